"""WebDataset shards (issue 13): writing, resuming, the index, the split over ranks and workers,
resuming a run, evaluation items, bad input."""
import csv
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

import tgdp_core as tg
from test_dataset import make_clips
from tgdp_core import dataset as D
from tgdp_core import media, shards
from tgdp_core.shardset import ShardError, ShardEvalSet, ShardTrainSet, shard_train_loader


def tiny(**data):
    return tg.Config.preset("tiny", data={"workers": 0, **data})


def write(tmp_path, n=10, shard_size=3, name="sh", seconds=5.12, **kw):
    manifest = make_clips(tmp_path / "data", n=n, seconds=seconds) if not (tmp_path / "data").exists() \
        else tmp_path / "data" / "train.json"
    summary = shards.write_shards(manifest, tmp_path / name, tiny(), shard_size=shard_size, workers=0, **kw)
    return manifest, summary


def samples_of(path):
    with open(path, "rb") as stream:
        return list(group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])))


def rewrite(path, change):
    """Write shard ``path`` again with ``change(samples)`` applied (webdataset's reader and writer)."""
    samples = change(samples_of(path))
    with wds.TarWriter(str(path), encoder=False) as writer:
        for s in samples:
            writer.write({k: v for k, v in s.items() if k != "__url__"})


# ---------------------------------------------------------------------- writing
def test_shards_hold_every_clip_once_with_the_layout_and_index(tmp_path):
    manifest, summary = write(tmp_path, fbank=True)
    out = tmp_path / "sh"
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and index["samples"] == summary.clips == 10
    assert [s["samples"] for s in index["shards"]] == [3, 3, 3, 1]
    assert index["settings"]["fbank"] == shards.fbank_settings(tiny())
    assert (out / "labels.csv").read_bytes() == (tmp_path / "data" / "labels.csv").read_bytes()
    clips = {c.video_id: c for c in D.read_manifest(manifest)}
    seen = []
    for entry in index["shards"]:
        listing = json.loads((out / entry["name"].replace(".tar", ".clips.json")).read_text())["clips"]
        samples = samples_of(out / entry["name"])
        assert [s["__key__"] for s in samples] == [c["key"] for c in listing]
        for s in samples:
            meta = json.loads(s["json"])
            clip = clips[meta["video_id"]]
            expected = {"json", "wav", "fbank.npy", *(f"frame_{i:02d}.jpg" for i in range(8))}
            assert set(s) - {"__key__", "__url__"} == expected
            assert meta["labels"] == list(clip.labels) and meta["num_frames"] == 8
            assert s["frame_03.jpg"] == open(clip.frame_path(3), "rb").read()  # JPEG bytes as they are
            stored = np.load(__import__("io").BytesIO(s["fbank.npy"]))
            assert stored.dtype == np.float16 and stored.shape == (512, 64)
            seen.append(meta["video_id"])
    assert sorted(seen) == sorted(clips) and len(seen) == len(set(seen))
    assert shards.sample_key("00W1lcxW-WU_40.000").startswith("00W1lcxW-WU_40_000_")  # no dots in keys


def test_bad_clips_go_to_rejects_with_the_reasons_prepare_gives(tmp_path):
    manifest = make_clips(tmp_path / "data", n=5)
    (tmp_path / "data" / "audio" / "clip1.wav").write_bytes(b"garbage")
    (tmp_path / "data" / "frames" / "frame_2" / "clip3.jpg").unlink()
    summary = shards.write_shards(manifest, tmp_path / "sh", tiny(), shard_size=2, workers=0)
    assert summary.clips == 3
    with open(tmp_path / "sh" / "rejects.csv", newline="") as f:
        rows = list(csv.reader(f))
    expected = []
    for read, path in ((media.read_audio, tmp_path / "data" / "audio" / "clip1.wav"),
                       (media.jpeg_bytes, tmp_path / "data" / "frames" / "frame_2" / "clip3.jpg")):
        with pytest.raises(media.MediaError) as err:
            read(path)
        expected.append([str(path), err.value.reason])
    assert rows == [["path", "reason"], *sorted(expected)]


