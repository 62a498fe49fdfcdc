"""Quickstart and ablation plumbing on a very small AV-Digits set (numbers are not the point here)."""
import json
import math

import pytest
import torch

import tgdp_core as tg
from tgdp_core import analysis, experiments
from tgdp_core.teacher import needs_teacher
from tgdp_core.trainer import rec_ratio_at
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


def test_ablation_rows_are_config_overrides_with_paired_seeds(tmp_path, small_cfg, monkeypatch):
    names = ["single pass (CAV-MAE Sync)", "+ Dual-path (Both 75%)"]
    summary = experiments.ablate(tmp_path, budget=2 / experiments.ABLATION_STEPS, seeds=2, probe_clips=12,
                                 rows=names, cfg=small_cfg, curriculum="equal")
    reference = experiments.REFERENCE_ROW
    assert list(summary) == [reference, *names]  # the reference of the differences always runs
    runs = tmp_path / "curriculum-equal" / "steps2"
    sync = tg.Config.load(runs / "single-pass-cav-mae-sync" / "seed1" / "config.json")
    tgdp = tg.Config.load(runs / "tg-dp-contrastive-0-50-guided" / "seed0" / "config.json")
    assert sync.method == "sync" and sync.train.seed == 1
    assert sync.objective.single_pass_mask_warmup_fraction == tgdp.objective.contrastive_mask_warmup_fraction > 0  # equal
    dual = tg.Config.load(runs / "dual-path-both-75" / "seed0" / "config.json")
    assert (dual.objective.contrastive_mask_ratio, dual.objective.selection, dual.objective.distill_weight) == (0.75, "random", 0.0)
    assert torch.load(runs / "dual-path-both-75" / "seed0" / "last.pt", weights_only=True)["teacher"] is None
    # paired differences: the reference against itself is exactly 0, and every row carries its interval
    assert (summary[reference]["A->V R@1 diff"], summary[reference]["A->V R@1 diff lo"]) == (0.0, 0.0)
    seeds = {s: json.loads((runs / "single-pass-cav-mae-sync" / f"seed{s}" / "results.json").read_text()) for s in (0, 1)}
    refs = {s: json.loads((runs / "tg-dp-contrastive-0-50-guided" / f"seed{s}" / "results.json").read_text()) for s in (0, 1)}
    diff = sum(seeds[s]["mAP"] - refs[s]["mAP"] for s in (0, 1)) / 2
    assert summary[names[0]]["mAP diff"] == pytest.approx(diff)
    assert summary[names[0]]["paper VGGSound A->V R@1"] == 23.2 and "visual AUC %" in summary[names[0]]
    table = (tmp_path / "ablation-equal.md").read_text()
    assert "±" in table and "95 % t interval" in table and "localisation" in table and "| + Dual-path (Both 75%) |" in table
    assert analysis.read_ablation_csv(tmp_path / "ablation-equal.csv")[names[1]]["seeds"] == 2
    assert len((tmp_path / "ablation-equal-seeds.csv").read_text().splitlines()) == 1 + 3 * 2
    assert (tmp_path / "ablation-equal.png").exists() and (tmp_path / "ablation-equal-deltas.png").exists()
    monkeypatch.setattr(experiments, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert experiments.ablate(tmp_path, budget=2 / experiments.ABLATION_STEPS, seeds=2, probe_clips=12, rows=names,
                              cfg=small_cfg)[names[0]] == summary[names[0]]
    changed = dict(experiments.ABLATION_ROWS, **{names[1]: {"objective.contrastive_mask_ratio": 0.65}})
    monkeypatch.setattr(experiments, "ABLATION_ROWS", changed)  # a row redefined: its old runs are not its results
    with pytest.raises(ValueError, match="holds a run of another config"):
        experiments.ablate(tmp_path, budget=2 / experiments.ABLATION_STEPS, seeds=2, probe_clips=12, rows=names, cfg=small_cfg)
    with pytest.raises(ValueError, match="unknown ablation rows"):
        experiments.ablate(tmp_path, rows=["nope"], cfg=small_cfg)
    asked = []  # --rows all: every row, the optional ones too, the reference first
    steps = set()
    monkeypatch.setattr(experiments, "run_row", lambda cfg, folder, bench: asked.append(folder.parent.name)
                        or steps.add((cfg.train.steps, folder.parent.parent.name)) or {})
    monkeypatch.setattr(experiments, "summarise", lambda runs: {})
    monkeypatch.setattr(experiments, "write_ablation", lambda *a: None)
    experiments.ablate(tmp_path / "all", seeds=1, probe_clips=12, rows=["all"], cfg=small_cfg, curriculum="none")
    assert asked == [experiments.slug(n) for n in [reference, *(n for n in experiments.ABLATION_ROWS if n != reference)]]
    assert steps == {(800, "steps800")}  # without a curriculum the default budget is the one where rows learn
    with pytest.raises(ValueError, match="unknown curriculum 'half'; valid: equal, none, preset"):
        experiments.ablate(tmp_path, cfg=small_cfg, curriculum="half")


def test_paired_differences_and_their_t_interval_against_a_direct_computation():
    from scipy import stats

    g = torch.Generator().manual_seed(0)
    ref = [{"A->V R@1": float(x)} for x in torch.rand(4, generator=g) * 50]
    row = [{"A->V R@1": r["A->V R@1"] + float(d)} for r, d in zip(ref, torch.randn(4, generator=g) * 3 + 2)]
    out = experiments.paired_differences({"ref": ref, "row": row}, "ref", metrics=("A->V R@1",))["row"]
    d = [b["A->V R@1"] - a["A->V R@1"] for a, b in zip(ref, row)]
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=sum(d) / len(d), scale=stats.sem(d))
    assert out["A->V R@1 diff"] == pytest.approx(sum(d) / len(d))
    assert (out["A->V R@1 diff lo"], out["A->V R@1 diff hi"]) == (pytest.approx(lo), pytest.approx(hi))
    one = experiments.t_interval([1.5])
    assert one[0] == 1.5 and math.isnan(one[1]) and math.isnan(one[2])
    with pytest.raises(ValueError, match="pair them seed by seed"):
        experiments.paired_differences({"ref": ref, "row": row[:3]}, "ref", metrics=("A->V R@1",))


