"""tgdp: Teacher-Guided Dual-Path audio-visual pretraining (CVPR 2026), complete and runnable."""
from . import evaluate, masking
from .checkpoint import load_model
from .config import Config
from .model import build_model
from .trainer import train

__all__ = ["Config", "build_model", "evaluate", "load_model", "masking", "train"]
__version__ = "0.1.0"
