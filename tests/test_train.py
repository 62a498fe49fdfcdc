"""The training loop: resume equality, atomic checkpoints, non-finite loss, schedules."""
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

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


# ---------------------------------------------------------------------- issue 17: nothing lost, nothing silent
REPO = Path(__file__).resolve().parents[1]


def test_a_diverging_run_saves_only_finite_weights_and_names_a_good_checkpoint(tmp_path):
    """Item 1: at lr 1e6 an update makes the weights NaN; before the fix that state was saved as
    last.pt and named as "the last good checkpoint"."""
    cfg = small_run_cfg(lr=1e6, warmup_steps=30, checkpoint_every=1, keep_checkpoints=10)
    with pytest.raises(T.NonFiniteLossError, match=r"non-finite .* at step \d") as info:
        T.train(cfg, tmp_path, dataset=SyntheticAV(cfg))
    named = re.search(r"the last good checkpoint is (\S+) \(step (\d+)\)", str(info.value))
    assert named, str(info.value)
    saved = sorted(tmp_path.glob("*.pt"))
    assert saved and all(not tg.checkpoint.non_finite(torch.load(p, weights_only=True)) for p in saved)
    tg.load_model(named.group(1))  # it really is good: load_model refuses non-finite weights


def test_non_finite_weights_are_never_saved_and_the_note_skips_bad_checkpoints(tmp_path):
    cfg = small_run_cfg(steps=2, checkpoint_every=1, keep_checkpoints=5)
    T.train(cfg, tmp_path, dataset=SyntheticAV(cfg))
    assert T.good_checkpoint_note(tmp_path).startswith(f"the last good checkpoint is {tmp_path / 'last.pt'} (step 2)")
    run = T.setup_run(cfg, tmp_path, resume=True, dataset=SyntheticAV(cfg))
    try:
        with torch.no_grad():
            next(run.student.parameters())[0] = float("nan")
        with pytest.raises(T.NonFiniteLossError, match="after step 3 1 tensors hold NaN.*not saved"):
            T.save_run(run, 3, [])
    finally:
        run.close()
    assert not (tmp_path / "step0000003.pt").exists()
    # a non-finite last.pt (written before this check existed) is passed over for an earlier good one
    bad = torch.load(tmp_path / "step0000002.pt", weights_only=True)
    bad["model"]["encoder.global_a"][:] = float("nan")
    tg.checkpoint.save_checkpoint(bad, tmp_path / "step0000002.pt")
    tg.checkpoint.link_atomically(tmp_path / "step0000002.pt", tmp_path / "last.pt")
    assert T.good_checkpoint_note(tmp_path).startswith(f"the last good checkpoint is {tmp_path / 'step0000001.pt'}")
    for path in tmp_path.glob("*.pt"):
        path.unlink()
    assert T.good_checkpoint_note(tmp_path).startswith(f"there is no good checkpoint in {tmp_path}")


