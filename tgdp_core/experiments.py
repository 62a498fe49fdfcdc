"""Experiments on the built-in benchmark: the quickstart and the paper's ablation table.

    python -m tgdp_core quickstart      # tiny TG-DP vs the single-pass baseline, same steps
    python -m tgdp_core ablate --budget 1 --seeds 3

Both train every row for the same number of steps (the paper's protocol), evaluate with the
same code (zero-shot retrieval, class-level precision, linear-probe mAP) and write their tables,
JSON and plots into the run folder. A finished row is not run again: re-running the command
after an interruption picks up where it stopped.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from .checkpoint import load_model
from .config import Config
from .dataset import AVDataset
from .evaluate import evaluate_model, markdown_table, pair_chance
from .model import build_model
from .trainer import resolve_data, train
from .viz import plot_ablation, plot_quickstart

# The paper's ablation (docs/method.md, "The paper's numbers"): overrides of the TG-DP config and the
# published VGGSound A->V R@1 / AS20K attention-probe mAP of each row.
ABLATION_ROWS: dict[str, dict[str, Any]] = {
    "single pass (CAV-MAE Sync)": {"method": "sync"},
    "dual path, both ratios 0.75": {"objective.contrastive_mask_ratio": 0.75},
    "TG-DP: contrastive 0.50, guided": {},
    "contrastive ratio 0.00": {"objective.contrastive_mask_ratio": 0.0},
    "contrastive ratio 0.65": {"objective.contrastive_mask_ratio": 0.65},
    "without distillation": {"objective.distill_weight": 0.0},
    "random instead of guided": {"objective.selection": "random"},
}
PAPER = {  # (VGGSound A->V R@1, AS20K mAP)
    "single pass (CAV-MAE Sync)": (23.2, 30.5),
    "dual path, both ratios 0.75": (27.4, 30.4),
    "TG-DP: contrastive 0.50, guided": (30.3, 32.0),
    "contrastive ratio 0.00": (29.8, 29.6),
    "contrastive ratio 0.65": (25.1, 30.5),
    "without distillation": (29.1, 30.5),
    "random instead of guided": (30.3, 30.2),
}


@dataclass
class Benchmark:
    """The evaluation sets of one experiment, built once and shared by its rows."""

    test: Any  # evaluation-mode dataset (all pairs of each clip)
    probe_train: Any  # evaluation-mode subset of the training clips, for the linear probe


def benchmark_for(cfg: Config, probe_clips: int = 1000) -> Benchmark:
    test = AVDataset(cfg.data.test_manifest, cfg, train=False)
    train_clips = AVDataset(cfg.data.train_manifest, cfg, train=False)
    return Benchmark(test, Subset(train_clips, range(min(probe_clips, len(train_clips)))))


def run_row(cfg: Config, out_dir: Path, bench: Benchmark) -> dict[str, float]:
    """Train ``cfg`` into ``out_dir`` and evaluate it; cached in ``out_dir/results.json``."""
    results = out_dir / "results.json"
    if results.exists():
        return json.loads(results.read_text())
    start = time.perf_counter()
    result = train(cfg, out_dir)
    wall = time.perf_counter() - start
    metrics = evaluate_model(load_model(result.checkpoint), bench.test, bench.probe_train)
    metrics["train s"] = wall
    metrics["eval s"] = time.perf_counter() - start - wall
    metrics["contrastive loss"] = result.history[-1]["contrastive"] if result.history else math.nan
    results.write_text(json.dumps(metrics, indent=2))
    return metrics


def mean_std(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per metric: mean, and standard deviation (key + " sd") over seeds."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = statistics.fmean(values)
        out[key + " sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def write_csv(path: Path, rows: dict[str, dict[str, float]]) -> None:
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", *keys])
        for name, r in rows.items():
            writer.writerow([name, *(f"{r.get(k, math.nan):.4f}" for k in keys)])


def with_method(base: Config, method: str, steps: int) -> Config:
    """``base`` (preset, data, recipe) switched to ``method`` with its own defaults, for ``steps``
    steps; the warm-ups keep their share of the run (the learning rate's is scaled here, the
    contrastive curriculum and the guidance warm-up are shares already), so a shorter budget
    is the same recipe compressed."""
    sections = {k: v for k, v in base.to_dict().items() if k not in ("method", "preset_name", "model")}
    cfg = Config.preset(base.preset_name, method=method, **sections)
    cfg.train.steps = steps
    cfg.train.warmup_steps = round(base.train.warmup_steps * steps / base.train.steps)
    return cfg


def seeded(cfg: Config, seed: int) -> Config:
    cfg = Config.from_dict(cfg.to_dict())
    cfg.train.seed = seed
    return cfg


def table_with_sd(rows: dict[str, dict[str, float]], columns: tuple[str, ...]) -> str:
    """Markdown table of mean +- sd for ``columns`` (rows from ``mean_std``)."""
    head = "| row | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    body = ""
    for name, r in rows.items():
        cells = [f"{r[c]:.1f} ± {r[c + ' sd']:.1f}" if c in r else "-" for c in columns]
        body += f"| {name} | " + " | ".join(cells) + " |\n"
    return head + body


# ---------------------------------------------------------------------- chance levels
def chance_row(bench: Benchmark) -> dict[str, float]:
    """What a model that knows nothing scores: R@k = k/N, pair class precision = the share of
    pairs in the query's class, mAP = mean class prevalence (the AP of random scores)."""
    n = len(bench.test)
    labels, frame_labels = bench.test.labels[:n].float(), bench.test.frame_labels[:n]
    prevalence = labels.mean(0)
    row = {f"{d} R@{k}": 100 * min(k, n) / n for d in ("A->V", "V->A") for k in (1, 5, 10)}
    row["mAP"] = prevalence[prevalence > 0].mean().item() * 100
    if (frame_labels >= 0).all():
        row["A->V pair P@1"] = row["V->A pair P@1"] = pair_chance(frame_labels)
    return row


