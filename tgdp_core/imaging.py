"""Pictures for the demo page and the benchmark: spectrograms (with the token priority laid
over them), frames under a priority heat map, frame mosaics. PIL and numpy only (fast enough
for a page answer: matplotlib's figures take tens of milliseconds)."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import media

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
