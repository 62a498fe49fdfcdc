"""Cross-modal retrieval over a gallery of clips with a checkpoint: embeddings, their cache, queries.

    r = Retriever("runs/quickstart/tgdp/last.pt", "data/generated/avdigits/test.json")
    hits = r.search(r.audio_query("query.wav").embedding, "visual", k=5)

Query protocol: clip-level embeddings as in evaluation (docs/method.md, "Evaluation"). A gallery
clip's visual embedding is the mean of its K frame embeddings, its audio embedding the mean of
its K aligned segment embeddings, both re-normalised. An audio query of any length is read like
a gallery wav (mono, resampled, fbank padded or cropped to ``data.clip_frames``) and embedded as
the mean over its K aligned segments, so a gallery clip's own wav reproduces its gallery
embedding; an image query is one frame. Scores are cosine similarities.

The token priority is TG-DP's: the head-averaged joint-block attention between the global token
and the patches (``objective.score_direction``), read from the EMA teacher when the checkpoint
holds one (as in training), else from the student.

No Gradio here: the demo page (``tgdp_core.demo``), the benchmark and notebooks share this
state. Query limits (duration, pixels, silence) are checked before decoding.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from . import evaluate, media
from .checkpoint import FORMAT, CheckpointError, load_model, read_checkpoint, save_checkpoint, teacher_encoder_from
from .export import is_export
from .dataset import AVDataset, segment_bounds

log = logging.getLogger(__name__)

MAX_AUDIO_SECONDS = 60.0
MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused before decoding (PIL only warns below 89 M)
SILENCE_PEAK = 1e-4  # peak amplitude (-80 dBFS) under which a query counts as silent
EMBEDDING_CACHE_VERSION = 1
EMBEDDING_FORMAT = "tgdp-demo-gallery"


class QueryError(ValueError):
    """A query the retriever refuses (bad file, silence, too long, too large); the demo shows the message."""


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


class Retriever:
    """A checkpoint and a gallery manifest: embeds queries and ranks the gallery's clips.

    The gallery's clip embeddings are computed once and cached at
    ``CACHE/demo/<key>.pt`` (CACHE = ``cache_dir``, else the config's ``data.cache_dir``, else
    ``.tgdp_cache`` beside the manifest, where the feature cache lives too). The key hashes the
    checkpoint's resolved path, size and modification time, the manifest's bytes and the
    config, so retraining, editing the manifest or changing a data setting recomputes them.
    """

    def __init__(self, checkpoint: str | Path, gallery: str | Path,
                 cache_dir: str | Path | None = None, device: str | torch.device = "cpu", progress: bool = True):
        self.checkpoint, self.gallery = Path(checkpoint), Path(gallery)
        self.device = torch.device(device)
        self.model = load_model(self.checkpoint, map_location=self.device)
        self.cfg = self.model.cfg
        # the extras load_model leaves (teacher, step); an export (export.py) holds weights only
        self.exported = is_export(self.checkpoint)
        data = {} if self.exported else read_checkpoint(self.checkpoint)
        self.official = not self.exported and data.get("format") != FORMAT
        self.step = data.get("step") if data.get("format") == FORMAT else None
        self.priority_direction = self.cfg.objective.score_direction
        self.guide_encoder, self.guide_source = self.model.encoder, "student"
        if not self.cfg.model.global_token:  # CAV-MAE: no global token, no attention priority
            self.guide_encoder, self.guide_source = None, "none (the model has no global token)"
        elif (teacher := teacher_encoder_from(data, self.model, str(self.checkpoint))) is not None:
            self.guide_encoder, self.guide_source = teacher.to(self.device), "EMA teacher"
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
        weights = self.checkpoint / "model.safetensors" if self.checkpoint.is_dir() else self.checkpoint
        stat = weights.stat()
        # the feature cache's folder name already hashes the gallery files' sizes and mtimes
        features = self.dataset.cache.folder.name if self.dataset.cache is not None else ""
        ident = [EMBEDDING_CACHE_VERSION, str(weights.resolve()), stat.st_size, stat.st_mtime_ns,
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
        try:  # (S, S, 3) uint8; an image too large is refused from its header, before decoding
            frame = media.load_frame(path, self.cfg.model.image_size, max_pixels=MAX_IMAGE_PIXELS)
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

    def search(self, embedding: torch.Tensor, target: str, k: int = 5) -> list[Hit]:
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

    def run_metrics(self) -> dict[str, Any]:
        """The last record of the checkpoint's run folder (metrics.jsonl), with the latest
        retrieval metrics ("R@...") merged in; {} when there is none or it cannot be read."""
        path = self.checkpoint.parent / "metrics.jsonl"
        try:
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        except ValueError as err:  # a line cut short by a crash: the page still starts
            log.warning("%s: unreadable metrics.jsonl: %s", path, err)
            return {}
        records = [rec for rec in records if isinstance(rec, dict)]
        if not records:
            return {}
        out = dict(records[-1])
        for rec in reversed(records):
            if any("R@" in key for key in rec):
                out.update(rec)
                break
        return out

    def info(self) -> dict[str, Any]:
        """What the model panel shows."""
        n_params = sum(p.numel() for p in self.model.parameters())
        return {"checkpoint": str(self.checkpoint),
                "format": "official CAV-MAE Sync / TG-DP" if self.official else "tgdp export" if self.exported else "tgdp",
                "method": self.cfg.method, "preset": self.cfg.preset_name, "step": self.step,
                "parameters": n_params, "priority": f"{self.guide_source}, {self.priority_direction}",
                "gallery": str(self.gallery), "clips": len(self.clips), "skipped": dict(self.dataset.skipped),
                "embedding_cache": str(self.cache_file), "device": str(self.device)}
