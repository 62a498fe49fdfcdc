"""Manifest dataset: alignment, feature cache, errors, sampling."""
import json

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
