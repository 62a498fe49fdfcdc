"""Where a training run's records go: metrics.jsonl, TensorBoard, Weights & Biases.

``trainer.RunLog`` hands every record (a flat dict: step, loss parts, lr, ...; evaluation
metrics as "eval/<metric>") and every figure to the loggers ``open_loggers`` makes from
``train.log_to``, on rank 0 only. Each logger is a small class with ``log(record)``,
``log_figure(name, figure, step)`` and ``close()``.

    tensorboard --logdir runs       # every run folder's tensorboard/ events, one run each

W&B is an optional extra (``pip install 'tgdp_core[wandb]'``), imported only when
``train.log_to`` names it, and runs offline unless ``train.wandb_mode`` says otherwise: no
network call by default.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from .config import Config

# TensorBoard groups tags by their first "/": loss parts together, the rest of the step
# statistics under train/, evaluation metrics under eval/.
_LOSS_TAGS = {"loss": "loss/total", "rec": "loss/rec", "contrastive": "loss/contrastive", "distill": "loss/distill"}


class TrackingError(ValueError):
    """A logger that cannot start (folder not writable, package missing); the message says what to do."""


def tensorboard_tag(key: str) -> str:
    """A record key as a TensorBoard tag: "rec" -> "loss/rec", "lr" -> "train/lr",
    "eval/A->V R@1" -> "eval/A2V_R1" (TensorBoard allows only letters, digits, ``_-./``)."""
    if key in _LOSS_TAGS:
        return _LOSS_TAGS[key]
    if not key.startswith("eval/"):
        key = f"train/{key}"
    return re.sub(r"[^\w\-./]", "", key.replace("->", "2").replace(" ", "_"))


class JsonlLogger:
    """metrics.jsonl: one JSON record per line. A resumed run's file is rewritten with the
    restored history first, so records logged after the checkpoint it resumes from are
    dropped, not duplicated."""

    def __init__(self, path: Path, history: list[dict[str, Any]]):
        self.path = path
        try:
            self.file = open(path, "w")
        except OSError as err:
            raise TrackingError(f"{path}: cannot write the run's metrics ({err}); make the run folder "
                                "writable or leave 'jsonl' out of train.log_to") from err
        self.file.writelines(json.dumps(r) + "\n" for r in history)
        self.file.flush()

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def log_figure(self, name: str, figure, step: int) -> None:
        pass  # the figures go to TensorBoard / W&B only

    def close(self) -> None:
        self.file.close()


class TensorBoardLogger:
    """Scalars (every numeric field of a record) and figures as TensorBoard events in ``folder``.

    ``purge_step``: on resume, the step after the checkpoint; TensorBoard hides the events an
    earlier process wrote from that step on (they are logged again).
    """

    def __init__(self, folder: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        try:
            self.writer = SummaryWriter(str(folder), purge_step=purge_step, flush_secs=30)
        except OSError as err:
            raise TrackingError(f"{folder}: cannot write TensorBoard events ({err}); make the folder writable "
                                "(or remove what stands in its place) or leave 'tensorboard' out of "
                                "train.log_to") from err

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tensorboard_tag(key), value, step)

    def log_figure(self, name: str, figure, step: int) -> None:
        self.writer.add_figure(name, figure, step, close=False)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run (``train.wandb_project``, ``train.wandb_mode``) whose files live in the run
    folder; a resumed run folder continues the same W&B run (its id is the folder's hash)."""

    def __init__(self, cfg: Config, out_dir: Path):
        try:
            import wandb
        except ImportError as err:
            raise TrackingError("train.log_to names 'wandb' but wandb is not installed: "
                                "pip install 'tgdp_core[wandb]' (or pip install wandb), or leave 'wandb' "
                                "out of train.log_to") from err
        self.wandb = wandb
        run_id = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=cfg.train.wandb_project, mode=cfg.train.wandb_mode, dir=str(out_dir),
                              name=out_dir.name, id=run_id, resume="allow", config=cfg.to_dict())

    def log(self, record: dict[str, Any]) -> None:
        values = {k: v for k, v in record.items() if k != "step" and not (isinstance(v, float) and math.isnan(v))}
        self.run.log(values, step=record["step"])

    def log_figure(self, name: str, figure, step: int) -> None:
        self.run.log({name: self.wandb.Image(figure)}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_loggers(cfg: Config, out_dir: Path, history: list[dict[str, Any]], start_step: int) -> list:
    """The loggers ``cfg.train.log_to`` names, writing into the run folder ``out_dir``.

    If one cannot start, those already open are closed before the error is raised.
    """
    makers = {
        "jsonl": lambda: JsonlLogger(out_dir / "metrics.jsonl", history),
        "tensorboard": lambda: TensorBoardLogger(out_dir / "tensorboard", start_step + 1 if start_step else None),
        "wandb": lambda: WandbLogger(cfg, out_dir),
    }
    loggers: list = []
    try:
        for name in cfg.train.log_to:
            loggers.append(makers[name]())
    except BaseException:
        for logger in loggers:
            logger.close()
        raise
    return loggers
