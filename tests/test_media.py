"""Decoding, features and clip extraction on tiny media made with PyAV in tmp_path."""
import pickle
import struct
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from PIL import Image

from tgdp_core.media import (MediaError, decode_audio, decode_frame, extract_clip, fbank, fbank_segment,
                             image_dimensions, jpeg_bytes, load_frame, normalize_frames, read_audio, write_atomic)

TONE_HZ = 440.0


def grey(i: int) -> int:
    """The grey level of frame i in write_video: frames are told apart by their brightness."""
    return (16 * i + 8) % 256


def write_video(path: Path, vcodec: str = "libx264", acodec: str | None = "aac", seconds: float = 1.5,
                fps: int = 10, size: tuple[int, int] = (64, 48), rate: int = 44100, layout: str = "stereo") -> Path:
    """A clip whose frame i is flat grey(i) and whose audio is a 440 Hz tone; acodec=None: no audio."""
    with av.open(str(path), "w") as container:
        video = container.add_stream(vcodec, rate=fps)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        audio = container.add_stream(acodec, rate=rate, layout=layout) if acodec else None
        for i in range(round(seconds * fps)):
            image = np.full((size[1], size[0], 3), grey(i), np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode())
        if audio is None:
            return path
        t = np.arange(round(seconds * rate)) / rate
        tone = np.repeat(0.5 * np.sin(2 * np.pi * TONE_HZ * t)[None], audio.layout.nb_channels, 0)
        step = audio.codec_context.frame_size or 1024
        for start in range(0, tone.shape[1], step):
            chunk = np.ascontiguousarray(tone[:, start:start + step], dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate, frame.pts = rate, start
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    return path


def dominant_hz(waveform: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(waveform))
    return float(np.fft.rfftfreq(len(waveform), 1 / sample_rate)[spectrum.argmax()])


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ------------------------------------------------------------------------ extract_clip
def test_mp4_with_stereo_44k_audio_becomes_16k_mono_wav_and_frames(tmp_path):
    video = write_video(tmp_path / "tone.mp4", seconds=1.5, rate=44100, layout="stereo")
    result = extract_clip(video, tmp_path / "out", "tone", num_frames=4, seconds=2.0, frame_size=32)

    wav, rate = sf.read(result["wav"])
    assert Path(result["wav"]) == tmp_path / "out" / "audio" / "tone.wav"
    assert rate == 16000 and wav.shape == (32000,) and sf.info(result["wav"]).subtype == "PCM_16"
    assert dominant_hz(wav[1600:22400], rate) == pytest.approx(TONE_HZ, abs=2)
    assert np.abs(wav[1600:22400]).max() == pytest.approx(0.5, abs=0.05)  # channels averaged, not summed
    assert np.abs(wav[25600:]).max() == 0  # the 1.5 s clip is zero-padded to 2 s
    assert result["audio_seconds"] == pytest.approx(1.5, abs=0.05)

    assert result["video_path"] == str(tmp_path / "out" / "frames")
    assert result["frames"] == [str(tmp_path / "out" / "frames" / f"frame_{i}" / "tone.jpg") for i in range(4)]
    for path in result["frames"]:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (32, 32) and image.mode == "RGB"
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_frames_are_the_ones_on_screen_at_even_times_and_short_videos_repeat_the_last(tmp_path):
    video = write_video(tmp_path / "count.mp4", seconds=2.0, fps=8)  # frames at 0, 0.125, ... 1.875 s
    # t_i = i * 3 / 6 = 0, 0.5, ..., 2.5 s: frames 0, 4, 8, 12, then the last (15) twice.
    result = extract_clip(video, tmp_path / "out", "count", num_frames=6, seconds=3.0, frame_size=16)
    levels = [np.asarray(Image.open(p)).mean() for p in result["frames"]]
    np.testing.assert_allclose(levels, [grey(i) for i in (0, 4, 8, 12, 15, 15)], atol=4)
    assert result["padded_frames"] == 2


def test_webm_vp8_opus(tmp_path):
    video = write_video(tmp_path / "clip.webm", vcodec="libvpx", acodec="libopus", rate=48000)
    result = extract_clip(video, tmp_path / "out", "clip", num_frames=16, seconds=1.0, frame_size=24)
    wav, rate = sf.read(result["wav"])
    assert rate == 16000 and wav.shape == (16000,)
    assert dominant_hz(wav[1600:], rate) == pytest.approx(TONE_HZ, abs=2)
    assert len(result["frames"]) == 16 and all(Path(p).exists() for p in result["frames"])
    assert result["padded_frames"] == 0  # a 1.5 s video covers 1 s


@pytest.mark.parametrize("case, reason", [
    ("no_audio", "no audio stream"),
    ("truncated_mp4", "truncated"),
    ("truncated_webm", "truncated"),
    ("zero_bytes", "empty file (0 bytes)"),
    ("missing", "file not found"),
    ("not_a_video", "not a video"),
])
def test_unusable_videos_raise_media_error_naming_file_and_reason(tmp_path, case, reason):
    path = tmp_path / f"{case}.{'webm' if case.endswith('webm') else 'mp4'}"
    if case == "no_audio":
        write_video(path, acodec=None)
    elif case == "truncated_mp4":  # the index (moov) is written last: the half left cannot be opened
        truncate(write_video(path))
    elif case == "truncated_webm":  # opens and decodes, but ends long before its declared duration
        truncate(write_video(path, "libvpx", "libopus", rate=48000))
    elif case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "not_a_video":
        path.write_text("hello " * 100)
    with pytest.raises(MediaError) as err:
        extract_clip(path, tmp_path / "out", "x", num_frames=4, seconds=2.0, frame_size=16)
    assert str(path) in str(err.value) and reason in err.value.reason
    assert not (tmp_path / "out" / "audio" / "x.wav").exists()


def test_media_error_keeps_path_and_reason_across_processes():
    err = MediaError("/data/a.mp4", "no audio stream", "a hint")
    assert str(err) == "/data/a.mp4: no audio stream (a hint)" and isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.path, copy.reason, str(copy)) == (err.path, err.reason, str(err))
    plain = pickle.loads(pickle.dumps(MediaError("clip7: already a whole message")))
    assert (plain.path, str(plain)) == (None, "clip7: already a whole message")


