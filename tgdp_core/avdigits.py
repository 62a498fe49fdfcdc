"""AV-Digits: the built-in audio-visual benchmark, spoken and written digit sequences in clutter.

TG-DP exists to remove semantic noise: a contrastive view built from random masks keeps silent
spectrogram stretches and uninformative backgrounds, the teacher's guided masks should keep the
informative tokens. AV-Digits makes the informative tokens a known minority, so the effect can
be seen (which tokens the teacher keeps) and measured (retrieval, probes) on a laptop CPU.

A clip is a 5.12 s "video": 8 frames (frame i at 0.64 i s) and a 16 kHz mono waveform.

    event j (j = 0..3) has a digit d_j
    frames 2j and 2j+1 (at 1.28 j and 1.28 j + 0.64 s) show d_j written (handwritten or
        typeset, small, among clutter; frame 2j+1 is the same glyph, held still on the patch
        grid by default, moved by a few pixels with grid_cells=0)
    d_j is spoken once by the clip's voice, centred within +-0.15 s of 1.28 j + 0.32 s,
        the midpoint of its two frames

Speech sits between the frames that show it, so the audio window the loaders pair with either
frame (centred on the frame's time, docs/method.md) holds that digit's speech and at most a few
tens of ms of a neighbour's when the window is one event long (1.28 s, the tiny preset): no
training pair holds more than 20 % of another digit's speech. With speech anywhere in a 1.28 s
slot starting at frame 2j (version 3) and the 1.92 s windows tiny used then, 56 % of the pairs
held more than half of a second digit's speech besides their own.

The relevant content is a minority: the digit's box is at most `digit_scale` (default 0.5) of
the frame side and, by default (`grid_cells` 6), sits centred on a block of whole cells of the
tiny preset's 6 x 6 patch grid, so it touches at most 3 x 3 of the 6 x 6 patches at 96 px (a
quarter; ink covers about 18 % of them), 4 x 3 when rotation widens the largest glyphs (0.5 %
of the default set's frames); the rest is textures, shapes, lines and letters.
Speech fills about `speech_share` (default 0.4) of the duration; the rest is a noise bed, quiet
stretches, babble words, tones, chirps and noise bursts.

Only the digit identity (and, through the slots, its order) is shared by the two modalities.
Every nuisance attribute (glyph source, font, colour, size, position, rotation, background;
voice, speed, pitch, loudness, onset, distractor sounds) is drawn from a per-clip random stream
of its own modality: the visual and audio streams of a clip are independent by construction,
so no attribute can stand in for the digits across modalities.

Splits. Test clips use voices (espeak-ng variants), handwriting samples (rows of scikit-learn's
`load_digits`) and fonts that training never sees: of each sorted pool, item k is held out for
test iff k % 5 == 4.

Retrieval bounds. Chance R@1 over N test clips is 1/N (0.1 % over 1,000). The ceiling is 100 %
when the test clips' 4-digit sequences are distinct, which `generate` guarantees whenever
n_test <= num_classes ** 4 (10,000 at the default 10 classes): sequences are drawn without
replacement, test first, then train from the rest of the same permutation (so train and test
sequences are also disjoint while n_train + n_test <= num_classes ** 4). Beyond that the
ceiling a perfect model reaches is (distinct test sequences) / N; `avdigits.json` records both
bounds.

Layout of a generated set (the CAV-MAE format that real data uses):

    OUT/audio/{video_id}.wav               16 kHz mono PCM16, 5.12 s
    OUT/frames/frame_{i}/{video_id}.jpg    128 x 128 RGB, i = 0..7
    OUT/train.json, OUT/test.json          {"data": [{"video_id", "wav", "video_path", "labels"}]}
                                           labels: the digits present, e.g. "digit_3,digit_7"
    OUT/train_first_digit.json, ...        the same clips, single label: the first digit
    OUT/labels.csv                         index,mid,display_name (digit_0,zero ...)
    OUT/relevance_{split}.npz              ground truth, see `load_relevance`
    OUT/avdigits.json                      version, arguments, retrieval bounds, measured shares

Speech stems are rendered once with espeak-ng by data/avdigits/make_stems.py and committed;
nothing here needs espeak-ng.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import math
import multiprocessing
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from .formats import FRAME_SHIFT_MS, SAMPLE_RATE

VERSION = "4"  # 2: manifests carry frame_labels; 3: dark_ink_share, background_contrast; 4: speech between its frames, grid_cells
CLIP_SECONDS = 5.12
CLIP_SAMPLES = round(CLIP_SECONDS * SAMPLE_RATE)  # 81,920
FRAMES_PER_CLIP = 8
EVENTS_PER_CLIP = 4
FRAME_STEP_S = CLIP_SECONDS / FRAMES_PER_CLIP  # 0.64 s: frame i is at i * 0.64 s
SLOT_SAMPLES = CLIP_SAMPLES // EVENTS_PER_CLIP  # 1.28 s between events (and their frames 2j)
FRAME_SIZE = 128  # stored frames are FRAME_SIZE x FRAME_SIZE; loaders resize per preset
FBANK_SHIFT_S = FRAME_SHIFT_MS / 1000  # Kaldi fbank frame shift
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "test")
DEFAULT_TRAIN, DEFAULT_TEST = 4000, 1000  # clips per split of the default set
HELD_OUT_EVERY = 5  # item k of a sorted pool (voice variants, handwriting rows, fonts) is test iff k % 5 == 4
STEMS_DIR = Path(__file__).resolve().parents[1] / "data" / "avdigits"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "data" / "generated" / "avdigits"  # git-ignored
# A patch counts as holding the digit when ink covers at least this share of its area: a
# stroke crossing a 16 px patch covers 10-30 % of it, a grazing corner a few percent.
MIN_COVER = 0.05
SHARE_GRIDS = (96, FRAME_SIZE)  # image sizes (tiny's 96 and the stored 128) whose relevant-patch shares are reported
SHARE_PATCH = 16

# Typeset glyphs: the fonts that ship with matplotlib (found through its font manager).
FONT_FAMILIES = ("DejaVu Sans", "DejaVu Sans Mono", "DejaVu Serif", "STIXGeneral",
                 "cmb10", "cmr10", "cmss10", "cmti10", "cmtt10")
# Distractor glyphs: letters that do not look like a digit (no O o D Q, I l J T, Z z, S s, B, G b, g q).
LETTERS = "ACEFHKMNPRUVWXYacefhkmnprtuvwxy"
GLYPH_RENDER_PX = 64  # fonts are rasterised at this size, then scaled down (sharp up to ~43 px)
HANDWRITING_PX = 60  # load_digits' 8 x 8 (+1 px border) images are upscaled smoothly to this first
# Ink of upscaled handwriting: load_digits values are pen-coverage counts 0..16 (scaled to 0..1)
# and a bicubic upscale blurs them; a soft ramp from 0.3 to 0.6 keeps the strokes, drops the halo.
HANDWRITING_INK = (0.3, 0.6)
MAX_ROTATION_DEG = 12.0
MIN_SIZE_FACTOR = 0.7  # each glyph's box side is drawn from U(0.7, 1) * digit_scale * FRAME_SIZE
MOTION_PX = 3  # frame 2j+1 shows the glyph moved by up to this many pixels: a moving "video"
PLACE_TRIES = 10  # attempts to place a distractor letter off the digit before dropping it
CAMERA_SHAKE_PX = 4  # frames are crops of a larger background canvas, moved up to this much
MIN_CONTRAST = 0.3  # minimum luminance difference between a glyph and the background under it
# dark_ink clips: grounds from [LIGHT_GROUND, 1]^3, glyph colours from [0, DARK_INK]^3. A tiny ViT
# trained from scratch learns glyph shapes slowly when their polarity flips from clip to clip
# (README, quickstart; data/avdigits/probe_learnability.py measures it).
LIGHT_GROUND = 0.55
DARK_INK = 0.35
CLUTTER_ITEMS = 10  # mean clip-level clutter items (shapes, lines, letters) at clutter_density 1
EVENT_LETTERS = 1.0  # mean distractor letters per event (they change with the digit) at density 1
JPEG_QUALITY = 90

SPEECH_CENTRE_S = FRAME_STEP_S / 2  # spoken digit j is centred at 1.28 j + this (between frames 2j and 2j+1) ...
SPEECH_CENTRE_JITTER_S = 0.15  # ... give or take up to this
SPEECH_DURATION_JITTER = (0.7, 1.3)  # each spoken digit aims at U(0.7, 1.3) * speech_share * 1.28 s
SPEECH_GAIN_DB = 4.0  # per spoken digit loudness jitter, +-dB
FADE_S = 0.005  # raised-cosine ramps on every pasted sound: trimmed stems start abruptly
SOUND_EVENTS = 4.0  # mean distractor sounds per clip at clutter_density 1
SOUND_KINDS = ("word", "tone", "chirp", "burst")
SOUND_LEVEL_DB = (-6.0, 0.0)  # distractor sound RMS relative to the speech RMS
OUTPUT_PEAK_DB = (-10.0, -1.0)  # clip peak level, a loudness nuisance
NOISE_COLOURS = (0.0, 0.5, 1.0, 1.5, 2.0)  # noise bed spectra 1/f^a: white, pink (1), brown (2) and between
NOISE_BANK_SECONDS = 30.0  # length of each bank noise; beds are random stretches of them


@dataclass(frozen=True)
class Knobs:
    """Difficulty knobs, arguments of `generate`; every field is also a CLI option.

    The defaults were chosen by measurement (README, "AV-Digits: choosing the defaults"): the
    largest content the issue allows (digits on 3 x 3 of tiny's 6 x 6 patches, speech 40 % of
    the audio), dark ink on the patch grid, textured backgrounds, a little clutter and
    handwriting, a 25 dB noise bed: the hardest setting measured at which the tiny TG-DP model
    learns the digits within the quickstart's budget."""

    digit_scale: float = field(default=0.5, metadata={"help": (
        "longest side of a digit's box as a fraction of the frame side (each glyph draws U(0.7, 1) "
        "of it, before rotation); on the patch grid (grid_cells 6) <= 0.5 keeps a digit within 3 x 3 "
        "of the 6 x 6 patches at 96 px (4 x 3 for a few rotated largest glyphs), placed freely "
        "<= 1/3 does")})
    snr_db: float = field(default=25.0, metadata={"help": (
        "speech RMS (over the spoken digits) over the RMS of the continuous noise bed, dB; "
        "distractor sounds come on top, 0 to 6 dB below the speech")})
    clutter_density: float = field(default=0.1, metadata={"help": (
        "scales the number of distractors: clutter items and letters per frame (mean 10 + 1) "
        "and distractor sounds per clip (mean 4)")})
    speech_share: float = field(default=0.4, metadata={"help": (
        "target share of the clip's duration covered by spoken digits; stems span roughly "
        "0.2 to 0.45, values outside saturate")})
    num_classes: int = field(default=10, metadata={"help": "digits used: 0 .. num_classes-1 (2..10)"})
    handwritten_share: float = field(default=0.1, metadata={"help": (
        "probability that a shown digit is handwritten (load_digits) rather than typeset")})
    dark_ink_share: float = field(default=1.0, metadata={"help": (
        "share of clips drawn as dark ink on light grounds (backgrounds from the light half of the "
        "colour cube, glyphs from the dark third); the others take any colours, so a glyph may be "
        "lighter or darker than its ground")})
    background_contrast: float = field(default=0.3, metadata={"help": (
        "scales the colour difference within a textured background (gradient, grating, noise, "
        "checkerboard); 0 gives a flat colour with grain")})
    grid_cells: int = field(default=6, metadata={"help": (
        "> 0: each digit is centred on a block of cells of a grid_cells x grid_cells grid over the "
        "frame and holds still (no motion, no camera shake); 6 is the tiny preset's patch grid. "
        "0: digits anywhere, moving a few pixels. A ViT trained from scratch on a few thousand "
        "clips learns shapes that straddle patch borders at random very slowly")})

    def validate(self) -> None:
        problems = []
        if not 0.05 <= self.digit_scale <= 0.5:
            problems.append(f"digit_scale={self.digit_scale} must lie in [0.05, 0.5]")
        if not 0.0 < self.speech_share < 1.0:
            problems.append(f"speech_share={self.speech_share} must lie in (0, 1)")
        if self.clutter_density < 0:
            problems.append(f"clutter_density={self.clutter_density} must be >= 0")
        if not 2 <= self.num_classes <= len(DIGIT_NAMES):
            problems.append(f"num_classes={self.num_classes} must lie in [2, 10]")
        if not 0.0 <= self.dark_ink_share <= 1.0:
            problems.append(f"dark_ink_share={self.dark_ink_share} must lie in [0, 1]")
        if not 0.0 <= self.background_contrast <= 1.0:
            problems.append(f"background_contrast={self.background_contrast} must lie in [0, 1]")
        if not 0.0 <= self.handwritten_share <= 1.0:
            problems.append(f"handwritten_share={self.handwritten_share} must lie in [0, 1]")
        if self.grid_cells < 0:
            problems.append(f"grid_cells={self.grid_cells} must be >= 0")
        if problems:
            raise ValueError("invalid AV-Digits knobs: " + "; ".join(problems))


