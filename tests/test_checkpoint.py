import argparse
import json
import os

import pytest
import torch

import tgdp_core as tg
from tgdp_core import checkpoint as ckpt

from conftest import REFERENCE_DIR, tiny_batch


def test_tgdp_checkpoint_round_trip(tmp_path, tiny_cfg):
    model = tg.build_model(tiny_cfg).eval()
    path = ckpt.save_checkpoint(ckpt.model_payload(model, step=3), tmp_path / "run" / "last.pt")
    loaded = tg.load_model(path)
    assert loaded.cfg == tiny_cfg
    audio, frames = tiny_batch(tiny_cfg)
    assert torch.equal(loaded.encode_audio(audio), model.encode_audio(audio))


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    model = tg.build_model(tiny_cfg)
    path = ckpt.save_checkpoint(ckpt.model_payload(model, step=1), tmp_path / "last.pt")

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is killed while writing

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(ckpt.model_payload(model, step=2), path)
    monkeypatch.undo()
    assert ckpt.read_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_unreadable_and_unsafe_checkpoints_are_refused(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        tg.load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="junk.pt: cannot be read"):
        tg.load_model(tmp_path / "junk.pt")

    # arbitrary objects never unpickle: every load is weights_only=True
    torch.save({"obj": argparse.Namespace(x=1)}, tmp_path / "pickle.pt")
    with pytest.raises(ckpt.CheckpointError, match="weights-only"):
        tg.load_model(tmp_path / "pickle.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ckpt.CheckpointError, match="not a tgdp checkpoint"):
        tg.load_model(tmp_path / "other.pt")


def test_weights_with_nan_or_inf_are_refused(tmp_path, tiny_cfg):
    """Issue 17, item 12: a diverged run's checkpoint must not serve "nan" scores."""
    model = tg.build_model(tiny_cfg)
    payload = ckpt.model_payload(model)
    payload["model"]["encoder.global_a"] = torch.full_like(payload["model"]["encoder.global_a"], float("nan"))
    payload["model"]["decoder.norm.bias"][0] = float("inf")
    path = ckpt.save_checkpoint(payload, tmp_path / "diverged.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"diverged.pt: 2 of \d+ tensors hold NaN or infinite values "
                                                   r"\((encoder.global_a|decoder.norm.bias), "):
        tg.load_model(path)
    assert ckpt.non_finite({"opt": {"state": {0: {"exp_avg": torch.tensor([1.0, float("-inf")]),
                                                  "step": torch.tensor(3)}}}}) == ["opt.state.0.exp_avg"]


def test_official_checkpoint_with_module_prefix_loads(tmp_path, reference):
    from test_reference import REFERENCE_MODEL

    state = {f"module.{k}": v for k, v in reference["state_dict"].items()}
    torch.save(state, tmp_path / "official.pt")
    cfg = tg.Config.preset("base", model=REFERENCE_MODEL)
    model = tg.load_model(tmp_path / "official.pt", cfg=cfg)
    feats = model.forward_features(reference["audio"], reference["visual"])
    assert (feats.audio - reference["global_a"]).abs().max() < 1e-5
    # without cfg, a non-base size is a clear error (head counts are not in the weights)
    with pytest.raises(ckpt.CheckpointError, match="pass cfg="):
        tg.load_model(tmp_path / "official.pt")


def test_missing_and_unknown_official_keys_are_listed(tmp_path, reference):
    from test_reference import REFERENCE_MODEL

    cfg = tg.Config.preset("base", model=REFERENCE_MODEL)
    state = dict(reference["state_dict"])
    del state["blocks_v.1.mlp.fc2.weight"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"missing \(1\): encoder.blocks_v.1.mlp.fc2.weight"):
        tg.load_model(tmp_path / "missing.pt", cfg=cfg)
    state = dict(reference["state_dict"], **{"constrative_head_audio.0.norm1.weight": torch.zeros(64)})
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(ckpt.CheckpointError, match="constrative_head_audio.0.norm1.weight"):
        tg.load_model(tmp_path / "extra.pt", cfg=cfg)


def test_official_base_key_listing_maps_onto_the_base_preset():
    path = REFERENCE_DIR / "cavmae_sync_base_keys.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    listing = json.loads(path.read_text())["keys"]
    state = {e["name"]: torch.empty(e["shape"], device="meta") for e in listing}
    assert ckpt.config_from_official(state) == tg.Config.preset("base")
    converted = ckpt.convert_official_state_dict(state)
    with torch.device("meta"):
        model = tg.build_model(tg.Config.preset("base"))
    own = model.state_dict()
    assert set(converted) == set(own)
    assert all(converted[k].shape == own[k].shape for k in own)
    dropped = {e["name"] for e in listing} - {k for k in state if not ckpt._UNUSED_OFFICIAL.match(k)}
    assert sum(e["shape"][0] for e in listing if e["name"] in dropped) == 167_936
