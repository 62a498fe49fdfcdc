"""Export without pickle: model.safetensors + config.json, read back by load_model (issue 15)."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tgdp_core as tg
from tgdp_core import checkpoint as ckpt
from tgdp_core import export
from tgdp_core.teacher import EMATeacher

from conftest import tiny_batch


@pytest.fixture
def trained_checkpoint(tmp_path, tiny_cfg):
    """A training checkpoint whose EMA teacher differs from the student (as after some steps)."""
    model = tg.build_model(tiny_cfg).eval()
    teacher = EMATeacher(model.encoder)
    with torch.no_grad():
        for p in teacher.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    payload = ckpt.model_payload(model, step=7, teacher=teacher.state_dict(), optimizer={"state": {}})
    return ckpt.save_checkpoint(payload, tmp_path / "run" / "last.pt"), model, teacher


def test_export_round_trip_gives_equal_tensors_and_embeddings(tmp_path, tiny_cfg, trained_checkpoint):
    path, model, _ = trained_checkpoint
    out = export.export_checkpoint(path, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert tg.Config.load(out / "config.json") == tiny_cfg
    weights = load_file(out / "model.safetensors")
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata()["encoder"] == "student" and f.metadata()["step"] == "7"
    audio, frames = tiny_batch(tiny_cfg)
    for source in (out, out / "model.safetensors"):  # the folder or the file
        loaded = tg.load_model(source)
        assert loaded.cfg == tiny_cfg and not loaded.training
        assert torch.equal(loaded.encode_audio(audio), model.encode_audio(audio))
        assert torch.equal(loaded.encode_visual(frames), model.encode_visual(frames))
    assert ckpt.load_teacher_encoder(out) is None  # an export holds one encoder
    again = export.export_checkpoint(out, tmp_path / "again")  # an export of an export is the same
    assert load_file(again / "model.safetensors").keys() == weights.keys()


def test_teacher_export_holds_the_ema_encoder_and_the_student_decoder(tmp_path, tiny_cfg, trained_checkpoint):
    path, model, teacher = trained_checkpoint
    out = export.export_checkpoint(path, tmp_path / "teacher", teacher=True)
    loaded = tg.load_model(out)
    for name, value in teacher.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[name], value), name
    for name, value in model.decoder.state_dict().items():
        assert torch.equal(loaded.decoder.state_dict()[name], value), name
    audio, _ = tiny_batch(tiny_cfg)
    assert not torch.equal(loaded.encode_audio(audio), model.encode_audio(audio))
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata()["encoder"] == "EMA teacher"
    ckpt.save_checkpoint(ckpt.model_payload(model), tmp_path / "student_only.pt")
    with pytest.raises(ckpt.CheckpointError, match="student_only.pt holds no EMA teacher.*without --teacher"):
        export.export_checkpoint(tmp_path / "student_only.pt", tmp_path / "x", teacher=True)


def test_folder_without_config_is_a_clear_error(tmp_path, tiny_cfg):
    out = export.save_export(tg.build_model(tiny_cfg), tmp_path / "exp")
    (out / "config.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"exp: no config.json beside the weights.*python -m tgdp_core export"):
        tg.load_model(out)
    with pytest.raises(ckpt.CheckpointError, match="no config.json"):
        tg.load_model(out / "model.safetensors")
    # a run folder (config.json, last.pt, no export) points at its checkpoint
    run = tmp_path / "run"
    ckpt.save_checkpoint(ckpt.model_payload(tg.build_model(tiny_cfg)), run / "last.pt")
    tiny_cfg.save(run / "config.json")
    with pytest.raises(ckpt.CheckpointError, match=r"model.safetensors: no such file; a run folder\? load .*last.pt"):
        tg.load_model(run)


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_safetensors_with_missing_or_extra_tensors_is_a_clear_error(tmp_path, tiny_cfg, change):
    out = export.save_export(tg.build_model(tiny_cfg), tmp_path / "exp")
    weights = load_file(out / "model.safetensors")
    if change == "missing":
        del weights["encoder.norm_a.weight"]
    elif change == "extra":
        weights["head.weight"] = torch.zeros(3)
    else:
        weights["encoder.norm_a.weight"] = torch.zeros(3)
    save_file(weights, out / "model.safetensors")
    title = {"missing": r"missing \(1\): encoder.norm_a.weight", "extra": r"unexpected \(1\): head.weight",
             "shape": r"wrong shape \(1\): encoder.norm_a.weight"}[change]
    with pytest.raises(ckpt.CheckpointError, match=rf"(?s)exp/model.safetensors does not fit.*{title}.*re-export"):
        tg.load_model(out)


def test_export_command(tmp_path, tiny_cfg, trained_checkpoint):
    path, model, _ = trained_checkpoint
    result = subprocess.run([sys.executable, "-m", "tgdp_core", "export", str(path), str(tmp_path / "cli"), "--teacher"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "model.safetensors" in result.stdout and "EMA teacher" in result.stdout
    assert json.loads((tmp_path / "cli" / "config.json").read_text()) == tiny_cfg.to_dict()
    result = subprocess.run([sys.executable, "-m", "tgdp_core", "export", str(tmp_path / "nothing.pt"), str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "nothing.pt: no such checkpoint file" in result.stderr
    assert "Traceback" not in result.stderr