# ---------------------------------------------------------------------- quickstart
QUICKSTART_COLUMNS = ("A->V R@1", "A->V R@5", "A->V R@10", "V->A R@1", "V->A R@5", "V->A R@10",
                      "A->V pair P@1", "V->A pair P@1", "mAP", "train s")


def quickstart(out: str | Path = "runs/quickstart", steps: int | None = None, probe_clips: int = 1000,
               cfg: Config | None = None) -> dict:
    """Tiny TG-DP and the single-pass Sync baseline on AV-Digits, same steps, one table.

    ``cfg``: the starting config (default: the tiny preset on the default AV-Digits set).
    """
    out = Path(out)
    phases: dict[str, float] = {}  # wall seconds per phase of this call (timing.json): where the time goes
    with _timed(phases, "data (AV-Digits generated on first use)"):
        base = resolve_data(cfg or Config.preset("tiny"))
    steps = steps or base.train.steps
    with _timed(phases, "feature caches (built on first use)"):
        bench = benchmark_for(base, probe_clips)
    rows: dict[str, dict[str, float]] = {"chance": chance_row(bench)}
    untrained = out / "untrained.json"
    with _timed(phases, "untrained model: evaluation"):
        if not untrained.exists():
            out.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(base.train.seed)
            untrained.write_text(json.dumps(evaluate_model(build_model(base), bench.test, bench.probe_train), indent=2))
    rows["untrained"] = json.loads(untrained.read_text())
    for method in ("sync", "tgdp"):
        with _timed(phases, f"{method}: training and evaluation (finished runs are reused)"):
            rows[method] = run_row(with_method(base, method, steps), out / method, bench)
    table = markdown_table(rows, QUICKSTART_COLUMNS)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "timing.json").write_text(json.dumps(phases, indent=2))
    figure = plot_quickstart({m: out / m for m in ("sync", "tgdp")}, rows)
    figure.savefig(out / "quickstart.png", dpi=110, bbox_inches="tight")
    return rows


@contextmanager
def _timed(phases: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------------- ablation
ABLATION_STEPS = 400  # steps per row at --budget 1, the tiny preset's run (7 rows x 3 seeds: about 80 min on 2 CPU cores)


def ablate(out: str | Path = "runs/ablate", budget: float = 1.0, seeds: int = 3, probe_clips: int = 1000,
           rows: list[str] | None = None, cfg: Config | None = None) -> dict[str, dict[str, float]]:
    """The paper's ablation rows on AV-Digits: mean and sd over ``seeds`` seeds per row."""
    out = Path(out)
    base = resolve_data(cfg or Config.preset("tiny"))
    steps = max(1, int(round(ABLATION_STEPS * budget)))
    bench = benchmark_for(base, probe_clips)
    names = rows or list(ABLATION_ROWS)
    unknown = [n for n in names if n not in ABLATION_ROWS]
    if unknown:
        raise ValueError(f"unknown ablation rows {unknown}; valid: {list(ABLATION_ROWS)}")
    summary = {}
    for name in names:
        overrides = dict(ABLATION_ROWS[name])
        row_cfg = with_method(base, overrides.pop("method", "tgdp"), steps).override(
            *(f"{k}={v}" for k, v in overrides.items()))
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        runs = [run_row(seeded(row_cfg, s), out / f"steps{steps}" / slug / f"seed{s}", bench) for s in range(seeds)]
        summary[name] = mean_std(runs)
    columns = ("A->V R@1", "V->A R@1", "A->V pair P@1", "V->A pair P@1", "mAP", "train s")
    table = table_with_sd(summary, columns)
    paper = "| row | paper VGGSound A->V R@1 | paper AS20K mAP |\n|---|---|---|\n" + "".join(
        f"| {n} | {PAPER[n][0]} | {PAPER[n][1]} |\n" for n in names)
    header = f"AV-Digits, tiny preset, {steps} steps per row, {seeds} seed(s), mean ± sd\n\n"
    (out / "ablation.md").write_text(header + table + "\n" + paper)
    write_csv(out / "ablation.csv", summary)
    plot_ablation(summary, {n: PAPER[n] for n in names}).savefig(out / "ablation.png", dpi=110, bbox_inches="tight")
    return summary