def test_interrupted_writing_resumes_without_duplicating_or_losing_a_clip(tmp_path, monkeypatch):
    _, reference = write(tmp_path, n=10, shard_size=3, name="reference")
    want = {p.name: p.read_bytes() for p in (tmp_path / "reference").glob("shard-*")}

    class Crash(Exception):
        pass

    def crash_after(calls, real):
        count = {"n": 0}

        def wrapped(*args, **kwargs):
            count["n"] += 1
            if count["n"] > calls:
                raise Crash
            return real(*args, **kwargs)
        return wrapped

    # 1: killed while encoding the 5th clip (shard 1 half full)
    monkeypatch.setattr(shards, "_encode_or_reject", crash_after(4, shards._encode_or_reject))
    with pytest.raises(Crash):
        write(tmp_path)
    monkeypatch.undo()
    assert json.loads((tmp_path / "sh" / "index.json").read_text())["next"] == 3
    # 2: killed halfway through writing a tar (a partial temporary file stays behind)
    monkeypatch.setattr(wds.TarWriter, "write", crash_after(2, wds.TarWriter.write))
    with pytest.raises(Crash):
        write(tmp_path)
    monkeypatch.undo()
    assert list((tmp_path / "sh").glob(".shard-*.tmp"))
    # 3: killed after a shard was renamed into place, before index.json recorded it
    monkeypatch.setattr(shards, "_save_index", crash_after(0, shards._save_index))
    with pytest.raises(Crash):
        write(tmp_path)
    monkeypatch.undo()
    _, summary = write(tmp_path)
    assert summary.clips == 10 and summary.written == 7  # 3 clips came from the first run
    got = {p.name: p.read_bytes() for p in (tmp_path / "sh").glob("shard-*")}
    assert got == want and not list((tmp_path / "sh").glob(".*.tmp"))
    again = write(tmp_path)[1]
    assert again.written == 0 and again.clips == 10  # a complete set is left as it is
    with pytest.raises(ValueError, match="Use the same manifest and settings"):
        write(tmp_path, shard_size=4)


# ---------------------------------------------------------------------- finding shards
def test_open_shards_by_folder_index_or_brace_pattern(tmp_path):
    write(tmp_path)
    out = tmp_path / "sh"
    for spec in (out, out / "index.json", f"{out}/shard-{{000000..000003}}.tar"):
        assert shards.open_shards(spec).samples == 10
    part = shards.open_shards(f"{out}/shard-{{000001..000002}}.tar")
    assert [s.path.name for s in part.shards] == ["shard-000001.tar", "shard-000002.tar"] and part.samples == 6
    with pytest.raises(ValueError, match="does not list shard-000008.tar, shard-000009.tar"):
        shards.open_shards(f"{out}/shard-{{000008..000009}}.tar")
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**index, "complete": False}))
    with pytest.raises(ValueError, match="did not finish"):
        shards.open_shards(out)
    assert shards.is_shard_spec(out) and not shards.is_shard_spec(tmp_path / "data" / "train.json")


def test_config_rejects_both_sources_and_a_bad_buffer():
    with pytest.raises(ValueError, match="set one of data.train_manifest and data.train_shards"):
        tiny(train_manifest="a.json", train_shards="b")
    with pytest.raises(ValueError, match="data.shuffle_buffer=0 must be >= 1"):
        tiny(shuffle_buffer=0)


# ---------------------------------------------------------------------- items
def test_training_items_equal_the_manifest_datasets(tmp_path):
    manifest, _ = write(tmp_path)
    cfg = tiny(cache=False)
    reference = D.AVDataset(manifest, cfg, train=True)
    data = ShardTrainSet(tmp_path / "sh", cfg)
    for item in [x for _, x in zip(range(10), data)]:
        n = int(item["index"])
        frame, seed = data.frame_and_seed(shards.sample_key(reference.clips[n].video_id), epoch=0)
        assert int(item["frame"]) == frame
        want = reference[(reference.valid.index(n), frame, seed)]
        torch.testing.assert_close(item["fbank"], want["fbank"], rtol=1e-5, atol=1e-5)
        assert torch.equal(item["frames"], want["frames"]) and torch.equal(item["labels"], want["labels"])