def test_write_atomic_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "a" / "file.wav"

    def half_then_crash(tmp):
        Path(tmp).write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, half_then_crash)
    assert list(target.parent.iterdir()) == []
    write_atomic(target, lambda tmp: Path(tmp).write_bytes(b"whole"))
    assert target.read_bytes() == b"whole" and list(target.parent.iterdir()) == [target]


# ------------------------------------------------------------------------ read_audio
def test_read_audio_averages_channels_and_resamples(tmp_path):
    t = np.arange(44100) / 44100
    left, right = 0.5 * np.sin(2 * np.pi * TONE_HZ * t), 0.2 * np.sin(2 * np.pi * 3000 * t)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], 1).astype(np.float32), 44100, subtype="FLOAT")

    waveform = read_audio(path)
    assert waveform.dtype == torch.float32 and waveform.shape == (16000,)
    expected = torchaudio.functional.resample(torch.from_numpy((left + right).astype(np.float32) / 2), 44100, 16000)
    torch.testing.assert_close(waveform, expected)
    assert read_audio(path, sample_rate=44100).shape == (44100,)


@pytest.mark.parametrize("case, reason", [
    ("missing", "file not found"), ("corrupt", "unreadable or corrupt"), ("zero_bytes", "empty file"),
    ("no_samples", "0 samples"), ("nan", "NaN"), ("huge", "samples reach 1e+30, far outside the [-1, 1] range"),
    ("unscaled", "samples reach 3.28e+04"),  # issue 17, item 7: a float file holding int16-scaled values
])
def test_read_audio_errors_name_the_file(tmp_path, case, reason):
    path = tmp_path / f"{case}.wav"
    if case == "corrupt":
        path.write_bytes(b"RIFF not really a wave file" * 10)
    elif case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "no_samples":
        sf.write(path, np.zeros(0, np.float32), 16000)
    elif case == "nan":
        sf.write(path, np.array([0.1, np.nan, 0.2] * 200, np.float32), 16000, subtype="FLOAT")
    elif case in ("huge", "unscaled"):
        peak = 1e30 if case == "huge" else 32767.0
        sf.write(path, np.array([0.1, peak, -0.2] * 200, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(MediaError) as err:
        read_audio(path)
    assert str(path) in str(err.value) and reason in str(err.value)


# ------------------------------------------------------------------------ fbank
def reference_fbank(waveform: torch.Tensor, num_frames: int, mel_bins: int = 128) -> torch.Tensor:
    """The CAV-MAE recipe written out independently of tgdp_core."""
    w = waveform - waveform.mean()
    x = torchaudio.compliance.kaldi.fbank(w[None], htk_compat=True, sample_frequency=16000, use_energy=False,
                                          window_type="hanning", num_mel_bins=mel_bins, dither=0.0,
                                          frame_shift=10, frame_length=25)
    if x.shape[0] < num_frames:
        x = torch.cat([x, torch.zeros(num_frames - x.shape[0], mel_bins)])
    return (x[:num_frames] + 5.081) / 4.4849


@pytest.mark.parametrize("seconds, num_frames, mel_bins", [(3.0, 1024, 128), (11.0, 1024, 128), (1.0, 64, 32)])
def test_fbank_matches_kaldi_reference_with_padding_and_cropping(seconds, num_frames, mel_bins):
    waveform = 0.1 * torch.randn(int(seconds * 16000))
    features = fbank(waveform, mel_bins=mel_bins, num_frames=num_frames)
    assert features.shape == (num_frames, mel_bins)
    torch.testing.assert_close(features, reference_fbank(waveform, num_frames, mel_bins))
    if seconds == 3.0:  # 298 real frames, then zero padding, normalised like everything else
        torch.testing.assert_close(features[298:], torch.full((1024 - 298, 128), 5.081 / 4.4849))


def test_fbank_rejects_waveforms_shorter_than_one_window():
    with pytest.raises(ValueError, match="shorter than one"):
        fbank(torch.zeros(399))
    assert fbank(torch.randn(400), num_frames=4).shape == (4, 128)


@pytest.mark.parametrize("seconds", [10.0, 4.0, 11.0])
def test_fbank_segment_equals_slicing_the_clip_fbank(seconds):
    """A training segment computed alone is the clip's fbank sliced: the loader's fast path."""
    waveform = 0.1 * torch.randn(int(seconds * 16000)) + 0.05  # an offset: the clip's mean is removed first
    full = fbank(waveform)
    for start, length in ((0, 416), (240, 416), (608, 416), (1000, 24), (0, 1024)):
        torch.testing.assert_close(fbank_segment(waveform, start, length), full[start:start + length],
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not lie within"):
        fbank_segment(waveform, 700, 416)


def test_decode_audio_reads_encoded_bytes_like_read_audio(tmp_path):
    wave = (0.2 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    for fmt in ("WAV", "FLAC"):
        path = tmp_path / f"a.{fmt.lower()}"
        sf.write(path, wave, 16000, format=fmt, subtype="PCM_16")
        torch.testing.assert_close(decode_audio(path.read_bytes()), read_audio(path))
    with pytest.raises(MediaError, match="member x.wav: unreadable or corrupt"):
        decode_audio(b"garbage", name="member x.wav")


# ------------------------------------------------------------------------ frames
def stripes(width: int, height: int, side: int) -> Image.Image:
    """Red | green | blue columns; the green middle band is ``side`` pixels wide."""
    image = np.zeros((height, width, 3), np.uint8)
    edge = (width - side) // 2
    image[:, :edge, 0] = image[:, edge:edge + side, 1] = image[:, edge + side:, 2] = 255
    return Image.fromarray(image)


def test_load_frame_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    stripes(80, 40, 40).save(tmp_path / "wide.png")  # shorter side already 40: a pure crop
    frame = load_frame(tmp_path / "wide.png", 40)
    assert frame.shape == (40, 40, 3) and frame.dtype == np.uint8
    assert (frame == [0, 255, 0]).all()

    stripes(160, 80, 80).save(tmp_path / "big.png")  # bicubic halving, then the same crop
    frame = load_frame(tmp_path / "big.png", 40)
    assert frame.shape == (40, 40, 3)
    np.testing.assert_allclose(frame[:, 2:-2].reshape(-1, 3).mean(0), [0, 255, 0], atol=2)

    stripes(48, 64, 48).rotate(90, expand=True).save(tmp_path / "tall.png")  # 64 x 48 -> 48 wide
    tall = load_frame(tmp_path / "tall.png", 32)
    assert tall.shape == (32, 32, 3)
    np.testing.assert_allclose(tall[2:-2].reshape(-1, 3).mean(0), [0, 255, 0], atol=2)


def test_load_frame_errors(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg" * 20)
    for path in (tmp_path / "bad.jpg", tmp_path / "missing.jpg"):
        with pytest.raises(MediaError, match=str(path)):
            load_frame(path, 32)


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height RGB pixels but holds almost no data: the header is all
    a size check may read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_an_image_too_large_is_refused_as_too_large_before_decoding(tmp_path):
    """Issue 17, item 15: PIL's decompression-bomb error used to read "not an image"."""
    bomb = png_header(tmp_path / "bomb.png", 20000, 10000)  # 200 MP: PIL refuses to open it at all
    with pytest.raises(MediaError, match=r"bomb.png: too large to decode: Image size \(200000000 pixels\)"):
        load_frame(bomb, 32)
    big = png_header(tmp_path / "big.png", 8000, 6000)  # 48 MP: PIL would decode it (144 MB)
    with pytest.raises(MediaError, match=r"big.png: too large: 8000 x 6000 pixels; images are limited to 40 megapixels"):
        load_frame(big, 32)
    assert image_dimensions(big.read_bytes()) == (8000, 6000)
    Image.new("RGB", (48, 40)).save(tmp_path / "small.png")
    with pytest.raises(MediaError, match="too large: 48 x 40 pixels; images are limited to 0.0016 megapixels"):
        load_frame(tmp_path / "small.png", 32, max_pixels=40 * 40)
    assert load_frame(tmp_path / "small.png", 32, max_pixels=None).shape == (32, 32, 3)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(MediaError, match=r"notes.png: unreadable or corrupt image: not an image PIL can read \(JPEG"):
        load_frame(tmp_path / "notes.png", 32)


def test_normalize_frames_matches_a_direct_computation():
    frames = np.random.default_rng(0).integers(0, 256, (2, 5, 8, 6, 3), dtype=np.uint8)  # (B, K, H, W, 3)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = torch.from_numpy(((frames / 255.0 - mean) / std).transpose(0, 1, 4, 2, 3)).float()
    for given in (frames, torch.from_numpy(frames)):
        result = normalize_frames(given)
        assert result.dtype == torch.float32 and result.shape == (2, 5, 3, 8, 6)
        torch.testing.assert_close(result, expected)
    with pytest.raises(ValueError, match="uint8"):
        normalize_frames(frames.astype(np.float32))


def test_decode_frame_gives_load_frames_pixels_and_jpeg_bytes_checks_the_file(tmp_path):
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (12, 15, 3)), np.ones((4, 4, 1))).astype(np.uint8)  # 48 x 60
    Image.fromarray(smooth).save(tmp_path / "f.jpg", quality=90)
    Image.fromarray(smooth[:40, :40]).save(tmp_path / "square.jpg", quality=90)
    Image.fromarray(smooth).save(tmp_path / "f.png")
    for name, size in (("f.jpg", 32), ("square.jpg", 40), ("f.png", 32)):
        data = (tmp_path / name).read_bytes()
        np.testing.assert_array_equal(decode_frame(data, size), load_frame(tmp_path / name, size))
    assert jpeg_bytes(tmp_path / "f.jpg") == (tmp_path / "f.jpg").read_bytes()  # JPEGs are copied as they are
    converted = jpeg_bytes(tmp_path / "f.png")
    assert converted[:2] == b"\xff\xd8" and decode_frame(converted, 32).shape == (32, 32, 3)
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "f.jpg").read_bytes()[:300])
    for path in (tmp_path / "cut.jpg", tmp_path / "missing.jpg"):
        with pytest.raises(MediaError, match=str(path)):
            jpeg_bytes(path)
    with pytest.raises(MediaError, match="member k.frame_00.jpg: unreadable or corrupt image"):
        decode_frame(b"\xff\xd8 not a jpeg", 32, name="member k.frame_00.jpg")