# ==================================================================== relevance (public)
def window_start(frame: int, window_s: float) -> float:
    """Start (s) of the audio window paired with `frame`: centred on the frame's time, shifted to fit the clip."""
    centre = frame * FRAME_STEP_S
    return min(max(0.0, centre - window_s / 2), CLIP_SECONDS - window_s)


def visual_relevance(mask_or_box: np.ndarray, image_size: int, patch: int, min_cover: float = MIN_COVER) -> np.ndarray:
    """Which patches of the frame, resized to image_size, hold the digit.

    mask_or_box: a (H, W) bool digit mask at the stored resolution, or a box (x0, y0, x1, y1)
        in stored-frame pixels (FRAME_SIZE), end-exclusive.
    Returns (g * g,) bool in raster order, g = image_size // patch: patch p is relevant when the
    digit covers at least `min_cover` of its area (and any of it, so min_cover=0 means touched).
    Coverage is exact area overlap: the whole frame maps onto image_size (a plain resize).
    """
    region = np.asarray(mask_or_box)
    if region.shape == (4,):
        region = _box_mask(region, FRAME_SIZE)
    if region.ndim != 2 or image_size % patch:
        raise ValueError(f"expected a (H, W) mask or a 4-box and image_size % patch == 0, got "
                         f"{region.shape}, {image_size}, {patch}")
    grid = image_size // patch
    height, width = region.shape
    # (g, H) @ (H, W) @ (W, g): ink pixels per patch, then as a share of the patch's area.
    ink = _area_weights(height, grid) @ region.astype(np.float64) @ _area_weights(width, grid).T
    cover = ink / ((height / grid) * (width / grid))
    return ((cover >= min_cover) & (cover > 0)).reshape(-1)


