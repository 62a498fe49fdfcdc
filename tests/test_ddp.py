"""Two-process torchrun on CPU (gloo) against one process that sees the same global batch."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tgdp_core as tg
from conftest import SyntheticAV


def test_two_rank_run_matches_one_process(tmp_path):
    from test_dataset import make_clips

    # with an evaluation at the last step (rank 0 evaluates, rank 1 waits; both draw the
    # masked views, whose InfoNCE gathers across ranks)
    test_manifest = str(make_clips(tmp_path / "test", n=3))
    cfg = tg.Config.preset("tiny", train=dict(steps=2, batch_size=8, log_every=1, checkpoint_every=2, warmup_steps=1,
                                              eval_every=2, keep_best="A->V R@1"),
                           data={"workers": 0, "test_manifest": test_manifest})
    env_script = Path(__file__).with_name("ddp_worker.py")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(env_script), json.dumps(cfg.to_dict()), str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=300, cwd=env_script.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]

    single = tg.train(cfg, tmp_path / "single", dataset=SyntheticAV(cfg))
    assert len(ddp) == len(single.history) == 2
    for a, b in zip(ddp, single.history):
        for key in ("loss", "rec", "distill", "contrastive"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert "eval/A->V R@1" in ddp[1] and "eval/A->V R@1" in single.history[1]
    assert (tmp_path / "ddp" / "best.pt").exists()
    assert len(list((tmp_path / "ddp" / "tensorboard").iterdir())) == 1  # one events file: rank 0 only
    # same weights after two optimiser steps (DDP averaged the ranks' gradients). Adam moves
    # each weight by about lr per step whatever its gradient's size, so the tolerance is a
    # tenth of lr; the key biases are left out: softmax ignores them, their gradient is zero
    # up to rounding, and Adam turns that rounding noise into full-size steps.
    m1 = tg.load_model(tmp_path / "ddp" / "last.pt")
    m2 = tg.load_model(tmp_path / "single" / "last.pt")
    for (name, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        if name.endswith("qkv.bias"):  # [q | k | v] biases
            D = p1.shape[0] // 3
            p1, p2 = torch.cat([p1[:D], p1[2 * D:]]), torch.cat([p2[:D], p2[2 * D:]])
        assert torch.allclose(p1, p2, atol=0.1 * cfg.train.lr), name
