"""Training: the step (guidance, losses, backward, clipping, Adam, EMA) and the loop around it.

    result = tgdp_core.train(cfg, out_dir="runs/mine", callbacks=[print])
    result.out_dir, result.checkpoint, result.history

The same call runs in a notebook cell, from ``python -m tgdp_core train`` and under
``torchrun --nproc_per_node N -m tgdp_core train`` (DDP: gloo on CPU, NCCL on GPU; negatives
gathered across ranks; the teacher follows the unwrapped student; only rank 0 writes).
Every random draw is a function of (seed, step, rank): a resumed run repeats an uninterrupted
one step for step.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import dist, folders, tracking
from .config import Config
from .layers import Block
from .masking import BatchSlice
from .media import write_atomic
from .model import TGDPModel, build_model
from .teacher import EMATeacher, guidance_active, momentum_at, needs_teacher


# ---------------------------------------------------------------------- pieces
def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Adam with the CAV-MAE recipe's weight decay and betas.

    Fused kernels on CPU as on CUDA: one pass over each tensor instead of a chain of
    temporaries (``base`` on one CPU core: ~0.17 s per update instead of ~0.6 s).
    """
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, fused=True)


def make_teacher(model: TGDPModel) -> EMATeacher | None:
    """The EMA teacher when the method needs one (TG-DP with guidance or distillation), else None."""
    return EMATeacher(model.encoder) if needs_teacher(model.cfg) else None


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up to ``train.lr`` over ``warmup_steps``, then cosine decay to zero."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def contrastive_ratio_at(step: int, cfg: Config) -> float:
    """The contrastive view's mask ratio at ``step``: linear from 0 to ``contrastive_mask_ratio``
    over the first ``contrastive_mask_warmup_fraction`` of the run, then constant (the whole
    run when the warm-up is 0)."""
    o = cfg.objective
    return _ramp(step, o.contrastive_mask_ratio, cfg.steps_of(o.contrastive_mask_warmup_fraction))


def rec_ratio_at(step: int, cfg: Config) -> float:
    """The reconstruction view's mask ratio at ``step``. Single-pass methods (sync, cavmae): the
    same ramp as ``contrastive_ratio_at``, from 0 to ``rec_mask_ratio`` over the first
    ``single_pass_mask_warmup_fraction`` of the run (their one view is also their contrastive
    view); tgdp: ``rec_mask_ratio`` throughout."""
    o = cfg.objective
    if cfg.method == "tgdp":
        return o.rec_mask_ratio
    return _ramp(step, o.rec_mask_ratio, cfg.steps_of(o.single_pass_mask_warmup_fraction))


def _ramp(step: int, ratio: float, warmup_steps: int) -> float:
    """Linear from 0 at step 0 to ``ratio`` at ``warmup_steps``, then ``ratio`` (at once when 0)."""
    return ratio if step >= warmup_steps else ratio * step / warmup_steps


def resolve_device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def trains_in_bf16(precision: str, device_type: str) -> bool:
    """Whether ``train.precision`` means bf16 autocast on this device type ("auto": on CUDA only)."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def autocast_for(cfg: Config, device: torch.device):
    """bf16 autocast where the config asks for it (`trains_in_bf16`), else a no-op context."""
    if trains_in_bf16(cfg.train.precision, device.type):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def teacher_autocast(cfg: Config, device: torch.device):
    """The teacher pass's precision inside the student's context: bf16 autocast when
    ``teacher.precision`` is "bf16", else a no-op (the student's own context applies)."""
    if cfg.teacher.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def compile_blocks(*modules: torch.nn.Module | None) -> None:
    """``train.compile``: torch.compile every transformer Block of ``modules`` in place.

    Regional compilation (the PyTorch recipe for repeated blocks): one compiled graph per
    block shape, reused by every block of that shape, instead of one graph of the whole step
    with masking, gathers and losses in it; state-dict names stay unchanged.
    """
    for module in (m for m in modules if m is not None):  # the teacher is None for sync / cavmae
        for block in module.modules():
            if isinstance(block, Block):
                block.compile(dynamic=True)  # the views' token counts differ: one graph for all


def mask_generator(cfg: Config, step: int, device: torch.device) -> torch.Generator:
    """The masks' noise source for one step: a function of (seed, step) only. Every rank
    draws the global batch's noise and keeps its rows (``masking.BatchSlice``)."""
    g = torch.Generator(device=device)
    return g.manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + 1)


