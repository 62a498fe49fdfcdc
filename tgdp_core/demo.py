"""The retrieval demo: a Gradio page that searches a gallery across modalities with a checkpoint.

    python -m tgdp_core demo [--checkpoint runs/quickstart/tgdp/last.pt] [--gallery MANIFEST]

    from tgdp_core import demo                       # in a notebook cell
    demo.launch(checkpoint="runs/quickstart/tgdp/last.pt", inline=True)
    app = demo.build_app(checkpoint, gallery); demo.launch(app, inline=True)   # the same, in two steps

Tabs: audio -> image (upload, record or pick a gallery clip's wav; the top-k clips' frames and
the query's token priority over its spectrogram), image -> audio (the top-k clips, playable,
with their spectrograms), a gallery browser and the model's details.

Query protocol: clip-level embeddings as in evaluation (DESIGN.md, "Evaluation protocols").
A gallery clip's visual embedding is the mean of its K frame embeddings, its audio embedding
the mean of its K aligned segment embeddings, both re-normalised. An audio query of any length
is read like a gallery wav (mono, resampled, fbank padded or cropped to ``data.clip_frames``)
and embedded as the mean over its K aligned segments, so a gallery clip's own wav reproduces
its gallery embedding; an image query is one frame. Scores are cosine similarities.

The token priority is TG-DP's: the head-averaged joint-block attention between the global token
and the patches (``objective.score_direction``), read from the EMA teacher when the checkpoint
holds one (as in training), else from the student.

Everything is a thin layer over the library: ``load_model``, ``AVDataset`` (its feature cache
also feeds the page's thumbnails and spectrograms), ``evaluate.embed_clips``, ``media`` for
decoding. ``Retriever`` holds no Gradio state; the page, the tests and the benchmark
(``query_latency``) share it. Gallery embeddings are cached on disk (see ``Retriever``).

Safety: the server binds to 127.0.0.1 unless told otherwise and never opens a share link; no
field of the page takes a path; the handlers receive Gradio's upload records unprocessed
(``preprocess=False``) and read only files inside Gradio's upload folder; uploads over
``max_upload_mb`` are refused by the server (and again by the handlers), audio over 60 s and
images over 40 megapixels before they are decoded.
"""
# No `from __future__ import annotations`: Gradio injects event data (gr.SelectData) by reading a
# handler's annotation as an object. Gradio is imported where it is used, so that building the
# CLI parser (add_arguments) does not pay for it.
import argparse
import copy
import hashlib
import json
import logging
import math
import re
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from . import evaluate, media
from .avdigits import DEFAULT_DIR as AVDIGITS_DIR
from .checkpoint import FORMAT, CheckpointError, load_model, load_teacher_encoder, read_checkpoint, save_checkpoint
from .dataset import AVDataset, segment_bounds

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = Path("runs/quickstart/tgdp/last.pt")  # what `python -m tgdp_core quickstart` trains
DEFAULT_GALLERY = AVDIGITS_DIR / "test.json"  # the built-in benchmark's test split
DEFAULT_HOST = "127.0.0.1"
TOP_K = 5
MAX_UPLOAD_MB = 20
MAX_AUDIO_SECONDS = 60.0
MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused before decoding (PIL only warns below 89 M)
SILENCE_PEAK = 1e-4  # peak amplitude (-80 dBFS) under which a query counts as silent
EXAMPLES = 4  # gallery clips offered as example queries
PAGE_SIZE = 24  # clips per page of the gallery browser
EMBEDDING_CACHE_VERSION = 1
EMBEDDING_FORMAT = "tgdp-demo-gallery"
QUICKSTART = "python -m tgdp_core quickstart"


class QueryError(ValueError):
    """A query the demo refuses (bad file, silence, too long, too large); the page shows the message."""


@dataclass
class Hit:
    """One retrieved gallery clip."""

    rank: int  # 1-based
    index: int  # position in Retriever.clips
    video_id: str
    score: float  # cosine similarity of the query and the clip embedding
    labels: str  # display names, comma-separated


@dataclass
class AudioQuery:
    embedding: torch.Tensor  # (D,) unit length
    fbank: torch.Tensor  # (clip_frames, F) normalised fbank of the query
    priority: torch.Tensor | None  # (F, clip_frames) token priority per fbank cell; None without a global token
    seconds: float  # duration of the file


@dataclass
class ImageQuery:
    embedding: torch.Tensor  # (D,) unit length
    frame: np.ndarray  # (S, S, 3) uint8, what the model saw
    priority: torch.Tensor | None  # (g, g) token priority over the patch grid


