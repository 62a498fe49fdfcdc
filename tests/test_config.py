import json

import pytest

import tgdp_core as tg


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
@pytest.mark.parametrize("method", ["tgdp", "sync", "cavmae"])
def test_json_round_trip(name, method):
    cfg = tg.Config.preset(name, method=method)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert tg.Config.from_dict(data) == cfg


def test_preset_name_is_recorded_and_old_configs_still_load():
    cfg = tg.Config.preset("small", method="sync")
    assert cfg.preset_name == "small" and tg.Config().preset_name == "base"
    old = {("preset" if k == "preset_name" else k): v for k, v in cfg.to_dict().items()}
    assert tg.Config.from_dict(old) == cfg


def test_configs_with_warm_up_step_counts_still_load_with_the_same_schedule():
    from tgdp_core.teacher import guidance_active
    from tgdp_core.trainer import contrastive_ratio_at

    new = tg.Config.preset("tiny")
    old = new.to_dict()  # tiny as saved before issue 12: step counts 250 of 400
    del old["objective"]["contrastive_mask_warmup_fraction"], old["teacher"]["guidance_warmup_fraction"]
    old["objective"]["contrastive_mask_warmup_steps"] = old["teacher"]["guidance_warmup_steps"] = 250
    assert tg.Config.from_dict(old) == new
    for step in range(400):  # the old rules, step for step
        assert guidance_active(new, step) == (step >= 250)
        assert contrastive_ratio_at(step, new) == (0.5 if step >= 250 else 0.5 * step / 250)
    # a short run of the old tiny preset (warm-ups past its end) loads: guidance never starts
    old["train"]["steps"] = 4
    short = tg.Config.from_dict(old)
    assert short.teacher.guidance_warmup_fraction == 1.0 and not any(guidance_active(short, s) for s in range(4))


def test_overrides_by_keyword_section_and_dotted_name():
    cfg = tg.Config.preset("tiny", method="sync", model={"embed_dim": 192, "num_heads": 6},
                           **{"objective.temperature": 0.3, "train.betas": [0.9, 0.98]})
    assert (cfg.method, cfg.model.embed_dim, cfg.model.num_heads) == ("sync", 192, 6)
    assert cfg.objective.temperature == 0.3 and cfg.train.betas == (0.9, 0.98)
    cfg.override("--objective.selection=random", "model.global_token=true", "train.steps=7", "train.betas=[0.8,0.9]")
    assert (cfg.objective.selection, cfg.model.global_token, cfg.train.steps, cfg.train.betas) == ("random", True, 7, (0.8, 0.9))


def test_base_preset_is_the_paper_architecture_and_recipe():
    cfg = tg.Config.preset("base")
    m, o = cfg.model, cfg.objective
    assert (m.embed_dim, m.num_heads, m.specific_depth, m.decoder_dim, m.decoder_depth, m.decoder_heads) == (768, 12, 11, 512, 8, 16)
    assert (m.num_audio_patches, m.num_visual_patches, m.audio_grid) == (208, 196, (8, 26))
    assert (o.rec_mask_ratio, o.contrastive_mask_ratio, o.temperature, o.contrastive_weight) == (0.75, 0.5, 0.05, 0.01)


def test_cavmae_method_defaults_and_overrides():
    cfg = tg.Config.preset("base", method="cavmae")
    assert (cfg.model.global_token, cfg.model.num_registers, cfg.model.audio_frames) == (False, 0, 1024)
    assert cfg.model.num_audio_patches == 512
    assert tg.Config.preset("base", method="cavmae", model={"audio_frames": 416}).model.audio_frames == 416