@pytest.mark.parametrize("fbank", [False, True])
def test_evaluation_items_equal_the_manifest_datasets(tmp_path, fbank):
    manifest, _ = write(tmp_path, fbank=fbank)
    cfg = tiny(cache=fbank)  # a stored fbank is float16, like the feature cache's
    reference = D.AVDataset(manifest, cfg, train=False)
    data = ShardEvalSet(tmp_path / "sh", cfg)
    items = list(data)
    assert len(items) == len(data) == 10
    assert [int(i["index"]) for i in items] == data.positions
    for item in items:
        want = reference[reference.valid.index(int(item["index"]))]
        torch.testing.assert_close(item["fbank"], want["fbank"], rtol=1e-5, atol=1e-5)
        for key in ("frames", "labels", "frame_labels"):
            assert torch.equal(item[key], want[key]), key


def test_per_class_choice_is_the_first_k_of_each_label_in_manifest_order(tmp_path):
    assert D.first_per_class([("a",), ("a",), ("b",), ("a", "c"), ("b",), ("c",)], 1) == [0, 2, 3]
    assert D.first_per_class([("a",), ("a",), ("b",), ("a", "c"), ("b",), ("c",)], 2) == [0, 1, 2, 3, 4, 5]
    manifest, _ = write(tmp_path)
    cfg = tiny()
    ids = {}
    for name, data in (("manifest", D.AVDataset(manifest, cfg, train=False)), ("shards", ShardEvalSet(tmp_path / "sh", cfg))):
        chosen, ids[name] = D.choose_clips(data, per_class=2, max_clips=3)
        assert len(chosen) == 3
        assert sorted(D.clip_ids(chosen, torch.tensor([int(x["index"]) for x in chosen]))) == sorted(ids[name])
    assert ids["manifest"] == ids["shards"] == ["clip0", "clip1", "clip2"]  # labels alternate c0, c1


# ---------------------------------------------------------------------- the split and resuming
def loader_indices(loader):
    return [batch["index"].tolist() for batch in loader]


def test_slots_split_every_epoch_into_disjoint_shares(tmp_path):
    write(tmp_path, n=10, shard_size=1)
    data = ShardTrainSet(tmp_path / "sh", tiny())
    for epoch in range(3):
        shares = [data.slot_shards(epoch, s, 4) for s in range(4)]
        assert sorted(i for share in shares for i in share) == list(range(10))
    assert data.slot_shards(0, 0, 4) != data.slot_shards(1, 0, 4) or data.slot_shards(0, 1, 4) != data.slot_shards(1, 1, 4)


def test_two_ranks_two_workers_cover_every_sample_once_per_epoch(tmp_path):
    write(tmp_path, n=48, shard_size=6, seconds=1.0)  # 8 shards: 2 per slot, 12 samples = 3 batches of 4
    cfg = tiny(workers=2, shuffle_buffer=5)
    cfg.train.batch_size, cfg.train.steps = 8, 12  # 6 steps per epoch
    data = ShardTrainSet(tmp_path / "sh", cfg)
    ranks = [loader_indices(shard_train_loader(data, cfg, 0, rank, 2)) for rank in range(2)]
    assert [len(r) for r in ranks] == [12, 12] and all(len(b) == 4 for r in ranks for b in r)
    epochs = [sorted(i for r in ranks for b in r[6 * e:6 * e + 6] for i in b) for e in range(2)]
    assert epochs[0] == epochs[1] == list(range(48))
    assert ranks[0][:6] != ranks[0][6:]  # a new order each epoch


def test_a_resumed_run_continues_where_it_stopped(tmp_path):
    write(tmp_path, n=24, shard_size=4, seconds=1.0)
    cfg = tiny(workers=2, shuffle_buffer=3)
    cfg.train.batch_size, cfg.train.steps = 4, 16  # 6 shards: 3 per worker, 12 samples = 3 batches each
    data = ShardTrainSet(tmp_path / "sh", cfg)
    full = list(shard_train_loader(data, cfg, 0))
    for start in (5, 8):  # 5: one slot mid-window in epoch 0, the other at its epoch boundary; 8: epoch 1
        resumed = list(shard_train_loader(data, cfg, start))
        assert len(resumed) == 16 - start
        for a, b in zip(full[start:], resumed):
            assert a["index"].tolist() == b["index"].tolist() and torch.equal(a["fbank"], b["fbank"])
            assert torch.equal(a["frames"], b["frames"])
    with pytest.raises(ValueError, match="6 shards cannot feed 2 rank"):
        shard_train_loader(data, tiny(workers=4), 0, 0, 2)


def test_training_from_shards_runs_and_resumes(tmp_path):
    write(tmp_path, n=12, shard_size=4, seconds=1.0)
    cfg = tiny(train_shards=str(tmp_path / "sh"))
    cfg.train.batch_size, cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = 4, 2, 1, 1
    result = tg.train(cfg, out_dir=tmp_path / "run")
    assert [r["step"] for r in result.history] == [1, 2]
    cfg.train.steps = 3  # extending the run: a change resume must be told about (issue 17)
    resumed = tg.train(cfg, out_dir=tmp_path / "run", allow_change=["train.steps"])
    assert [r["step"] for r in resumed.history] == [1, 2, 3]


def test_evaluation_during_training_reads_test_shards(tmp_path):
    """train.eval_every with data.test_shards: the logged metrics are evaluate_model's on the
    first eval_clips clips of the shards (manifest order), for the student of that step."""
    write(tmp_path, n=12, shard_size=4, seconds=1.0)
    cfg = tiny(train_shards=str(tmp_path / "sh"), test_shards=str(tmp_path / "sh"))
    cfg.train.batch_size, cfg.train.steps, cfg.train.log_every = 4, 2, 1
    cfg.train.eval_every, cfg.train.eval_clips, cfg.train.keep_best = 2, 5, "A->V R@1"
    result = tg.train(cfg, out_dir=tmp_path / "run")
    logged = {k[len("eval/"):]: v for k, v in result.history[-1].items() if k.startswith("eval/")}
    assert "A->V R@1" in logged and (tmp_path / "run" / "best.pt").exists()
    data = ShardEvalSet(tmp_path / "sh", cfg)
    first = data.subset(sorted(data.positions)[:5])
    want = tg.evaluate.evaluate_model(tg.load_model(result.checkpoint), first, progress=False)
    assert logged == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------------- bad input
def first_key(path):
    return samples_of(path)[0]["__key__"]


def break_missing_audio(path):
    rewrite(path, lambda ss: [{k: v for k, v in s.items() if k != "wav"} if i == 1 else s for i, s in enumerate(ss)])
    return samples_of(path)[1]["__key__"]


def break_missing_frame(path):
    rewrite(path, lambda ss: [{k: v for k, v in s.items() if k != "frame_05.jpg"} if i == 0 else s
                              for i, s in enumerate(ss)])
    return first_key(path)


def break_json(path):
    rewrite(path, lambda ss: [{**s, "json": b"{not json"} if i == 2 else s for i, s in enumerate(ss)])
    return samples_of(path)[2]["__key__"]


def break_truncate(path):
    keys = [s["__key__"] for s in samples_of(path)]
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with tarfile.open(path, "r|") as tar:  # the sample the cut falls in
        names = []
        try:
            for member in tar:
                names.append(member.name)
        except tarfile.ReadError:
            pass
    return next(k for k in keys if k == names[-1].split(".")[0]) if names else keys[0]


@pytest.mark.parametrize("damage, reason", [(break_missing_audio, "no audio member"),
                                            (break_missing_frame, "missing frame member"),
                                            (break_json, "JSON member does not parse"),
                                            (break_truncate, "truncated")])
def test_bad_samples_raise_naming_shard_and_key_or_are_skipped_and_counted(tmp_path, damage, reason, caplog):
    write(tmp_path, n=12, shard_size=4, seconds=1.0)
    shard = tmp_path / "sh" / "shard-000001.tar"
    key = damage(shard)
    for kind in (ShardTrainSet, ShardEvalSet):
        with pytest.raises(ShardError, match=reason) as err:
            for _ in zip(range(12), kind(tmp_path / "sh", tiny())):
                pass
        assert str(shard) in str(err.value) and key in str(err.value)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tgdp_core.shardset"):
            got = [int(x["index"]) for _, x in zip(range(12), kind(tmp_path / "sh", tiny(on_error="skip")))]
        skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        assert skipped and str(shard) in skipped[0] and key in skipped[0]
        if kind is ShardEvalSet:  # every other clip comes once
            lost = 12 - len(got)
            assert 1 <= lost <= 4 and len(got) == len(set(got))
            assert f"{lost} sample(s) skipped so far" in skipped[-1]
        else:  # training goes on over the other samples (into the next epoch)
            assert len(got) == 12


def test_training_lists_skipped_shard_samples_in_skipped_csv(tmp_path):
    """data.on_error=skip: the loader workers append each skipped sample to out_dir/skipped.csv
    (as a manifest run lists its skipped clips); a resumed run keeps the earlier rows."""
    write(tmp_path, n=12, shard_size=4, seconds=1.0)
    key = break_missing_audio(tmp_path / "sh" / "shard-000001.tar")
    cfg = tiny(train_shards=str(tmp_path / "sh"), on_error="skip", workers=2)
    cfg.train.batch_size, cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = 4, 4, 1, 1
    tg.train(cfg, out_dir=tmp_path / "run")  # 16 samples: every sample of the first epoch is read
    path = tmp_path / "run" / "skipped.csv"
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["video_id", "reason"]
    assert rows[1][0] == key and "shard-000001.tar" in rows[1][1] and "no audio member" in rows[1][1]
    assert all(r[0] == key for r in rows[1:])
    cfg.train.steps = 8
    tg.train(cfg, out_dir=tmp_path / "run", allow_change=["train.steps"])
    again = list(csv.reader(path.open()))
    assert again[:len(rows)] == rows and len(again) > len(rows)  # the second epoch skips it again


# ---------------------------------------------------------------------- commands
def run_cli(*argv):
    from tgdp_core.__main__ import main

    try:
        main([str(a) for a in argv])
    except SystemExit as exit:
        return exit.code
    return 0


def checkpoint_with_teacher(tmp_path, cfg):
    from tgdp_core.checkpoint import model_payload, save_checkpoint
    from tgdp_core.teacher import EMATeacher

    model = tg.build_model(cfg)
    teacher = EMATeacher(model.encoder)
    with torch.no_grad():
        for p in teacher.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_checkpoint(model_payload(model, teacher=teacher.state_dict()), tmp_path / "model.pt"), model, teacher


def test_shard_eval_and_embed_commands(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    manifest = make_clips(tmp_path / "data", n=6)
    assert run_cli("shard", manifest, tmp_path / "sh", "--preset", "tiny", "--shard-size", "4", "--workers", "0",
                   "--audio-format", "flac") == 0
    assert "6 clips in 2 shards" in capsys.readouterr().out
    assert shards.open_shards(tmp_path / "sh").settings["audio_format"] == "flac"
    cfg = tiny()
    path, model, teacher = checkpoint_with_teacher(tmp_path, cfg)
    for source in (manifest, tmp_path / "sh"):
        out = tmp_path / f"m-{source.name}.json"
        assert run_cli("eval", path, source, "--per-class", "2", "--max-clips", "3", "--out", out) == 0
        assert "A->V R@1" in capsys.readouterr().out
        assert out.with_suffix(".clips.txt").read_text().split() == ["clip0", "clip1", "clip2"]
    assert run_cli("probe", path, tmp_path / "sh", tmp_path / "sh", "--kind", "knn", "--no-cache") == 0
    assert "| knn both |" in capsys.readouterr().out  # probes read shards too
    out = tmp_path / "m-config.json"  # the test clips from the config: data.test_shards
    assert run_cli("eval", path, f"--data.test_shards={tmp_path / 'sh'}", "--out", out) == 0
    assert sorted(out.with_suffix(".clips.txt").read_text().split()) == [f"clip{k}" for k in range(6)]
    for flag, encoder in (("--clips", model.encoder), ("--teacher", teacher.encoder)):
        out = tmp_path / f"emb{flag}.safetensors"
        argv = ["embed", path, tmp_path / "sh", out] + (["--teacher"] if flag == "--teacher" else [])
        assert run_cli(*argv) == 0
        saved = load_file(out)
        with safe_open(out, "pt") as f:
            meta = f.metadata()
        ids = json.loads(meta["clip_ids"])
        assert meta["encoder"] == ("teacher" if flag == "--teacher" else "student") and len(ids) == 6
        items = {int(x["index"]): x for x in ShardEvalSet(tmp_path / "sh", cfg)}  # the inputs embed saw
        clips = D.read_manifest(manifest)
        for row, n in enumerate(saved["index"].tolist()):
            item = items[n]
            assert ids[row] == clips[n].video_id
            with torch.no_grad():
                ga, gv = encoder.encode(item["fbank"], "a")[0], encoder.encode(item["frames"], "v")[0]
                if flag != "--teacher":  # the student's embeddings are encode_audio / encode_visual
                    torch.testing.assert_close(saved["audio"][row], model.encode_audio(item["fbank"]))
                    torch.testing.assert_close(saved["visual"][row], model.encode_visual(item["frames"]))
            torch.testing.assert_close(saved["audio_global"][row], ga)
            torch.testing.assert_close(saved["visual_global"][row], gv)
            torch.testing.assert_close(saved["audio"][row], torch.nn.functional.normalize(ga, dim=-1))
    assert not torch.allclose(load_file(tmp_path / "emb--teacher.safetensors")["audio"],
                              load_file(tmp_path / "emb--clips.safetensors")["audio"])
    from tgdp_core.checkpoint import model_payload, save_checkpoint

    save_checkpoint(model_payload(model), tmp_path / "student.pt")
    error = run_cli("embed", tmp_path / "student.pt", tmp_path / "sh", tmp_path / "x.safetensors", "--teacher")
    assert "holds no EMA teacher" in error and not (tmp_path / "x.safetensors").exists()


def test_prepare_with_shards(tmp_path, capsys):
    from test_media import write_video

    for label in ("dog", "cat"):
        (tmp_path / "videos" / label).mkdir(parents=True)
        write_video(tmp_path / "videos" / label / f"{label}1.mp4", seconds=1.0)
    (tmp_path / "videos" / "cat" / "empty.mp4").write_bytes(b"")
    assert run_cli("prepare", tmp_path / "videos", tmp_path / "out", "--workers", "0", "--num-frames", "4",
                   "--frame-size", "32", "--seconds", "1", "--shards", "--shard-size", "1", "--fbank") == 0
    printed = capsys.readouterr().out
    assert "2 clips in 2 shards" in printed and "rejected" in printed
    source = shards.open_shards(tmp_path / "out" / "shards")
    assert source.settings["fbank"]["clip_frames"] == 1024 and source.settings["frames_per_clip"] == 4
    assert sorted(c["video_id"] for c in source.clips()) == ["cat1", "dog1"]
    with open(tmp_path / "out" / "rejects.csv", newline="") as f:  # prepare's own rejects, as before
        assert [row[0] for row in csv.reader(f)][1:] == [str(tmp_path / "videos" / "cat" / "empty.mp4")]


def test_parallel_writing_gives_the_same_shards(tmp_path):
    write(tmp_path, n=7, shard_size=3, name="one")
    manifest = tmp_path / "data" / "train.json"
    shards.write_shards(manifest, tmp_path / "two", tiny(), shard_size=3, workers=2)  # spawned processes
    one, two = (sorted((tmp_path / n).glob("shard-*")) for n in ("one", "two"))
    assert [p.name for p in one] == [p.name for p in two]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))