class NonFiniteLossError(FloatingPointError):
    """The loss, the gradients or the weights became NaN or infinite; the step was not applied,
    or (weights) not saved, so every checkpoint of the run holds finite weights."""


def train_step(model: torch.nn.Module, teacher: EMATeacher | None, optimizer: torch.optim.Optimizer,
               fbank: torch.Tensor, frames: torch.Tensor, step: int, *,
               generator: torch.Generator | None = None, student: TGDPModel | None = None,
               autocast=None, batch_slice: BatchSlice | None = None, log: bool = True) -> dict[str, float]:
    """One optimiser step; returns the loss parts, gradient norm and embedding statistics.

    fbank (B, T, F) and frames (B, 3, H, W) are this process's rows of the global batch.
    ``model`` may be a DDP wrapper of ``student`` (the unwrapped model, whose encoder the
    teacher follows); in one process leave ``student`` None. ``generator`` seeds the masks
    (``mask_generator``); ``batch_slice`` says which rows of the global batch this rank holds,
    so every sample gets the mask it gets in one process. ``autocast``: a context such as
    ``autocast_for(cfg, device)``. With ``log=False`` the statistics (and their all-reduce
    across ranks) are skipped and the record is empty.
    """
    student = student or model
    cfg = student.cfg
    # the last step's gradients are spent: free them before this step's activations (peak memory)
    optimizer.zero_grad(set_to_none=True)
    with autocast or nullcontext():
        guide = None
        if teacher is not None:
            priority = cfg.objective.score_direction if guidance_active(cfg, step) else None
            with teacher_autocast(cfg, fbank.device):
                guide = teacher(fbank, frames, priority)
            if cfg.teacher.precision != "same":
                guide = guide.float()
        out = model(fbank, frames, guide, generator, batch_slice, contrastive_ratio=contrastive_ratio_at(step, cfg),
                    rec_ratio=rec_ratio_at(step, cfg))
    if not torch.isfinite(out.loss):
        raise NonFiniteLossError(f"non-finite loss at step {step}: "
                                 + ", ".join(f"{k}={v.item():.4g}" for k, v in out.parts.items()))
    out.loss.backward()
    grad_norm = _grad_norm(student, cfg.train.grad_clip)
    # A finite loss can still back-propagate to NaN or infinite gradients (an overflow), and
    # Adam would write them into every weight: check before the update, not after (issue 17).
    if not torch.isfinite(grad_norm):
        raise NonFiniteLossError(f"non-finite gradient norm at step {step} (loss {out.loss.item():.4g}); "
                                 "the step was not applied")
    optimizer.step()
    momentum = momentum_at(step, cfg.train.steps, cfg.teacher.momentum_start, cfg.teacher.momentum_end)
    if teacher is not None:
        teacher.update(student.encoder, momentum)
    if not log:
        return {}
    record = _step_statistics(out)
    record["grad_norm"] = float(grad_norm)
    if teacher is not None:
        record["momentum"] = momentum
    return record


