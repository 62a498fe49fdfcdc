import subprocess
import sys
from pathlib import Path


def run(*args):
    return subprocess.run([sys.executable, "-m", "tgdp_core", *args], capture_output=True, text=True, timeout=300)


def test_step_command_prints_the_losses_of_each_step():
    result = run("step", "--preset", "tiny", "--steps", "2", "--batch", "4", "--objective.contrastive_mask_ratio=0.65")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all("rec" in l and "distill" in l and "contrastive" in l for l in lines)


def test_bad_override_is_one_clear_line():
    result = run("step", "--model.widht=3")
    assert result.returncode != 0
    assert "unknown field 'widht' in model; valid fields:" in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_command_prints_a_table_and_writes_json(tmp_path):
    import json

    import tgdp_core as tg
    from tgdp_core.checkpoint import model_payload, save_checkpoint
    from test_dataset import make_clips

    manifest = make_clips(tmp_path / "data", n=4)
    cfg = tg.Config.preset("tiny", data={"workers": 0})
    save_checkpoint(model_payload(tg.build_model(cfg)), tmp_path / "model.pt")
    result = run("eval", str(tmp_path / "model.pt"), str(manifest), "--clips", "3", "--out", str(tmp_path / "m.json"))
    assert result.returncode == 0, result.stderr
    assert "| tgdp |" in result.stdout and "A->V R@1" in result.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0 <= metrics["V->A R@1"] <= 100 and metrics["A->V MedR"] <= 3


def test_ablate_names_a_bad_curriculum_or_row_in_one_line_before_any_work():
    result = run("ablate", "--curriculum", "half")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "unknown curriculum 'half'; valid: equal, none, preset" in result.stderr
    result = run("ablate", "--rows", "nope")
    assert "unknown ablation rows ['nope']" in result.stderr


def test_ablate_starts_every_row_from_the_preset_it_is_given(monkeypatch, tmp_path):
    from tgdp_core import __main__ as cli
    from tgdp_core import experiments

    seen = []

    def fake_ablate(out, cfg=None, curriculum="equal", **kw):
        seen.append(cfg.preset_name)
        (Path(out) / f"ablation-{curriculum}.md").write_text("table")

    monkeypatch.setattr(experiments, "ablate", fake_ablate)
    cli.main(["ablate", "--out", str(tmp_path)])
    cli.main(["ablate", "--out", str(tmp_path), "--preset", "small", "--curriculum", "preset"])
    assert seen == ["tiny", "small"]


# ---------------------------------------------------------------------------- issue 17
def test_train_passes_allow_change_and_refuses_nonsense_before_work(monkeypatch, tmp_path):
    """Items 3 and 8: --allow-change reaches tgdp_core.train; --train.steps=0 is refused by validate."""
    import pytest

    from tgdp_core import __main__ as cli
    from tgdp_core import trainer

    seen = {}
    monkeypatch.setattr(trainer, "train", lambda cfg, **kw: seen.update(kw, cfg=cfg) or trainer.TrainResult(tmp_path, None))
    cli.main(["train", "--out", str(tmp_path), "--train.steps=800", "--allow-change", "train.steps",
              "--allow-change", "train.lr, objective.temperature"])
    assert seen["allow_change"] == ["train.steps", "train.lr", "objective.temperature"]
    assert seen["cfg"].train.steps == 800 and seen["resume"] is True
    with pytest.raises(SystemExit, match=r"error: invalid config: train.steps=0 must be >= 1"):
        cli.main(["train", "--out", str(tmp_path), "--train.steps=0"])


def test_eval_refuses_clips_below_one_and_reports_skipped_clips_and_a_small_gallery(tmp_path):
    """Items 8, 4 and 14 through the command line."""
    import tgdp_core as tg
    from tgdp_core.checkpoint import model_payload, save_checkpoint
    from test_dataset import make_clips

    manifest = make_clips(tmp_path / "data", n=3)
    save_checkpoint(model_payload(tg.build_model(tg.Config.preset("tiny"))), tmp_path / "model.pt")
    for clips in ("0", "-1"):
        result = run("eval", str(tmp_path / "model.pt"), str(manifest), "--clips", clips)
        assert result.returncode == 2 and f"must be at least 1, got {clips}" in result.stderr, result.stderr
    (tmp_path / "data" / "audio" / "clip2.wav").write_bytes(b"garbage")
    result = run("eval", str(tmp_path / "model.pt"), str(manifest), "--data.on_error=skip", "--data.workers=0")
    assert result.returncode == 0, result.stderr
    assert "2 clips" in result.stdout and "(1 of the 3 clips in" in result.stdout
    assert "were skipped (data.on_error=skip) and are not in the table, e.g. clip2: " in result.stdout
    assert "gallery of only 2 clip(s)" in result.stderr
    (tmp_path / "out").mkdir()
    result = run("eval", str(tmp_path / "model.pt"), str(manifest), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "is a folder; give a file name" in result.stderr and "Traceback" not in result.stderr