# ---------------------------------------------------------------------------------- the retriever
class Retriever:
    """A checkpoint and a gallery manifest: embeds queries and ranks the gallery's clips.

    The gallery's clip embeddings are computed once and cached at
    ``CACHE/demo/<key>.pt`` (CACHE = ``cache_dir``, else the config's ``data.cache_dir``, else
    ``.tgdp_cache`` beside the manifest, where the feature cache lives too). The key hashes the
    checkpoint's resolved path, size and modification time, the manifest's bytes and the
    config, so retraining, editing the manifest or changing a data setting recomputes them.
    """

    def __init__(self, checkpoint: str | Path = DEFAULT_CHECKPOINT, gallery: str | Path = DEFAULT_GALLERY,
                 cache_dir: str | Path | None = None, device: str | torch.device = "cpu", progress: bool = True):
        self.checkpoint, self.gallery = Path(checkpoint), Path(gallery)
        check_inputs(self.checkpoint, self.gallery)
        self.device = torch.device(device)
        self.model = load_model(self.checkpoint, map_location=self.device)
        self.cfg = self.model.cfg
        data = read_checkpoint(self.checkpoint)  # the extras load_model leaves: teacher, step, history
        self.official = data.get("format") != FORMAT
        self.step = None if self.official else data.get("step")
        self.priority_direction = self.cfg.objective.score_direction
        self.guide_encoder, self.guide_source = self.model.encoder, "student"
        if not self.cfg.model.global_token:  # CAV-MAE: no global token, no attention priority
            self.guide_encoder, self.guide_source = None, "none (the model has no global token)"
        elif (teacher := load_teacher_encoder(self.checkpoint, self.model, self.device)) is not None:
            self.guide_encoder, self.guide_source = teacher, "EMA teacher"
        del data

        cfg = copy.deepcopy(self.cfg)
        cfg.data.cache, cfg.data.on_error = True, "skip"  # a bad gallery clip is left out and reported
        if cfg.data.label_csv and not Path(cfg.data.label_csv).is_file():
            cfg.data.label_csv = ""  # trained elsewhere: fall back to labels.csv beside the manifest
        self.dataset = AVDataset(self.gallery, cfg, train=False, cache_dir=cache_dir)
        if not len(self.dataset):
            first = next(iter(self.dataset.skipped.items()), ("", "the manifest is empty"))
            raise ValueError(f"{self.gallery}: no gallery clip could be read (first: {first[0]}: {first[1]})")
        self.clips = [self.dataset.clips[n] for n in self.dataset.valid]
        names = self.dataset.label_names
        index = self.dataset.label_index or {}
        self.labels = [", ".join(names[index[mid]] if mid in index else mid for mid in c.labels) for c in self.clips]
        folder = Path(cache_dir or cfg.data.cache_dir or self.gallery.parent / ".tgdp_cache") / "demo"
        self.cache_file = folder / f"{self._cache_key()}.pt"
        self.audio, self.visual = self._gallery_embeddings(progress)  # (N, D) each, unit length, CPU

    # ------------------------------------------------------------------ gallery embeddings
    def _cache_key(self) -> str:
        stat = self.checkpoint.stat()
        # the feature cache's folder name already hashes the gallery files' sizes and mtimes
        features = self.dataset.cache.folder.name if self.dataset.cache is not None else ""
        ident = [EMBEDDING_CACHE_VERSION, str(self.checkpoint.resolve()), stat.st_size, stat.st_mtime_ns,
                 self.cfg.to_dict(), features]
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode())
        digest.update(self.gallery.read_bytes())
        return digest.hexdigest()[:20]

    def _gallery_embeddings(self, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [c.video_id for c in self.clips]
        if self.cache_file.exists():
            try:
                saved = read_checkpoint(self.cache_file)
                if saved.get("format") == EMBEDDING_FORMAT and saved.get("video_ids") == ids:
                    return saved["audio"], saved["visual"]
                log.warning("%s does not match the gallery; recomputing", self.cache_file)
            except CheckpointError as err:
                log.warning("unreadable embedding cache, recomputing: %s", err)
        emb = evaluate.embed_clips(self.model, self.dataset, progress=progress)  # (N, K, D) per modality
        audio, visual = F.normalize(emb.audio.mean(1), dim=-1), F.normalize(emb.visual.mean(1), dim=-1)  # (N, D)
        save_checkpoint({"format": EMBEDDING_FORMAT, "version": EMBEDDING_CACHE_VERSION, "video_ids": ids,
                         "checkpoint": str(self.checkpoint), "gallery": str(self.gallery),
                         "audio": audio, "visual": visual}, self.cache_file)
        return audio, visual

    # ------------------------------------------------------------------ queries
    @property
    def segment_bounds(self) -> list[tuple[int, int]]:
        """[start, end) fbank frames of the K segments aligned to a clip's frames."""
        d = self.cfg.data
        return [segment_bounds(i, d.frames_per_clip, d.clip_frames, self.cfg.model.audio_frames)
                for i in range(d.frames_per_clip)]

    @torch.no_grad()
    def audio_query(self, path: str | Path, name: str | None = None) -> AudioQuery:
        """Embed an audio file (any length up to MAX_AUDIO_SECONDS) as the mean of its K segments."""
        name = name or Path(path).name
        try:
            info = sf.info(str(path))
        except (sf.SoundFileError, RuntimeError):
            raise QueryError(f"{name} is not an audio file this demo can read (WAV, FLAC, OGG or MP3)") from None
        if info.frames <= 0 or info.samplerate <= 0:
            raise QueryError(f"{name} is empty: it holds no audio samples")
        seconds = info.frames / info.samplerate
        if seconds > MAX_AUDIO_SECONDS:
            raise QueryError(f"{name} is {seconds:.1f} s long; queries are limited to {MAX_AUDIO_SECONDS:.0f} s")
        d, m = self.cfg.data, self.cfg.model
        try:
            wave = media.read_audio(path, d.sample_rate)  # (T,) mono at the model's rate
            if wave.abs().max() < SILENCE_PEAK:
                raise QueryError(f"{name} is silent (peak below {SILENCE_PEAK:g}): there is nothing to match")
            fbank = media.fbank(wave, d.sample_rate, m.mel_bins, d.clip_frames, d.fbank_mean, d.fbank_std)
        except media.MediaError as err:
            raise QueryError(f"{name}: {err.reason}") from None
        except QueryError:
            raise
        except ValueError as err:  # shorter than one fbank window
            raise QueryError(f"{name} is too short: {err}") from None
        segments = torch.stack([fbank[s:e] for s, e in self.segment_bounds]).to(self.device)  # (K, T, F)
        embedding = F.normalize(self.model.encode_audio(segments).mean(0), dim=-1).cpu()
        return AudioQuery(embedding, fbank, self._audio_priority(segments), seconds)

    @torch.no_grad()
    def image_query(self, path: str | Path, name: str | None = None) -> ImageQuery:
        """Embed one image (resized and centre-cropped like the gallery's frames)."""
        name = name or Path(path).name
        try:
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
        except (OSError, Image.DecompressionBombError):
            raise QueryError(f"{name} is not an image this demo can read (JPEG, PNG, WebP, ...)") from None
        if width * height > MAX_IMAGE_PIXELS:
            raise QueryError(f"{name} is {width} x {height} pixels; images are limited to "
                             f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels")
        try:
            frame = media.load_frame(path, self.cfg.model.image_size)  # (S, S, 3) uint8
        except media.MediaError as err:
            raise QueryError(f"{name}: {err.reason}") from None
        x = media.normalize_frames(frame.copy())[None].to(self.device)  # (1, 3, S, S); PIL's array is read-only
        embedding = self.model.encode_visual(x)[0].cpu()
        priority = None
        if self.guide_encoder is not None:
            _, scores = self.guide_encoder.encode(x, "v", self.priority_direction)
            priority = scores[0].view(self.cfg.model.visual_grid).cpu()  # (g, g), raster order
        return ImageQuery(embedding, frame, priority)

    def _audio_priority(self, segments: torch.Tensor) -> torch.Tensor | None:
        """(K, T, F) segments -> (F, clip_frames) token priority, averaged where segments overlap."""
        if self.guide_encoder is None:
            return None
        m = self.cfg.model
        _, scores = self.guide_encoder.encode(segments, "a", self.priority_direction)
        p = m.patch_size
        grid = scores.view(len(segments), *m.audio_grid).cpu()  # (K, F/p, T/p): frequency-major tokens
        cells = grid.repeat_interleave(p, 1).repeat_interleave(p, 2)  # (K, F, T)
        total = torch.zeros(m.mel_bins, self.cfg.data.clip_frames)
        count = torch.zeros(self.cfg.data.clip_frames)
        for (start, end), cell in zip(self.segment_bounds, cells):
            total[:, start:end] += cell
            count[start:end] += 1
        return total / count.clamp(min=1)

    def search(self, embedding: torch.Tensor, target: str, k: int = TOP_K) -> list[Hit]:
        """The k gallery clips whose ``target`` ("visual" or "audio") embedding is closest to ``embedding`` (D,)."""
        bank = {"visual": self.visual, "audio": self.audio}[target]  # (N, D)
        scores = bank @ embedding.to(bank.dtype)  # (N,) cosine similarities
        top = scores.topk(min(k, len(scores)))
        return [Hit(r + 1, i, self.clips[i].video_id, s, self.labels[i])
                for r, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()))]

    # ------------------------------------------------------------------ gallery media
    def _row(self, index: int) -> int:
        return self.dataset.valid[index]

    def frames(self, index: int) -> np.ndarray:
        """(K, S, S, 3) uint8 frames of gallery clip ``index`` (from the feature cache)."""
        return np.asarray(self.dataset.cache.frames[self._row(index)])

    def fbank(self, index: int) -> torch.Tensor:
        """(clip_frames, F) normalised fbank of gallery clip ``index`` (from the feature cache)."""
        return torch.from_numpy(np.asarray(self.dataset.cache.fbank[self._row(index)], dtype=np.float32))

    def waveform(self, index: int) -> tuple[int, np.ndarray]:
        """(sample rate, (T,) int16) of gallery clip ``index``, for playback."""
        rate = self.cfg.data.sample_rate
        wave = media.read_audio(self.clips[index].wav, rate).clamp(-1, 1)
        return rate, (wave * 32767).round().to(torch.int16).numpy()

    def info(self) -> dict[str, Any]:
        """What the model panel shows."""
        n_params = sum(p.numel() for p in self.model.parameters())
        return {"checkpoint": str(self.checkpoint),
                "format": "official CAV-MAE Sync / TG-DP" if self.official else "tgdp",
                "method": self.cfg.method, "preset": self.cfg.preset_name, "step": self.step,
                "parameters": n_params, "priority": f"{self.guide_source}, {self.priority_direction}",
                "gallery": str(self.gallery), "clips": len(self.clips), "skipped": dict(self.dataset.skipped),
                "embedding_cache": str(self.cache_file), "device": str(self.device)}


