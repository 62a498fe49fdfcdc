"""Tracking (metrics.jsonl, TensorBoard, W&B) and evaluation during training (issue 15)."""
import json
import sys
import types

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tgdp_core as tg
from tgdp_core import config as C
from tgdp_core import evaluate as ev
from tgdp_core import periodic_eval, tracking
from tgdp_core import trainer as T

from conftest import SyntheticAV
from test_dataset import make_clips


def run_cfg(tmp_path, **train):
    over = dict(steps=4, batch_size=4, log_every=1, checkpoint_every=2, warmup_steps=1, keep_checkpoints=1)
    over.update(train)
    data = {"workers": 0}
    if over.get("eval_every"):
        data["test_manifest"] = str(make_clips(tmp_path / "test", n=4))
    return tg.Config.preset("tiny", train=over, data=data)


def events(folder):
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


class Interrupt(Exception):
    pass


# ---------------------------------------------------------------------- TensorBoard
def test_tensorboard_holds_every_logged_value_and_the_masked_views(tmp_path):
    cfg = run_cfg(tmp_path, eval_every=2)
    result = T.train(cfg, tmp_path / "run", dataset=SyntheticAV(cfg))
    acc = events(tmp_path / "run" / "tensorboard")
    by_step = {r["step"]: r for r in result.history}
    assert sorted(by_step) == [1, 2, 3, 4]
    expected = {"loss/total": "loss", "loss/rec": "rec", "loss/distill": "distill", "loss/contrastive": "contrastive",
                "train/lr": "lr", "train/momentum": "momentum", "train/grad_norm": "grad_norm",
                "train/samples_per_s": "samples_per_s", "train/offdiag_cos": "offdiag_cos"}
    for tag, key in expected.items():
        scalars = acc.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3, 4], tag
        for s in scalars:
            assert s.value == pytest.approx(by_step[s.step][key], rel=1e-6), (tag, s.step)
    # evaluation metrics at the evaluation steps, the same numbers as in the records
    for tag, key in (("eval/A2V_R1", "eval/A->V R@1"), ("eval/V2A_MedR", "eval/V->A MedR"), ("eval/A2V_P1", "eval/A->V P@1")):
        assert [(s.step, s.value) for s in acc.Scalars(tag)] == [(2, by_step[2][key]), (4, by_step[4][key])]
    images = acc.Images("masked_views")
    assert [i.step for i in images] == [2, 4] and images[0].width > 100 and images[0].height > 100
    # metrics.jsonl holds the same records, the evaluation's merged into its step's
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history and "eval/A->V R@1" in lines[1] and "eval/A->V R@1" not in lines[0]


def test_resumed_run_shows_each_step_once_in_tensorboard(tmp_path):
    cfg = run_cfg(tmp_path)

    def stop_after_3(record):
        if record["step"] == 3:
            raise Interrupt

    full = T.train(cfg, tmp_path / "full", dataset=SyntheticAV(cfg))
    with pytest.raises(Interrupt):  # step 3 reached TensorBoard; the checkpoint is step 2's
        T.train(cfg, tmp_path / "cut", callbacks=[stop_after_3], dataset=SyntheticAV(cfg))
    T.train(cfg, tmp_path / "cut", dataset=SyntheticAV(cfg))
    scalars = events(tmp_path / "cut" / "tensorboard").Scalars("loss/total")
    assert [s.step for s in scalars] == [1, 2, 3, 4]  # the first process's step 3 is purged
    assert [s.value for s in scalars] == pytest.approx([r["loss"] for r in full.history], rel=1e-6)


def test_tensorboard_tags():
    assert tracking.tensorboard_tag("rec") == "loss/rec"
    assert tracking.tensorboard_tag("loss") == "loss/total"
    assert tracking.tensorboard_tag("samples_per_s") == "train/samples_per_s"
    assert tracking.tensorboard_tag("eval/A->V pair P@1") == "eval/A2V_pair_P1"


def test_unwritable_tensorboard_folder_stops_before_training(tmp_path):
    cfg = run_cfg(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").write_text("a file where the event folder goes")
    with pytest.raises(tracking.TrackingError, match=r"run/tensorboard: cannot write TensorBoard events.*"
                                                     r"leave 'tensorboard' out of train.log_to"):
        T.train(cfg, tmp_path / "run", dataset=SyntheticAV(cfg))
    assert not (tmp_path / "run" / "last.pt").exists()
    # without TensorBoard the same folder trains
    cfg.train.log_to = ("jsonl",)
    assert T.train(cfg, tmp_path / "run", dataset=SyntheticAV(cfg)).checkpoint.exists()


def test_log_to_and_evaluation_fields_are_validated():
    with pytest.raises(ValueError, match="train.log_to"):
        tg.Config.preset("tiny", **{"train.log_to": ["jsonl", "csv"]})
    with pytest.raises(ValueError, match="train.wandb_mode"):
        tg.Config.preset("tiny", **{"train.wandb_mode": "cloud"})
    with pytest.raises(ValueError, match="keep_best needs evaluations"):
        tg.Config.preset("tiny", **{"train.keep_best": "A->V R@1"})
    with pytest.raises(ValueError, match="'A->V R@2' is not one of"):
        tg.Config.preset("tiny", **{"train.keep_best": "A->V R@2", "train.eval_every": 10})
    cfg = tg.Config.preset("tiny").override('train.log_to=["jsonl"]', "train.eval_every=5", "train.keep_best=V->A MedR")
    assert cfg.train.log_to == ("jsonl",) and tg.Config.from_dict(cfg.to_dict()) == cfg


def test_keep_best_choices_are_metrics_the_evaluation_reports():
    g = torch.Generator().manual_seed(0)
    a, v = torch.randn(6, 2, 8, generator=g), torch.randn(6, 2, 8, generator=g)
    labels = torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2])]
    reported = {**ev.retrieval_metrics(a, v, labels), **ev.pair_class_precision(a, v, torch.tensor([[0, 1]] * 6))}
    assert set(C.EVAL_METRICS) <= set(reported)
    assert periodic_eval._better("A->V MedR", 2.0, 3.0) and not periodic_eval._better("A->V MedR", 3.0, 2.0)
    assert periodic_eval._better("A->V R@1", 3.0, 2.0) and periodic_eval._better("A->V R@1", 0.0, None)