def _grad_norm(student: torch.nn.Module, clip: float) -> torch.Tensor:
    """The global gradient norm before clipping; gradients clipped to ``clip`` when it is > 0."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(student.parameters(), clip)
    return torch.nn.utils.get_total_norm([p.grad for p in student.parameters() if p.grad is not None])


@torch.no_grad()
def _step_statistics(out) -> dict[str, float]:
    """The loss, its parts and the collapse watch (mean cosine between different samples'
    audio and visual embeddings), averaged over ranks under DDP (the global batch's values)."""
    a = F.normalize(out.audio.float(), dim=-1)
    v = F.normalize(out.visual.float(), dim=-1)
    B = a.shape[0]
    off_diag = ((a @ v.T).sum() - (a * v).sum()) / max(1, B * (B - 1))
    names = ["loss", *out.parts, "offdiag_cos"]
    values = torch.stack([out.loss.detach().float(), *(p.detach().float() for p in out.parts.values()), off_diag])
    if dist.is_distributed():
        torch_dist.all_reduce(values)
        values /= dist.world_size()
    return dict(zip(names, values.tolist()))


# ---------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path | None  # last.pt of the run (None on ranks other than 0)
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl records


@dataclass
class Run:
    """Everything one training run holds: config, models, optimiser, data and where it stands."""

    cfg: Config
    out_dir: Path
    device: torch.device
    student: TGDPModel  # the model being trained (unwrapped)
    model: torch.nn.Module  # the student, or its DDP wrapper
    teacher: EMATeacher | None
    optimizer: torch.optim.Optimizer
    loader: Iterable[dict[str, torch.Tensor]]
    start_step: int
    history: list[dict[str, Any]]
    evaluator: Any = None  # periodic_eval.PeriodicEval when train.eval_every > 0, else None
    init: ckpt.PretrainedReport | None = None  # what train.init_from loaded (None: random start or resumed)
    probe: Any = None  # diagnostics.GuidanceProbe on rank 0 of an AV-Digits run, else None
    lock: folders.RunLock | None = None  # rank 0's hold on out_dir for the run (issue 17)

    def guidance_record(self, step: int) -> dict[str, float]:
        """The guidance diagnostics after ``step`` steps when due (``train.probe_every``), else {}."""
        if self.probe is None or not self.probe.due(step):
            return {}
        return self.probe(self.teacher.encoder if self.teacher is not None else self.student.encoder)

    @property
    def last(self) -> Path:
        return self.out_dir / "last.pt"

    def close(self) -> None:
        """Release the run folder."""
        if self.lock is not None:
            self.lock.release()


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.preset_name}-{cfg.method}"


def train(cfg: Config, out_dir: str | Path | None = None, callbacks: Iterable[Callable[[dict], Any]] = (),
          resume: bool = True, dataset=None, eval_dataset=None, allow_change: Iterable[str] = ()) -> TrainResult:
    """Pretrain ``cfg.method`` for ``cfg.train.steps`` steps; resumes from ``out_dir/last.pt`` if present.

    ``callbacks`` receive each logged record (a dict: step, losses, lr, samples/s, ...; with
    ``train.eval_every`` the evaluation metrics as "eval/<metric>").
    ``dataset`` overrides the manifest of ``cfg.data`` (an ``AVDataset`` in training mode),
    ``eval_dataset`` its test manifest (evaluation mode) for ``train.eval_every``.
    A resumed run must have the checkpoint's config; ``allow_change`` names the fields that
    may differ (``("train.steps",)`` extends a run). One run at a time holds ``out_dir``.
    """
    cfg.validate()
    started_dist = _init_distributed()
    try:
        run = setup_run(cfg, out_dir, resume, dataset, eval_dataset, tuple(allow_change))
        try:
            with RunLog(run, callbacks) as log:
                train_steps(run, log)
        finally:
            run.close()
        return TrainResult(run.out_dir, run.last if dist.is_main() else None, log.history)
    finally:
        if started_dist:
            torch_dist.destroy_process_group()


def setup_run(cfg: Config, out_dir: str | Path | None, resume: bool, dataset=None, eval_dataset=None,
              allow_change: tuple[str, ...] = ()) -> Run:
    """Run folder (rank 0: checked writable and locked before any work), device, data, models,
    optimiser and evaluations; restores ``out_dir/last.pt`` when resuming (``check_resume_config``)."""
    out_dir = _shared_run_dir(Path(out_dir) if out_dir else default_run_dir(cfg))
    lock = open_run_folder(out_dir) if dist.is_main() else None
    try:
        run = _assemble(cfg, out_dir, resume, dataset, eval_dataset, allow_change)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock = lock
    return run


