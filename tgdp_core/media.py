"""Decoding and input features: audio (soundfile, PyAV), Kaldi fbank, frames, clip extraction.

The formats follow CAV-MAE / CAV-MAE Sync (docs/method.md, "Inputs" and "Data formats"; the constants
live in ``formats.py``):

    read_audio(path)           -> (T,)               float32 mono waveform at 16 kHz
    decode_audio(data)         -> (T,)               the same from an encoded file in memory
    fbank(waveform)            -> (1024, 128)        normalised log-mel filterbank
    fbank_segment(waveform, s, n) -> (n, 128)        fbank(waveform)[s:s + n], computing only those frames
    load_frame(path, 224)      -> (224, 224, 3)      uint8 RGB, bicubic resize + centre crop
    decode_frame(data, 224)    -> (224, 224, 3)      the same from encoded image bytes (simplejpeg)
    normalize_frames(frames)   -> (..., 3, H, W)     float32, ImageNet mean/std
    extract_clip(video, out, video_id)               writes out/audio/{id}.wav (16 kHz mono
                                                     PCM16, exactly 10 s) and 16 frames
                                                     out/frames/frame_{i}/{id}.jpg

Every failure to read an input raises MediaError, whose message names the file and the reason.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import av
import numpy as np
import simplejpeg
import soundfile as sf
import torch
import torchaudio
from PIL import Image, UnidentifiedImageError

from .formats import FBANK_MEAN, FBANK_STD, FRAME_LENGTH_MS, FRAME_SHIFT_MS, IMAGENET_MEAN, IMAGENET_STD, SAMPLE_RATE

JPEG_QUALITY = 90
# Audio samples lie in [-1, 1]; a file whose samples reach this is not audio at its true level
# (e.g. a float WAV holding integer-scaled values): 40 dB over full scale. Its fbank would sit
# far off the normalisation (1e30 overflows it to inf, issue 17).
MAX_SAMPLE_MAGNITUDE = 100.0
# Images larger than this are refused from their header, before decoding: 40 megapixels is
# 120 MB of RGB, far beyond any frame or query; PIL itself only warns up to 179 megapixels.
MAX_IMAGE_PIXELS = 40_000_000
# A file whose decodable content ends this much before the duration its header declares is
# truncated (e.g. a WebM cut short still declares the full length and decodes to the cut).
TRUNCATION_TOLERANCE_S = 0.5


class MediaError(ValueError):
    """An input file that cannot be used.

    MediaError(path, reason, hint=None) reads "<path>: <reason> (<hint>)" and keeps ``path`` and
    ``reason`` (hint included) apart for reports; MediaError(message), the plain ValueError
    form, takes a message that already names the file (``path`` is then None).
    """

    def __init__(self, path: str | os.PathLike, reason: str | None = None, hint: str | None = None):
        if reason is None:
            self.path, self.reason = None, str(path)
        else:
            self.path, self.reason = str(path), reason if hint is None else f"{reason} ({hint})"
        super().__init__(self.reason if self.path is None else f"{self.path}: {self.reason}")

    def __reduce__(self):
        # Rebuilt from (path, reason), not from the joined message, when sent between processes.
        return type(self), (self.reason,) if self.path is None else (self.path, self.reason)


# ---------------------------------------------------------------------------------- audio
def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Read an audio file as a mono float32 waveform (T,) at ``sample_rate``.

    Channels are averaged (not summed, so the result stays within [-1, 1]); other rates are
    resampled with torchaudio's windowed-sinc resampler.
    """
    _check_file(path)
    return _decode_audio(str(path), path, sample_rate)


def decode_audio(data: bytes, sample_rate: int = 16000, name: str = "audio bytes") -> torch.Tensor:
    """``read_audio`` for an encoded audio file held in memory (a shard's wav or flac member);
    errors name ``name``."""
    if not data:
        raise MediaError(name, "empty audio (0 bytes)")
    return _decode_audio(io.BytesIO(data), name, sample_rate)