# ---------------------------------------------------------------------- W&B (optional extra)
def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    cfg = run_cfg(tmp_path, log_to=["jsonl", "wandb"])
    with pytest.raises(tracking.TrackingError, match=r"pip install 'tgdp_core\[wandb\]'"):
        T.train(cfg, tmp_path / "run", dataset=SyntheticAV(cfg))


def test_wandb_runs_offline_by_default(tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Image=lambda fig: ("image", fig)))
    cfg = run_cfg(tmp_path, log_to=["wandb"], eval_every=4)
    T.train(cfg, tmp_path / "run", dataset=SyntheticAV(cfg))
    (kwargs,) = calls["init"]
    assert kwargs["mode"] == "offline" and kwargs["project"] == "tgdp" and kwargs["dir"] == str(tmp_path / "run")
    assert kwargs["config"] == cfg.to_dict()
    scalars = [(step, values) for step, values in calls["log"] if "loss" in values]
    assert [step for step, _ in scalars] == [1, 2, 3, 4] and "eval/A->V R@1" in scalars[-1][1]
    assert [step for step, values in calls["log"] if "masked_views" in values] == [4]
    assert calls["finish"] == 1 and not (tmp_path / "run" / "metrics.jsonl").exists()
    cfg.train.wandb_mode, cfg.train.wandb_project = "online", "mine"  # the user's choice reaches wandb.init
    T.train(cfg, tmp_path / "run2", dataset=SyntheticAV(cfg))
    assert calls["init"][-1]["mode"] == "online" and calls["init"][-1]["project"] == "mine"


# ---------------------------------------------------------------------- evaluation during training
class NoisyAV(SyntheticAV):
    """SyntheticAV plus noise from the global RNG (as augmentations drawn from it would be):
    with workers=0 any draw an evaluation made from that RNG would change the next batches."""

    def __getitem__(self, item):
        out = super().__getitem__(item)
        out["fbank"] = out["fbank"] + 0.1 * torch.randn(out["fbank"].shape)
        return out


def test_evaluation_leaves_the_training_unchanged_and_keeps_the_best(tmp_path):
    plain = run_cfg(tmp_path, steps=6, log_every=1)
    with_eval = run_cfg(tmp_path, steps=6, log_every=1, eval_every=2, keep_best="A->V R@1")
    a = T.train(plain, tmp_path / "plain", dataset=NoisyAV(plain))
    b = T.train(with_eval, tmp_path / "eval", dataset=NoisyAV(with_eval))
    keys = ("loss", "rec", "distill", "contrastive", "grad_norm", "offdiag_cos")
    assert [[r[k] for k in keys] for r in a.history] == [[r[k] for k in keys] for r in b.history]
    wa, wb = tg.load_model(a.checkpoint).state_dict(), tg.load_model(b.checkpoint).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    evals = [(r["step"], r["eval/A->V R@1"]) for r in b.history if "eval/A->V R@1" in r]
    assert [s for s, _ in evals] == [2, 4, 6]
    best = torch.load(tmp_path / "eval" / "best.pt", weights_only=True)
    top = max(v for _, v in evals)
    assert best["metric"] == "A->V R@1" and best["value"] == top
    assert best["step"] == next(s for s, v in evals if v == top)  # the first evaluation to reach it
    assert best["teacher"] is not None and "optimizer" not in best
    assert best["metrics"]["A->V R@1"] == top and tg.load_model(tmp_path / "eval" / "best.pt").cfg == with_eval


def test_evaluation_needs_test_clips_and_labels_for_class_metrics(tmp_path):
    cfg = run_cfg(tmp_path, eval_every=2)
    cfg.data.test_manifest = ""
    with pytest.raises(ValueError, match="train.eval_every needs test clips"):
        T.train(cfg, tmp_path / "run", dataset=SyntheticAV(cfg))
    cfg = run_cfg(tmp_path, eval_every=2, keep_best="A->V pair P@1")  # make_clips has no frame_labels
    with pytest.raises(ValueError, match="needs per-frame labels"):
        T.train(cfg, tmp_path / "run2", dataset=SyntheticAV(cfg))