def open_run_folder(out_dir: Path) -> folders.RunLock:
    """Claim ``out_dir`` for one run: writable (else a FolderError naming it), locked against a
    second run (``folders.RunLock``), temporaries left by a kill mid-save removed."""
    folders.check_writable(out_dir, "choose another out_dir (--out)")
    lock = folders.RunLock(out_dir).acquire()
    folders.remove_stale_temporaries(out_dir)  # safe now: no other run writes here
    return lock


def _assemble(cfg: Config, out_dir: Path, resume: bool, dataset, eval_dataset, allow_change: tuple[str, ...]) -> Run:
    from .dataset import train_data, train_loader
    from .periodic_eval import periodic_eval_for

    device = resolve_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dataset is None:
        cfg = resolve_data(cfg)
    resuming = resume and (out_dir / "last.pt").exists()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    student = build_model(cfg)
    init = initial_weights(cfg, student, out_dir / "last.pt" if resuming else None)
    student = student.to(device).train()
    teacher = make_teacher(student)  # after the weights are in: the teacher starts as the student
    optimizer = make_optimizer(student, cfg)
    if cfg.train.compile:
        compile_blocks(student, teacher)
    start_step, history = 0, []
    if resuming:
        start_step, history = _restore(out_dir / "last.pt", cfg, student, teacher, optimizer, device, allow_change)
    model = student
    if dist.is_distributed():
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    data = dataset or _rank0_first(lambda: train_data(cfg))  # a manifest's clips or shards (issue 13)
    if dist.is_main():
        cfg.save(out_dir / "config.json")
        if init:
            (out_dir / "init_from.json").write_text(init.to_json())
        report_skipped(data, out_dir, resuming)
    if hasattr(data, "skip_log"):  # shards: the loader workers append each skip as it happens
        data.skip_log = out_dir / "skipped.csv"
    evaluator = _rank0_first(lambda: periodic_eval_for(cfg, out_dir, device, eval_dataset, start_step > 0))
    loader = train_loader(data, cfg, start_step, dist.rank(), dist.world_size())
    return Run(cfg, out_dir, device, student, model, teacher, optimizer, loader, start_step, history, evaluator, init,
               _rank0_probe(cfg))


def _rank0_probe(cfg: Config):
    """The guidance probe (diagnostics.py) on rank 0; None elsewhere and off AV-Digits."""
    from .diagnostics import probe_for  # it builds on analysis, which imports this module

    return probe_for(cfg) if dist.is_main() else None


def report_skipped(data, out_dir: Path, resuming: bool = False) -> None:
    """``out_dir/skipped.csv`` (video_id, reason) and a warning with the count when the data
    left clips out (``data.on_error=skip``); an earlier run's list is removed when none are.
    Shards are checked as they stream: their loader appends to the file during the run (a resumed
    run keeps the earlier rows, a fresh one starts it empty)."""
    path = out_dir / "skipped.csv"
    if hasattr(data, "skip_log"):
        if not resuming:
            path.unlink(missing_ok=True)
        return
    skipped = getattr(data, "skipped", None) or {}
    if not skipped:
        path.unlink(missing_ok=True)
        return
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["video_id", "reason"])
    writer.writerows(sorted(skipped.items()))
    write_atomic(path, lambda tmp: Path(tmp).write_text(text.getvalue()))
    total = len(getattr(data, "clips", ())) or "?"
    warnings.warn(f"{len(skipped)} of {total} clips were skipped (data.on_error=skip) and are not trained on; "
                  f"each is listed with its reason in {path}", stacklevel=2)


