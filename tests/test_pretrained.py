"""Pretrained starts (train.init_from, checkpoint.load_pretrained): each source format is built
here, at the tiny preset's sizes, and every tensor is checked where the mapping puts it."""
import json

import pytest
import torch

import tgdp_core as tg
from tgdp_core import checkpoint as ckpt
from tgdp_core import trainer as T

from conftest import SyntheticAV

POSITION_TABLES = {"encoder.pos_embed_a", "encoder.pos_embed_v", "decoder.pos_embed_a", "decoder.pos_embed_v"}


def run_cfg(**train):
    over = dict(steps=1, batch_size=4, log_every=1, warmup_steps=1, checkpoint_every=1, lr=0.0)
    over.update(train)
    return tg.Config.preset("tiny", train=over, data={"workers": 0})


def mae_state(cfg, blocks=None, width=None):
    """Random weights in the MAE release's names for a ViT of cfg's width, patch and image size."""
    m = cfg.model
    D, p, H = width or m.embed_dim, m.patch_size, int(m.embed_dim * m.mlp_ratio) if width is None else 4 * width
    g = torch.Generator().manual_seed(7)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    state = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + m.num_visual_patches, D),
             "patch_embed.proj.weight": r(D, 3, p, p), "patch_embed.proj.bias": r(D),
             "norm.weight": r(D), "norm.bias": r(D)}
    for i in range(m.specific_depth + 1 if blocks is None else blocks):
        for name, shape in (("norm1", (D,)), ("norm2", (D,)), ("attn.qkv", (3 * D, D)), ("attn.proj", (D, D)),
                            ("mlp.fc1", (H, D)), ("mlp.fc2", (D, H))):
            if len(shape) == 2:
                state[f"blocks.{i}.{name}.weight"], state[f"blocks.{i}.{name}.bias"] = r(*shape), r(shape[0])
            else:
                state[f"blocks.{i}.{name}.weight"], state[f"blocks.{i}.{name}.bias"] = r(D), r(D)
    return state


def mae_expected(mae, cfg):
    """The issue's mapping, written out independently of the loader: tgdp name -> tensor."""
    S = cfg.model.specific_depth
    want = {"encoder.global_a": mae["cls_token"], "encoder.global_v": mae["cls_token"],
            "encoder.patch_embed_v.proj.weight": mae["patch_embed.proj.weight"],
            "encoder.patch_embed_a.proj.weight": mae["patch_embed.proj.weight"].sum(1, keepdim=True),
            "encoder.patch_embed_v.proj.bias": mae["patch_embed.proj.bias"],
            "encoder.patch_embed_a.proj.bias": mae["patch_embed.proj.bias"]}
    for key, value in mae.items():
        parts = key.split(".")
        if parts[0] == "norm":
            for n in ("norm", "norm_a", "norm_v"):
                want[f"encoder.{n}.{parts[1]}"] = value
        elif parts[0] == "blocks" and int(parts[1]) < S:
            rest = ".".join(parts[2:])
            want[f"encoder.blocks_a.{parts[1]}.{rest}"] = want[f"encoder.blocks_v.{parts[1]}.{rest}"] = value
        elif parts[0] == "blocks":
            rest = ".".join(parts[2:])
            want[f"encoder.joint.{rest}"] = value
            if parts[2] in ("norm1", "norm2"):
                for m in "av":
                    want[f"encoder.joint.{parts[2]}_{m}.{parts[3]}"] = value
    return want


def to_official(state):
    """tgdp names -> the official CAVMAE_DP names (the inverse of checkpoint._RENAMES)."""
    out = {}
    for key, value in state.items():
        if key in ("encoder.registers_a", "encoder.registers_v"):
            continue
        name = key
        for old, new in (("encoder.global_", "cls_token_"), ("encoder.joint.", "blocks_u.0."), ("encoder.", ""),
                         ("decoder.blocks.", "decoder_blocks."), ("decoder.mask_token", "mask_token"),
                         ("decoder.embed.", "decoder_embed."), ("decoder.norm.", "decoder_norm."),
                         ("decoder.", "decoder_")):
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = value
    out["register_tokens"] = torch.cat([state["encoder.registers_a"][0], state["encoder.registers_v"][0]])
    return out


def assert_state(model, want):
    own = model.state_dict()
    for name, value in want.items():
        assert torch.equal(own[name], value), name


def source_model(cfg, seed=1):
    torch.manual_seed(seed)
    return tg.build_model(cfg)