def _decode_audio(source, name: str | os.PathLike, sample_rate: int) -> torch.Tensor:
    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)  # (T, C)
    except sf.SoundFileError as err:
        raise MediaError(name, f"unreadable or corrupt audio file: {err}",
                         "soundfile reads WAV/FLAC/OGG/MP3; extract audio from videos with "
                         "`python -m tgdp_core prepare`") from None
    if data.shape[0] == 0:
        raise MediaError(name, "audio file is empty (0 samples)")
    if not np.isfinite(data).all():
        raise MediaError(name, "audio contains NaN or infinite samples")
    peak = float(np.abs(data).max())
    if peak > MAX_SAMPLE_MAGNITUDE:
        raise MediaError(name, f"samples reach {peak:.3g}, far outside the [-1, 1] range of audio samples "
                               "(a float file holding unscaled values?)", "rescale it to [-1, 1]")
    waveform = torch.from_numpy(data[:, 0] if data.shape[1] == 1 else data.mean(axis=1))  # (T,); mono as it is
    if rate != sample_rate:
        waveform = torchaudio.functional.resample(waveform, rate, sample_rate)
    return waveform


def fbank_frame_count(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """How many fbank frames ``fbank`` computes from ``num_samples`` samples (before pad/crop)."""
    window, shift = int(sample_rate * FRAME_LENGTH_MS / 1000), int(sample_rate * FRAME_SHIFT_MS / 1000)
    return 0 if num_samples < window else 1 + (num_samples - window) // shift


def fbank(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE, mel_bins: int = 128, num_frames: int = 1024,
          mean: float = FBANK_MEAN, std: float = FBANK_STD) -> torch.Tensor:
    """Normalised Kaldi log-mel filterbank of a mono waveform (T,) -> (num_frames, mel_bins).

    The CAV-MAE recipe: remove the waveform mean, 25 ms Hanning windows every 10 ms, no dither,
    no energy; zero-pad or crop (from the start) to ``num_frames``, then (x - mean) / std.
    Padding happens before normalisation, so padded frames hold -mean / std, as in CAV-MAE.
    """
    return fbank_segment(waveform, 0, num_frames, sample_rate, mel_bins, num_frames, mean, std)


def fbank_segment(waveform: torch.Tensor, start: int, length: int, sample_rate: int = 16000, mel_bins: int = 128,
                  num_frames: int = 1024, mean: float = FBANK_MEAN, std: float = FBANK_STD) -> torch.Tensor:
    """``fbank(waveform, ...)[start:start + length]`` without computing the other frames: (length, mel_bins).

    Kaldi frames are independent once the clip's mean is removed (each window has its own DC
    removal, pre-emphasis and FFT), so only the samples under frames start .. start + length - 1
    are transformed: a 416-frame training segment costs 40 % of the whole 1,024-frame clip.
    """
    if waveform.ndim != 1:
        raise ValueError(f"expected a mono waveform of shape (T,), got {tuple(waveform.shape)}")
    if start < 0 or length < 0 or start + length > num_frames:
        raise ValueError(f"segment [{start}, {start + length}) does not lie within the {num_frames} clip frames")
    window = int(sample_rate * FRAME_LENGTH_MS / 1000)
    shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
    if waveform.shape[0] < window:
        raise ValueError(f"waveform of {waveform.shape[0]} samples is shorter than one "
                         f"{FRAME_LENGTH_MS:g} ms fbank window ({window} samples at {sample_rate} Hz)")
    available = 1 + (waveform.shape[0] - window) // shift  # frames Kaldi makes (snip_edges)
    end = min(start + length, available)
    features = torch.zeros(0, mel_bins)
    if end > start:
        waveform = waveform.float() - waveform.float().mean()
        piece = waveform[start * shift:(end - 1) * shift + window]
        features = torchaudio.compliance.kaldi.fbank(
            piece[None], htk_compat=True, sample_frequency=sample_rate, use_energy=False,
            window_type="hanning", num_mel_bins=mel_bins, dither=0.0, frame_shift=FRAME_SHIFT_MS,
            frame_length=FRAME_LENGTH_MS)  # (end - start, mel_bins)
    features = torch.nn.functional.pad(features, (0, 0, 0, length - features.shape[0]))  # (length, mel_bins)
    return (features - mean) / std


# --------------------------------------------------------------------------------- frames
def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the shorter side is ``size``, then a centred size x size crop."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_frame(path: str | os.PathLike, image_size: int, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An image file as uint8 RGB (image_size, image_size, 3): bicubic resize + centre crop.

    An image of more than ``max_pixels`` pixels is refused as too large from its header, before
    any decoding (None: only PIL's own limit applies).
    """
    _check_file(path)
    return decode_frame(Path(path).read_bytes(), image_size, name=str(path), max_pixels=max_pixels)


def image_dimensions(data: bytes, name: str = "image bytes") -> tuple[int, int]:
    """(width, height) from encoded image bytes' header; nothing is decoded.

    MediaError when the bytes are not an image PIL can read, or one so large that PIL refuses
    even to open it (more than 2 x ``PIL.Image.MAX_IMAGE_PIXELS``, its decompression-bomb guard).
    """
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        return width, height
    except ValueError:  # not a JPEG simplejpeg reads: PIL's header parsers decide
        pass
    try:
        with warnings.catch_warnings():  # PIL warns from half its limit on; the caller decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError as err:
        raise MediaError(name, f"too large to decode: {err}") from None
    except OSError as err:  # PIL's "cannot identify image file <BytesIO ...>" says no more than this
        detail = "" if isinstance(err, UnidentifiedImageError) else f": {err}"
        raise MediaError(name, f"unreadable or corrupt image: not an image PIL can read (JPEG, PNG, WebP, ...)"
                               f"{detail}") from None


def decode_frame(data: bytes, image_size: int, name: str = "image bytes",
                 max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """``load_frame`` for encoded image bytes (a shard's JPEG member): uint8 RGB (image_size, image_size, 3).

    JPEGs decode with simplejpeg (libjpeg-turbo, the same pixels as PIL's decoder and faster:
    ``bench``'s loader section); other formats, and sizes other than image_size, go through PIL.
    More than ``max_pixels`` pixels is refused from the header as too large (issue 17).
    """
    width, height = image_dimensions(data, name)
    if max_pixels is not None and width * height > max_pixels:
        raise MediaError(name, f"too large: {width} x {height} pixels; images are limited to "
                               f"{max_pixels / 1e6:g} megapixels", "resize it")
    try:
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB")  # (H, W, 3) uint8
    except ValueError:  # not a JPEG simplejpeg reads (PNG, CMYK, corrupt): PIL decides
        try:
            with Image.open(io.BytesIO(data)) as image:
                rgb = np.array(image.convert("RGB"))
        except (OSError, Image.DecompressionBombError) as err:
            raise MediaError(name, f"unreadable or corrupt image: {err}") from None
    if rgb.shape[:2] != (image_size, image_size):
        rgb = np.array(resize_center_crop(Image.fromarray(rgb), image_size))  # a writable copy, as simplejpeg's
    return rgb


def jpeg_bytes(path: str | os.PathLike, quality: int = JPEG_QUALITY) -> bytes:
    """An image file's bytes as a JPEG that decodes: a JPEG's own bytes, other formats converted
    (``quality``); MediaError for a missing, empty or corrupt file."""
    _check_file(path)
    data = Path(path).read_bytes()
    try:
        simplejpeg.decode_jpeg(data, colorspace="RGB")  # decodes in full, so a truncated JPEG fails here
        return data
    except ValueError:
        pass
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as err:
        raise MediaError(path, f"unreadable or corrupt image: {err}") from None
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def normalize_frames(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB frames (..., H, W, 3) -> float32 (..., 3, H, W) in [0, 1], ImageNet-normalised."""
    if isinstance(frames, np.ndarray) and not frames.flags.writeable:
        frames = frames.copy()  # PIL and memory-mapped arrays are read-only; torch wants to own writable memory
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames of shape (..., H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    # Channels first while still uint8 (a quarter of the bytes to move), then one float pass and
    # two in-place ones: (x / 255 - mean) / std = x * (1 / (255 std)) - mean / std. A quarter of
    # the time of the direct form on one core (issue 13: the per-sample path of the loaders).
    x = frames.movedim(-1, -3).contiguous().float()  # (..., 3, H, W)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return x.mul_(1.0 / (255.0 * std)).sub_(mean / std)


# ------------------------------------------------------------------------ clip extraction
def clip_paths(out_dir: str | os.PathLike, video_id: str, num_frames: int = 16) -> tuple[Path, list[Path]]:
    """Where extract_clip writes a clip: (out/audio/{id}.wav, [out/frames/frame_{i}/{id}.jpg])."""
    out = Path(out_dir)
    frames = [out / "frames" / f"frame_{i}" / f"{video_id}.jpg" for i in range(num_frames)]
    return out / "audio" / f"{video_id}.wav", frames


def temporary_name(path: Path, pid: int | None = None) -> Path:
    """Where ``write_atomic`` in process ``pid`` (default: this one) writes ``path`` first."""
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}.tmp")


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temporary name in the same folder and os.replace, so readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def extract_clip(video_path: str | os.PathLike, out_dir: str | os.PathLike, video_id: str, num_frames: int = 16,
                 seconds: float = 10.0, sample_rate: int = SAMPLE_RATE, frame_size: int = 224) -> dict[str, Any]:
    """Decode one video into the CAV-MAE layout under ``out_dir``.

    Audio: mono (channels averaged) at ``sample_rate``, zero-padded or cut to exactly
    ``seconds``, 16-bit PCM WAV at out/audio/{video_id}.wav.
    Frames: the frame on screen at t_i = i * seconds / num_frames (i < num_frames), resized and
    centre-cropped to frame_size, JPEG (quality 90) at out/frames/frame_{i}/{video_id}.jpg.
    Past the end of a short video the last frame is repeated. Times count from the
    container's start, so audio and frames stay aligned when one stream starts late.
    Each file is written under a temporary name and renamed into place, so an interrupted
    run never leaves a partial file under a final name.

    Returns {"video_id", "wav", "video_path" (the frame root out/frames), "frames" (paths),
    "audio_seconds" (real audio before padding, at most ``seconds``), "padded_frames" (how
    many of the frames repeat the last one because the video ended)}.
    Raises MediaError for missing, empty, corrupt or truncated files and for files without an
    audio or a video stream.
    """
    if num_frames < 1 or frame_size < 1 or not seconds > 0:
        raise ValueError(f"num_frames ({num_frames}), frame_size ({frame_size}) and seconds ({seconds}) "
                         "must be positive")
    _check_file(video_path)
    try:
        container = av.open(str(video_path))
    except OSError as err:  # PyAV's permission and not-found errors are OSErrors too
        raise MediaError(video_path, f"cannot be read ({_why(err)})") from None
    except av.error.FFmpegError as err:
        raise MediaError(video_path, f"corrupt, truncated or not a video: FFmpeg cannot open it "
                                     f"({_why(err)})") from None
    with container:
        if not container.streams.video:
            raise MediaError(video_path, "no video stream")
        if not container.streams.audio:
            raise MediaError(video_path, "no audio stream", "tgdp needs audio and frames from every clip")
        try:
            audio, rate, picker = _decode(container, num_frames, seconds, frame_size)
        except av.error.FFmpegError as err:
            raise MediaError(video_path, f"corrupt or truncated: decoding failed ({_why(err)})") from None
    if rate == 0:
        raise MediaError(video_path, "the audio stream decodes to no samples (zero duration)")
    if not picker.chosen:
        raise MediaError(video_path, "the video stream decodes to no frames (zero duration)")

    pcm = _fixed_length_pcm(audio, rate, sample_rate, seconds)
    wav_path, frame_paths = clip_paths(out_dir, video_id, num_frames)
    for image, path in zip(picker.chosen, frame_paths):
        write_atomic(path, lambda tmp, image=image: image.save(tmp, format="JPEG", quality=JPEG_QUALITY))
    write_atomic(wav_path, lambda tmp: sf.write(tmp, pcm, sample_rate, subtype="PCM_16", format="WAV"))
    return {
        "video_id": video_id,
        "wav": str(wav_path),
        "video_path": str(Path(out_dir) / "frames"),
        "frames": [str(p) for p in frame_paths],
        "audio_seconds": len(audio) / rate,
        "padded_frames": picker.padded,
    }


def _fixed_length_pcm(audio: np.ndarray, rate: int, sample_rate: int, seconds: float) -> np.ndarray:
    """(T,) mono samples at ``rate`` -> exactly ``seconds`` at ``sample_rate`` (zero-padded or cut), in [-1, 1]."""
    waveform = torch.from_numpy(audio)
    if rate != sample_rate:
        waveform = torchaudio.functional.resample(waveform, rate, sample_rate)
    length = round(seconds * sample_rate)
    waveform = torch.nn.functional.pad(waveform, (0, max(0, length - waveform.shape[0])))[:length]
    # Resampling can overshoot full scale slightly; clip so the 16-bit conversion cannot wrap.
    return waveform.clamp(-1.0, 1.0).numpy()


class _FramePicker:
    """Chooses, for each target time, the frame on screen then (the last one starting at or before it)."""

    def __init__(self, targets: list[float], size: int):
        self.targets, self.size = targets, size
        self.chosen: list[Image.Image] = []
        self.padded = 0  # targets past the end of the video, filled with its last frame
        self.last: av.VideoFrame | None = None
        self.last_image: Image.Image | None = None  # self.last converted, once however often chosen

    @property
    def done(self) -> bool:
        return len(self.chosen) == len(self.targets)

    def feed(self, frame: av.VideoFrame, t: float) -> None:
        if self.last is None:
            self.last = frame  # targets before the first frame (a late-starting video) get it
        # 1 ms slack: container timestamps are rounded to their time base.
        while not self.done and t > self.targets[len(self.chosen)] + 1e-3:
            self._choose_last()
        if self.last is not frame:
            self.last, self.last_image = frame, None

    def finish(self) -> list[Image.Image]:
        """The chosen frames; targets past the end of the video repeat the last frame."""
        while self.last is not None and not self.done:
            self._choose_last()
            self.padded += 1
        return self.chosen

    def _choose_last(self) -> None:
        if self.last_image is None:
            self.last_image = resize_center_crop(self.last.to_image(), self.size)
        self.chosen.append(self.last_image)


def _decode(container: av.container.InputContainer, num_frames: int, seconds: float,
            frame_size: int) -> tuple[np.ndarray, int, _FramePicker]:
    """One demux pass over the best audio and video streams, stopping once both are covered.

    Returns (mono audio (S,) float32 at its native rate, at most ``seconds`` of it; that rate,
    0 if the stream decoded to nothing; the frame picker, finished).
    """
    video, audio = container.streams.best("video"), container.streams.best("audio")
    origin = (container.start_time or 0) / av.time_base  # seconds; the earliest stream start
    picker = _FramePicker([i * seconds / num_frames for i in range(num_frames)], frame_size)
    resampler: av.AudioResampler | None = None
    chunks: list[np.ndarray] = []
    have = need = rate = 0
    video_end = audio_end = 0.0
    for packet in container.demux(video, audio):
        for frame in packet.decode():  # the final empty packet of each stream flushes its decoder
            if frame.time is None:
                continue  # a frame without a timestamp cannot be placed on the clip's timeline
            t = frame.time - origin
            if isinstance(frame, av.VideoFrame):
                picker.feed(frame, t)
                video_end = max(video_end, t + (float(frame.duration * frame.time_base) if frame.duration else 0.0))
            elif resampler is None or have < need:
                if resampler is None:
                    # Format conversion only: rate and layout stay those of the first frame, so
                    # a mid-stream change of either is converted, not concatenated as is.
                    resampler, rate = av.AudioResampler(format="fltp"), frame.sample_rate
                    need = round(seconds * rate)
                    lead = round(max(0.0, t) * rate)  # audio starting late: silence before it
                    chunks.append(np.zeros(lead, np.float32))
                    have = lead
                for converted in resampler.resample(frame):
                    mono = converted.to_ndarray().mean(axis=0)  # (C, n) -> (n,)
                    chunks.append(mono)
                    have += len(mono)
                audio_end = have / rate
        if picker.done and have >= need > 0:
            break  # both streams cover `seconds`
    else:
        _check_complete(container, max(video_end, audio_end), seconds)
    samples = np.concatenate(chunks)[:need] if chunks else np.zeros(0, np.float32)
    picker.finish()
    return samples.astype(np.float32), rate, picker


def _check_complete(container: av.container.InputContainer, decoded: float, seconds: float) -> None:
    """Raise MediaError when decoding ended well before the duration the header declares."""
    if container.duration is None:
        return  # nothing declared (e.g. a live recording): trust what decodes
    declared = container.duration / av.time_base
    if decoded + TRUNCATION_TOLERANCE_S < min(declared, seconds):
        raise MediaError(container.name, f"truncated: the header declares {declared:.2f} s but only "
                                         f"{decoded:.2f} s decode")


def _check_file(path: str | os.PathLike) -> None:
    p = Path(path)
    if not p.exists():
        raise MediaError(path, "file not found")
    if not p.is_file():
        raise MediaError(path, "not a regular file")
    if p.stat().st_size == 0:
        raise MediaError(path, "empty file (0 bytes)")


def _why(err: BaseException) -> str:
    """FFmpeg's own words for an error, without the file name it repeats."""
    return getattr(err, "strerror", None) or str(err)
