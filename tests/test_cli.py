import subprocess
import sys


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
