"""Plots shared by the CLI, the notebooks and the demo (matplotlib, no global state)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_losses(runs: dict[str, list[dict]], keys=("rec", "contrastive", "distill"), ax_row=None) -> Figure:
    """One panel per loss part, one line per run: runs = {name: metrics records}."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3)) if ax_row is None else (ax_row[0].figure, ax_row)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes, keys):
        for n, (name, records) in enumerate(runs.items()):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:  # a run keeps its colour in every panel, also where others have no line
                ax.plot(*zip(*points), label=name, color=colours[n % len(colours)])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return fig


def plot_quickstart(run_dirs: dict[str, Path], rows: dict[str, dict[str, float]]) -> Figure:
    """Loss curves of the runs and their retrieval / probe numbers beside chance."""
    fig = plt.figure(figsize=(15, 3.4))
    grid = fig.add_gridspec(1, 4)
    axes = [fig.add_subplot(grid[0, i]) for i in range(3)]
    plot_losses({name: read_metrics(d) for name, d in run_dirs.items()}, ("rec", "contrastive", "distill"), axes)
    ax = fig.add_subplot(grid[0, 3])
    metrics = ("A->V R@1", "V->A R@1", "A->V pair P@1", "V->A pair P@1", "mAP")
    width = 0.8 / len(rows)
    for n, (name, row) in enumerate(rows.items()):
        ax.bar([i + n * width for i in range(len(metrics))], [row.get(m, 0) for m in metrics], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))], metrics, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_ablation(summary: dict[str, dict[str, float]], paper: dict[str, tuple[float, float]]) -> Figure:
    """Ablation rows: our A->V R@1 / class P@1 / mAP (mean +- sd) beside the paper's numbers."""
    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.5 * len(names) + 1.5), sharey=True)
    y = range(len(names))
    for ax, (metric, paper_col, title) in zip(axes, (("A->V R@1", 0, "A->V R@1 (%)"), ("mAP", 1, "probe mAP (%)"))):
        ax.barh([i - 0.2 for i in y], [summary[n][metric] for n in names], 0.4,
                xerr=[summary[n][metric + " sd"] for n in names], label="AV-Digits (tiny)")
        ax.barh([i + 0.2 for i in y], [paper[n][paper_col] for n in names], 0.4, alpha=0.6,
                label="paper (VGGSound R@1 / AS20K mAP)")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(list(y), names)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig
