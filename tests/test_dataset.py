"""Manifest dataset: alignment, feature cache, errors, sampling."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import tgdp_core as tg
from tgdp_core import dataset as D
from tgdp_core import media


def make_clips(root, n=3, seconds=5.12, frames=8, sr=16000, size=40):
    """n clips in the CAV-MAE layout: a tone per clip, frames of one flat colour each."""
    rng = np.random.default_rng(0)
    entries = []
    for k in range(n):
        vid = f"clip{k}"
        t = np.arange(int(seconds * sr)) / sr
        wave = 0.3 * np.sin(2 * np.pi * (300 + 200 * k) * t) + 0.01 * rng.standard_normal(t.size)
        (root / "audio").mkdir(parents=True, exist_ok=True)
        sf.write(root / "audio" / f"{vid}.wav", wave.astype(np.float32), sr, subtype="PCM_16")
        for i in range(frames):
            (root / "frames" / f"frame_{i}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (size + 8, size), (30 * i, 80 * k, 200)).save(root / "frames" / f"frame_{i}" / f"{vid}.jpg")
        entries.append({"video_id": vid, "wav": str(root / "audio" / f"{vid}.wav"),
                        "video_path": str(root / "frames"), "labels": f"c{k % 2}"})
    (root / "train.json").write_text(json.dumps({"data": entries}))
    (root / "labels.csv").write_text("index,mid,display_name\n0,c0,even\n1,c1,odd\n")
    return root / "train.json"


@pytest.fixture
def cfg():
    return tg.Config.preset("tiny", data={"workers": 0})


def test_segment_bounds_follow_the_reference_formula():
    for i in range(16):  # 16 frames over 1024 fbank frames, 416-frame segments (docs/method.md, "Inputs")
        centre = 64 * i
        start = min(max(0, centre - 208), 1024 - 416)
        assert D.segment_bounds(i, 16, 1024, 416) == (start, start + 416)
    assert D.segment_bounds(0, 8, 512, 192) == (0, 192)
    assert D.segment_bounds(4, 8, 512, 192) == (256 - 96, 256 + 96)
    assert D.segment_bounds(7, 8, 512, 192) == (320, 512)


def test_training_and_eval_items_hold_aligned_segments(tmp_path, cfg):
    manifest = make_clips(tmp_path)
    train = D.AVDataset(manifest, cfg, train=True)
    item = train[(1, 5, 0)]
    m = cfg.model
    assert item["fbank"].shape == (m.audio_frames, m.mel_bins) and item["frames"].shape == (3, 96, 96)
    assert item["labels"].tolist() == [0.0, 1.0]
    full = media.fbank(media.read_audio(tmp_path / "audio" / "clip1.wav"), 16000, m.mel_bins, 512)
    start, end = D.segment_bounds(5, 8, 512, m.audio_frames)
    assert torch.allclose(item["fbank"], full[start:end], atol=2e-2)  # cached as float16
    expected = media.normalize_frames(media.load_frame(tmp_path / "frames" / "frame_5" / "clip1.jpg", 96))
    assert torch.allclose(item["frames"], expected, atol=1e-6)
    clip = D.AVDataset(manifest, cfg, train=False)[2]
    assert clip["fbank"].shape == (8, m.audio_frames, m.mel_bins) and clip["frames"].shape == (8, 3, 96, 96)


def test_cache_is_built_once_and_keyed_by_settings(tmp_path, cfg, monkeypatch):
    manifest = make_clips(tmp_path)
    first = D.AVDataset(manifest, cfg, train=True)
    monkeypatch.setattr(D.ClipReader, "fbank", lambda *a: pytest.fail("cache miss: decoded a wav again"))
    again = D.AVDataset(manifest, cfg, train=True)
    assert again.cache.folder == first.cache.folder
    assert torch.equal(again[(0, 0, 0)]["fbank"], first[(0, 0, 0)]["fbank"])
    monkeypatch.undo()
    # a regenerated file (same path, new content) must not be served from the old cache
    wave, sr = sf.read(tmp_path / "audio" / "clip0.wav")
    sf.write(tmp_path / "audio" / "clip0.wav", -wave, sr, subtype="PCM_16")
    assert D.AVDataset(manifest, cfg, train=True).cache.folder != first.cache.folder
    other = tg.Config.preset("tiny", data={"workers": 0}, model={"mel_bins": 128})
    assert D.AVDataset(manifest, other, train=True).cache.folder != first.cache.folder
    uncached = D.AVDataset(manifest, tg.Config.preset("tiny", data={"workers": 0, "cache": False}), train=True)
    assert uncached.cache is None
    assert torch.allclose(uncached[(2, 3, 0)]["fbank"], first[(2, 3, 0)]["fbank"], atol=2e-2)


def test_bad_clips_raise_naming_the_file_or_are_skipped_and_reported(tmp_path, cfg):
    manifest = make_clips(tmp_path)
    (tmp_path / "audio" / "clip1.wav").write_bytes(b"garbage")
    with pytest.raises(media.MediaError, match="clip1"):
        D.AVDataset(manifest, cfg, train=True)
    skip = tg.Config.preset("tiny", data={"workers": 0, "on_error": "skip"})
    data = D.AVDataset(manifest, skip, train=True)
    assert len(data) == 2 and list(data.skipped) == ["clip1"]
    with pytest.raises(FileNotFoundError, match="prepare"):
        D.read_manifest(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"data": [{"video_id": "x"}]}')
    with pytest.raises(ValueError, match="entry 0 lacks wav, video_path"):
        D.read_manifest(tmp_path / "bad.json")


def test_step_sampler_is_a_function_of_the_step_and_splits_ranks():
    full = D.StepSampler(10, 8, global_batch=6, seed=3, start_step=0, total_steps=5)
    batches = list(full)
    assert len(batches) == 5 and all(len(b) == 6 for b in batches)
    resumed = list(D.StepSampler(10, 8, 6, 3, start_step=2, total_steps=5))
    assert resumed == batches[2:]
    ranks = [list(D.StepSampler(10, 8, 6, 3, 0, 5, rank=r, world=2)) for r in range(2)]
    assert all(ranks[0][s] + ranks[1][s] == batches[s] for s in range(5))
    # every clip once per epoch: steps 0-4 cover 30 samples = 3 epochs of 10 clips
    clips = [c for b in batches for c, _, _ in b]
    assert all(sorted(clips[e * 10:(e + 1) * 10]) == list(range(10)) for e in range(3))
    with pytest.raises(ValueError, match="divisible"):
        D.StepSampler(10, 8, 5, 0, 0, 1, world=2)


def test_visual_augmentation_is_seeded(tmp_path):
    image = torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8)
    a = D.random_resized_crop_flip(image, torch.Generator().manual_seed(1))
    b = D.random_resized_crop_flip(image, torch.Generator().manual_seed(1))
    c = D.random_resized_crop_flip(image, torch.Generator().manual_seed(2))
    assert a.shape == image.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_embed_clips_and_evaluate_model_on_a_manifest(tmp_path, cfg):
    manifest = make_clips(tmp_path, n=4)
    test_set = D.AVDataset(manifest, cfg, train=False)
    model = tg.build_model(cfg).eval()
    a, v, y, fy = tg.evaluate.embed_clips(model, test_set, batch_size=3, progress=False)
    assert (fy == -1).all()  # make_clips writes no frame_labels
    assert a.shape == v.shape == (4, 8, cfg.model.embed_dim) and y.shape == (4, 2)
    item = test_set[2]  # the same numbers as encoding one clip's pairs directly
    assert torch.allclose(a[2], model.encode_audio(item["fbank"]), atol=1e-5)
    assert torch.allclose(v[2], model.encode_visual(item["frames"]), atol=1e-5)
    metrics = tg.evaluate.evaluate_model(model, test_set, test_set, probe_epochs=5, progress=False)
    sim = tg.evaluate.clip_similarity(a, v)
    assert metrics["A->V R@1"] == tg.evaluate.recall_at_k(sim)["R@1"]
    assert {"V->A R@5", "A->V MedR", "A->V P@1", "mAP"} <= set(metrics)


# ---------------------------------------------------------------------- issue 17: clear input errors
def test_clips_a_cache_recorded_as_failed_raise_under_on_error_raise(tmp_path, cfg):
    """Item 4: a cache built with skip no longer hides its failures from a later raise run."""
    manifest = make_clips(tmp_path)
    (tmp_path / "audio" / "clip1.wav").write_bytes(b"garbage")
    skip = tg.Config.preset("tiny", data={"workers": 0, "on_error": "skip"})
    with pytest.warns(UserWarning, match=r"1 of 3 clips were skipped \(data.on_error=skip\).*e.g. clip1: .*clip1.wav"):
        D.AVDataset(manifest, skip, train=False)
    with pytest.raises(media.MediaError, match=r"clip1: .*clip1.wav: unreadable or corrupt audio.*recorded when "
                                               r"the feature cache .* was built with data.on_error=skip"):
        D.AVDataset(manifest, cfg, train=True)


def test_no_usable_clip_and_too_few_frames_are_clear_errors(tmp_path, cfg):
    """Item 6: both used to end in ZeroDivisionError."""
    manifest = make_clips(tmp_path, n=2)
    for k in range(2):
        (tmp_path / "audio" / f"clip{k}.wav").write_bytes(b"garbage")
    skip = tg.Config.preset("tiny", data={"workers": 0, "on_error": "skip"})
    with pytest.raises(ValueError, match=r"train.json: no usable clips: all 2 were skipped .* e.g. clip0: "):
        D.AVDataset(manifest, skip, train=True)
    with pytest.raises(ValueError, match="no usable clips"):
        D.StepSampler(0, 8, 4, 0, 0, 1)

    manifest = make_clips(tmp_path / "eight", n=2, frames=8)
    sixteen = tg.Config.preset("tiny", data={"workers": 0, "frames_per_clip": 16, "on_error": "skip"})
    with pytest.raises(ValueError, match=r"the data has 8 frames per clip \(frame_0 .. frame_7 in .*\), the config "
                                         r"reads 16 \(data.frames_per_clip\): set --data.frames_per_clip=8"):
        D.AVDataset(manifest, sixteen, train=True)


def test_more_frames_or_longer_audio_than_used_warn_once_saying_what_is_used(tmp_path, recwarn):
    """Item 6: data is no longer cut silently."""
    manifest = make_clips(tmp_path, n=1, seconds=10.0, frames=10)
    D.AVDataset(manifest, tg.Config.preset("tiny", data={"workers": 0}), train=True)
    messages = [str(w.message) for w in recwarn.list]
    assert any("more than 8 frames per clip; only frame_0 .. frame_7 are used" in m for m in messages), messages
    assert any("holds 10.00 s of audio; only the first 5.12 s are used (data.clip_frames=512" in m for m in messages)
    assert len(messages) == 2
    recwarn.clear()
    fits = make_clips(tmp_path / "fits", n=1)  # the tiny layout exactly: 5.12 s, 8 frames
    D.AVDataset(fits, tg.Config.preset("tiny", data={"workers": 0}), train=True)
    assert not recwarn.list


def test_absurd_samples_are_an_input_error_naming_the_file(tmp_path, cfg):
    """Item 7: 1e30 samples gave an infinite fbank and NaN at step 0, naming nothing."""
    manifest = make_clips(tmp_path, n=2)
    loud = tmp_path / "audio" / "clip1.wav"
    sf.write(loud, np.full(16000, 1e30, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(media.MediaError, match=rf"{loud}: samples reach 1e\+30, far outside the \[-1, 1\] range"):
        D.AVDataset(manifest, cfg, train=True)
    clip = D.read_manifest(manifest)[1]
    with pytest.raises(media.MediaError, match=f"{loud}: samples reach"):
        D.ClipReader(cfg).fbank(clip)  # the uncached path checks the same way


@pytest.mark.parametrize("text, message", [
    ('{"data": {"video_id": "x"}}', r'its "data" is dict'),
    ('{"data": "clips.csv"}', r'its "data" is str'),
    ('[{"video_id": "x"}]', r"it holds list \[\{"),
    ('{"clips": []}', r"it holds dict"),
    ('{"data": ["x.mp4"]}', r'entry 0 is str \'x.mp4\', not an object with video_id, wav, video_path'),
])
def test_a_manifest_of_the_wrong_shape_names_the_file_and_the_shape(tmp_path, text, message):
    """Item 9: a raw TypeError before."""
    (tmp_path / "m.json").write_text(text)
    with pytest.raises(ValueError, match=rf"m.json: .*{message}") as info:
        D.read_manifest(tmp_path / "m.json")
    assert '"data": [{"video_id"' in str(info.value)


def test_an_unwritable_cache_folder_names_it_and_data_cache_dir(tmp_path):
    """Item 10."""
    manifest = make_clips(tmp_path)
    (tmp_path / "cache").write_text("a file")
    cfg = tg.Config.preset("tiny", data={"workers": 0, "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(tg.folders.FolderError, match=rf"{tmp_path / 'cache'} is a file, not a folder; set "
                                                      r"data.cache_dir to a writable folder"):
        D.AVDataset(manifest, cfg, train=True)
    if Path("/proc/self").is_dir():  # unwritable even for root
        cfg.data.cache_dir = "/proc/tgdp-cache"
        with pytest.raises(tg.folders.FolderError, match="cannot create the folder /proc/tgdp-cache.*data.cache_dir"):
            D.AVDataset(manifest, cfg, train=True)
