"""AV-Digits: format, determinism, held-out splits, relevance, and no cross-modal shortcut."""
import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tgdp_core import avdigits as avd

N_TRAIN, N_TEST = 40, 40


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The same set twice (2 workers, then in-process) and one with another seed."""
    root = tmp_path_factory.mktemp("avdigits")
    first = avd.generate(root / "a", N_TRAIN, N_TEST, seed=0, workers=2)
    again = avd.generate(root / "b", N_TRAIN, N_TEST, seed=0, workers=1)
    other = avd.generate(root / "c", 4, 4, seed=1, workers=1)
    return first, again, other


def manifest(root: Path, split: str) -> list[dict]:
    return json.loads((root / f"{split}.json").read_text())["data"]


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def test_manifests_labels_and_paths(sets):
    root = sets[0]
    with open(root / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["mid"] for r in rows] == [f"digit_{d}" for d in range(10)]
    assert rows[3]["display_name"] == "three" and rows[0]["index"] == "0"
    meta = json.loads((root / "avdigits.json").read_text())
    assert meta["version"] == avd.VERSION and meta["arguments"]["n_train"] == N_TRAIN
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        entries, relevance = manifest(root, split), avd.load_relevance(root, split)
        firsts = json.loads((root / f"{split}_first_digit.json").read_text())["data"]
        assert len(entries) == n and [e["video_id"] for e in entries] == relevance.video_ids
        for entry, first, digits in zip(entries, firsts, relevance.digits):
            assert set(entry) == {"video_id", "wav", "video_path", "labels", "frame_labels"}
            assert Path(entry["wav"]).is_absolute() and Path(entry["wav"]).exists()
            assert Path(entry["video_path"]) == root / "frames"
            for i in range(avd.FRAMES_PER_CLIP):
                assert (Path(entry["video_path"]) / f"frame_{i}" / f"{entry['video_id']}.jpg").exists()
            assert entry["labels"].split(",") == [f"digit_{d}" for d in sorted(set(digits.tolist()))]
            assert first["labels"] == f"digit_{digits[0]}"


def test_media_rate_length_and_frame_size(sets):
    root = sets[0]
    entry = manifest(root, "test")[0]
    info = sf.info(entry["wav"])
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (16_000, 1, 81_920, "PCM_16")
    frames = [Image.open(Path(entry["video_path"]) / f"frame_{i}" / f"{entry['video_id']}.jpg") for i in range(8)]
    assert len(frames) == 8 and all(f.size == (128, 128) and f.mode == "RGB" for f in frames)


def test_deterministic_from_seed(sets):
    first, again, other = sets
    for name in ("train.json", "test.json", "train_first_digit.json", "labels.csv", "avdigits.json"):
        # Manifests hold absolute paths: equal up to the output folder.
        assert (first / name).read_text().replace(str(first), "") == (again / name).read_text().replace(str(again), "")
    for wav in sorted((first / "audio").iterdir()):
        assert wav.read_bytes() == (again / "audio" / wav.name).read_bytes()
    for jpg in sorted((first / "frames" / "frame_5").iterdir()):
        assert np.array_equal(np.asarray(Image.open(jpg)), np.asarray(Image.open(again / "frames" / "frame_5" / jpg.name)))
    for split in avd.SPLITS:
        a, b = avd.load_relevance(first, split), avd.load_relevance(again, split)
        assert np.array_equal(a.packed_masks, b.packed_masks) and np.array_equal(a.speech, b.speech)
    clip = "avd-test-00000.wav"
    assert (first / "audio" / clip).read_bytes() != (other / "audio" / clip).read_bytes()
    assert not np.array_equal(avd.load_relevance(first, "test").digits[:4], avd.load_relevance(other, "test").digits)


def test_test_split_holds_out_voices_handwriting_and_fonts(sets):
    train, test = (avd.load_relevance(sets[0], split).nuisance for split in avd.SPLITS)
    variants = [{v.split("+")[1] for v in n["voice"]} for n in (train, test)]
    assert variants[0] and variants[1] and not variants[0] & variants[1]
    rows = [set(n["glyph_row"].ravel().tolist()) - {-1} for n in (train, test)]
    assert rows[0] and rows[1] and not rows[0] & rows[1]
    assert all(r % avd.HELD_OUT_EVERY == avd.HELD_OUT_EVERY - 1 for r in rows[1])
    fonts = [set(n["glyph_font"].ravel().tolist()) - {""} for n in (train, test)]
    assert fonts[0] and fonts[1] and not fonts[0] & fonts[1]


def test_sequences_unique_and_retrieval_bounds(sets):
    train, test = (avd.load_relevance(sets[0], split).digits for split in avd.SPLITS)
    assert len(np.unique(test, axis=0)) == N_TEST and len(np.unique(train, axis=0)) == N_TRAIN
    assert not {tuple(s) for s in train} & {tuple(s) for s in test}
    meta = json.loads((sets[0] / "avdigits.json").read_text())["splits"]["test"]
    assert meta["chance_r1"] == pytest.approx(100 / N_TEST) and meta["ceiling_r1"] == 100.0
    # Two clips share a sequence: a perfect model gets one of the pair right at random.
    assert avd.retrieval_bounds(np.array([[1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 1], [5, 6, 7, 8]])) == {
        "chance_r1": 25.0, "ceiling_r1": 75.0}


def test_events_are_aligned_and_relevant_content_is_a_minority(sets):
    for split in avd.SPLITS:
        rel = avd.load_relevance(sets[0], split)
        # Spoken digit j is centred between its frames 2j and 2j+1 (at 1.28 j + 0.32 s, +-0.15 s),
        # so the 1.28 s window around either frame holds it.
        centres = rel.speech.mean(axis=-1)  # (N, 4)
        assert np.all(np.abs(centres - (np.arange(4) * 1.28 + 0.32)) <= 0.15 + 1e-3)
        for frame in range(8):
            start = avd.window_start(frame, 1.28)
            own = rel.speech[:, frame // 2]
            # at speech_share 0.4 the longer stems overhang the window in about one pair in ten
            # (88-90 % inside on the default 5,000-clip set; this fixture is a few dozen clips)
            assert np.mean((own[:, 0] >= start - 0.05) & (own[:, 1] <= start + 1.28 + 0.05)) >= 0.75
        spoken = (rel.speech[..., 1] - rel.speech[..., 0]).sum(axis=1) / avd.CLIP_SECONDS  # (N,)
        assert 0.15 < spoken.mean() <= 0.4 and spoken.max() <= 0.5
        shares, touched = [], []
        for clip in range(len(rel.video_ids)):
            for frame in range(8):
                mask = rel.mask(clip, frame)
                assert np.array_equal(rel.boxes[clip, frame], avd._bbox(mask))
                shares.append(avd.visual_relevance(mask, 96, 16).mean())
                touched.append((avd.visual_relevance(mask, 96, 16, min_cover=0).sum(),
                                avd.visual_relevance(mask, 128, 16, min_cover=0).sum()))
        touched = np.array(touched)
        assert 0.02 < np.mean(shares) <= 0.25
        # on the 6 x 6 grid a digit fills a 3 x 3 block of tiny's patches (a quarter) or less; at
        # the largest size a rotated glyph's box can need a fourth cell along one side (4 x 3: 0.5 %
        # of the default set's frames). The block's cell edges fall between the stored 128 px
        # frame's 16 px patches: 5 x 5 (6 x 5 rotated) of 8 x 8
        assert np.mean(touched[:, 0] <= 9) > 0.97 and touched[:, 0].max() <= 12
        assert np.mean(touched[:, 1] <= 25) > 0.97 and touched[:, 1].max() <= 30
        # Frames 2j and 2j+1 show the same glyph, moved a little.
        sizes = rel.boxes[..., 2:] - rel.boxes[..., :2]  # (N, 8, 2)
        assert np.all(np.abs(sizes[:, 0::2] - sizes[:, 1::2]) <= 1)


def test_visual_relevance_on_a_hand_made_mask():
    mask = np.zeros((128, 128), bool)
    mask[10:50, 70:100] = True  # rows 10..49, columns 70..99
    tokens = avd.visual_relevance(mask, 96, 16)
    assert tokens.shape == (36,) and tokens.dtype == bool
    # Direct check on a common refinement: 384 = 3 * 128 = 4 * 96, a 96 px patch is 64 x 64 there.
    fine = mask.repeat(3, axis=0).repeat(3, axis=1).astype(float)
    cover = fine.reshape(6, 64, 6, 64).mean(axis=(1, 3))
    assert np.array_equal(tokens, (cover >= avd.MIN_COVER).ravel())
    assert set(np.nonzero(tokens)[0]) == {3, 4, 9, 10, 15, 16}  # rows 0-2, columns 3-4 (raster)
    assert np.array_equal(avd.visual_relevance(np.array([70, 10, 100, 50]), 96, 16), tokens)
    assert np.array_equal(avd.visual_relevance(mask, 128, 16), (mask.reshape(8, 16, 8, 16).mean(axis=(1, 3)) >= 0.05).ravel())


def test_audio_relevance_on_a_hand_made_example():
    assert avd.window_start(0, 1.92) == 0.0 and avd.window_start(3, 1.92) == pytest.approx(0.96)
    assert avd.window_start(7, 1.92) == pytest.approx(3.2)  # centre 4.48 s, shifted back to fit 5.12 s
    # The same windows as the training loader's (tiny: 8 frames, 512 fbank frames, segments of 192).
    from tgdp_core.dataset import segment_bounds

    for frame in range(8):
        assert avd.window_start(frame, 1.92) == pytest.approx(segment_bounds(frame, 8, 512, 192)[0] * 0.01)
    # 192 fbank frames x 64 mel bins, patch 16: 4 frequency rows x 12 columns of 160 ms.
    tokens = avd.audio_relevance(np.array([[0.5, 0.7], [3.0, 3.1]]), 0.32, 192, 64, 16)
    assert tokens.shape == (48,) and tokens.dtype == bool
    # Columns start at 0.32 + 0.16 t: [0.48, 0.64) and [0.64, 0.80) overlap 0.5..0.7; 3.0 s is past the window.
    expected = {f * 12 + t for f in range(4) for t in (1, 2)}
    assert set(np.nonzero(tokens)[0]) == expected


def test_no_cross_modal_nuisance_correlation(sets):
    """Glyph colour, size and position against voice pitch, speed, loudness and timing: ~0.

    The visual side is measured from the frames (pixels under the stored masks), the loudness
    from the waveforms, so the audit covers what a model sees, not only the generator's intent.
    """
    visual, audio = [], []
    for split in avd.SPLITS:
        rel = avd.load_relevance(sets[0], split)
        for clip, entry in enumerate(manifest(sets[0], split)):
            wave, _ = sf.read(entry["wav"])
            for j in range(4):
                frame = np.asarray(Image.open(Path(entry["video_path"]) / f"frame_{2 * j}" / f"{entry['video_id']}.jpg"))
                mask = rel.mask(clip, 2 * j)
                onset, offset = (rel.speech[clip, j] * avd.SAMPLE_RATE).astype(int)
                visual.append((luminance(frame[mask] / 255).mean(), mask.sum(), rel.nuisance["glyph_centre"][clip, j, 0],
                               luminance(rel.nuisance["glyph_rgb"][clip, j]), rel.nuisance["glyph_size"][clip, j]))
                audio.append((rel.nuisance["pitch"][clip], rel.nuisance["speech_speed"][clip, j],
                              20 * np.log10(np.sqrt(np.mean(wave[onset:offset] ** 2))), rel.speech[clip, j, 0] - 1.28 * j))
    visual, audio = np.array(visual, float), np.array(audio, float)
    # The measurements are real: pixels under the masks carry the painted colour, areas the size.
    assert np.corrcoef(visual[:, 0], visual[:, 3])[0, 1] > 0.7
    assert np.corrcoef(visual[:, 1], visual[:, 4])[0, 1] > 0.5
    # 320 events (80 clips for the clip-level pitch): |r| < 0.3 is about 3 standard errors at 80.
    r = np.corrcoef(visual[:, :3].T, audio.T)[:3, 3:]  # (glyph luminance, area, x) x (pitch, speed, loudness, onset)
    assert np.abs(r).max() < 0.3, r


def test_knobs_cli_and_validation(tmp_path):
    parser = argparse.ArgumentParser()
    avd.add_arguments(parser)
    defaults = parser.parse_args([])
    assert all(getattr(defaults, k) == v for k, v in vars(avd.Knobs()).items())
    args = parser.parse_args(["--out", str(tmp_path / "set"), "--n-train", "3", "--n-test", "2", "--workers", "1",
                              "--num-classes", "3", "--digit-scale", "0.2", "--snr-db", "0"])
    assert avd.main(args) == 0
    assert len((tmp_path / "set" / "labels.csv").read_text().splitlines()) == 4  # header + 3 classes
    assert avd.load_relevance(tmp_path / "set", "train").digits.max() < 3
    assert json.loads((tmp_path / "set" / "avdigits.json").read_text())["arguments"]["digit_scale"] == 0.2
    with pytest.raises(ValueError, match="unknown AV-Digits knob"):
        avd.generate(tmp_path / "x", 1, 1, snr=3)
    with pytest.raises(ValueError, match="num_classes"):
        avd.generate(tmp_path / "x", 1, 1, num_classes=11)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("not a set")
    with pytest.raises(FileExistsError):
        avd.generate(tmp_path / "busy", 1, 1)


def test_ensure_default_generates_only_when_missing_or_stale(tmp_path, monkeypatch):
    calls = []

    def fake_generate(root, n_train=avd.DEFAULT_TRAIN, n_test=avd.DEFAULT_TEST, seed=0, workers=2, **knobs):
        arguments = dict(n_train=n_train, n_test=n_test, seed=seed, **vars(avd.Knobs(**knobs)))
        calls.append(arguments)
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "avdigits.json").write_text(json.dumps(dict(version=avd.VERSION, arguments=arguments)))

    monkeypatch.setattr(avd, "generate", fake_generate)
    paths = avd.ensure_default(root=tmp_path / "set")
    assert calls == [dict(n_train=4000, n_test=1000, seed=0, **vars(avd.Knobs()))]
    assert paths["train"] == tmp_path / "set" / "train.json"
    avd.ensure_default(root=tmp_path / "set")
    assert len(calls) == 1  # present and current: reused
    (tmp_path / "set" / "avdigits.json").write_text(json.dumps(dict(version="0", arguments={})))
    avd.ensure_default(root=tmp_path / "set")
    assert len(calls) == 2  # stale: regenerated


def test_background_contrast_flattens_the_texture(tmp_path):
    from PIL import Image

    def background_spread(root):
        """Pixel spread of each frame outside the digit's box, averaged over clips and frames."""
        entries, relevance = manifest(root, "train"), avd.load_relevance(root, "train")
        spreads = []
        for n, entry in enumerate(entries):
            for i in range(avd.FRAMES_PER_CLIP):
                image = np.asarray(Image.open(f"{entry['video_path']}/frame_{i}/{entry['video_id']}.jpg"), np.float32)
                spreads.append(image[~relevance.mask(n, i)].std(axis=0).mean())
        return float(np.mean(spreads))

    knobs = dict(clutter_density=0.0)
    flat = avd.generate(tmp_path / "flat", 3, 1, workers=1, background_contrast=0.0, **knobs)
    textured = avd.generate(tmp_path / "textured", 3, 1, workers=1, background_contrast=1.0, **knobs)
    assert background_spread(flat) < 0.3 * background_spread(textured)
    with pytest.raises(ValueError, match="background_contrast"):
        avd.generate(tmp_path / "bad", 1, 1, background_contrast=1.5)