def initial_weights(cfg: Config, student: TGDPModel, resuming: Path | None) -> ckpt.PretrainedReport | None:
    """Load ``train.init_from`` into the fresh student and say what went where (rank 0 prints
    it; the run folder keeps it as init_from.json). A run resuming from ``resuming`` (its
    last.pt) keeps that checkpoint's weights, and the log says so."""
    if not cfg.train.init_from:
        return None
    if resuming is not None:
        _note(f"resuming from {resuming}: its weights win, train.init_from={cfg.train.init_from} is not loaded")
        return None
    report = ckpt.load_pretrained(student, cfg.train.init_from)
    _note(report.summary())
    return report


def _note(message: str) -> None:
    """A line in the run's log (rank 0), above the progress bar."""
    if dist.is_main():
        tqdm.write(message)


def train_steps(run: Run, log: "RunLog") -> None:
    """The loop: one ``train_step`` per batch, records to ``log``, evaluations every
    ``train.eval_every`` steps, checkpoints every ``train.checkpoint_every`` steps and at the end."""
    cfg, device = run.cfg, run.device
    autocast = autocast_for(cfg, device)
    step = run.start_step
    try:
        for batch in run.loader:
            fbank = batch["fbank"].to(device, non_blocking=True)
            frames = batch["frames"].to(device, non_blocking=True)
            for group in run.optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            evaluating = run.evaluator is not None and run.evaluator.due(step + 1)
            record = train_step(run.model, run.teacher, run.optimizer, fbank, frames, step,
                                generator=mask_generator(cfg, step, device), student=run.student,
                                autocast=autocast, log=log.due(step + 1) or evaluating,
                                batch_slice=BatchSlice(dist.rank() * fbank.shape[0], cfg.train.batch_size))
            step += 1
            figures = _evaluate(run, log, step, record) if evaluating else {}
            record.update(run.guidance_record(step))
            log.step_done(step, record, fbank.shape[0] * dist.world_size(), figures)
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                save_run(run, step, log.history)
    except NonFiniteLossError as err:
        raise NonFiniteLossError(f"{err}; {good_checkpoint_note(run.out_dir)}") from None


def good_checkpoint_note(out_dir: Path) -> str:
    """Where a diverged run can go back to: the newest checkpoint whose tensors are all finite
    (read and checked, not assumed), or that there is none."""
    for path in [out_dir / "last.pt", *sorted(out_dir.glob("step*.pt"), reverse=True)]:
        try:
            data = ckpt.read_checkpoint(path)
        except ckpt.CheckpointError:
            continue
        if not ckpt.non_finite([data.get("model"), data.get("teacher"), data.get("optimizer")]):
            return (f"the last good checkpoint is {path} (step {data.get('step')}); to resume from it with "
                    "another learning rate, add --train.lr=... --allow-change train.lr")
    return (f"there is no good checkpoint in {out_dir}: start again (--fresh), e.g. with a lower train.lr "
            "or more train.warmup_steps")


def _evaluate(run: Run, log: "RunLog", step: int, record: dict[str, float]) -> dict[str, Any]:
    """The evaluation after ``step``: its metrics join ``record``, best.pt is kept (rank 0;
    the other ranks wait), the fixed sample's masked views become a figure for the loggers.
    Its time does not count as training time (samples/s)."""
    with log.paused():
        views = run.evaluator.masked_views(run, step)  # on every rank: the step's InfoNCE gathers across ranks
        figures = {}
        if dist.is_main():
            record.update(run.evaluator.evaluate(run, step))
            if log.wants_figures:
                figures["masked_views"] = run.evaluator.figure(views)
        if dist.is_distributed():
            torch_dist.barrier()
    return figures