def audio_relevance(intervals: np.ndarray, window_start_s: float, num_fbank_frames: int, mel_rows: int,
                    patch: int) -> np.ndarray:
    """Which audio tokens of a window hold speech.

    intervals: (K, 2) [onset, offset) of the spoken digits in clip seconds.
    window_start_s: where the window's first fbank frame sits in the clip (see `window_start`).
    num_fbank_frames, mel_rows: the window's spectrogram is mel_rows x num_fbank_frames
        (frequency rows x 10 ms frames); tokens are patch x patch.
    Returns (mel_rows // patch * T,) bool, T = num_fbank_frames // patch, frequency-major
    (token k = f * T + t): every frequency row of time column t is relevant when the column's
    patch * 10 ms (160 ms at patch 16) overlaps a spoken digit.
    """
    columns, rows = num_fbank_frames // patch, mel_rows // patch
    column_s = patch * FBANK_SHIFT_S
    starts = window_start_s + column_s * np.arange(columns)  # (T,)
    spans = np.asarray(intervals, dtype=np.float64).reshape(-1, 2)  # (K, 2)
    hit = ((spans[None, :, 0] < starts[:, None] + column_s) & (spans[None, :, 1] > starts[:, None])).any(axis=1)
    return np.tile(hit, rows)  # (rows * T,): row f repeats the time pattern


@dataclass
class Relevance:
    """Ground truth of one split (OUT/relevance_{split}.npz), clips in manifest order."""

    video_ids: list[str]
    digits: np.ndarray  # (N, 4) int, the digit of each event
    speech: np.ndarray  # (N, 4, 2) float, [onset, offset) of each spoken digit, clip seconds
    boxes: np.ndarray  # (N, 8, 4) int, the digit's box per frame (x0, y0, x1, y1), end-exclusive, stored px
    packed_masks: np.ndarray  # (N, 8, 128, 16) uint8: np.packbits of each frame's (128, 128) digit mask
    nuisance: dict[str, np.ndarray]  # per-clip nuisance attributes (see `_Clip`), for shortcut audits

    def mask(self, clip: int, frame: int) -> np.ndarray:
        """(128, 128) bool: the digit's pixels on that frame."""
        return np.unpackbits(self.packed_masks[clip, frame], axis=-1, count=FRAME_SIZE).astype(bool)


def load_relevance(root: str | Path, split: str) -> Relevance:
    """The ground truth written by `generate` for `split` ("train" or "test")."""
    with np.load(Path(root) / f"relevance_{split}.npz") as data:
        return Relevance(
            video_ids=[str(v) for v in data["video_ids"]], digits=data["digits"], speech=data["speech"],
            boxes=data["boxes"], packed_masks=data["masks"],
            nuisance={k.removeprefix("nuisance_"): data[k] for k in data.files if k.startswith("nuisance_")})


def retrieval_bounds(sequences: np.ndarray) -> dict[str, float]:
    """Chance and ceiling R@1 (percent) of clip retrieval among these clips' (N, 4) digit sequences.

    Chance is 1/N. A perfect digit reader ties clips that share a sequence and, breaking ties at
    random, ranks the right one first in 1/m of a group of m: the ceiling is distinct / N.
    """
    n = len(sequences)
    distinct = len(np.unique(np.asarray(sequences), axis=0))
    return {"chance_r1": 100.0 / n, "ceiling_r1": 100.0 * distinct / n}


