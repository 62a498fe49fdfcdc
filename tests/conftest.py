import os
from pathlib import Path

import pytest
import torch

import tgdp_core as tg

REFERENCE_DIR = Path(os.environ.get("TGDP_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def reference():
    """The official model's recorded tensors (../shared/reference); CI requires them."""
    path = REFERENCE_DIR / "tgdp_reference_tiny.pt"
    if not path.exists():
        if os.environ.get("TGDP_REQUIRE_REFERENCE"):
            pytest.fail(f"reference vectors missing: {path}")
        pytest.skip(f"reference vectors not found at {path} (set TGDP_REFERENCE_DIR)")
    return torch.load(path, map_location="cpu", weights_only=True)


def tiny_batch(cfg, batch=4, generator=None):
    m = cfg.model
    audio = torch.randn(batch, m.audio_frames, m.mel_bins, generator=generator)
    frames = torch.randn(batch, 3, m.image_size, m.image_size, generator=generator)
    return audio, frames


@pytest.fixture
def tiny_cfg():
    return tg.Config.preset("tiny")


class SyntheticAV(torch.utils.data.Dataset):
    """Deterministic random clips in the training item format of AVDataset: (clip, frame, seed) -> dict."""

    def __init__(self, cfg, clips=16):
        self.cfg, self.n = cfg, clips

    def __len__(self):
        return self.n

    def __getitem__(self, item):
        clip, frame, _ = item
        g = torch.Generator().manual_seed(clip * 100 + frame)
        m = self.cfg.model
        return {"fbank": torch.randn(m.audio_frames, m.mel_bins, generator=g),
                "frames": torch.randn(3, m.image_size, m.image_size, generator=g),
                "labels": torch.zeros(0), "index": torch.tensor(clip), "frame": torch.tensor(frame)}
