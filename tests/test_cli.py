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