def test_grid_cells_put_still_digits_on_whole_cells(tmp_path):
    root = avd.generate(tmp_path / "grid", 4, 1, workers=1, grid_cells=6, digit_scale=0.33)
    boxes = avd.load_relevance(root, "train").boxes.astype(float)  # (N, 8, 4) x0, y0, x1, y1
    cell = avd.FRAME_SIZE / 6
    centres = (boxes[..., :2] + boxes[..., 2:]) / 2 / cell  # in cells
    # A glyph spanning k cells is centred on a block of k whole cells: its centre sits on a
    # cell centre (odd k) or a cell border (even k), to within the glyph's rasterisation.
    span = np.ceil((boxes[..., 2:] - boxes[..., :2]).max(-1, keepdims=True) / cell - 1e-9)
    offset = np.where(span % 2 == 1, 0.5, 0.0)
    assert np.abs((centres - offset) - np.round(centres - offset)).max() < 2.5 / cell
    assert np.array_equal(boxes[:, 0::2], boxes[:, 1::2])  # the glyph holds still within its event
    with pytest.raises(ValueError, match="grid_cells"):
        avd.generate(tmp_path / "bad", 1, 1, grid_cells=-1)


def test_dark_ink_share_draws_dark_glyphs_on_light_grounds(tmp_path):
    root = avd.generate(tmp_path / "dark", 3, 1, workers=1, dark_ink_share=1.0, clutter_density=0.0)
    relevance = avd.load_relevance(root, "train")
    luma = np.array([0.299, 0.587, 0.114])
    assert (relevance.nuisance["glyph_rgb"] @ luma).max() <= 0.35 + 1e-6
    entry = manifest(root, "train")[0]
    image = np.asarray(Image.open(f"{entry['video_path']}/frame_0/{entry['video_id']}.jpg"), np.float32) / 255
    assert (image[~relevance.mask(0, 0)] @ luma).mean() > 0.5