def test_a_second_run_into_a_locked_folder_stops_at_once_naming_the_holder(tmp_path, monkeypatch):
    """Item 2: the folder is locked by another process (an OS lock, released however it ends)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom tgdp_core.folders import RunLock\n"
         "lock = RunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(120)", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = small_run_cfg(steps=2)
        monkeypatch.setattr(T, "build_model", lambda cfg: pytest.fail("work began in a locked folder"))
        with pytest.raises(tg.folders.FolderError, match=rf"{tmp_path} is in use by another training run "
                                                          rf"\(pid {holder.pid} on .*, started "):
            T.train(cfg, tmp_path, dataset=SyntheticAV(cfg))
        monkeypatch.undo()
        assert not (tmp_path / "config.json").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    result = T.train(cfg, tmp_path, dataset=SyntheticAV(cfg))  # the killed holder's lock is gone
    assert result.checkpoint.exists()
    with tg.folders.RunLock(tmp_path):  # and the finished run released its own
        pass


def test_resume_refuses_a_changed_config_unless_the_change_is_allowed(tmp_path):
    """Item 3: resuming with another lr, batch, seed or temperature used to be silent."""
    cfg = small_run_cfg(steps=2)
    T.train(cfg, tmp_path, dataset=SyntheticAV(cfg))
    changed = small_run_cfg(steps=2, lr=5e-3, seed=1, batch_size=2)
    changed.objective.temperature = 0.5
    with pytest.raises(tg.checkpoint.CheckpointError, match="differs from the checkpoint's in 4 field") as info:
        T.train(changed, tmp_path, dataset=SyntheticAV(changed))
    message = str(info.value)
    for line in ("objective.temperature: 0.2 in the checkpoint, 0.5 now", "train.batch_size: 4 in the checkpoint, 2 now",
                 "train.lr: 0.001 in the checkpoint, 0.005 now", "train.seed: 0 in the checkpoint, 1 now",
                 "--allow-change train.lr"):
        assert line in message, message
    assert tg.Config.load(tmp_path / "config.json") == cfg  # nothing overwritten

    longer = small_run_cfg(steps=3, log_every=2)  # log_every only says how the run is logged: free
    with pytest.raises(tg.checkpoint.CheckpointError, match="train.steps: 2 in the checkpoint, 3 now"):
        T.train(longer, tmp_path, dataset=SyntheticAV(longer))
    with pytest.raises(ValueError, match="unknown field 'stpes' in train"):
        T.train(longer, tmp_path, dataset=SyntheticAV(longer), allow_change=["train.stpes"])
    result = T.train(longer, tmp_path, dataset=SyntheticAV(longer), allow_change=["train.steps"])
    assert [r["step"] for r in result.history] == [1, 2, 3]  # steps 1-2 restored, 3 trained
    assert tg.Config.load(tmp_path / "config.json") == longer


def test_skipped_clips_are_listed_in_the_run_folder(tmp_path):
    """Item 4: on_error=skip writes skipped.csv with the reasons and warns with the count."""
    from test_dataset import make_clips

    manifest = make_clips(tmp_path / "data")
    (tmp_path / "data" / "audio" / "clip1.wav").write_bytes(b"garbage")
    cfg = small_run_cfg(steps=1, batch_size=2)
    cfg.data.train_manifest, cfg.data.on_error = str(manifest), "skip"
    with pytest.warns(UserWarning, match=r"1 of 3 clips were skipped .* listed with its reason in .*skipped.csv"):
        T.train(cfg, tmp_path / "run")
    rows = list(csv.reader(open(tmp_path / "run" / "skipped.csv")))
    assert rows[0] == ["video_id", "reason"] and [r[0] for r in rows[1:]] == ["clip1"]
    assert "clip1.wav: unreadable or corrupt audio file" in rows[1][1]


def test_an_unusable_run_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """Item 10: a file, an uncreatable or an unwritable folder, named in one line, before training."""
    monkeypatch.setattr(T, "resolve_data", lambda cfg: pytest.fail("work began"))
    cfg = small_run_cfg(steps=1)
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(tg.folders.FolderError, match=f"{tmp_path / 'taken'} is a file, not a folder; choose another"):
        T.train(cfg, tmp_path / "taken")
    with pytest.raises(tg.folders.FolderError, match=f"cannot create the folder {tmp_path / 'taken' / 'run'}"):
        T.train(cfg, tmp_path / "taken" / "run")
    if Path("/proc/self").is_dir():  # a folder nobody can write into, root included
        with pytest.raises(tg.folders.FolderError, match="cannot write to the folder /proc"):
            T.train(cfg, "/proc")
    if os.geteuid() != 0:  # permissions bind every user but root
        locked = tmp_path / "readonly"
        locked.mkdir(mode=0o555)
        with pytest.raises(tg.folders.FolderError, match=f"cannot write to the folder {locked}"):
            T.train(cfg, locked)


def test_temporary_files_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    """Item 11."""
    tmp_path.mkdir(exist_ok=True)
    stale = [tmp_path / ".step0000003.pt.k2j4h1.tmp", tmp_path / ".last.pt.4242.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("not ours")
    cfg = small_run_cfg(steps=1)
    T.train(cfg, tmp_path, dataset=SyntheticAV(cfg))
    assert not any(p.exists() for p in stale) and (tmp_path / "notes.tmp").exists()
