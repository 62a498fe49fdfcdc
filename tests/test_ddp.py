"""torchrun on CPU (gloo) against one process that sees the same global batch: two processes on
one node, and two nodes of one process each (c10d rendezvous on 127.0.0.1, as on a cluster)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tgdp_core as tg
from conftest import SyntheticAV

WORKER = Path(__file__).with_name("ddp_worker.py")
# the workers import the tgdp_core under test (this checkout), not whichever one is installed
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tg.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def ddp_cfg(tmp_path_factory):
    """Two steps with an evaluation at the last one (rank 0 evaluates, the other rank waits;
    both draw the masked views, whose InfoNCE gathers across ranks)."""
    from test_dataset import make_clips

    test_manifest = str(make_clips(tmp_path_factory.mktemp("test"), n=3))
    return tg.Config.preset("tiny", train=dict(steps=2, batch_size=8, log_every=1, checkpoint_every=2, warmup_steps=1,
                                               eval_every=2, keep_best="A->V R@1"),
                            data={"workers": 0, "test_manifest": test_manifest})


@pytest.fixture(scope="module")
def single(tmp_path_factory, ddp_cfg):
    """The one-process run both launches are compared with: (out_dir, history)."""
    out = tmp_path_factory.mktemp("single")
    return out, tg.train(ddp_cfg, out, dataset=SyntheticAV(ddp_cfg)).history


def torchrun(cfg, launch: list[str], out: Path) -> list[str]:
    """The torchrun command line for ddp_worker.py writing its run into ``out``."""
    return [sys.executable, "-m", "torch.distributed.run", *launch, str(WORKER), json.dumps(cfg.to_dict()), str(out)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def places(ddp_dir: Path) -> list[tuple[int, int]]:
    """(node, local rank) of each global rank, as torchrun placed the workers; world size 2."""
    ranks = [json.loads((ddp_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(p["world_size"] == 2 for p in ranks)
    return [(p["group_rank"], p["local_rank"]) for p in ranks]


def assert_same_run(ddp_dir: Path, single_dir: Path, history: list[dict], lr: float) -> None:
    ddp = [json.loads(line) for line in (ddp_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(ddp) == len(history) == 2
    for a, b in zip(ddp, history):
        for key in ("loss", "rec", "distill", "contrastive"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert "eval/A->V R@1" in ddp[1] and "eval/A->V R@1" in history[1]
    assert (ddp_dir / "best.pt").exists()
    assert len(list((ddp_dir / "tensorboard").iterdir())) == 1  # one events file: rank 0 only
    # same weights after two optimiser steps (DDP averaged the ranks' gradients). Adam moves
    # each weight by about lr per step whatever its gradient's size, so the tolerance is a
    # tenth of lr; the key biases are left out: softmax ignores them, their gradient is zero
    # up to rounding, and Adam turns that rounding noise into full-size steps.
    m1 = tg.load_model(ddp_dir / "last.pt")
    m2 = tg.load_model(single_dir / "last.pt")
    for (name, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        if name.endswith("qkv.bias"):  # [q | k | v] biases
            D = p1.shape[0] // 3
            p1, p2 = torch.cat([p1[:D], p1[2 * D:]]), torch.cat([p2[:D], p2[2 * D:]])
        assert torch.allclose(p1, p2, atol=0.1 * lr), name


def test_two_rank_run_matches_one_process(tmp_path, ddp_cfg, single):
    launch = ["--nproc_per_node", "2", "--master_port", str(free_port())]
    result = subprocess.run(torchrun(ddp_cfg, launch, tmp_path / "ddp"), capture_output=True, text=True, timeout=300,
                            cwd=WORKER.parent, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert places(tmp_path / "ddp") == [(0, 0), (0, 1)]  # one node, two processes
    assert_same_run(tmp_path / "ddp", *single, ddp_cfg.train.lr)


def test_two_nodes_match_one_process(tmp_path, ddp_cfg, single):
    """README's multi-node command, both nodes on this machine: each agent joins the c10d
    rendezvous at HOST:PORT (one of them hosts its store), one process per node."""
    endpoint = f"127.0.0.1:{free_port()}"
    launch = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
              "--rdzv-id", "tgdp-test"]
    nodes = [subprocess.Popen(torchrun(ddp_cfg, launch, tmp_path / "ddp"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=WORKER.parent, env=ENV) for _ in range(2)]
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-3000:]
    assert sorted(places(tmp_path / "ddp")) == [(0, 0), (1, 0)]  # two nodes, one process each
    assert_same_run(tmp_path / "ddp", *single, ddp_cfg.train.lr)
