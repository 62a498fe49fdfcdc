"""Plots shared by the CLI, the notebooks and the demo (matplotlib; only ``notebook_style``
touches global settings).

Token layers: frames and spectrogram segments are drawn in token units (one unit per p x p
patch), so priorities, masks and relevance (all (N,) in the model's token order) lie on them
as they are: raster order on frames, frequency-major with low frequencies at the bottom on
spectrograms.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from PIL import Image

from .analysis import kept_relevant_share, select_tokens


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
    """Ablation rows: our A->V R@1 / mAP (mean +- sd) beside the paper's numbers (no bar for a
    row the paper does not report: absent from ``paper`` or NaN)."""
    names = list(summary)
    # the legend sits below the panels ("outside"): inside, it covered the longest bars (issue 16)
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.5 * len(names) + 1.9), sharey=True, layout="constrained")
    y = range(len(names))
    for ax, (metric, paper_col, title) in zip(axes, (("A->V R@1", 0, "A->V R@1 (%)"), ("mAP", 1, "probe mAP (%)"))):
        ax.barh([i - 0.2 for i in y], [summary[n][metric] for n in names], 0.4,
                xerr=[summary[n][metric + " sd"] for n in names], label="AV-Digits (tiny)")
        ax.barh([i + 0.2 for i in y], [paper.get(n, (np.nan, np.nan))[paper_col] for n in names], 0.4, alpha=0.6,
                label="paper (VGGSound R@1 / AS20K mAP)")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(list(y), names)
    axes[0].invert_yaxis()
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


# ---------------------------------------------------------------------- notebooks
NOTEBOOK_DPI = 72  # inline figures: small images keep the committed notebooks light
FIGURE_DPI = 80  # README figures (docs/figures)
JPEG_QUALITY = 85  # frames and spectrograms are photographs to a PNG coder: JPEG is 5x smaller
SELECTION_COLOURS = {"guided": "tab:red", "random": "tab:blue", "probabilistic": "tab:green", "chance": "grey"}


def notebook_style(dpi: int = NOTEBOOK_DPI) -> None:
    """Small inline figures for the notebooks, as JPEG (their images are most of a saved
    notebook's size). Outside IPython only the matplotlib settings change."""
    plt.rcParams.update({"figure.dpi": dpi, "font.size": 8, "axes.titlesize": 9})
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:
        return
    if get_ipython() is not None:
        set_matplotlib_formats("jpeg", pil_kwargs={"quality": JPEG_QUALITY})


def save_figure(fig: Figure, folder: str | Path, name: str, dpi: int = FIGURE_DPI) -> Path:
    """Write ``fig`` to folder/name.png as a 256-colour PNG (a third of a full-colour one; the
    README's figures are made this way by the notebooks)."""
    path = Path(folder) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)
    return path


class LiveLosses:
    """A training callback that redraws the loss curves in place while ``tgdp_core.train`` runs.

    ``train(cfg, out, callbacks=[live])``; each logged record joins the curves and every
    ``every``-th one redraws them in the same output (one figure per cell, not one per update).
    Outside IPython the curves are drawn on ``live.fig`` without being shown.
    ``live.show(history)`` draws a finished run's curves (e.g. a reused run that logged nothing new).
    """

    def __init__(self, keys=("loss", "rec", "contrastive", "distill"), every: int = 1, name: str = "train"):
        self.keys, self.every, self.name = keys, every, name
        self.records: list[dict] = []
        self.fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 2.2))
        self.axes = list(axes)
        plt.close(self.fig)  # shown through the display handle only
        self._handle = None

    def __call__(self, record: dict) -> None:
        self.records.append(record)
        if len(self.records) % self.every == 0:
            self._draw()

    def show(self, history: list[dict] | None = None) -> None:
        if history is not None:
            self.records = list(history)
        self._draw()

    def _draw(self) -> None:
        for ax in self.axes:
            ax.clear()
        plot_losses({self.name: self.records}, self.keys, self.axes)
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            return
        if get_ipython() is None:
            return
        if self._handle is None:
            self._handle = display(self.fig, display_id=True)
        else:
            self._handle.update(self.fig)