# ---------------------------------------------------------------------- the mapping, per source
def test_mae_weights_land_where_the_mapping_says(tmp_path):
    cfg = tg.Config.preset("tiny")
    mae = mae_state(cfg)
    torch.save({"model": mae}, tmp_path / "mae_pretrain_vit.pth")  # the MAE release's container
    model = tg.build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = ckpt.load_pretrained(model, tmp_path / "mae_pretrain_vit.pth")

    want = mae_expected(mae, cfg)
    assert_state(model, want)
    assert report.source == "mae" and set(report.loaded) == set(want)
    assert report.loaded["encoder.joint.norm1_v.weight"] == f"blocks.{cfg.model.specific_depth}.norm1.weight"
    fresh = {k for k in before if k.startswith("decoder.")} | POSITION_TABLES | {
        "encoder.modality_a", "encoder.modality_v", "encoder.registers_a", "encoder.registers_v"}
    assert set(report.fresh) == fresh == set(before) - set(want)
    assert_state(model, {k: before[k] for k in fresh})  # untouched: decoder, modality tokens, sin-cos tables
    assert set(report.dropped) == {"pos_embed"} and "sin-cos" in report.dropped["pos_embed"]
    assert "loaded 80 tensors" in report.summary() and "decoder.blocks (12)" in report.summary()


def test_full_mae_checkpoint_maps_its_decoder_as_cav_mae_does(tmp_path):
    cfg = tg.Config.preset("tiny")
    m, p = cfg.model, cfg.model.patch_size
    mae = mae_state(cfg)
    decoder = source_model(cfg).decoder.state_dict()  # decoder tensors of the right shapes, MAE names
    mae.update({"mask_token": decoder["mask_token"], "decoder_pos_embed": torch.zeros(1, 1 + m.num_visual_patches, m.decoder_dim),
                "decoder_embed.weight": decoder["embed.weight"], "decoder_embed.bias": decoder["embed.bias"],
                "decoder_norm.weight": decoder["norm.weight"], "decoder_norm.bias": decoder["norm.bias"],
                "decoder_pred.weight": decoder["pred_v.weight"], "decoder_pred.bias": decoder["pred_v.bias"]})
    mae.update({f"decoder_blocks.{k[len('blocks.'):]}": v for k, v in decoder.items() if k.startswith("blocks.")})
    ckpt.save_checkpoint(mae, tmp_path / "full.pth")
    model = tg.build_model(cfg)
    report = ckpt.load_pretrained(model, tmp_path / "full.pth")
    want = {f"decoder.{k}": v for k, v in decoder.items() if not k.startswith(("pos_embed", "modality", "pred_a"))}
    want["decoder.pred_a.weight"] = decoder["pred_v.weight"][: p * p]
    want["decoder.pred_a.bias"] = decoder["pred_v.bias"][: p * p]
    assert_state(model, want)
    assert {"pos_embed", "decoder_pos_embed"} == set(report.dropped)
    assert {"decoder.modality_a", "decoder.modality_v"} <= set(report.fresh)


def test_official_state_dict_loads_through_the_conversion(tmp_path):
    cfg = tg.Config.preset("tiny")
    source = source_model(cfg).state_dict()
    official = {f"module.{k}": v for k, v in to_official(source).items()}  # saved from DataParallel
    official["module.blocks_a.0.norm1_a.weight"] = torch.ones(cfg.model.embed_dim)  # an unused official norm
    torch.save(official, tmp_path / "official.pth")
    model = tg.build_model(cfg)
    report = ckpt.load_pretrained(model, tmp_path / "official.pth")
    assert_state(model, source)
    assert report.source == "official"
    assert report.loaded["encoder.global_a"] == "cls_token_a" and report.loaded["encoder.registers_v"] == "register_tokens"
    assert set(report.fresh) == POSITION_TABLES  # fixed tables: the model's own, equal to the source's
    assert "blocks_a.0.norm1_a.weight" in report.dropped and "pos_embed_a" in report.dropped

    # without its decoder (an encoder-only export): the decoder starts fresh, and says so
    encoder_only = {k: v for k, v in official.items() if "decoder" not in k and "mask_token" not in k}
    torch.save(encoder_only, tmp_path / "encoder_only.pth")
    fresh_model = tg.build_model(cfg)
    decoder_before = {k: v.clone() for k, v in fresh_model.decoder.state_dict().items()}
    report = ckpt.load_pretrained(fresh_model, tmp_path / "encoder_only.pth")
    assert {f"decoder.{k}" for k in decoder_before} <= set(report.fresh)
    assert all(torch.equal(v, decoder_before[k]) for k, v in fresh_model.decoder.state_dict().items())


def test_tgdp_checkpoint_and_exported_weights_load_model_only(tmp_path):
    from safetensors.torch import save_file

    cfg = tg.Config.preset("tiny")
    source = source_model(cfg)
    ckpt.save_checkpoint(ckpt.model_payload(source, step=5, optimizer={"state": {}}), tmp_path / "run.pt")
    export = tmp_path / "export"
    export.mkdir()
    save_file(source.state_dict(), export / "model.safetensors")
    (export / "config.json").write_text(json.dumps(cfg.to_dict()))
    for path in (tmp_path / "run.pt", export, export / "model.safetensors"):
        model = tg.build_model(cfg)
        report = ckpt.load_pretrained(model, path)
        assert_state(model, source.state_dict())
        assert report.source == "tgdp" and set(report.dropped) == POSITION_TABLES, path

    # head counts are not in the shapes: the saved config must agree
    (export / "config.json").write_text(json.dumps(tg.Config.preset("tiny", model={"num_heads": 2}).to_dict()))
    with pytest.raises(ckpt.CheckpointError, match="num_heads=2"):
        ckpt.load_pretrained(tg.build_model(cfg), export)