def check_inputs(checkpoint: Path, gallery: Path) -> None:
    """Raise FileNotFoundError naming the command that creates a missing checkpoint or gallery."""
    if not checkpoint.is_file():
        hint = (f"`{QUICKSTART}` trains the quickstart model and writes it there"
                if checkpoint == DEFAULT_CHECKPOINT else f"the quickstart's checkpoint is {DEFAULT_CHECKPOINT} "
                f"(made by `{QUICKSTART}`)")
        raise FileNotFoundError(f"no checkpoint at {checkpoint}: {hint}; --checkpoint also takes a run's "
                                "last.pt or an official CAV-MAE Sync / TG-DP checkpoint")
    if not gallery.is_file():
        hint = (f"`{QUICKSTART}` generates the built-in AV-Digits benchmark, whose test split is the default "
                "gallery" if gallery.resolve() == DEFAULT_GALLERY.resolve() else
                f"make a manifest from videos with `python -m tgdp_core prepare VIDEOS OUT`, or run "
                f"`{QUICKSTART}` for the default gallery ({DEFAULT_GALLERY})")
        raise FileNotFoundError(f"no gallery manifest at {gallery}: {hint}")


# ---------------------------------------------------------------------------------- rendering
_FONT = None


def _font() -> ImageFont.ImageFont:
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default(size=11)
    return _FONT


