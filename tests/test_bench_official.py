"""``bench --against-official``: the harness that runs the released TG-DP model's training step.

The official code is not part of this repository: the harness test uses a clone when one is
present (``TGDP_OFFICIAL_DIR``, a work tree, or the ``fetch`` tool's mirror beside the
project, ``../.mirror/wanglg20+TG-DP/repo``) and skips, saying why, otherwise.
"""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from tgdp_core.bench_official import ranked_masking

MIRROR = Path(__file__).resolve().parents[2] / ".mirror" / "wanglg20+TG-DP" / "repo"
# the official code fixes mel bins 128, 224-pixel frames and 12 blocks; everything else is small
SMALL = ["--model.audio_frames=32", "--model.mel_bins=128", "--model.image_size=224", "--model.specific_depth=11",
         "--model.embed_dim=32", "--model.num_heads=2", "--model.decoder_dim=32", "--model.decoder_heads=2",
         "--model.decoder_depth=1"]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A work tree of github.com/wanglg20/TG-DP, or a skip that names what is missing."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (the official model imports it): pip install timm")
    if os.environ.get("TGDP_OFFICIAL_DIR"):
        return Path(os.environ["TGDP_OFFICIAL_DIR"])
    if not (MIRROR / "HEAD").exists():
        pytest.skip(f"no clone of wanglg20/TG-DP: set TGDP_OFFICIAL_DIR to a work tree (none at {MIRROR})")
    tree = tmp_path_factory.mktemp("tgdp-official")
    archive = subprocess.run(["git", "--git-dir", str(MIRROR), "archive", "HEAD"], capture_output=True, check=True)
    archive_path = tree / "head.tar"
    archive_path.write_bytes(archive.stdout)
    with tarfile.open(archive_path) as tar:
        tar.extractall(tree, filter="data")
    return tree


def test_ranked_masking_keeps_the_teachers_top_ranks_in_mae_convention():
    x = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)
    ranks = torch.tensor([[5, 0, 3, 1, 2, 4], [1, 2, 0, 5, 4, 3]])
    kept, mask, ids_restore = ranked_masking(None, x, (ranks, torch.rand(2, 6)), 0.5)
    assert torch.equal(kept, torch.stack([x[0, [5, 0, 3]], x[1, [1, 2, 0]]]))
    assert torch.equal(mask, torch.tensor([[0., 1, 1, 0, 1, 0], [0, 0, 0, 1, 1, 1]]))  # 1 = removed
    # ids_restore puts [kept, removed] back in token order, as the decoder's gather expects
    shuffled = torch.cat([kept, torch.full((2, 3, 3), -1.0)], dim=1)
    restored = torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, 3))
    assert torch.equal(restored[mask == 0], x[mask == 0]) and (restored[mask == 1] == -1).all()
    assert torch.equal(ranked_masking(None, x, ranks, 0.5)[0], kept)  # the ranks alone work too


def test_against_official_runs_both_steps_in_turn_and_prints_the_table(official, tmp_path):
    out = tmp_path / "official.json"
    result = subprocess.run(
        [sys.executable, "-m", "tgdp_core", "bench", "--against-official", str(official), "--preset", "tiny",
         "--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "0", "--threads", "1", "--precision", "fp32",
         *SMALL, "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["step"] for r in report["rows"]] == ["dual path, contrastive 0.50, fp32", "single pass, fp32"]
    for row in report["rows"]:
        for side in ("official", "tgdp"):
            r = row[side]
            assert r["step_s"] > 0 and r["peak_memory_bytes"] > 0 and r["flops_per_sample"] > 0
            assert all(torch.isfinite(torch.tensor(r["losses"])))
        assert row["ratio"] == pytest.approx(row["official"]["step_s"] / row["tgdp"]["step_s"])
    # the official dual path computes more than its single pass (teacher, second pass), as tgdp's does
    dual, single = report["rows"]
    for side in ("official", "tgdp"):
        assert dual[side]["flops_per_sample"] > 1.5 * single[side]["flops_per_sample"]
    table = out.with_suffix(".md").read_text()
    assert "| step | official | tgdp | ratio |" in table and "| dual path, contrastive 0.50, fp32 |" in table
    assert len(report["targets"]) == 1 and "1.5x faster" in report["targets"][0]["name"]


def test_against_official_names_a_missing_clone(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tgdp_core", "bench", "--against-official", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "src/models/cavmae_dp.py: not found" in result.stderr
    assert "github.com/wanglg20/TG-DP" in result.stderr and "Traceback" not in result.stderr