# ---------------------------------------------------------------------- errors name what does not fit
def test_tensors_without_a_place_or_of_another_shape_are_errors_that_name_them(tmp_path):
    cfg = tg.Config.preset("tiny")
    model = tg.build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (dict(mae_state(cfg), **{"head.weight": torch.zeros(10, 128)}), "head.weight"),  # a classifier head
        (mae_state(cfg, blocks=12), r"blocks 3\.\.11 \(the model takes blocks 0\.\.2"),  # ViT-B depth into tiny
        (mae_state(cfg, width=64), r"wrong shape \(80\): blocks.0.attn.proj.bias \(64,\) -> encoder.blocks_a.0.attn.proj.bias \(128,\)"),
        ({"weights": torch.zeros(3)}, "not tgdp, official"),
    ]
    diverged = mae_state(cfg)
    diverged["blocks.1.mlp.fc1.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), 1.0])
    cases.append((diverged, r"NaN or infinite values .*: blocks\.1\.mlp\.fc1\.weight \(2 of"))
    for i, (state, message) in enumerate(cases):
        torch.save(state, tmp_path / f"bad{i}.pth")
        with pytest.raises(ckpt.CheckpointError, match=message):
            ckpt.load_pretrained(model, tmp_path / f"bad{i}.pth")
    assert_state(model, before)  # nothing was copied
    sync_state = source_model(tg.Config.preset("tiny")).state_dict()
    torch.save(sync_state, tmp_path / "tgdp_names.pth")
    cavmae = tg.build_model(tg.Config.preset("tiny", method="cavmae"))  # no global or register tokens
    with pytest.raises(ckpt.CheckpointError, match="no such tensor in the model.*encoder.global_a"):
        ckpt.load_pretrained(cavmae, tmp_path / "tgdp_names.pth")
    with pytest.raises(ckpt.CheckpointError, match="no such weights file"):
        ckpt.load_pretrained(model, tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------- the trainer starts there
def _source_file(kind, cfg, tmp_path):
    """(path, the tgdp tensors it must put into the model) for one source format."""
    if kind == "mae":
        mae = mae_state(cfg)
        torch.save({"model": mae}, tmp_path / "mae.pth")
        return tmp_path / "mae.pth", mae_expected(mae, cfg)
    source = source_model(cfg).state_dict()
    if kind == "official":
        torch.save(to_official(source), tmp_path / "official.pth")
        return tmp_path / "official.pth", source
    run = T.train(run_cfg(seed=3), tmp_path / "source_run", dataset=SyntheticAV(cfg))
    return run.checkpoint, ckpt.read_checkpoint(run.checkpoint)["model"]


@pytest.mark.parametrize("kind", ["mae", "official", "tgdp"])
def test_training_starts_from_the_loaded_weights(tmp_path, kind, capsys):
    """lr 0: one real step leaves the weights where step 0 began, so last.pt shows the start."""
    cfg = run_cfg()
    path, want = _source_file(kind, cfg, tmp_path)
    cfg.override(f"train.init_from={path}")  # the CLI's --train.init_from=PATH
    result = T.train(cfg, tmp_path / "run", dataset=SyntheticAV(cfg))
    data = ckpt.read_checkpoint(result.checkpoint)
    student = tg.build_model(cfg)
    student.load_state_dict(data["model"])
    assert_state(student, want)
    teacher = ckpt.load_teacher_encoder(result.checkpoint, student)  # a copy of the loaded student
    assert all(torch.equal(v, student.encoder.state_dict()[k]) for k, v in teacher.state_dict().items())
    assert data["step"] == 1 and [r["step"] for r in result.history] == [1]  # fresh step count
    assert all(s["step"] == 1 for s in data["optimizer"]["state"].values())  # and a fresh optimiser
    saved = json.loads((tmp_path / "run" / "init_from.json").read_text())
    assert saved["source"] == kind and set(saved["loaded"]) >= set(want) - POSITION_TABLES
    assert f"init_from {path} ({kind} weights" in capsys.readouterr().out


def test_resume_wins_over_init_from_and_says_so(tmp_path, capsys):
    cfg = run_cfg(lr=1e-3)
    T.train(cfg, tmp_path / "run", dataset=SyntheticAV(cfg))
    last = ckpt.read_checkpoint(tmp_path / "run" / "last.pt")["model"]
    path, _ = _source_file("mae", cfg, tmp_path)
    longer = run_cfg(lr=1e-3, steps=2, init_from=str(path))
    run = T.setup_run(longer, tmp_path / "run", resume=True, dataset=SyntheticAV(longer),
                      allow_change=("train.steps",))  # extending the run; init_from may change on resume
    run.close()
    assert run.start_step == 1 and run.init is None
    assert_state(run.student, last)
    assert "its weights win, train.init_from=" in capsys.readouterr().out