class RunLog:
    """The run's records: the loggers of ``train.log_to`` (``tracking``: metrics.jsonl,
    TensorBoard, W&B; rank 0), the progress bar, callbacks, the collapse warning."""

    def __init__(self, run: Run, callbacks: Iterable[Callable[[dict], Any]] = ()):
        self.cfg, self.callbacks, self.history = run.cfg, list(callbacks), run.history
        self.loggers = (tracking.open_loggers(run.cfg, run.out_dir, self.history, run.start_step)
                        if dist.is_main() else [])
        self.wants_figures = any(name in run.cfg.train.log_to for name in ("tensorboard", "wandb"))
        self.bar = tqdm(total=self.cfg.train.steps, initial=run.start_step, unit="step",
                        desc=f"{self.cfg.method} {self.cfg.preset_name}", disable=not dist.is_main())
        self.window_start, self.window_samples, self.collapse_warned = time.perf_counter(), 0, False

    def due(self, step: int) -> bool:
        """Whether the step that ends at ``step`` is logged: every ``log_every``-th, the last, and every
        probe step (``train.probe_every``; on every rank, so their statistics' all-reduce agrees)."""
        t = self.cfg.train
        return step % t.log_every == 0 or step == t.steps or (t.probe_every > 0 and step % t.probe_every == 0)

    def step_done(self, step: int, record: dict[str, float], samples: int, figures: dict[str, Any] | None = None) -> None:
        self.window_samples += samples
        self.bar.update(1)
        if not record:
            return
        now = time.perf_counter()
        record.update(step=step, lr=lr_at(step - 1, self.cfg),
                      samples_per_s=self.window_samples / max(now - self.window_start, 1e-9))
        self.window_start, self.window_samples = now, 0
        self.collapse_warned |= _warn_on_collapse(record, self.cfg, self.collapse_warned)
        self.history.append(record)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", con=f"{record['contrastive']:.3f}",
                             sps=f"{record['samples_per_s']:.0f}")
        for logger in self.loggers:
            logger.log(record)
        if figures:
            import matplotlib.pyplot as plt  # figures come from viz, which imported it

            for name, figure in figures.items():
                for logger in self.loggers:
                    logger.log_figure(name, figure, step)
                plt.close(figure)  # the loggers keep their own copies (images)
        for callback in self.callbacks:
            callback(record)

    @contextmanager
    def paused(self):
        """Time spent inside is left out of the samples/s window (evaluations)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.window_start += time.perf_counter() - start

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        for logger in self.loggers:
            logger.close()


def resolve_data(cfg: Config) -> Config:
    """``cfg`` with its manifests filled in: the built-in AV-Digits set when none is given
    (generated on first use, by rank 0 while the others wait)."""
    if cfg.data.train_manifest or cfg.data.train_shards:
        return cfg
    from .avdigits import ensure_default

    paths = _rank0_first(lambda: ensure_default(cfg))
    cfg = Config.from_dict(cfg.to_dict())
    cfg.data.train_manifest, cfg.data.test_manifest = str(paths["train"]), str(paths["test"])
    cfg.data.label_csv = str(paths["labels"])
    return cfg


def _rank0_first(make: Callable[[], Any]) -> Any:
    """Run ``make`` on rank 0, then on the other ranks (which then find its files, caches)."""
    if not dist.is_distributed():
        return make()
    if dist.is_main():
        result = make()
        torch_dist.barrier()
        return result
    torch_dist.barrier()
    return make()


def _shared_run_dir(out_dir: Path) -> Path:
    """Rank 0's run folder on every rank (default folder names carry the time)."""
    if dist.is_distributed():
        box = [str(out_dir)]
        torch_dist.broadcast_object_list(box, src=0)
        out_dir = Path(box[0])
    return out_dir


def _init_distributed() -> bool:
    """Join torchrun's process group when its environment says so; False if nothing started."""
    if dist.is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch_dist.init_process_group(backend)
    return True


def _warn_on_collapse(record: dict, cfg: Config, already: bool) -> bool:
    """Warn once when InfoNCE sits at ln(batch) with near-identical embeddings."""
    chance = math.log(cfg.train.batch_size)
    if not already and record["step"] >= 50 and abs(record["contrastive"] - chance) < 0.02 * chance \
            and record["offdiag_cos"] > 0.9:
        warnings.warn(f"contrastive loss {record['contrastive']:.3f} sits at ln(batch)={chance:.3f} and the "
                      f"embeddings are nearly identical (mean off-diagonal cosine {record['offdiag_cos']:.2f}): "
                      "the model may have collapsed; try a higher objective.temperature", stacklevel=3)
        return True
    return False