def test_pairs_against_any_row_of_a_seed_file_are_that_rows_paired_differences(tmp_path):
    g = torch.Generator().manual_seed(1)
    keys = experiments.DIFF_METRICS
    base = [dict(zip(keys, map(float, v))) for v in torch.rand(3, len(keys), generator=g) * 50]
    shifted = [{k: r[k] + 20 + i for k in keys} for i, r in enumerate(base)]  # +20, +21, +22 on every metric
    noisy = [{k: r[k] + s for k in keys} for r, s in zip(base, (-3.0, 4.0, -1.0))]
    ref = experiments.REFERENCE_ROW
    experiments.write_seed_csv(tmp_path / "s.csv", {ref: noisy, "random instead of guided": base, "without distillation": shifted})
    text = experiments.pairs_markdown(tmp_path / "s.csv", "random instead of guided", ["without distillation", ref])
    rows = [line for line in text.splitlines() if line.startswith("| ") and "Δ" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| without distillation", f"| {ref}"]
    assert rows[0].count("**+21.0 [+18.5, +23.5]**") == len(keys)  # t(0.975, 2) * 1 / sqrt(3) = 2.48
    assert "**" not in rows[1] and "+0.0 [" in rows[1]  # -3, +4, -1: mean 0, not resolved
    everything = experiments.pairs_markdown(tmp_path / "s.csv", ref)
    assert "| random instead of guided |" in everything and "| without distillation |" in everything
    with pytest.raises(ValueError, match=r"no row \['sync'\]; its rows"):
        experiments.pairs_markdown(tmp_path / "s.csv", "sync")
    with pytest.raises(FileNotFoundError, match="no such file"):
        experiments.pairs_markdown(tmp_path / "nope.csv", ref)


def test_ablations_that_share_their_reference_runs_merge_into_one_table_and_others_are_refused(tmp_path):
    g = torch.Generator().manual_seed(0)

    def seeds(n=3):
        keys = (*experiments.DIFF_METRICS, "train s")
        return [dict(zip(keys, map(float, values))) for values in torch.rand(n, len(keys), generator=g) * 90]

    ref, sync, dual, rec = seeds(), seeds(), seeds(), seeds()
    ref_elsewhere = [dict(r, **{"train s": r["train s"] + 50}) for r in ref]  # the same runs, timed on a busier machine
    a, b = experiments.REFERENCE_ROW, "+ Dual-path (Both 75%)"
    experiments.write_seed_csv(tmp_path / "one.csv", {a: ref, "guided reconstruction mask": rec, b: dual})
    experiments.write_seed_csv(tmp_path / "two.csv", {a: ref_elsewhere, "single pass (CAV-MAE Sync)": sync})
    summary = experiments.merge_ablations([tmp_path / "one.csv", tmp_path / "two.csv"], tmp_path / "merged", "equal")
    assert list(summary) == [a, "single pass (CAV-MAE Sync)", b, "guided reconstruction mask"]  # ABLATION_ROWS order
    direct = experiments.summarise({a: ref, "single pass (CAV-MAE Sync)": sync, b: dual})
    for name in direct:  # the paired differences of the merged table are those of one ablation with every row
        for key in ("A->V R@1 diff", "A->V R@1 diff lo", "mAP diff hi", "mAP sd"):
            assert summary[name][key] == pytest.approx(direct[name][key], abs=1e-3)
    assert analysis.read_ablation_csv(tmp_path / "merged" / "ablation-equal.csv")[b]["seeds"] == 3
    assert "one.csv" in (tmp_path / "merged" / "ablation-equal.md").read_text()
    assert experiments.read_seed_csv(tmp_path / "merged" / "ablation-equal-seeds.csv")[b][2]["mAP"] == pytest.approx(dual[2]["mAP"], abs=1e-4)
    other = [dict(r) for r in ref]
    other[1]["mAP"] += 0.5  # another run of the reference (another budget, curriculum or code): not pairable
    experiments.write_seed_csv(tmp_path / "three.csv", {a: other, b: dual})
    with pytest.raises(ValueError, match=r"seed 1, 'mAP'.*cannot be paired"):
        experiments.merge_ablations([tmp_path / "one.csv", tmp_path / "three.csv"], tmp_path / "bad", "equal")
    experiments.write_seed_csv(tmp_path / "four.csv", {b: dual})
    with pytest.raises(ValueError, match="no 'TG-DP: contrastive 0.50, guided' row"):
        experiments.merge_ablations([tmp_path / "four.csv"], tmp_path / "bad", "equal")
    experiments.write_seed_csv(tmp_path / "five.csv", {a: ref[:2]})
    with pytest.raises(ValueError, match="has 3 seeds.*five.csv 2"):
        experiments.merge_ablations([tmp_path / "one.csv", tmp_path / "five.csv"], tmp_path / "bad", "equal")
    with pytest.raises(FileNotFoundError, match="nope.csv: no such file"):
        experiments.merge_ablations([tmp_path / "nope.csv"], tmp_path / "bad", "equal")
    assert not (tmp_path / "bad").exists()  # a refused merge writes nothing


@pytest.mark.parametrize("curriculum,tgdp_ramp,sync_ramp", [("none", 0, 0), ("equal", 250, 250), ("preset", 250, 0)])
def test_curricula_ramp_the_view_the_contrastive_loss_sees(curriculum, tgdp_ramp, sync_ramp):
    base = tg.Config.preset("tiny")
    for name in ("TG-DP: contrastive 0.50, guided", "+ Dual-path (Both 75%)"):
        cfg = experiments.row_config(base, name, 400, curriculum)
        o = cfg.objective
        assert (cfg.steps_of(o.contrastive_mask_warmup_fraction), o.single_pass_mask_warmup_fraction) == (tgdp_ramp, 0)
        assert rec_ratio_at(0, cfg) == o.rec_mask_ratio  # the reconstruction view never ramps
    sync = experiments.row_config(base, "single pass (CAV-MAE Sync)", 400, curriculum)
    assert sync.steps_of(sync.objective.single_pass_mask_warmup_fraction) == sync_ramp
    assert rec_ratio_at(sync_ramp // 2, sync) == pytest.approx(0.375 if sync_ramp else 0.75)
    half = experiments.row_config(base, "single pass (CAV-MAE Sync)", 200, curriculum)
    assert half.steps_of(half.objective.single_pass_mask_warmup_fraction) == sync_ramp // 2  # the same share
    guided = experiments.row_config(base, "TG-DP: contrastive 0.50, guided", 400, curriculum)
    assert guided.teacher.guidance_warmup_fraction == base.teacher.guidance_warmup_fraction  # no mask curriculum


def test_paper_numbers_stand_beside_the_rows_defined_as_in_the_paper():
    rows = experiments.ABLATION_ROWS
    assert set(experiments.PAPER) < set(rows) and experiments.REFERENCE_ROW in experiments.PAPER
    base = tg.Config.preset("tiny")
    dual = experiments.row_config(base, "+ Dual-path (Both 75%)", 400, "equal")
    assert not needs_teacher(dual)  # structural decoupling only: no teacher is built
    extra = experiments.row_config(base, "dual path 0.75, guided + distillation", 400, "equal")
    assert needs_teacher(extra) and extra.objective.selection == "guided" and extra.objective.distill_weight > 0
    assert "dual path 0.75, guided + distillation" not in experiments.PAPER
    official = experiments.row_config(base, "probabilistic, released code (softmax, T = 1)", 400, "equal").objective
    assert (official.selection, official.selection_temperature) == ("probabilistic_softmax", 1.0)
    for name in experiments.OPTIONAL_ROWS:
        assert name not in experiments.DEFAULT_ROWS and experiments.row_config(base, name, 400, "none").objective.rec_selection != "random"