def _token_layers(ax, grid: tuple[int, int], origin: str, heat=None, removed=None, outline=None,
                  lines: bool = False) -> None:
    """Draw token-level layers over an image shown in token units (one unit per patch).

    heat (h*w,) values (inferno, translucent); removed (h*w,) 1 = masked (greyed out);
    outline (h*w,) bool (cyan boxes: the relevant tokens); lines: the patch grid.
    """
    h, w = grid
    extent = (0, w, h, 0) if origin == "upper" else (0, w, 0, h)
    if heat is not None:
        ax.imshow(_np(heat).reshape(h, w), cmap="inferno", alpha=0.6, extent=extent, origin=origin,
                  interpolation="nearest", aspect="auto")
    if removed is not None:
        grey = np.zeros((h, w, 4))
        grey[..., :3] = 0.5
        grey[..., 3] = 0.85 * _np(removed).reshape(h, w)
        ax.imshow(grey, extent=extent, origin=origin, interpolation="nearest", aspect="auto")
    if outline is not None:
        for k in np.flatnonzero(_np(outline)):
            ax.add_patch(plt.Rectangle((k % w, k // w), 1, 1, fill=False, edgecolor="cyan", linewidth=0.8))
    if lines:
        for x in range(1, w):
            ax.axvline(x, color="white", linewidth=0.4)
        for y in range(1, h):
            ax.axhline(y, color="white", linewidth=0.4)


def _np(x) -> np.ndarray:
    """A tensor (any device, dtype) or array-like as a numpy array."""
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def show_frame(ax, image: np.ndarray, patch: int, title: str = "", **layers) -> None:
    """(S, S, 3) uint8 frame with token layers (see ``_token_layers``), axes in patches."""
    g = image.shape[0] // patch
    ax.imshow(image, extent=(0, g, g, 0))
    _token_layers(ax, (g, g), "upper", **layers)
    ax.set_xlim(0, g)
    ax.set_ylim(g, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)


def show_spectrogram(ax, fbank, patch: int, title: str = "", start_s: float = 0.0, **layers) -> None:
    """(T, F) normalised fbank segment, low frequencies at the bottom, time in seconds; token
    layers on its (F / p, T / p) frequency-major grid."""
    spec = _np(fbank).T  # (F, T)
    h, w = spec.shape[0] // patch, spec.shape[1] // patch
    ax.imshow(spec, cmap="magma", origin="lower", extent=(0, w, 0, h), aspect="auto")
    _token_layers(ax, (h, w), "lower", **layers)
    ax.set_xlim(0, w)
    ax.set_ylim(0, h)
    seconds = patch * 0.01  # fbank frames are 10 ms apart
    ticks = range(0, w + 1, max(1, w // 4))
    ax.set_xticks(list(ticks), [f"{start_s + t * seconds:.1f}" for t in ticks])
    ax.set_yticks([])
    ax.set_xlabel("s")
    ax.set_title(title)


def clip_figure(images: np.ndarray, fbank, speech=None, digits=None, frame_shift_s: float = 0.01) -> Figure:
    """A clip: its K frames in a row over its whole spectrogram (T, F), spoken digits shaded,
    each frame's time marked (AV-Digits: frame i at i * clip / K)."""
    K = len(images)
    spec = _np(fbank).T  # (F, T)
    seconds = spec.shape[1] * frame_shift_s
    fig = plt.figure(figsize=(1.2 * K, 3.4))
    grid = fig.add_gridspec(2, K, height_ratios=(1, 1.3))
    for k, image in enumerate(images):
        ax = fig.add_subplot(grid[0, k])
        ax.imshow(image)
        ax.set_axis_off()
        ax.set_title(f"frame {k}\n{k * seconds / K:.2f} s", fontsize=7)
    ax = fig.add_subplot(grid[1, :])
    ax.imshow(spec, cmap="magma", origin="lower", aspect="auto", extent=(0, seconds, 0, spec.shape[0]))
    for j, (onset, offset) in enumerate(np.asarray(speech) if speech is not None else []):
        ax.axvspan(onset, offset, color="cyan", alpha=0.25)
        if digits is not None:
            ax.text((onset + offset) / 2, spec.shape[0] * 0.9, str(int(digits[j])), color="white", ha="center")
    for k in range(K):
        ax.axvline(k * seconds / K, color="white", linewidth=0.6, linestyle=":")
    ax.set_xlabel("time (s); shaded: a spoken digit, dotted: a frame's time")
    ax.set_ylabel("mel bin")
    fig.tight_layout()
    return fig


def patches_figure(pairs, i: int, patch: int) -> Figure:
    """Pair ``i``'s frame and aligned spectrogram segment cut into the model's p x p tokens."""
    image, fbank = pairs.images[i], pairs.fbank[i]
    g = image.shape[0] // patch
    rows, cols = fbank.shape[1] // patch, fbank.shape[0] // patch
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.6), gridspec_kw={"width_ratios": (1, 2.2)})
    show_frame(axes[0], image, patch, f"frame: {g} x {g} = {g * g} tokens", lines=True)
    show_spectrogram(axes[1], fbank, patch, f"segment: {rows} x {cols} = {rows * cols} tokens (frequency-major)",
                     pairs.start_s[i], lines=True)
    fig.tight_layout()
    return fig


def masked_views_figure(pairs, i: int, masks: dict, priority: tuple | None, ratios: tuple, patch: int,
                        selection: str = "guided") -> Figure:
    """Pair ``i``'s two TG-DP views: the teacher's priority, the reconstruction view (random)
    and the contrastive view (the teacher's top-k); removed tokens grey, relevant ones cyan.

    masks: ``StepOutput.masks`` ("rec_a", "rec_v", "con_a", "con_v", each (B, N)); priority:
    the teacher's (audio (B, Na), visual (B, Nv)); ratios: (reconstruction, contrastive);
    selection: how the contrastive view chose its tokens. Without a teacher (priority None) or
    a contrastive view (single-pass methods) those columns are left out; without ground truth
    (``pairs.visual_relevant`` None) nothing is outlined.
    """
    rec, con = ratios
    chosen = {"guided": "teacher's top-k", "probabilistic": "sampled by priority"}.get(selection, selection)
    columns = []  # (title, audio layers, visual layers)
    if priority is not None:
        columns.append(("teacher priority (full view)", dict(heat=priority[0][i]), dict(heat=priority[1][i])))
    columns.append((f"reconstruction view:\nrandom, {rec:.0%} removed", dict(removed=masks["rec_a"][i]),
                    dict(removed=masks["rec_v"][i])))
    if "con_a" in masks:
        columns.append((f"contrastive view:\n{chosen}, {con:.0%} removed", dict(removed=masks["con_a"][i]),
                        dict(removed=masks["con_v"][i])))
    outline_v = None if pairs.visual_relevant is None else pairs.visual_relevant[i]
    outline_a = None if pairs.audio_relevant is None else pairs.audio_relevant[i]
    fig, axes = plt.subplots(2, len(columns), figsize=(8 * len(columns) / 3, 4.2), squeeze=False,
                             gridspec_kw={"height_ratios": (1.6, 1)})
    for col, (title, audio, visual) in enumerate(columns):
        show_frame(axes[0, col], pairs.images[i], patch, title, outline=outline_v, **visual)
        show_spectrogram(axes[1, col], pairs.fbank[i], patch, "", pairs.start_s[i], outline=outline_a, **audio)
    fig.tight_layout()
    return fig


def priority_figure(pairs, priority: tuple, rows, patch: int) -> Figure:
    """The teacher's token priority over frame and segment of the chosen pairs (rows), the
    relevant tokens (the digit; the spoken digit's time columns) outlined in cyan."""
    pa, pv = priority
    fig, axes = plt.subplots(len(rows), 2, figsize=(6.5, 1.9 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": (1, 2.2)})
    for r, i in enumerate(rows):
        name = f"clip {pairs.clips[i]}, frame {pairs.frame[i]}"
        show_frame(axes[r, 0], pairs.images[i], patch, name, heat=pv[i], outline=pairs.visual_relevant[i])
        show_spectrogram(axes[r, 1], pairs.fbank[i], patch, "priority over its segment", pairs.start_s[i],
                         heat=pa[i], outline=pairs.audio_relevant[i])
    fig.tight_layout()
    return fig


def selection_figure(pairs, i: int, masks: dict, patch: int, ratio: float) -> Figure:
    """Tokens kept by each selection for pair ``i`` (removed ones greyed out), relevant tokens
    outlined, with the share of kept tokens on the relevant content in each title.
    masks: {selection: (audio (B, Na), visual (B, Nv))} as from ``analysis.select_tokens``."""
    fig, axes = plt.subplots(2, len(masks), figsize=(2.8 * len(masks), 3.6), squeeze=False,
                             gridspec_kw={"height_ratios": (1.5, 1)})
    for col, (name, (ma, mv)) in enumerate(masks.items()):
        rv, ra = pairs.visual_relevant[i:i + 1], pairs.audio_relevant[i:i + 1]
        share_v, share_a = kept_relevant_share(mv[i:i + 1], rv).item(), kept_relevant_share(ma[i:i + 1], ra).item()
        show_frame(axes[0, col], pairs.images[i], patch, f"{name}: {share_v:.0%} of kept on the digit",
                   removed=mv[i], outline=rv[0])
        show_spectrogram(axes[1, col], pairs.fbank[i], patch, f"{share_a:.0%} of kept on speech", pairs.start_s[i],
                         removed=ma[i], outline=ra[0])
    fig.suptitle(f"mask ratio {ratio:.2f}: cyan = relevant tokens, grey = removed", fontsize=9)
    fig.tight_layout()
    return fig


def over_training_figure(pairs, i: int, steps: list[int], priorities: list[tuple], ratio: float, patch: int) -> Figure:
    """Pair ``i`` under the teacher of each checkpoint: priority and the guided top-k kept."""
    fig, axes = plt.subplots(2, len(steps), figsize=(2.2 * len(steps), 3.2), squeeze=False,
                             gridspec_kw={"height_ratios": (1.5, 1)})
    for col, (step, (pa, pv)) in enumerate(zip(steps, priorities)):
        mv, ma = select_tokens(pv[i:i + 1], ratio)["guided"][0], select_tokens(pa[i:i + 1], ratio)["guided"][0]
        show_frame(axes[0, col], pairs.images[i], patch, f"step {step}", heat=pv[i], removed=mv,
                   outline=pairs.visual_relevant[i])
        show_spectrogram(axes[1, col], pairs.fbank[i], patch, "", pairs.start_s[i], heat=pa[i], removed=ma,
                         outline=pairs.audio_relevant[i])
    fig.tight_layout()
    return fig


def plot_relevance_over_training(steps: list[int], reports: list[dict]) -> Figure:
    """Share of kept tokens on the relevant content per selection against training step, one
    panel per modality; reports as from ``analysis.relevance_report``, one per step."""
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 2.6), sharey=False)
    for ax, modality in zip(axes, ("visual", "audio")):
        for name, colour in SELECTION_COLOURS.items():
            style = "--" if name == "chance" else "-o"
            ax.plot(steps, [100 * r[modality][name] for r in reports], style, color=colour, label=name, markersize=3)
        ax.set_title(f"{modality}: kept tokens on the {'digit' if modality == 'visual' else 'spoken digit'}")
        ax.set_xlabel("training step")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def embedding_maps(maps: dict[str, np.ndarray], labels: np.ndarray, titles: dict[str, str] | None = None) -> Figure:
    """Joint 2-D maps of audio (circles) and visual (triangles) embeddings, one panel per model.

    maps: {name: (2N, 2) audio rows then visual rows} (``analysis.joint_umap``); labels (N,)
    class of each pair (colour); each pair joined by a thin line.
    """
    fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps), 3.2), squeeze=False)
    cmap = plt.get_cmap("tab10")
    colours = cmap(np.asarray(labels) % 10)
    for ax, (name, xy) in zip(axes[0], maps.items()):
        n = len(labels)
        a, v = xy[:n], xy[n:]
        segments = np.stack([a, v], axis=1)  # (N, 2, 2): one line per pair
        ax.add_collection(LineCollection(segments, colors=colours, linewidths=0.3, alpha=0.25))
        ax.scatter(*a.T, c=colours, s=6, marker="o", linewidths=0)
        ax.scatter(*v.T, c=colours, s=9, marker="^", linewidths=0)
        ax.set_title((titles or {}).get(name, name))
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], marker="o", linestyle="", color="k", label="audio"),
               plt.Line2D([], [], marker="^", linestyle="", color="k", label="visual")]
    handles += [plt.Line2D([], [], marker="s", linestyle="", color=cmap(c), label=str(c))
                for c in sorted(set(np.asarray(labels).tolist()))]
    axes[0, -1].legend(handles=handles, fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    return fig


def plot_ablation_deltas(summary: dict[str, dict[str, float]], paper: dict[str, tuple[float, float]],
                         reference: str, metric: str = "A->V R@1") -> Figure:
    """Each row's change from the ``reference`` row, ours (``metric``) beside the paper's
    (VGGSound A->V R@1): whether a switch moves things the same way, whatever the scale.

    Ours is the mean paired difference over seeds with its 95 % interval as error bars when the
    summary has them (``experiments.summarise``: "<metric> diff", " diff lo", " diff hi"), else
    the difference of the means. The paper's bar is missing where it does not report the row.
    """
    names = [n for n in summary if n != reference]
    paired = f"{metric} diff" in summary[reference]
    ours = np.array([summary[n][f"{metric} diff"] if paired else summary[n][metric] - summary[reference][metric]
                     for n in names])
    errors = None
    if paired:
        lo = np.array([summary[n][f"{metric} diff lo"] for n in names])
        hi = np.array([summary[n][f"{metric} diff hi"] for n in names])
        errors = np.nan_to_num(np.stack([ours - lo, hi - ours]))  # no bar where one seed gives no interval
    nan = (np.nan, np.nan)
    theirs = [paper.get(n, nan)[0] - paper.get(reference, nan)[0] for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(names) + 1.6), layout="constrained")
    y = np.arange(len(names))
    label = f"AV-Digits {metric}" + (" (paired, 95 % interval)" if paired else "")
    ax.barh(y - 0.2, ours, 0.4, xerr=errors, label=label)
    ax.barh(y + 0.2, theirs, 0.4, alpha=0.6, label="paper VGGSound A->V R@1")
    ax.axvline(0, color="k", linewidth=0.6)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel(f"points vs {reference!r}")
    fig.legend(loc="outside lower center", ncol=2, fontsize=7, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_guidance_probe(history: list[dict], direction: str | None = None) -> Figure:
    """The guidance diagnostics of a run over training (``probe/...`` records of metrics.jsonl,
    diagnostics.py): top row, the share of the priority's top half on the relevant tokens for
    each score direction beside a random half and chance; bottom row, the priority's AUC against
    the relevance mask (0.5: no localisation). One column per modality. ``direction`` limits the
    lines to one score direction (default: both)."""
    records = [r for r in history if "probe/visual/chance" in r]
    directions = [direction] if direction else ["patch_to_global", "global_to_patch"]
    fig, axes = plt.subplots(2, 2, figsize=(8, 4.6), sharex=True, squeeze=False)
    steps = [r["step"] for r in records]
    for col, (modality, content) in enumerate((("visual", "digit"), ("audio", "speech"))):
        top, bottom = axes[0, col], axes[1, col]
        for d, style in zip(directions, ("-o", "-s")):
            key = f"probe/{modality}/{d}"
            top.plot(steps, [100 * r[f"{key}/guided"] for r in records], style, color="tab:red", markersize=3,
                     label=f"top-k, {d}", alpha=1 if style == "-o" else 0.6)
            top.plot(steps, [100 * r[f"{key}/random"] for r in records], style, color="tab:blue", markersize=3,
                     label=f"random, {d}", alpha=1 if style == "-o" else 0.6)
            bottom.plot(steps, [r[f"{key}/auc"] for r in records], style, color="tab:purple", markersize=3, label=d)
        top.plot(steps, [100 * r[f"probe/{modality}/chance"] for r in records], "--", color="grey", label="chance")
        bottom.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
        top.set_title(f"{modality}: kept tokens on the {content} (%)")
        bottom.set_title(f"{modality}: AUC of the priority")
        bottom.set_xlabel("training step")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=6)
    axes[1, 0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def attribution_figure(pairs, rows, scores: dict[str, tuple], patch: int) -> Figure:
    """For each chosen pair (rows): the frame and segment, then one column per score map
    (attributions, the teacher's priority), relevant tokens outlined.
    scores: {name: (audio (B, Na), visual (B, Nv))}."""
    columns = 1 + len(scores)
    fig, axes = plt.subplots(2 * len(rows), columns, figsize=(2 * columns, 2.6 * len(rows)), squeeze=False,
                             gridspec_kw={"height_ratios": (1.6, 0.9) * len(rows)}, layout="constrained")
    for r, i in enumerate(rows):
        top, bottom = axes[2 * r], axes[2 * r + 1]
        show_frame(top[0], pairs.images[i], patch, f"clip {pairs.clips[i]}, frame {pairs.frame[i]}",
                   outline=pairs.visual_relevant[i])
        show_spectrogram(bottom[0], pairs.fbank[i], patch, "", pairs.start_s[i], outline=pairs.audio_relevant[i])
        for c, (name, (sa, sv)) in enumerate(scores.items(), start=1):
            show_frame(top[c], pairs.images[i], patch, name, heat=sv[i])
            show_spectrogram(bottom[c], pairs.fbank[i], patch, "", pairs.start_s[i], heat=sa[i])
    return fig