def save_run(run: Run, step: int, history: list) -> None:
    """step{step}.pt with everything a resume needs, last.pt linked to it, old steps pruned (rank 0)."""
    if not dist.is_main():
        return
    out_dir, cfg = run.out_dir, run.cfg
    payload = ckpt.model_payload(
        run.student, step=step, teacher=run.teacher.state_dict() if run.teacher else None,
        optimizer=run.optimizer.state_dict(), history=history,
        rng={"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})})
    bad = ckpt.non_finite({k: payload[k] for k in ("model", "teacher", "optimizer")})
    if bad:  # the last line of defence: a checkpoint is written only from finite weights
        raise NonFiniteLossError(f"after step {step} {ckpt.describe_non_finite(bad)}; not saved")
    step_file = ckpt.save_checkpoint(payload, out_dir / f"step{step:07d}.pt")
    ckpt.link_atomically(step_file, out_dir / "last.pt")  # the same bytes, serialised once
    for old in sorted(out_dir.glob("step*.pt"))[:-cfg.train.keep_checkpoints]:
        old.unlink()


# Fields that say how a run is run, logged or evaluated, not what it trains: free to change on
# resume (evaluations run under a forked RNG, train.init_from is not read when resuming).
RESUME_FREE = ("preset_name", "data.workers", "data.cache_dir", "train.log_every", "train.checkpoint_every",
               "train.keep_checkpoints", "train.log_to", "train.wandb_project", "train.wandb_mode",
               "train.eval_every", "train.eval_clips", "train.keep_best", "train.probe_every", "train.init_from",
               "model.grad_checkpointing", "train.compile")  # memory / speed switches: the same arithmetic


def check_resume_config(saved: Config, cfg: Config, allow_change: tuple[str, ...], path: Path) -> None:
    """Refuse to resume the checkpoint at ``path`` (config ``saved``) under a config that differs
    in any field outside RESUME_FREE and ``allow_change``; the error lists each field (issue 17).
    The model and method can never change: the weights would not fit."""
    for key in allow_change:
        cfg.check_field(key)
    changed = {k: v for k, v in saved.differences(cfg).items() if k not in RESUME_FREE}
    fixed = {k: v for k, v in changed.items() if k == "method" or k.startswith("model.")}
    refused = fixed or {k: v for k, v in changed.items() if k not in allow_change}
    if not refused:
        return
    lines = "\n".join(f"  {k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in refused.items())
    if fixed:
        raise ckpt.CheckpointError(f"{path} was trained with another model or method:\n{lines}\n"
                                   "resume with its config.json or choose a new out_dir")
    allow = " ".join(f"--allow-change {k}" for k in refused)
    raise ckpt.CheckpointError(
        f"{path}: this config differs from the checkpoint's in {len(refused)} field(s):\n{lines}\n"
        f"resume with the checkpoint's config ({path.parent / 'config.json'}), allow the change ({allow}; "
        "train(..., allow_change=[...]) in Python), or start a new run (--fresh or another --out)")


def _restore(path: Path, cfg: Config, student: TGDPModel, teacher: EMATeacher | None,
             optimizer: torch.optim.Optimizer, device: torch.device,
             allow_change: tuple[str, ...] = ()) -> tuple[int, list]:
    data = ckpt.read_checkpoint(path)
    check_resume_config(Config.from_dict(data["config"]), cfg, allow_change, path)
    ckpt.load_state_strict(student, data["model"], str(path))
    if teacher is not None:
        teacher.load_state_dict(data["teacher"])
    optimizer.load_state_dict(data["optimizer"])
    torch.set_rng_state(data["rng"]["torch"])
    if "cuda" in data["rng"] and device.type == "cuda":
        torch.cuda.set_rng_state(data["rng"]["cuda"])
    return int(data["step"]), list(data["history"])
