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
import re
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
from .viz import plot_ablation, plot_ablation_deltas, plot_quickstart

# The ablation rows: overrides of the TG-DP config (docs/method.md, "The paper's numbers").
REFERENCE_ROW = "TG-DP: contrastive 0.50, guided"  # every row's paired differences are against this one
ABLATION_ROWS: dict[str, dict[str, Any]] = {
    "single pass (CAV-MAE Sync)": {"method": "sync"},
    # the paper's structural decoupling alone: two passes, random 0.75 masks on both, no teacher
    "+ Dual-path (Both 75%)": {"objective.contrastive_mask_ratio": 0.75, "objective.selection": "random",
                               "objective.distill_weight": 0.0},
    REFERENCE_ROW: {},
    "contrastive ratio 0.00": {"objective.contrastive_mask_ratio": 0.0},
    "contrastive ratio 0.65": {"objective.contrastive_mask_ratio": 0.65},
    "without distillation": {"objective.distill_weight": 0.0},
    "random instead of guided": {"objective.selection": "random"},
    # rows the paper does not report
    "dual path 0.75, guided + distillation": {"objective.contrastive_mask_ratio": 0.75},
    "probabilistic (in proportion to priority)": {"objective.selection": "probabilistic"},
    "probabilistic, released code (softmax, T = 1)": {"objective.selection": "probabilistic_softmax",
                                                      "objective.selection_temperature": 1.0},
    "guided reconstruction mask": {"objective.rec_selection": "guided"},
    "inverse-guided reconstruction mask": {"objective.rec_selection": "guided_inverse"},
}
# The published (VGGSound A->V R@1, AS20K attention-probe mAP) of the rows the paper defines the same way.
PAPER = {
    "single pass (CAV-MAE Sync)": (23.2, 30.5),
    "+ Dual-path (Both 75%)": (27.4, 30.4),
    REFERENCE_ROW: (30.3, 32.0),
    "contrastive ratio 0.00": (29.8, 29.6),
    "contrastive ratio 0.65": (25.1, 30.5),
    "without distillation": (29.1, 30.5),
    "random instead of guided": (30.3, 30.2),
}
# The paper's future work (guided reconstruction masks): run with --rows, not by default.
OPTIONAL_ROWS = ("guided reconstruction mask", "inverse-guided reconstruction mask")
DEFAULT_ROWS = [name for name in ABLATION_ROWS if name not in OPTIONAL_ROWS]
# Mask-ratio curricula of an ablation (issue 14), see ``with_curriculum``.
CURRICULA = {
    "equal": "every row ramps the mask ratio of the view its contrastive loss sees from 0 over the preset's "
             "contrastive warm-up (single pass: its one view; dual path: the contrastive view)",
    "none": "no row ramps a mask ratio: every view at its ratio from step 0",
    "preset": "the preset's own: the dual-path rows' contrastive view ramps, the single pass does not",
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
    """Train ``cfg`` into ``out_dir`` and evaluate it; cached in ``out_dir/results.json`` (a
    folder that holds another config's run is an error, not a result)."""
    results, saved = out_dir / "results.json", out_dir / "config.json"
    if saved.exists() and Config.load(saved).to_dict() != cfg.to_dict():
        raise ValueError(f"{out_dir} holds a run of another config (the row's definition or the recipe "
                         "changed): remove that folder or choose another --out")
    if results.exists():
        return json.loads(results.read_text())
    start = time.perf_counter()
    result = train(cfg, out_dir)
    wall = time.perf_counter() - start
    metrics = evaluate_model(load_model(result.checkpoint), bench.test, bench.probe_train)
    metrics["train s"] = wall
    metrics["eval s"] = time.perf_counter() - start - wall
    metrics["contrastive loss"] = result.history[-1]["contrastive"] if result.history else math.nan
    metrics.update(localisation(result.history, cfg.objective.score_direction))
    results.write_text(json.dumps(metrics, indent=2))
    return metrics


def localisation(history: list[dict], direction: str) -> dict[str, float]:
    """The last guidance probe of a run (diagnostics.py) in percent, for the run's score direction:
    share of the priority's top half on the digit / on speech, of a random half, and the AUC."""
    last = next((r for r in reversed(history) if f"probe/visual/{direction}/auc" in r), None)
    if last is None:
        return {}
    out = {}
    for modality, content in (("visual", "digit"), ("audio", "speech")):
        key = f"probe/{modality}/{direction}"
        out[f"{modality} top-k on {content}"] = 100 * last[f"{key}/guided"]
        out[f"{modality} random on {content}"] = 100 * last[f"{key}/random"]
        out[f"{modality} AUC %"] = 100 * last[f"{key}/auc"]
    return out


def mean_std(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per metric that every run has: mean, and standard deviation (key + " sd") over seeds."""
    out = {}
    for key in [k for k in runs[0] if all(k in r for r in runs)]:
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


def write_seed_csv(path: Path, runs: dict[str, list[dict[str, float]]]) -> None:
    """Every seed's metrics, one line per (row, seed): what the summary's means and intervals come from."""
    keys = list(dict.fromkeys(k for seeds in runs.values() for r in seeds for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "seed", *keys])
        for name, seeds in runs.items():
            for s, r in enumerate(seeds):
                writer.writerow([name, s, *(f"{r.get(k, math.nan):.4f}" for k in keys)])


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
    """Markdown table of mean ± sd for ``columns`` (rows from ``mean_std``); a column without an
    sd (the paper's numbers) shows its value, a missing or NaN value "-"."""
    head = "| row | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    body = ""
    for name, r in rows.items():
        cells = []
        for c in columns:
            value = r.get(c, math.nan)
            cells.append("-" if math.isnan(value) else f"{value:.1f} ± {r[c + ' sd']:.1f}" if c + " sd" in r
                         else f"{value:.1f}")
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
# Steps per row at --budget 1: the tiny preset's run. A TG-DP row takes about 3.5 min per seed on
# 2 quiet CPU cores (README: the seven paper rows x 3 seeds took 79 min), a single-pass row less.
ABLATION_STEPS = 400
# The budget (x ABLATION_STEPS) each curriculum's table runs at by default: where the rows learn.
# Without a ramp the masked rows barely leave chance in 400 steps (TG-DP 18.8 / 22.1 pair P@1,
# seed 0) and learn in 800 (53.4 / 55.3); README, "Finding the budget without a curriculum".
DEFAULT_BUDGET = {"equal": 1.0, "none": 2.0, "preset": 1.0}
TABLE_COLUMNS = ("A->V R@1", "V->A R@1", "A->V pair P@1", "V->A pair P@1", "mAP", "train s")
DIFF_METRICS = ("A->V R@1", "V->A R@1", "A->V pair P@1", "V->A pair P@1", "mAP")
PROBE_COLUMNS = ("visual top-k on digit", "visual random on digit", "visual AUC %",
                 "audio top-k on speech", "audio random on speech", "audio AUC %")


def with_curriculum(cfg: Config, curriculum: str) -> Config:
    """A row's config (after ``with_method``) with one of the ``CURRICULA``.

    The ramp of "equal" is the preset's contrastive warm-up, the same share of every run length
    (tiny: 250 of 400 steps). The guidance warm-up (``teacher.guidance_warmup_fraction``) is no
    mask-ratio curriculum and stays as the preset has it under all three.
    """
    if curriculum not in CURRICULA:
        raise ValueError(f"unknown curriculum {curriculum!r}; valid: {', '.join(CURRICULA)}")
    cfg = Config.from_dict(cfg.to_dict())
    o = cfg.objective
    if curriculum == "none":
        o.contrastive_mask_warmup_fraction = o.single_pass_mask_warmup_fraction = 0.0
    elif curriculum == "equal":
        o.single_pass_mask_warmup_fraction = 0.0 if cfg.method == "tgdp" else o.contrastive_mask_warmup_fraction
    cfg.validate()
    return cfg


def row_config(base: Config, name: str, steps: int, curriculum: str) -> Config:
    """The config of ablation row ``name``: ``base``'s recipe, the row's overrides, the curriculum."""
    overrides = dict(ABLATION_ROWS[name])
    cfg = with_method(base, overrides.pop("method", "tgdp"), steps)
    return with_curriculum(cfg.override(*(f"{k}={v}" for k, v in overrides.items())), curriculum)


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and its two-sided Student-t interval at ``level`` (NaN bounds below 2 values)."""
    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = t.ppf((1 + level) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_differences(runs: dict[str, list[dict[str, float]]], reference: str,
                       metrics: tuple[str, ...] = DIFF_METRICS) -> dict[str, dict[str, float]]:
    """Per row and metric: the mean over seeds of (row - ``reference``) on the same seed, and its
    95 % t interval, as "<metric> diff", "<metric> diff lo", "<metric> diff hi". ``runs``: {row:
    per-seed metrics, seed 0 first}; rows share seeds (same initialisation and data order), so
    the differences cancel what a seed does to every row."""
    ref = runs[reference]
    out = {}
    for name, seeds in runs.items():
        if len(seeds) != len(ref):
            raise ValueError(f"row {name!r} has {len(seeds)} seeds, {reference!r} {len(ref)}: pair them seed by seed")
        row = {}
        for m in metrics:
            mean, lo, hi = t_interval([r[m] - q[m] for r, q in zip(seeds, ref)])
            row.update({f"{m} diff": mean, f"{m} diff lo": lo, f"{m} diff hi": hi})
        out[name] = row
    return out


def summarise(runs: dict[str, list[dict[str, float]]], reference: str = REFERENCE_ROW) -> dict[str, dict[str, float]]:
    """One record per row: mean and sd of every metric, paired differences against ``reference``,
    the seed count and the paper's numbers where the paper defines the row the same way (else NaN)."""
    diffs = paired_differences(runs, reference)
    summary = {}
    for name, seeds in runs.items():
        paper = PAPER.get(name, (math.nan, math.nan))
        summary[name] = {**mean_std(seeds), **diffs[name], "seeds": len(seeds),
                         "paper VGGSound A->V R@1": paper[0], "paper AS20K mAP": paper[1]}
    return summary


def ablation_markdown(summary: dict[str, dict[str, float]], header: str, reference: str = REFERENCE_ROW) -> str:
    """The ablation's tables: mean ± sd beside the paper, paired differences with their
    intervals (bold where the interval excludes 0), and the teacher's localisation."""
    table = table_with_sd(summary, TABLE_COLUMNS + ("paper VGGSound A->V R@1", "paper AS20K mAP"))
    ref = summary[reference]
    lines = [f"| row | {' | '.join('Δ ' + m for m in DIFF_METRICS)} | paper Δ A->V R@1 | paper Δ mAP |",
             "|---|" + "---|" * (len(DIFF_METRICS) + 2)]
    for name, r in summary.items():
        if name == reference:
            continue
        cells = _diff_cells(r)
        paper = [r[k] - ref[k] for k in ("paper VGGSound A->V R@1", "paper AS20K mAP")]
        lines.append(f"| {name} | " + " | ".join(cells + [_number(x, "+.1f") for x in paper]) + " |")
    n = int(ref["seeds"])
    text = (f"{header}\n\n{table}\nPaired differences against {reference!r}, same seed: mean [95 % t interval] "
            f"over {n} seed(s); **bold**: the interval excludes 0.\n\n" + "\n".join(lines) + "\n")
    if all(c in r for r in summary.values() for c in PROBE_COLUMNS):
        text += ("\nThe teacher's localisation at the last step (student's encoder without a teacher; the row's "
                 "score direction; top-k keeps half the tokens; AUC of the priority against the relevance mask):\n\n"
                 + table_with_sd(summary, PROBE_COLUMNS))
    return text


def pairs_markdown(seed_csv: str | Path, reference: str, rows: list[str] | None = None) -> str:
    """Paired differences of ``rows`` (default: every other row) against any ``reference`` row of
    one ``ablation-<curriculum>-seeds.csv``: the question the TG-DP-referenced table does not ask
    (probabilistic against random selection, the teacher at 0.75 against the teacher-free dual
    path). Rows share seeds, so the pairing holds for any two rows of one file."""
    path = Path(seed_csv)
    runs = read_seed_csv(path)
    rows = rows or [name for name in runs if name != reference]
    missing = [name for name in [reference, *rows] if name not in runs]
    if missing:
        raise ValueError(f"{path} has no row {missing}; its rows: {list(runs)}")
    diffs = paired_differences({name: runs[name] for name in dict.fromkeys([reference, *rows])}, reference)
    lines = [f"| row | {' | '.join('Δ ' + m for m in DIFF_METRICS)} |", "|---|" + "---|" * len(DIFF_METRICS)]
    lines += [f"| {name} | " + " | ".join(_diff_cells(diffs[name])) + " |" for name in rows]
    return (f"Paired differences against {reference!r}, same seed (`{path}`): mean [95 % t interval] over "
            f"{len(runs[reference])} seed(s); **bold**: the interval excludes 0.\n\n" + "\n".join(lines) + "\n")


def _diff_cells(record: dict[str, float]) -> list[str]:
    """One table cell per ``DIFF_METRICS`` entry from a record with "<metric> diff", "diff lo", "diff hi"."""
    return [_interval_cell(record[f"{m} diff"], record[f"{m} diff lo"], record[f"{m} diff hi"]) for m in DIFF_METRICS]


def _interval_cell(mean: float, lo: float, hi: float) -> str:
    if math.isnan(lo):
        return f"{mean:+.1f}"
    cell = f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]"
    return f"**{cell}**" if lo > 0 or hi < 0 else cell


def _number(x: float, spec: str) -> str:
    return "-" if math.isnan(x) else format(x, spec)


def ablate(out: str | Path = "runs/ablate", budget: float | None = None, seeds: int = 3, probe_clips: int = 1000,
           rows: list[str] | None = None, cfg: Config | None = None, curriculum: str = "equal") -> dict[str, dict[str, float]]:
    """The ablation rows on AV-Digits under one of the ``CURRICULA``, ``seeds`` seeds each.

    ``budget``: steps per row as a multiple of ``ABLATION_STEPS`` (default: the curriculum's
    ``DEFAULT_BUDGET``). ``rows``: names from ``ABLATION_ROWS`` (default ``DEFAULT_ROWS``; ``["all"]``: every row, the
    optional ones too); the TG-DP row is always run, the reference of the paired differences. Writes ``ablation-<curriculum>.md`` (the
    tables), ``.csv`` (``summarise``), ``-seeds.csv`` (every seed's metrics) and two plots
    into ``out``; runs go to ``out/curriculum-<curriculum>/steps<N>/<row>/seed<k>``.
    """
    out = Path(out)
    wanted = list(ABLATION_ROWS) if rows == ["all"] else rows or DEFAULT_ROWS
    names = list(dict.fromkeys([REFERENCE_ROW, *wanted]))
    unknown = [n for n in names if n not in ABLATION_ROWS]
    if unknown:
        raise ValueError(f"unknown ablation rows {unknown}; valid: {list(ABLATION_ROWS)}")
    if curriculum not in CURRICULA:
        raise ValueError(f"unknown curriculum {curriculum!r}; valid: {', '.join(CURRICULA)}")
    base = resolve_data(cfg or Config.preset("tiny"))
    steps = max(1, int(round(ABLATION_STEPS * (DEFAULT_BUDGET[curriculum] if budget is None else budget))))
    bench = benchmark_for(base, probe_clips)
    runs = {}
    for name in names:
        row_cfg = row_config(base, name, steps, curriculum)
        folder = out / f"curriculum-{curriculum}" / f"steps{steps}" / slug(name)
        runs[name] = [run_row(seeded(row_cfg, s), folder / f"seed{s}", bench) for s in range(seeds)]
    summary = summarise(runs)
    header = (f"AV-Digits, {base.preset_name} preset, {steps} steps per row, seeds 0-{seeds - 1}, curriculum "
              f"{curriculum!r} ({CURRICULA[curriculum]}); mean ± sd")
    write_ablation(out, curriculum, summary, runs, header)
    return summary


# Metrics that say how long a run took, not what it learnt: they may differ between two copies of one run.
TIMING_METRICS = ("train s", "eval s")


def read_seed_csv(path: str | Path) -> dict[str, list[dict[str, float]]]:
    """The per-seed metrics an ablation wrote to ``ablation-<curriculum>-seeds.csv``: {row: [seed 0, 1, ...]}."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (give the ablation-<curriculum>-seeds.csv that ablate wrote)")
    runs: dict[str, list[dict[str, float]]] = {}
    with open(path, newline="") as f:
        for record in csv.DictReader(f):
            name, seed = record.pop("row"), int(record.pop("seed"))
            seeds = runs.setdefault(name, [])
            if seed != len(seeds):
                raise ValueError(f"{path}: row {name!r} lists seed {seed} after {len(seeds)} seeds; "
                                 "expected seeds 0, 1, ... in order (a file ablate wrote)")
            seeds.append({k: float(v) for k, v in record.items() if v != "nan"})
    return runs


def merge_seed_runs(sources: dict[str, dict[str, list[dict[str, float]]]],
                    reference: str = REFERENCE_ROW) -> dict[str, list[dict[str, float]]]:
    """The rows of several ablations as one, for ``summarise``: ``sources`` maps a name (a file)
    to its per-seed runs (``read_seed_csv``).

    Paired differences are only valid against the same reference runs, so every source must
    hold the reference row with the same seeds and the same results (timing aside), and a row
    in several sources must agree likewise: the ablations ran the same configs (same preset,
    steps, curriculum and seeds; runs are deterministic on one machine and thread count).
    Anything else is an error naming the file, row, seed and metric. Rows come out in
    ``ABLATION_ROWS`` order, the reference first."""
    if not sources:
        raise ValueError("nothing to merge: give at least one ablation-<curriculum>-seeds.csv")
    merged: dict[str, list[dict[str, float]]] = {}
    origin: dict[str, str] = {}
    for source, runs in sources.items():
        if reference not in runs:
            raise ValueError(f"{source} has no {reference!r} row: its differences have no reference to pair with")
        for name, seeds in runs.items():
            if name not in merged:
                merged[name], origin[name] = seeds, source
                continue
            _check_same_runs(name, merged[name], origin[name], seeds, source)
    order = {name: i for i, name in enumerate(dict.fromkeys([reference, *ABLATION_ROWS]))}
    return dict(sorted(merged.items(), key=lambda item: order.get(item[0], len(order))))


def _check_same_runs(name: str, kept: list[dict[str, float]], kept_from: str,
                     other: list[dict[str, float]], other_from: str) -> None:
    if len(kept) != len(other):
        raise ValueError(f"row {name!r}: {kept_from} has {len(kept)} seeds, {other_from} {len(other)}; "
                         "merge ablations run with the same --seeds")
    for seed, (a, b) in enumerate(zip(kept, other)):
        for metric in sorted((set(a) | set(b)) - set(TIMING_METRICS)):
            x, y = a.get(metric, math.nan), b.get(metric, math.nan)
            if not (abs(x - y) <= 1e-3 or (math.isnan(x) and math.isnan(y))):
                raise ValueError(f"row {name!r}, seed {seed}, {metric!r}: {x} in {kept_from} but {y} in {other_from}; "
                                 "these are not the same runs (another preset, budget, curriculum, code version, "
                                 "machine or thread count), so their rows cannot be paired")


def merge_ablations(seed_csvs: list[str | Path], out: str | Path, curriculum: str, header: str = "") -> dict:
    """Merge the ``-seeds.csv`` of ablations that share their TG-DP runs (rows split across
    machines or sessions) into one table: ``out/ablation-<curriculum>.{md,csv,png}`` as
    ``ablate`` writes them. Returns the summary (``summarise``)."""
    if curriculum not in CURRICULA:
        raise ValueError(f"unknown curriculum {curriculum!r}; valid: {', '.join(CURRICULA)}")
    sources = {}
    for path in map(Path, seed_csvs):
        sources[str(path)] = read_seed_csv(path)
    runs = merge_seed_runs(sources)
    summary = summarise(runs)
    seeds = len(runs[REFERENCE_ROW])
    header = header or (f"AV-Digits, merged from {', '.join(f'`{p}`' for p in sources)} (the same TG-DP runs), "
                        f"seeds 0-{seeds - 1}, curriculum {curriculum!r} ({CURRICULA[curriculum]}); mean ± sd")
    write_ablation(Path(out), curriculum, summary, runs, header)
    return summary


def slug(name: str) -> str:
    """A row's folder name: lower case, runs of other characters as one dash."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_ablation(out: Path, curriculum: str, summary: dict, runs: dict, header: str) -> None:
    """The files of one ablation: ablation-<curriculum>.md, .csv, -seeds.csv, .png, -deltas.png."""
    stem = out / f"ablation-{curriculum}"
    out.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text(ablation_markdown(summary, header))
    write_csv(Path(f"{stem}.csv"), summary)
    write_seed_csv(Path(f"{stem}-seeds.csv"), runs)
    paper = {n: PAPER.get(n, (math.nan, math.nan)) for n in summary}
    plot_ablation(summary, paper).savefig(f"{stem}.png", dpi=110, bbox_inches="tight")
    plot_ablation_deltas(summary, paper, REFERENCE_ROW).savefig(f"{stem}-deltas.png", dpi=110, bbox_inches="tight")