# ==================================================================== generation (public)
def generate(out_dir: str | Path, n_train: int = DEFAULT_TRAIN, n_test: int = DEFAULT_TEST, seed: int = 0, workers: int = 2,
             stems_dir: str | Path = STEMS_DIR, **knobs: Any) -> Path:
    """Write an AV-Digits set to out_dir and return its path. Deterministic in `seed`.

    knobs: the fields of `Knobs` (digit_scale, snr_db, clutter_density, speech_share,
    num_classes, handwritten_share). workers <= 1 generates in this process. stems_dir: the
    committed speech stems (data/avdigits in a source checkout).
    An existing out_dir must be empty or an earlier AV-Digits set (which is replaced).
    """
    unknown = sorted(set(knobs) - {f.name for f in fields(Knobs)})
    if unknown:
        raise ValueError(f"unknown AV-Digits knob(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(f.name for f in fields(Knobs))}")
    settings = Knobs(**knobs)
    settings.validate()
    if n_train < 1 or n_test < 1:
        raise ValueError(f"need at least one clip per split, got n_train={n_train}, n_test={n_test}")
    out = _prepare_out_dir(Path(out_dir).resolve())
    material = _load_material(Path(stems_dir))
    codes = dict(zip(SPLITS, _sequences(n_train, n_test, settings.num_classes, seed)))
    tasks = [(split, start, codes[split][start:start + _CHUNK], seed, settings, str(out))
             for split in SPLITS for start in range(0, len(codes[split]), _CHUNK)]
    results: dict[str, list[_Clip]] = {split: [] for split in SPLITS}
    with tqdm(total=n_train + n_test, desc="AV-Digits", unit="clip", disable=None) as bar:
        for split, clips in _run(tasks, material, workers):
            results[split] += clips
            bar.update(len(clips))
    stats = {split: _write_split(out, split, results[split], settings) for split in SPLITS}
    _write_labels(out, settings.num_classes)
    arguments = dict(n_train=n_train, n_test=n_test, seed=seed, **vars(settings))
    meta = dict(name="AV-Digits", version=VERSION, arguments=arguments, sample_rate=SAMPLE_RATE,
                clip_seconds=CLIP_SECONDS, frames_per_clip=FRAMES_PER_CLIP, frame_size=FRAME_SIZE,
                events_per_clip=EVENTS_PER_CLIP, held_out_rule=f"sorted pool item k is test iff k % "
                f"{HELD_OUT_EVERY} == {HELD_OUT_EVERY - 1}", splits=stats)
    (out / "avdigits.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks a complete set
    return out


def ensure_default(cfg: Any = None, root: str | Path = DEFAULT_DIR) -> dict[str, Path]:
    """The default set (all defaults, seed 0) at `root`, generated on first use or when its version
    or arguments are stale (about a minute on 2 cores). Returns its "root", "train", "test" and
    "labels" paths. Call it from one process (rank 0) before others read the set.

    cfg: a tgdp_core Config; only cfg.data.workers (the processes to generate with) is read.
    """
    root = Path(root).resolve()
    defaults = dict(n_train=DEFAULT_TRAIN, n_test=DEFAULT_TEST, seed=0, **vars(Knobs()))
    meta_path = root / "avdigits.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("version") != VERSION or meta.get("arguments") != defaults:
        generate(root, workers=max(1, cfg.data.workers) if cfg is not None else 2)
    return dict(root=root, train=root / "train.json", test=root / "test.json", labels=root / "labels.csv")


def describe(root: str | Path) -> str:
    """A few lines on a generated set: size, knobs, retrieval bounds, measured relevant shares."""
    meta = json.loads((Path(root) / "avdigits.json").read_text())
    lines = [f"AV-Digits v{meta['version']} at {root}",
             "knobs: " + ", ".join(f"{k}={v}" for k, v in meta["arguments"].items())]
    for split, s in meta["splits"].items():
        lines.append(f"{split}: {s['clips']} clips, R@1 chance {s['chance_r1']:.2f} % ceiling {s['ceiling_r1']:.1f} %, "
                     f"speech {100 * s['speech_share']:.0f} % of the audio, digit on "
                     f"{100 * s['visual_share_96px']:.0f} % of the 96 px patches")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of a CLI subcommand that calls `main`."""
    parser.add_argument("--out", default=str(DEFAULT_DIR), help="output folder")
    parser.add_argument("--n-train", type=int, default=DEFAULT_TRAIN, help="training clips")
    parser.add_argument("--n-test", type=int, default=DEFAULT_TEST, help="test clips (unseen voices, handwriting, fonts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes; <= 1 runs in-process")
    for knob in fields(Knobs):
        parser.add_argument(f"--{knob.name.replace('_', '-')}", type=type(knob.default), default=knob.default,
                            help=f"{knob.metadata['help']} (default {knob.default})")


def main(args: argparse.Namespace) -> int:
    knobs = {knob.name: getattr(args, knob.name) for knob in fields(Knobs)}
    path = generate(args.out, args.n_train, args.n_test, args.seed, args.workers, **knobs)
    print(describe(path))
    return 0


# ==================================================================== material
@dataclass
class _Pool:
    """One split's share of the material."""

    voices: list[str]  # digit speakers
    digit_stems: dict[str, list[list[int]]]  # voice -> digit -> indices into _Material.stems
    word_stems: list[int]  # babble utterances (indices into _Material.stems)
    handwriting: list[np.ndarray]  # digit -> rows of _Material.handwriting showing it
    fonts: list[str]  # font file paths


@dataclass
class _Material:
    stems: list[np.ndarray]  # float32 utterances at 16 kHz
    pitch: dict[str, int]  # voice -> espeak pitch (its stems share it)
    speed: list[int]  # espeak speed of each stem
    noise: np.ndarray  # (colours, samples) float32, see _noise_bank
    handwriting: np.ndarray  # (1797, 8, 8) load_digits images, values 0..16
    pools: dict[str, _Pool]


def _held_out(k: int) -> bool:
    return k % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


def _load_material(stems_dir: Path) -> _Material:
    from sklearn.datasets import load_digits  # bundled with scikit-learn; imported late: slow import

    index = json.loads((stems_dir / "stems.json").read_text())["stems"]
    files = {name: sf.read(stems_dir / name, dtype="float32")[0] for name in sorted({s["file"] for s in index})}
    stems = [files[s["file"]][s["start"]:s["start"] + s["length"]] for s in index]
    variants = sorted({s["variant"] for s in index})
    test_variants = {v for k, v in enumerate(variants) if _held_out(k)}
    digits = load_digits()
    fonts = _font_paths()
    pools = {}
    for split in SPLITS:
        in_split = [(k, s) for k, s in enumerate(index) if (s["variant"] in test_variants) == (split == "test")]
        voices = sorted({s["voice"] for _, s in in_split})
        by_voice: dict[str, list[list[int]]] = {v: [[] for _ in DIGIT_NAMES] for v in voices}
        for k, s in in_split:
            if s["kind"] == "digit":
                by_voice[s["voice"]][s["digit"]].append(k)
        rows = np.array([_held_out(r) == (split == "test") for r in range(len(digits.target))])
        pools[split] = _Pool(
            voices=voices, digit_stems=by_voice, word_stems=[k for k, s in in_split if s["kind"] == "word"],
            handwriting=[np.nonzero(rows & (digits.target == d))[0] for d in range(len(DIGIT_NAMES))],
            fonts=[f for k, f in enumerate(fonts) if _held_out(k) == (split == "test")])
    return _Material(stems=stems, pitch={s["voice"]: s["pitch"] for s in index},
                     speed=[s["speed"] for s in index], noise=_noise_bank(), handwriting=digits.images,
                     pools=pools)


def _font_paths() -> list[str]:
    """matplotlib's own fonts of FONT_FAMILIES, sorted by file name (the same on every machine)."""
    import matplotlib
    from matplotlib import font_manager

    root = Path(matplotlib.get_data_path()).resolve()
    paths = {f.fname for f in font_manager.fontManager.ttflist
             if f.name in FONT_FAMILIES and Path(f.fname).resolve().is_relative_to(root)}
    return sorted(paths, key=lambda p: Path(p).name)


# ==================================================================== one clip
@dataclass
class _Clip:
    """What a worker hands back for one clip (media are already on disk)."""

    video_id: str
    digits: np.ndarray  # (4,)
    speech: np.ndarray  # (4, 2) seconds
    boxes: np.ndarray  # (8, 4)
    masks: np.ndarray  # (8, 128, 16) packed bits
    visual_share: dict[str, float]  # share of relevant patches, per grid
    nuisance: dict[str, Any]


# Nuisance attributes stored per clip (relevance npz, "nuisance_" + name), for shortcut audits:
#   glyph_rgb (4, 3) colour as painted, glyph_size (4,) box side px, glyph_centre (4, 2) x, y px
#   on frame 2j, glyph_row (4,) load_digits row of a handwritten digit (-1: typeset),
#   glyph_font (4,) font file of a typeset digit ("": handwritten), voice (str), pitch (int),
#   speech_speed (4,) wpm, speech_gain_db (4,), sound_events (int), output_peak_db (float)

_CHUNK = 25  # clips per worker task: enough to amortise pickling, small enough to balance
_MATERIAL: _Material | None = None  # the worker's copy (fork: inherited, spawn: pickled once)
_STREAM_SEQUENCES, _STREAM_VISUAL, _STREAM_AUDIO = 0, 1, 2  # independent random streams


def _set_material(material: _Material) -> None:
    global _MATERIAL
    _MATERIAL = material


def _run(tasks: list[tuple], material: _Material, workers: int):
    """Yield (split, clips) per task, in task order."""
    if workers <= 1:
        _set_material(material)
        yield from map(_make_chunk, tasks)
        return
    with multiprocessing.Pool(workers, initializer=_set_material, initargs=(material,)) as pool:
        yield from pool.imap(_make_chunk, tasks)


def _make_chunk(task: tuple) -> tuple[str, list[_Clip]]:
    split, start, codes, seed, knobs, out = task
    return split, [_make_clip(split, start + k, code, seed, knobs, Path(out)) for k, code in enumerate(codes)]


def _make_clip(split: str, index: int, code: int, seed: int, knobs: Knobs, out: Path) -> _Clip:
    material = _MATERIAL
    pool = material.pools[split]
    digits = _code_digits(code, knobs.num_classes)
    video_id = f"avd-{split}-{index:05d}"
    # One stream per modality, keyed by the clip alone: the workers' chunking cannot change a
    # clip, and nothing drawn for the frames can inform the audio or the reverse.
    visual_rng = np.random.default_rng([seed, _STREAM_VISUAL, SPLITS.index(split), index])
    audio_rng = np.random.default_rng([seed, _STREAM_AUDIO, SPLITS.index(split), index])
    frames, masks, visual_nuisance = _render_frames(visual_rng, material, pool, digits, knobs)
    wave, speech, audio_nuisance = _render_audio(audio_rng, material, pool, digits, knobs)
    encoded = io.BytesIO()  # libsndfile writes a file in small chunks: 10x slower than one write
    sf.write(encoded, wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    (out / "audio" / f"{video_id}.wav").write_bytes(encoded.getvalue())
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(out / "frames" / f"frame_{i}" / f"{video_id}.jpg", quality=JPEG_QUALITY)
    shares = {f"{size}px": float(np.mean([visual_relevance(m, size, SHARE_PATCH).mean() for m in masks]))
              for size in SHARE_GRIDS}
    return _Clip(video_id=video_id, digits=digits, speech=speech, boxes=np.stack([_bbox(m) for m in masks]),
                 masks=np.packbits(masks, axis=-1), visual_share=shares,
                 nuisance={**visual_nuisance, **audio_nuisance})


# -------------------------------------------------------------------- frames
@dataclass
class _Glyph:
    alpha: np.ndarray  # (h, w) ink in [0, 1]
    at: np.ndarray  # (2, 2) top-left (x, y) on frames 2j and 2j+1 (moved a little)
    colour: np.ndarray  # (3,) RGB in [0, 1], before the contrast adjustment


def _render_frames(rng: np.random.Generator, material: _Material, pool: _Pool, digits: np.ndarray, knobs: Knobs):
    """8 frames (8, 128, 128, 3) uint8, digit masks (8, 128, 128) bool, and the digits' nuisance attributes."""
    dark_ink = bool(rng.random() < knobs.dark_ink_share)  # this clip: dark glyphs on light grounds
    background = _background(rng, FRAME_SIZE + 2 * CAMERA_SHAKE_PX, knobs.background_contrast, dark_ink)
    canvas = _clutter(rng, background, pool.fonts, knobs)
    frames, masks, colours, glyphs, sources = [], [], [], [], []
    for digit in digits:
        if rng.random() < knobs.handwritten_share:
            row, font = int(rng.choice(pool.handwriting[digit])), ""
            ink = _handwritten(material.handwriting[row])
        else:
            row, font = -1, pool.fonts[rng.integers(len(pool.fonts))]
            ink = _typeset(font, str(digit))
        glyph = _glyph(rng, ink, knobs, dark_ink)
        letters = [_glyph(rng, _typeset(pool.fonts[rng.integers(len(pool.fonts))], LETTERS[rng.integers(len(LETTERS))]),
                          knobs, dark_ink, avoid=glyph) for _ in range(rng.poisson(EVENT_LETTERS * knobs.clutter_density))]
        for step in range(2):
            shake = (np.full(2, CAMERA_SHAKE_PX) if knobs.grid_cells
                     else rng.integers(0, 2 * CAMERA_SHAKE_PX + 1, size=2))
            frame = canvas[shake[1]:shake[1] + FRAME_SIZE, shake[0]:shake[0] + FRAME_SIZE].copy()
            for letter in letters:
                if letter is not None:
                    _paint(frame, letter.alpha, letter.at[step], letter.colour)
            painted = _paint(frame, glyph.alpha, glyph.at[step], glyph.colour)  # last: nothing hides the digit
            (x, y), (h, w) = glyph.at[step], glyph.alpha.shape
            mask = np.zeros((FRAME_SIZE, FRAME_SIZE), bool)
            mask[y:y + h, x:x + w] = glyph.alpha >= 0.5
            frames.append((np.clip(frame, 0, 1) * 255 + 0.5).astype(np.uint8))
            masks.append(mask)
        colours.append(painted)
        glyphs.append(glyph)
        sources.append((row, Path(font).name))
    nuisance = dict(glyph_rgb=np.array(colours, np.float32),
                    glyph_size=np.array([max(g.alpha.shape) for g in glyphs], np.int16),
                    glyph_centre=np.array([g.at[0] + np.array(g.alpha.shape[::-1]) / 2 for g in glyphs], np.float32),
                    glyph_row=np.array([row for row, _ in sources], np.int16),
                    glyph_font=np.array([font for _, font in sources]))
    return np.stack(frames), np.stack(masks), nuisance


def _glyph(rng: np.random.Generator, ink: np.ndarray, knobs: Knobs, dark_ink: bool,
           avoid: _Glyph | None = None) -> _Glyph | None:
    """Size, rotate, place and colour a glyph; digits and letters alike, so size and style do not
    tell them apart. With `avoid`, the glyph keeps off that one (None when no free place is found)."""
    alpha = _shape(ink, rng.uniform(MIN_SIZE_FACTOR, 1.0) * knobs.digit_scale * FRAME_SIZE,
                   rng.uniform(-1, 1) * MAX_ROTATION_DEG)
    colour = rng.random(3) * (DARK_INK if dark_ink else 1.0)
    if knobs.grid_cells and avoid is None:  # a digit on the grid, still
        at = _on_grid(rng, alpha.shape, knobs.grid_cells)
        return _Glyph(alpha=alpha, at=np.stack([at, at]), colour=colour.astype(np.float32))
    free = FRAME_SIZE - 2 * MOTION_PX - np.array(alpha.shape[::-1])  # keep the glyph and its motion inside
    for _ in range(PLACE_TRIES):
        at = MOTION_PX + rng.integers(0, free + 1)
        if avoid is None or not _overlap(at, alpha.shape, avoid.at[0], avoid.alpha.shape, 2 * MOTION_PX):
            moved = at + rng.integers(-MOTION_PX, MOTION_PX + 1, size=2)
            return _Glyph(alpha=alpha, at=np.stack([at, moved]), colour=colour.astype(np.float32))
    return None


def _on_grid(rng: np.random.Generator, shape: tuple, cells: int) -> np.ndarray:
    """Top-left (x, y) that centres a (h, w) glyph on a random block of whole cells of a
    cells x cells grid over the frame (the block: the fewest cells that hold the glyph)."""
    cell = FRAME_SIZE / cells
    span = int(np.ceil(max(shape) / cell - 1e-9))
    corner = rng.integers(0, cells - span + 1, size=2)  # block's top-left cell (x, y)
    offset = (span * cell - np.array(shape[::-1])) / 2
    return (corner * cell + offset).astype(int)


def _overlap(at_a: np.ndarray, shape_a: tuple, at_b: np.ndarray, shape_b: tuple, margin: int) -> bool:
    """Whether two boxes (top-left (x, y), shape (h, w)) come within `margin` px of each other."""
    return bool(np.all(at_a < at_b + np.array(shape_b[::-1]) + margin)
                and np.all(at_b < at_a + np.array(shape_a[::-1]) + margin))


def _background(rng: np.random.Generator, size: int, contrast: float, light: bool) -> np.ndarray:
    """A textured, never blank background, from light colours only when `light`. (size, size, 3) float32 in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (size, size) each
    colours = rng.random((2, 3)).astype(np.float32)
    if light:
        colours = LIGHT_GROUND + (1 - LIGHT_GROUND) * colours
    kind = rng.integers(4)
    if kind == 0:  # linear gradient at a random angle
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * x + np.sin(angle) * y)
    elif kind == 1:  # grating: period 6..30 px
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 30) / size
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * x + np.sin(angle) * y) / period)
    elif kind == 2:  # smooth value noise from a coarse random grid
        cells = int(rng.integers(3, 10))
        coarse = Image.fromarray(rng.random((cells, cells)).astype(np.float32))
        t = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))
    else:  # checkerboard, cells 8..24 px
        cell = rng.uniform(8, 24) / size
        t = ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(np.float32)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = colours[0] + contrast * t[..., None] * (colours[1] - colours[0])  # (size, size, 3)
    return image + rng.normal(0, 0.02, image.shape).astype(np.float32)  # a little grain


def _clutter(rng: np.random.Generator, canvas: np.ndarray, fonts: list[str], knobs: Knobs) -> np.ndarray:
    """Draw shapes, lines and letters on the canvas (clip-level clutter). Returns float32 (S, S, 3)."""
    size = canvas.shape[0]
    image = Image.fromarray((np.clip(canvas, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image, "RGBA")  # RGBA mode blends each shape with its alpha
    letters = []
    for _ in range(rng.poisson(CLUTTER_ITEMS * knobs.clutter_density)):
        kind = rng.integers(5)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3)) + (int(rng.integers(120, 256)),)
        x0, y0 = rng.integers(-10, size, 2)
        w, h = rng.integers(6, 60, 2)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        if kind == 0:
            draw.rectangle(box, fill=fill)
        elif kind == 1:
            draw.ellipse(box, fill=fill)
        elif kind == 2:
            points = rng.integers(-10, size + 10, (int(rng.integers(3, 7)), 2))
            draw.polygon([tuple(int(v) for v in p) for p in points], fill=fill)
        elif kind == 3:
            points = rng.integers(-10, size + 10, (int(rng.integers(2, 5)), 2))
            draw.line([tuple(int(v) for v in p) for p in points], fill=fill, width=int(rng.integers(1, 5)))
        else:
            letters.append(fill[:3])
    canvas = np.asarray(image, np.float32) / 255
    largest = knobs.digit_scale * FRAME_SIZE
    for fill in letters:  # glyphs like the digits: same fonts, sizes and rotations
        alpha = _shape(_typeset(fonts[rng.integers(len(fonts))], LETTERS[rng.integers(len(LETTERS))]),
                       rng.uniform(MIN_SIZE_FACTOR, 1.0) * largest, rng.uniform(-1, 1) * MAX_ROTATION_DEG)
        at = rng.integers(0, size - np.array(alpha.shape[::-1]) + 1)
        _paint(canvas, alpha, at, np.array(fill) / 255)
    return canvas


@functools.lru_cache(maxsize=None)
def _typeset(font: str, char: str) -> np.ndarray:
    """One character's ink in a font, cropped, float32 in [0, 1]. Shape (h, w)."""
    face = ImageFont.truetype(font, GLYPH_RENDER_PX)
    left, top, right, bottom = face.getbbox(char)
    image = Image.new("L", (right - left + 4, bottom - top + 4))
    ImageDraw.Draw(image).text((2 - left, 2 - top), char, fill=255, font=face)
    return _crop(np.asarray(image, np.float32) / 255)


def _handwritten(image8: np.ndarray) -> np.ndarray:
    """A load_digits 8 x 8 image (0..16) as smooth ink, upscaled and cropped. (h, w) float32 in [0, 1]."""
    padded = np.pad(image8.astype(np.float32) / 16, 1)  # a blank border keeps the bicubic ring inside
    big = np.asarray(Image.fromarray(padded).resize((HANDWRITING_PX, HANDWRITING_PX), Image.Resampling.BICUBIC))
    low, high = HANDWRITING_INK
    return _crop(np.clip((big - low) / (high - low), 0, 1))


def _shape(ink: np.ndarray, side: float, angle: float) -> np.ndarray:
    """Scale ink so its box's longer side is `side` px after rotating by `angle` degrees. (h, w) alpha."""
    # Rotate first and scale second, so the box (what the patch budget counts) gets this side.
    rotated = _crop(np.asarray(Image.fromarray(ink).rotate(angle, Image.Resampling.BILINEAR, expand=True)))
    height, width = rotated.shape
    scale = side / max(height, width)
    size = (max(1, int(width * scale)), max(1, int(height * scale)))  # floor: never above `side`
    return np.clip(np.asarray(Image.fromarray(rotated).resize(size, Image.Resampling.LANCZOS)), 0, 1)


def _crop(ink: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    rows, cols = np.nonzero(ink > threshold)
    return ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _paint(frame: np.ndarray, alpha: np.ndarray, at: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Composite a glyph in place at top-left `at` (x, y), contrast-adjusted; returns the colour used."""
    h, w = alpha.shape
    region = frame[at[1]:at[1] + h, at[0]:at[0] + w]
    colour = _contrasting(colour, region.reshape(-1, 3).mean(axis=0))
    region += alpha[..., None] * (colour - region)  # (h, w, 3): alpha blend
    return colour


def _contrasting(colour: np.ndarray, under: np.ndarray) -> np.ndarray:
    """Move `colour` towards black or white until its luminance differs from `under`'s by MIN_CONTRAST."""
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    have, ground = float(colour @ luma), float(under @ luma)
    if abs(have - ground) >= MIN_CONTRAST:
        return colour.astype(np.float32)
    if ground > 0.5:  # darken to ground - MIN_CONTRAST
        return (colour * (ground - MIN_CONTRAST) / max(have, 1e-6)).astype(np.float32)
    t = (ground + MIN_CONTRAST - have) / max(1 - have, 1e-6)  # lighten towards white
    return (colour + t * (1 - colour)).astype(np.float32)


def _bbox(mask: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) end-exclusive box of a non-empty mask."""
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.int16)


def _box_mask(box: np.ndarray, size: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    mask[y0:y1, x0:x1] = True
    return mask


@functools.lru_cache(maxsize=64)
def _area_weights(n_source: int, n_cells: int) -> np.ndarray:
    """(n_cells, n_source): overlap (in source pixels) of source pixel s with output cell k."""
    edges = np.arange(n_cells + 1) * n_source / n_cells
    pixels = np.arange(n_source)
    overlap = np.minimum(edges[1:, None], pixels[None] + 1) - np.maximum(edges[:-1, None], pixels[None])
    return np.clip(overlap, 0, None)


# -------------------------------------------------------------------- audio
def _render_audio(rng: np.random.Generator, material: _Material, pool: _Pool, digits: np.ndarray, knobs: Knobs):
    """The waveform (CLIP_SAMPLES,) float32, speech intervals (4, 2) s, and the audio's nuisance attributes."""
    voice = pool.voices[rng.integers(len(pool.voices))]
    speech = np.zeros(CLIP_SAMPLES)
    intervals = np.zeros((EVENTS_PER_CLIP, 2))
    speeds, gains = [], []
    for j, digit in enumerate(digits):
        # The stem of this voice and digit whose duration is nearest a jittered target: espeak
        # speeds set the speech share, no time-stretching needed.
        target = knobs.speech_share * SLOT_SAMPLES * rng.uniform(*SPEECH_DURATION_JITTER)
        options = pool.digit_stems[voice][digit]
        stem = min(options, key=lambda k: abs(len(material.stems[k]) - target))
        gain_db = rng.uniform(-SPEECH_GAIN_DB, SPEECH_GAIN_DB)
        audio = _fade(_unit_rms(material.stems[stem])) * 10 ** (gain_db / 20)
        centre = (j * SLOT_SAMPLES / SAMPLE_RATE + SPEECH_CENTRE_S
                  + rng.uniform(-SPEECH_CENTRE_JITTER_S, SPEECH_CENTRE_JITTER_S))
        onset = min(max(0, round(centre * SAMPLE_RATE) - len(audio) // 2), CLIP_SAMPLES - len(audio))
        speech[onset:onset + len(audio)] += audio
        intervals[j] = onset / SAMPLE_RATE, (onset + len(audio)) / SAMPLE_RATE
        speeds.append(material.speed[stem])
        gains.append(gain_db)
    # Levels relative to the speech RMS over the spoken digits: the noise bed at -snr_db, so the
    # stretches between sounds stay quiet; distractor sounds about as loud as the speech.
    level = _rms(np.concatenate([speech[round(a * SAMPLE_RATE):round(b * SAMPLE_RATE)] for a, b in intervals]))
    mix = speech + _noise_bed(rng, material.noise) * level * 10 ** (-knobs.snr_db / 20)
    n_events = int(rng.poisson(SOUND_EVENTS * knobs.clutter_density))
    for _ in range(n_events):
        sound = _fade(_unit_rms(_distractor(rng, material, pool))) * level * 10 ** (rng.uniform(*SOUND_LEVEL_DB) / 20)
        onset = int(rng.integers(0, CLIP_SAMPLES - len(sound) + 1))
        mix[onset:onset + len(sound)] += sound
    peak_db = rng.uniform(*OUTPUT_PEAK_DB)
    mix *= 10 ** (peak_db / 20) / np.abs(mix).max()
    nuisance = dict(voice=voice, pitch=material.pitch[voice], speech_speed=np.array(speeds, np.int16),
                    speech_gain_db=np.array(gains, np.float32), sound_events=n_events, output_peak_db=peak_db)
    return mix.astype(np.float32), intervals, nuisance


def _distractor(rng: np.random.Generator, material: _Material, pool: _Pool) -> np.ndarray:
    """One unrelated sound: a babble word, a tone, a chirp or a noise burst. (samples,)."""
    kind = SOUND_KINDS[rng.integers(len(SOUND_KINDS))]
    if kind == "word":
        return material.stems[pool.word_stems[rng.integers(len(pool.word_stems))]]
    seconds = {"tone": (0.1, 0.5), "chirp": (0.2, 0.8), "burst": (0.05, 0.4)}[kind]
    n = int(rng.uniform(*seconds) * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    envelope = np.sin(np.pi * np.arange(n) / n) ** rng.uniform(0.2, 2)  # soft to sharp attack
    if kind == "tone":  # a few harmonics of a log-uniform 150..2500 Hz pitch
        f0 = math.exp(rng.uniform(math.log(150), math.log(2500)))
        harmonics = [k for k in range(1, int(rng.integers(1, 5)) + 1) if k * f0 < SAMPLE_RATE / 2]
        return envelope * sum(np.sin(2 * np.pi * k * f0 * t) / k for k in harmonics)
    if kind == "chirp":  # exponential sweep between two log-uniform 100..6000 Hz frequencies
        f0, f1 = np.exp(rng.uniform(math.log(100), math.log(6000), 2))
        duration, ratio = n / SAMPLE_RATE, math.log(f1 / f0)
        phase = 2 * np.pi * f0 * duration / ratio * (np.exp(t * ratio / duration) - 1)
        return envelope * np.sin(phase)
    spectrum = np.fft.rfft(rng.standard_normal(n))  # burst: band-limited noise
    frequencies = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    low = rng.uniform(100, 4000)
    spectrum[(frequencies < low) | (frequencies > low * rng.uniform(1.5, 4))] = 0
    return envelope * np.fft.irfft(spectrum, n)


def _noise_bank(seconds: float = NOISE_BANK_SECONDS) -> np.ndarray:
    """Long coloured noises, 1/f^a power spectra for a in NOISE_COLOURS, unit RMS. (colours, samples) float32.

    A clip's noise bed is a random stretch of one of them: an FFT pair per clip would cost more
    than the rest of the clip's audio.
    """
    n = int(seconds * SAMPLE_RATE)
    rng = np.random.default_rng(0)  # fixed: the bank is material, the per-clip choice is the randomness
    frequencies = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0)  # 20 Hz floor: no DC blow-up
    bank = [np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * frequencies ** (-a / 2), n) for a in NOISE_COLOURS]
    return np.stack([_unit_rms(noise) for noise in bank]).astype(np.float32)


def _noise_bed(rng: np.random.Generator, bank: np.ndarray) -> np.ndarray:
    """A random CLIP_SAMPLES stretch of a random noise of the bank. (CLIP_SAMPLES,) float64."""
    colour, start = rng.integers(len(bank)), rng.integers(0, bank.shape[1] - CLIP_SAMPLES + 1)
    return bank[colour, start:start + CLIP_SAMPLES].astype(np.float64)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) + 1e-12


def _unit_rms(x: np.ndarray) -> np.ndarray:
    return x / _rms(x)


def _fade(x: np.ndarray) -> np.ndarray:
    n = min(int(FADE_S * SAMPLE_RATE), len(x) // 2)
    ramp = np.sin(np.linspace(0, np.pi / 2, n)) ** 2
    out = np.array(x, dtype=np.float64)
    out[:n] *= ramp
    out[len(out) - n:] *= ramp[::-1]
    return out


# ==================================================================== sequences and writing
def _sequences(n_train: int, n_test: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence codes (base-num_classes, 4 digits) for train and test.

    One permutation of all num_classes ** 4 sequences, read cyclically: test takes the first
    n_test, train the next n_train. Test sequences are distinct while n_test <= C ** 4; train and
    test are disjoint while n_train + n_test <= C ** 4.
    """
    total = num_classes ** EVENTS_PER_CLIP
    order = np.random.default_rng([seed, _STREAM_SEQUENCES]).permutation(total)
    test = order[np.arange(n_test) % total]
    train = order[(n_test + np.arange(n_train)) % total]
    return train, test


def _code_digits(code: int, num_classes: int) -> np.ndarray:
    """(4,) digits of a sequence code, first event first."""
    return np.array([code // num_classes ** (EVENTS_PER_CLIP - 1 - j) % num_classes for j in range(EVENTS_PER_CLIP)])


def _prepare_out_dir(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        if not (out / "avdigits.json").exists():
            raise FileExistsError(f"{out} is not empty and holds no AV-Digits set; refusing to overwrite it")
        for name in ("audio", "frames"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "avdigits.json").unlink()
    (out / "audio").mkdir(parents=True, exist_ok=True)
    for i in range(FRAMES_PER_CLIP):
        (out / "frames" / f"frame_{i}").mkdir(parents=True, exist_ok=True)
    return out


def _mid(digit: int) -> str:
    return f"digit_{digit}"


def _write_labels(out: Path, num_classes: int) -> None:
    rows = [f"{d},{_mid(d)},{DIGIT_NAMES[d]}" for d in range(num_classes)]
    (out / "labels.csv").write_text("index,mid,display_name\n" + "\n".join(rows) + "\n")


def _write_split(out: Path, split: str, clips: list[_Clip], knobs: Knobs) -> dict[str, Any]:
    """Manifests and relevance of one split; returns its measured statistics."""
    def manifest(labels) -> str:
        # frame_labels (an extension the CAV-MAE format ignores): the digit each frame shows,
        # for pair-level class retrieval (frame i shows the digit of event i // 2)
        per_event = FRAMES_PER_CLIP // EVENTS_PER_CLIP
        data = [dict(video_id=c.video_id, wav=str(out / "audio" / f"{c.video_id}.wav"),
                     video_path=str(out / "frames"), labels=labels(c),
                     frame_labels=",".join(_mid(int(c.digits[i // per_event])) for i in range(FRAMES_PER_CLIP)))
                for c in clips]
        return json.dumps({"data": data}, indent=1) + "\n"

    (out / f"{split}.json").write_text(manifest(lambda c: ",".join(_mid(d) for d in sorted(set(c.digits.tolist())))))
    (out / f"{split}_first_digit.json").write_text(manifest(lambda c: _mid(int(c.digits[0]))))
    nuisance = {f"nuisance_{name}": np.array([c.nuisance[name] for c in clips]) for name in clips[0].nuisance}
    digits = np.stack([c.digits for c in clips]).astype(np.int8)
    speech = np.stack([c.speech for c in clips])
    np.savez_compressed(out / f"relevance_{split}.npz", video_ids=np.array([c.video_id for c in clips]),
                        digits=digits, speech=speech, boxes=np.stack([c.boxes for c in clips]),
                        masks=np.stack([c.masks for c in clips]), **nuisance)
    return dict(clips=len(clips), **retrieval_bounds(digits),
                speech_share=float(np.mean((speech[..., 1] - speech[..., 0]).sum(axis=1)) / CLIP_SECONDS),
                **{f"visual_share_{size}px": float(np.mean([c.visual_share[f"{size}px"] for c in clips]))
                   for size in SHARE_GRIDS})