@pytest.mark.parametrize("call,message", [
    (lambda: tg.Config.preset("huge"), "unknown preset 'huge'; valid presets: base, small, tiny"),
    (lambda: tg.Config.preset("tiny", method="clip"), "valid methods: tgdp, sync, cavmae"),
    (lambda: tg.Config.preset("tiny", model={"width": 3}), "unknown field 'width' in model; valid fields: embed_dim"),
    (lambda: tg.Config.preset("tiny", **{"optim.lr": 1}), "unknown config section 'optim'; valid sections: model"),
    (lambda: tg.Config.preset("tiny", learning_rate=1), "unknown field 'learning_rate' in config"),
    (lambda: tg.Config.from_dict({"model": {"depth": 2}}), r"unknown field\(s\) depth in model"),
    (lambda: tg.Config.preset("tiny", objective={"selection": "topk"}), "selection 'topk' is not one of guided"),
    (lambda: tg.Config.preset("tiny", objective={"contrastive_mask_ratio": 1.0}), r"mask ratios must lie in \[0, 1\)"),
    (lambda: tg.Config.preset("tiny", model={"global_token": False}), "needs model.global_token=True"),
    (lambda: tg.Config.preset("tiny").override("train.steps"), "section.field=value"),
    (lambda: tg.Config.preset("tiny", teacher={"guidance_warmup_fraction": 250}),
     r"teacher.guidance_warmup_fraction=250 is a share of train.steps: it must lie in \[0, 1\]"),
    (lambda: tg.Config.preset("tiny", objective={"rec_selection": "top"}), "rec_selection 'top' is not one of random"),
    (lambda: tg.Config.preset("tiny", method="sync", objective={"rec_selection": "guided"}), "needs the EMA teacher"),
    (lambda: tg.Config.preset("tiny", objective={"selection_temperature": 0.0}), "selection_temperature must be positive"),
    (lambda: tg.Config.preset("tiny", objective={"single_pass_mask_warmup_fraction": -0.1}),
     r"single_pass_mask_warmup_fraction=-0.1 is a share of train.steps"),
    (lambda: tg.Config.preset("tiny", train={"probe_every": -5}), r"probe_every must be >= 0 \(0 = off\)"),
])
def test_bad_configs_are_rejected_with_the_valid_names(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("field,bad,good,message", [  # issue 17, item 8: nonsense is refused with the valid range
    ("train.batch_size", "0", "1", r"train.batch_size=0 must be >= 1"),
    ("train.batch_size", "-4", "1", r"train.batch_size=-4 must be >= 1"),
    ("train.steps", "0", "1", r"train.steps=0 must be >= 1"),
    ("train.log_every", "0", "1", r"train.log_every=0 must be >= 1"),
    ("train.checkpoint_every", "0", "1", r"train.checkpoint_every=0 must be >= 1"),
    ("train.keep_checkpoints", "0", "1", r"train.keep_checkpoints=0 must be >= 1"),
    ("objective.temperature", "nan", "0.1", r"objective.temperature=nan must be a finite number > 0"),
    ("objective.temperature", "inf", "0.1", r"objective.temperature=inf must be a finite number > 0"),
    ("objective.temperature", "0", "0.1", r"objective.temperature=0.0 must be a finite number > 0"),
    ("train.lr", "nan", "0", r"train.lr=nan must be a finite number >= 0"),
    ("train.lr", "inf", "0", r"train.lr=inf must be a finite number >= 0"),
    ("train.lr", "-1e-3", "0", r"train.lr=-0.001 must be a finite number >= 0"),
    ("train.grad_clip", "-1", "0", r"train.grad_clip=-1.0 must be a finite number >= 0"),
    ("train.betas", "[0.9,1.0]", "[0.9,0.99]", r"train.betas=\(0.9, 1.0\) must lie in \[0, 1\)"),
])
def test_out_of_range_values_are_rejected_with_the_valid_range(field, bad, good, message):
    with pytest.raises(ValueError, match=message):
        tg.Config.preset("tiny").override(f"{field}={bad}")
    tg.Config.preset("tiny").override(f"{field}={good}")  # the lowest sensible values pass


def test_differences_name_each_changed_field():
    a, b = tg.Config.preset("tiny"), tg.Config.preset("tiny", train={"lr": 2e-3, "seed": 3})
    assert a.differences(b) == {"train.lr": (1e-3, 2e-3), "train.seed": (0, 3)}
    assert a.differences(tg.Config.preset("tiny")) == {}
    with pytest.raises(ValueError, match="unknown field 'stpes' in train"):
        a.check_field("train.stpes")
