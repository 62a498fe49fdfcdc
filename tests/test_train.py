"""The training loop: resume equality, atomic checkpoints, non-finite loss, schedules."""
import json
import math

import pytest
import torch

import tgdp_core as tg
from tgdp_core import trainer as T

from conftest import SyntheticAV


def small_run_cfg(**train):
    over = dict(steps=6, batch_size=4, log_every=1, checkpoint_every=3, warmup_steps=2, keep_checkpoints=1)
    over.update(train)
    return tg.Config.preset("tiny", train=over, data={"workers": 0})


class Interrupt(Exception):
    pass


def test_resume_continues_the_same_run(tmp_path):
    cfg = small_run_cfg()
    full = T.train(cfg, tmp_path / "full", dataset=SyntheticAV(cfg))
    assert [r["step"] for r in full.history] == [1, 2, 3, 4, 5, 6]

    def stop_after_4(record):
        if record["step"] == 4:
            raise Interrupt

    with pytest.raises(Interrupt):  # killed after step 4; the checkpoint of step 3 survives
        T.train(cfg, tmp_path / "cut", callbacks=[stop_after_4], dataset=SyntheticAV(cfg))
    resumed = T.train(cfg, tmp_path / "cut", dataset=SyntheticAV(cfg))
    by_step = {r["step"]: r for r in resumed.history}
    assert sorted(by_step) == [1, 2, 3, 4, 5, 6]  # history of steps 1-3 restored, 4-6 recomputed
    for record in full.history:
        for key in ("loss", "rec", "distill", "contrastive"):
            assert by_step[record["step"]][key] == record[key], (record["step"], key)
    logged = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]  # step 4, logged before the crash, is not there twice
    a, b = tg.load_model(full.checkpoint), tg.load_model(resumed.checkpoint)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_run_folder_holds_config_metrics_and_few_checkpoints(tmp_path):
    cfg = small_run_cfg()
    seen = []
    result = T.train(cfg, tmp_path, callbacks=[seen.append], dataset=SyntheticAV(cfg))
    assert tg.Config.load(tmp_path / "config.json") == cfg
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [r["step"] for r in seen] == list(range(1, 7))
    assert {"loss", "rec", "distill", "contrastive", "lr", "samples_per_s", "offdiag_cos", "momentum"} <= set(lines[0])
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["last.pt", "step0000006.pt"]
    assert result.checkpoint == tmp_path / "last.pt"
    payload = torch.load(result.checkpoint, weights_only=True)
    assert payload["step"] == 6 and payload["teacher"] is not None and payload["optimizer"]


def test_non_finite_loss_stops_loudly_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = small_run_cfg()

    class PoisonAfter3(SyntheticAV):
        def __getitem__(self, item):
            out = super().__getitem__(item)
            if self.calls >= 3 * cfg.train.batch_size:
                out["fbank"][:] = float("nan")
            self.calls += 1
            return out

    data = PoisonAfter3(cfg)
    data.calls = 0
    with pytest.raises(T.NonFiniteLossError, match="non-finite loss at step 3.*last good checkpoint"):
        T.train(cfg, tmp_path, dataset=data)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 3


def test_resume_refuses_another_model(tmp_path):
    cfg = small_run_cfg(steps=3)
    T.train(cfg, tmp_path, dataset=SyntheticAV(cfg))
    other = tg.Config.preset("tiny", method="sync", train=cfg.train.__dict__, data={"workers": 0})
    with pytest.raises(tg.checkpoint.CheckpointError, match="another model or method"):
        T.train(other, tmp_path, dataset=SyntheticAV(other))


def test_lr_schedule_warms_up_then_decays():
    cfg = tg.Config.preset("tiny", train={"steps": 100, "warmup_steps": 10, "lr": 1e-3})
    lrs = [T.lr_at(s, cfg) for s in range(100)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-5
    assert T.lr_at(55, cfg) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_warm_ups_are_shares_of_the_run():
    from tgdp_core.teacher import guidance_active

    cfg = tg.Config.preset("tiny")  # 62.5 % of 400 steps: step 250, as the recipe was measured
    assert [guidance_active(cfg, s) for s in (0, 249, 250, 399)] == [False, False, True, True]
    assert [T.contrastive_ratio_at(s, cfg) for s in (0, 125, 249, 250, 399)] == [0.0, 0.25, 0.5 * 249 / 250, 0.5, 0.5]
    longer = tg.Config.preset("tiny", train={"steps": 4000})  # the same recipe over a 10x longer run
    assert not guidance_active(longer, 2499) and guidance_active(longer, 2500)
    assert T.contrastive_ratio_at(1250, longer) == 0.25
    base = tg.Config.preset("base", train={"steps": 100_000})  # base: guidance after 10 %, no curriculum
    assert not guidance_active(base, 9_999) and guidance_active(base, 10_000)
    assert T.contrastive_ratio_at(0, base) == 0.5
