"""Quickstart and ablation plumbing on a very small AV-Digits set (numbers are not the point here)."""
import json

import pytest

import tgdp_core as tg
from tgdp_core import experiments
from tgdp_core.avdigits import generate


@pytest.fixture(scope="module")
def small_cfg(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("avd"), n_train=12, n_test=8, workers=1)
    data = {"train_manifest": str(root / "train.json"), "test_manifest": str(root / "test.json"),
            "label_csv": str(root / "labels.csv"), "workers": 0}
    return tg.Config.preset("tiny", data=data, train={"batch_size": 4, "log_every": 1, "warmup_steps": 1})


def test_quickstart_writes_one_table_and_reuses_finished_runs(tmp_path, small_cfg, monkeypatch):
    rows = experiments.quickstart(tmp_path, steps=2, probe_clips=12, cfg=small_cfg)
    assert list(rows) == ["chance", "untrained", "sync", "tgdp"]
    assert rows["chance"]["A->V R@1"] == pytest.approx(100 / 8) and 0 < rows["chance"]["A->V pair P@1"] < 30
    for method in ("sync", "tgdp"):
        assert tg.Config.load(tmp_path / method / "config.json").method == method
        assert {"A->V R@1", "V->A R@10", "A->V pair P@1", "mAP", "train s"} <= set(rows[method])
    assert "| tgdp |" in (tmp_path / "table.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["sync"] == rows["sync"]
    assert (tmp_path / "quickstart.png").stat().st_size > 10_000
    monkeypatch.setattr(experiments, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert experiments.quickstart(tmp_path, steps=2, probe_clips=12, cfg=small_cfg)["tgdp"] == rows["tgdp"]


def test_a_shorter_budget_keeps_each_warm_up_share_of_the_run():
    base = tg.Config.preset("tiny")
    half = experiments.with_method(base, "sync", base.train.steps // 2)
    assert half.method == "sync" and half.train.steps == base.train.steps // 2
    assert half.train.warmup_steps == round(base.train.warmup_steps / 2)
    # the curriculum and the guidance warm-up are shares of the run: tiny's step 250 of 400 is step 125 of 200
    assert half.objective.contrastive_mask_warmup_fraction == base.objective.contrastive_mask_warmup_fraction
    assert half.teacher.guidance_warmup_fraction == base.teacher.guidance_warmup_fraction
    assert half.steps_of(half.teacher.guidance_warmup_fraction) == 125
    same = experiments.with_method(base, "tgdp", base.train.steps)
    assert same.to_dict() == base.to_dict()


def test_ablation_rows_are_config_overrides_with_seeds(tmp_path, small_cfg):
    names = ["single pass (CAV-MAE Sync)", "contrastive ratio 0.65", "random instead of guided"]
    summary = experiments.ablate(tmp_path, budget=2 / experiments.ABLATION_STEPS, seeds=2, probe_clips=12,
                                 rows=names, cfg=small_cfg)
    assert list(summary) == names and all("A->V R@1 sd" in r for r in summary.values())
    runs = tmp_path / "steps2"
    assert tg.Config.load(runs / "single-pass--cav-mae-sync" / "seed1" / "config.json").method == "sync"
    ratio = tg.Config.load(runs / "contrastive-ratio-0-65" / "seed0" / "config.json")
    assert ratio.objective.contrastive_mask_ratio == 0.65 and ratio.train.seed == 0
    assert tg.Config.load(runs / "random-instead-of-guided" / "seed1" / "config.json").objective.selection == "random"
    table = (tmp_path / "ablation.md").read_text()
    assert "±" in table and "paper VGGSound" in table
    assert (tmp_path / "ablation.csv").read_text().startswith("row,")
    with pytest.raises(ValueError, match="unknown ablation rows"):
        experiments.ablate(tmp_path, rows=["nope"], cfg=small_cfg)