def _colormap(name: str) -> np.ndarray:
    """(256, 3) uint8 lookup table of a matplotlib colormap."""
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


_LUTS: dict[str, np.ndarray] = {}


def _lut(name: str) -> np.ndarray:
    if name not in _LUTS:
        _LUTS[name] = _colormap(name)
    return _LUTS[name]


def _unit(x: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.5) -> np.ndarray:
    lo, hi = np.percentile(x, [lo_pct, hi_pct])
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)


def _heat(priority: np.ndarray) -> np.ndarray:
    """Priorities -> [0, 1], min to max: the ranking is what guided masking uses, not the scale."""
    lo, hi = float(priority.min()), float(priority.max())
    return (priority - lo) / max(hi - lo, 1e-12)


def _blend(grey: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Grey (H, W) in [0, 1] under an inferno heat map (H, W) in [0, 1], opaque where it is hot."""
    alpha = (0.15 + 0.7 * heat)[..., None]
    base = np.repeat((grey * 210)[..., None], 3, axis=2)
    return (base * (1 - alpha) + _lut("inferno")[(heat * 255).astype(np.uint8)] * alpha).astype(np.uint8)


def spectrogram_image(fbank: torch.Tensor, priority: torch.Tensor | None = None,
                      frame_shift_s: float = media.FRAME_SHIFT_MS / 1000) -> np.ndarray:
    """(T, F) fbank -> (H, W, 3) uint8: time left to right, low frequencies at the bottom, ticks every second.

    Without ``priority`` a magma spectrogram; with a (F, T) priority the spectrogram in grey under
    the priority in inferno (min to max), opaque where the priority is highest.
    """
    spec = _unit(fbank.float().numpy().T[::-1])  # (F, T), row 0 = highest mel bin
    if priority is None:
        rgb = _lut("magma")[(spec * 255).astype(np.uint8)]
    else:
        rgb = _blend(spec, _heat(priority.float().numpy()[::-1]))
    rows, cols = max(1, round(192 / rgb.shape[0])), max(1, round(1024 / rgb.shape[1]))
    rgb = np.repeat(np.repeat(rgb, rows, axis=0), cols, axis=1)  # mel bins and frames a few pixels each
    height, width = rgb.shape[:2]
    canvas = Image.new("RGB", (width, height + 16), (24, 24, 27))
    canvas.paste(Image.fromarray(np.ascontiguousarray(rgb)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    per_second = cols / frame_shift_s  # pixels per second
    for s in range(int(width / per_second) + 1):
        x = int(s * per_second)
        draw.line([(x, height), (x, height + 4)], fill=(200, 200, 200))
        draw.text((x + 2, height + 2), f"{s} s", fill=(200, 200, 200), font=_font())
    return np.asarray(canvas)


def priority_overlay(frame: np.ndarray, priority: torch.Tensor | None, size: int = 288) -> np.ndarray:
    """(S, S, 3) uint8 frame with a (g, g) token priority laid over it -> (size, size, 3) uint8."""
    image = Image.fromarray(frame).resize((size, size), Image.Resampling.BICUBIC)
    if priority is None:
        return np.asarray(image)
    heat = _heat(priority.float().numpy()).astype(np.float32)
    heat = np.asarray(Image.fromarray(heat).resize((size, size), Image.Resampling.NEAREST))
    alpha = (0.1 + 0.6 * np.clip(heat, 0, 1))[..., None]
    colour = _lut("inferno")[(np.clip(heat, 0, 1) * 255).astype(np.uint8)]
    return (np.asarray(image) * (1 - alpha) + colour * alpha).astype(np.uint8)


def mosaic(frames: np.ndarray, tile: int = 128, columns: int = 4, gap: int = 2) -> np.ndarray:
    """(K, S, S, 3) uint8 frames -> one image, ``columns`` frames per row, in order."""
    K = len(frames)
    columns = min(columns, K)
    rows = math.ceil(K / columns)
    tile = min(tile, frames.shape[1])
    canvas = Image.new("RGB", (columns * tile + (columns - 1) * gap, rows * tile + (rows - 1) * gap), (255, 255, 255))
    for i, frame in enumerate(frames):
        image = Image.fromarray(frame)
        if image.size != (tile, tile):
            image = image.resize((tile, tile), Image.Resampling.BILINEAR)
        canvas.paste(image, ((i % columns) * (tile + gap), (i // columns) * (tile + gap)))
    return np.asarray(canvas)


def caption(hit: Hit) -> str:
    return f"#{hit.rank} · {hit.video_id} · {hit.score:.3f}" + (f" · {hit.labels}" if hit.labels else "")


# ---------------------------------------------------------------------------------- answers
# Each answer returns the outputs of one page event; the Gradio handlers below add the upload
# checks. Bad input is a message in the status field, never an exception: the page stays usable.
TABLE_HEADERS = ["rank", "clip", "score", "labels"]
# Result images go out as JPEG: it encodes a 1024 px spectrogram in ~2 ms where WebP (Gradio's
# default) takes ~30, which decides whether a 5-result answer stays well under 300 ms.
OUT = "jpeg"
HINT_AUDIO = "Upload or record a sound, or pick an example."
HINT_IMAGE = "Upload an image, or pick an example."


def _table(hits: list[Hit]) -> list[list[Any]]:
    return [[h.rank, h.video_id, round(h.score, 4), h.labels] for h in hits]


def _md(text: str) -> str:
    """Text (an uploaded file's name, say) shown literally in Markdown."""
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", text)


def _ok(what: str, r: Retriever, hits: list[Hit], start: float, note: str = "") -> str:
    ms = 1000 * (time.perf_counter() - start)
    best = f" Best match: **{_md(hits[0].video_id)}** ({hits[0].score:.3f})." if hits else ""
    return f"Top {len(hits)} of {len(r.clips):,} gallery clips for **{_md(what)}**{note}.{best} ({ms:.0f} ms)"


def _problem(message: str) -> str:
    return f"⚠️ **Cannot use this input.** {_md(message)}"


def answer_audio(r: Retriever, path: str | Path, name: str, k: int = TOP_K) -> tuple:
    """Audio -> visual: (status, [(mosaic, caption)], priority image, table rows)."""
    start = time.perf_counter()
    query = r.audio_query(path, name)
    hits = r.search(query.embedding, "visual", k)
    clip_s = r.cfg.data.clip_frames * media.FRAME_SHIFT_MS / 1000
    cropped = query.seconds > clip_s + 0.05
    note = f" ({query.seconds:.2f} s" + (f"; the first {clip_s:.2f} s were used)" if cropped else ")")
    gallery = [(mosaic(r.frames(h.index)), caption(h)) for h in hits]
    heat = spectrogram_image(query.fbank, query.priority)
    return _ok(name, r, hits, start, note), gallery, heat, _table(hits)


def answer_image(r: Retriever, path: str | Path, name: str, k: int = TOP_K) -> tuple:
    """Visual -> audio: (status, priority overlay, table rows, then per hit: audio, spectrogram)."""
    import gradio as gr

    start = time.perf_counter()
    query = r.image_query(path, name)
    hits = r.search(query.embedding, "audio", k)
    slots = []
    for h in hits:
        slots += [gr.update(value=r.waveform(h.index), label=caption(h)), spectrogram_image(r.fbank(h.index))]
    return (_ok(name, r, hits, start), priority_overlay(query.frame, query.priority), _table(hits), *slots)


def _upload(payload: Any, limit_bytes: int) -> tuple[Path, str]:
    """The file behind a Gradio upload record; refuses anything outside Gradio's upload folder."""
    from gradio.utils import get_upload_folder

    if isinstance(payload, str):  # a bare path is never accepted from the page
        raise QueryError("uploads are read only from Gradio's own temporary files")
    path = Path(payload.get("path") or "").resolve()
    name = Path(payload.get("orig_name") or path.name).name
    if not path.is_relative_to(Path(get_upload_folder()).resolve()) or not path.is_file():
        raise QueryError("uploads are read only from Gradio's own temporary files")
    size = path.stat().st_size
    if size == 0:
        raise QueryError(f"{name} is empty (0 bytes)")
    if size > limit_bytes:
        raise QueryError(f"{name} is {size / 2**20:.1f} MB; uploads are limited to {limit_bytes / 2**20:.0f} MB")
    return path, name


def _handler(answer: Callable, r: Retriever, k: int, limit_bytes: int, empty: tuple, hint: str) -> Callable:
    """A page event: upload record -> outputs, every refusal or failure as a message in the status field."""

    def handle(payload):
        if not payload:
            return (hint, *empty)
        try:
            path, name = _upload(payload, limit_bytes)
            return answer(r, path, name, k)
        except QueryError as err:
            return (_problem(str(err)), *empty)
        except Exception as err:  # a bug or an unforeseen file: say so in the page, keep serving
            log.exception("query failed")
            return (_problem(f"the query failed unexpectedly ({type(err).__name__}: {err})"), *empty)

    return handle


# ---------------------------------------------------------------------------------- the page
CSS = """
.tgdp-status { min-height: 2.6em; }
.tgdp-status p { margin: 0.2em 0; }
#a2v-results .caption-label { white-space: normal; max-width: 96%; }
footer { display: none !important; }
"""


def _theme():
    import gradio as gr

    # System fonts: the default theme fetches Google Fonts, which an offline machine cannot reach.
    return gr.themes.Soft(primary_hue="indigo", font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def build_app(checkpoint: str | Path = DEFAULT_CHECKPOINT, gallery: str | Path = DEFAULT_GALLERY,
              cache_dir: str | Path | None = None, *, top_k: int = TOP_K, device: str = "cpu",
              max_upload_mb: float = MAX_UPLOAD_MB, examples: int = EXAMPLES, progress: bool = True,
              retriever: Retriever | None = None):
    """The demo page (a ``gradio.Blocks``) for a checkpoint and a gallery manifest; serve it with ``launch``.

    ``retriever`` reuses a loaded ``Retriever`` (then checkpoint, gallery and cache_dir are
    ignored). Endpoints: ``/audio_to_visual`` and ``/visual_to_audio`` take one file each.
    """
    import gradio as gr

    r = retriever or Retriever(checkpoint, gallery, cache_dir, device, progress)
    k = max(1, min(top_k, len(r.clips)))
    limit = int(max_upload_mb * 2**20)
    K = r.cfg.data.frames_per_clip
    picks = sorted({round(i * (len(r.clips) - 1) / max(1, examples - 1)) for i in range(examples)})
    info = r.info()

    with gr.Blocks(title="TG-DP retrieval", analytics_enabled=False) as app:
        step = f", step {r.step}" if r.step is not None else ""
        gr.Markdown(f"## TG-DP cross-modal retrieval\n`{r.checkpoint}` · {r.cfg.method} ({r.cfg.preset_name}){step} · "
                    f"gallery `{r.gallery.name}`: {len(r.clips):,} clips of {K} frames")
        with gr.Tabs():
            with gr.Tab("Audio → image", id="a2v"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=300):
                        audio_in = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio query",
                                            elem_id="a2v-query")
                        gr.Examples([[r.clips[i].wav] for i in picks], audio_in, label="Gallery clips as queries",
                                    example_labels=[f"{r.clips[i].video_id} ({r.labels[i]})" for i in picks])
                        a_status = gr.Markdown(HINT_AUDIO, label="status", elem_classes="tgdp-status",
                                               elem_id="a2v-status")
                    with gr.Column(scale=3):
                        a_gallery = gr.Gallery(label=f"Top {k} clips (all {K} frames each)", format=OUT,
                                               columns=min(k, 3), height="auto", object_fit="contain",
                                               elem_id="a2v-results")
                a_heat = gr.Image(label=f"Token priority over the query's spectrogram ({r.guide_source}; bright = kept "
                                        "first by guided masking)", format=OUT, interactive=False,
                                  elem_id="a2v-priority")
                a_table = gr.Dataframe(headers=TABLE_HEADERS, label="Ranking", interactive=False)
            with gr.Tab("Image → audio", id="v2a"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=300):
                        image_in = gr.Image(sources=["upload", "clipboard"], type="filepath", label="Image query",
                                            height=288, elem_id="v2a-query")
                        gr.Examples([[r.clips[i].frame_path(K // 2)] for i in picks], image_in,
                                    label="Gallery frames as queries",
                                    example_labels=[f"{r.clips[i].video_id}, frame {K // 2}" for i in picks])
                        v_status = gr.Markdown(HINT_IMAGE, label="status", elem_classes="tgdp-status",
                                               elem_id="v2a-status")
                        v_heat = gr.Image(label=f"Token priority ({r.guide_source})", format=OUT, interactive=False,
                                          height=288, elem_id="v2a-priority")
                    with gr.Column(scale=3):
                        v_table = gr.Dataframe(headers=TABLE_HEADERS, label="Ranking", interactive=False)
                        slots = []  # per rank: a player and the clip's spectrogram
                        for rank in range(1, k + 1):
                            with gr.Row(equal_height=True):
                                slots.append(gr.Audio(label=f"#{rank}", interactive=False, scale=2, min_width=260,
                                                      elem_id=f"v2a-audio-{rank}"))
                                slots.append(gr.Image(label=f"#{rank} spectrogram", show_label=False, format=OUT,
                                                      interactive=False, height=150, scale=3,
                                                      elem_id=f"v2a-spec-{rank}"))
            with gr.Tab("Gallery", id="gallery"):
                pages = math.ceil(len(r.clips) / PAGE_SIZE)
                page = gr.Slider(1, max(pages, 2), value=1, step=1, label=f"Page (of {pages}, {PAGE_SIZE} clips each)",
                                 visible=pages > 1)
                thumbs = gr.Gallery(_page(r, 1), format=OUT, columns=8, height="auto", allow_preview=False,
                                    show_label=False, elem_id="gallery-thumbs")
                with gr.Row():
                    with gr.Column(scale=2):
                        picked = gr.Markdown("Select a clip to see its frames and hear it.", elem_id="gallery-picked")
                        picked_audio = gr.Audio(label="Audio", interactive=False)
                    picked_frames = gr.Image(label="Frames", format=OUT, interactive=False, scale=3,
                                             elem_id="gallery-frames")
                picked_spec = gr.Image(label="Spectrogram", format=OUT, interactive=False)
            with gr.Tab("Model", id="model"):
                gr.Markdown(_model_markdown(r, info))
                with gr.Accordion("Config", open=False):
                    gr.JSON(r.cfg.to_dict())

        # preprocess=False: the handlers get Gradio's upload record and check it themselves
        audio_in.change(_handler(answer_audio, r, k, limit, ([], None, []), HINT_AUDIO), audio_in,
                        [a_status, a_gallery, a_heat, a_table], api_name="audio_to_visual", preprocess=False,
                        show_progress="minimal")
        empty_slots = [x for rank in range(1, k + 1) for x in (gr.update(value=None, label=f"#{rank}"), None)]
        image_in.change(_handler(answer_image, r, k, limit, (None, [], *empty_slots), HINT_IMAGE), image_in,
                        [v_status, v_heat, v_table, *slots], api_name="visual_to_audio", preprocess=False,
                        show_progress="minimal")
        page.change(lambda p: _page(r, int(p)), page, thumbs, api_name="gallery_page", show_progress="hidden",
                    trigger_mode="always_last")

        def show_clip(p, evt: gr.SelectData):
            index = (int(p) - 1) * PAGE_SIZE + evt.index
            c, labels = r.clips[index], r.labels[index]
            text = f"**{_md(c.video_id)}**" + (f" · {_md(labels)}" if labels else "") + f"\n\n{_md(Path(c.wav).name)}"
            return text, r.waveform(index), mosaic(r.frames(index)), spectrogram_image(r.fbank(index))

        thumbs.select(show_clip, page, [picked, picked_audio, picked_frames, picked_spec], api_visibility="private")
    app.retriever = r  # query_latency and the tests reach the state through the app
    app.max_upload_bytes = limit
    app.top_k = k
    return app


def _page(r: Retriever, page: int) -> list[tuple[np.ndarray, str]]:
    """The gallery browser's thumbnails: each clip's middle frame with its id (labels show on selection)."""
    K = r.cfg.data.frames_per_clip
    start = (page - 1) * PAGE_SIZE
    return [(r.frames(i)[K // 2], r.clips[i].video_id) for i in range(start, min(start + PAGE_SIZE, len(r.clips)))]


def _model_markdown(r: Retriever, info: dict[str, Any]) -> str:
    lines = ["| model | |", "|---|---|"]
    for key, value in info.items():
        if key == "skipped":
            value = (", ".join(f"{vid} ({why})" for vid, why in value.items()) or "none")
        elif key == "parameters":
            value = f"{value / 1e6:.2f} M"
        is_path = key in ("checkpoint", "gallery", "embedding_cache")
        lines.append(f"| {key} | `{value}` |" if is_path else f"| {key} | {value} |")
    metrics = run_metrics(r.checkpoint)
    if metrics:
        lines += ["", f"`{r.checkpoint.parent / 'metrics.jsonl'}`", "", "| metrics | |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
                  for key, value in metrics.items()]
    return "\n".join(lines)


def run_metrics(checkpoint: Path) -> dict[str, Any]:
    """The last record of the run folder's metrics.jsonl, with the latest retrieval metrics ("R@") merged in."""
    from . import viz  # matplotlib: imported when a page is built, not with the CLI

    try:
        records = [rec for rec in viz.read_metrics(checkpoint.parent) if isinstance(rec, dict)]
    except ValueError as err:  # a line cut short by a crash: the page still starts
        log.warning("%s: unreadable metrics.jsonl: %s", checkpoint.parent, err)
        return {}
    if not records:
        return {}
    out = dict(records[-1])
    for rec in reversed(records):
        if any("R@" in key for key in rec):
            out.update(rec)
            break
    return out


# ---------------------------------------------------------------------------------- serving
def launch(app=None, *, checkpoint: str | Path = DEFAULT_CHECKPOINT, gallery: str | Path = DEFAULT_GALLERY,
           host: str = DEFAULT_HOST, port: int | None = None, inline: bool = False, block: bool = True,
           quiet: bool = False, **build_kwargs):
    """Serve the demo (building it from ``checkpoint`` and ``gallery`` unless ``app`` is given).

    host: 127.0.0.1 (this machine only) unless told otherwise; no share link is ever opened.
    inline=True shows the page in a notebook cell (notebooks never block). block=False returns
    while the server runs in a background thread; stop it with ``app.close()``. Returns the app.
    """
    app = app if app is not None else build_app(checkpoint, gallery, **build_kwargs)
    app.launch(server_name=host, server_port=port, inline=inline, share=False, prevent_thread_lock=not block,
               max_file_size=app.max_upload_bytes, theme=_theme(), css=CSS, quiet=quiet, ssr_mode=False,
               mcp_server=False, pwa=False, enable_monitoring=False)
    return app


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def query_latency(target, n: int = 20, k: int | None = None) -> dict[str, Any]:
    """Time ``n`` queries in each direction on a loaded demo (a ``build_app`` app or a ``Retriever``).

    The query is the first gallery clip's wav (audio -> visual) and its middle frame (visual ->
    audio), answered in full as the page answers it (decode, embed, token priority, search,
    render) minus Gradio's serialisation. Returns milliseconds: median, p90 and max per
    direction, and the median of the search alone.
    """
    r = target if isinstance(target, Retriever) else target.retriever
    k = k or getattr(target, "top_k", TOP_K)
    clip = r.clips[0]
    wav, frame = Path(clip.wav), Path(clip.frame_path(r.cfg.data.frames_per_clip // 2))
    out: dict[str, Any] = {"clips": len(r.clips), "n": n, "k": k, "threads": torch.get_num_threads()}
    for direction, run in (("audio_to_visual", lambda: answer_audio(r, wav, wav.name, k)),
                           ("visual_to_audio", lambda: answer_image(r, frame, frame.name, k))):
        run()  # warm-up: first calls pay for allocations and lazy imports
        times = []
        for _ in range(n):
            start = time.perf_counter()
            run()
            times.append(1000 * (time.perf_counter() - start))
        times.sort()
        out[direction] = {"median_ms": statistics.median(times), "p90_ms": times[min(n - 1, int(0.9 * n))],
                          "max_ms": times[-1]}
    query = r.visual[0]
    times = []
    for _ in range(max(n, 20)):
        start = time.perf_counter()
        r.search(query, "audio", k)
        times.append(1000 * (time.perf_counter() - start))
    out["search_median_ms"] = statistics.median(times)
    return out


# ---------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``demo`` subcommand (see ``main``)."""
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                        help=f"a tgdp checkpoint or an official CAV-MAE Sync / TG-DP one "
                             f"(default: {DEFAULT_CHECKPOINT}, made by `{QUICKSTART}`)")
    parser.add_argument("--gallery", default=str(DEFAULT_GALLERY),
                        help="manifest of the clips to search (default: the AV-Digits test split, "
                             "data/generated/avdigits/test.json)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default 127.0.0.1: this machine only; "
                             "0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    parser.add_argument("--cache-dir", help="where gallery features and embeddings are cached "
                                            "(default: .tgdp_cache beside the manifest)")
    parser.add_argument("--top-k", type=int, default=TOP_K, help=f"results per query (default {TOP_K})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main(args: argparse.Namespace) -> int:
    """``python -m tgdp_core demo``: build the page and serve it until interrupted."""
    try:
        app = build_app(args.checkpoint, args.gallery, args.cache_dir, top_k=args.top_k, device=args.device)
    except (FileNotFoundError, ValueError) as err:  # CheckpointError and MediaError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.host not in (DEFAULT_HOST, "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the demo",
              file=sys.stderr)
    launch(app, host=args.host, port=args.port)
    return 0
