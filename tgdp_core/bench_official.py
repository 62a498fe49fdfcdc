"""``python -m tgdp_core bench --against-official PATH``: tgdp's step against the released code's.

PATH is a work tree of github.com/wanglg20/TG-DP. Its model class (``CAVMAE_DP`` in
``src/models/cavmae_dp.py``) is imported from there at run time; none of its code is in this
repository. The release has no training script, so the harness runs its model the way its
``forward`` is written to be trained, with the recipe of the code it builds on:

    dual path    an EMA copy of the model in ``teacher_mode`` (full input: token ranks from the
                 joint block's attention, full-view global tokens), then the student's
                 ``forward`` with ``cls_full=True``: the 0.75 reconstruction pass and the
                 second, ranked 0.50 pass for the contrastive loss; plus the distillation MSE of
                 the student's global tokens to the teacher's (TG-DP's L_dis, which tgdp's step
                 has too); the EMA update of every teacher parameter (DINO's loop)
    single pass  ``cls_full=False``: one 0.75 pass for reconstruction and contrast (CAV-MAE Sync)
    both         CAV-MAE's loop: forward under autocast (bf16 here, as tgdp's), then
                 ``zero_grad``, backward, plain Adam (CAV-MAE's settings: torch's default
                 implementation, wd 5e-7, betas (0.95, 0.999))

The released ``forward`` calls ``self.ranked_masking``, which the release does not define; the
harness supplies one (``ranked_masking`` below: keep the first ``int(N * (1 - ratio))`` tokens
of the teacher's ranking, MAE's mask convention). Both sides get the same random inputs, the
same threads, and take turns step by step (``stepbench.interleaved``).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .bench import _machine, bench_config
from .config import Config
from .stepbench import interleaved, paired_ratio, random_inputs
from .trainer import autocast_for, resolve_device

OFFICIAL_MODULE = "src/models/cavmae_dp.py"
OFFICIAL_PACKAGE = "tgdp_official_models"  # the name the clone's src/models is imported under
# The rows of the comparison: name, tgdp method, official second pass (cls_full)
ROWS = (("dual path, contrastive {ratio:.2f}", "tgdp", True), ("single pass", "sync", False))
SPEEDUP = 1.5  # the target for the dual-path step at equal precision


# ---------------------------------------------------------------------- the official model
def ranked_masking(self, x: torch.Tensor, rank, mask_ratio: float):
    """The masking the released ``forward_encoder`` calls for its ranked (guided) pass.

    x (B, N, D) patch tokens; ``rank`` the teacher's ``get_patch2cls_rank`` output, a pair
    (ranks (B, N) token indices best first, probabilities) or the ranks alone. Keeps the first
    ``int(N * (1 - mask_ratio))`` ranked tokens in rank order; returns (kept (B, keep, D),
    mask (B, N) with 1 = removed, ids_restore (B, N)) as its random masking does.
    """
    order = rank[0] if isinstance(rank, (tuple, list)) else rank  # (B, N)
    B, N, D = x.shape
    keep = int(N * (1 - mask_ratio))
    ids_restore = torch.argsort(order, dim=1)
    kept = torch.gather(x, 1, order[:, :keep, None].expand(B, keep, D))
    mask = torch.ones(B, N, device=x.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


def official_class(path: str | Path) -> type:
    """The clone's ``CAVMAE_DP`` with ``ranked_masking`` added, imported from ``PATH/src/models``."""
    models = Path(path) / "src" / "models"
    if not (models / "cavmae_dp.py").exists():
        raise FileNotFoundError(f"{Path(path) / OFFICIAL_MODULE}: not found; --against-official takes a work tree "
                                "of https://github.com/wanglg20/TG-DP (git clone it, then pass its folder)")
    try:
        importlib.import_module("timm")  # the official model is built on timm's layers
    except ImportError as err:
        raise ImportError("the official TG-DP model imports timm: pip install timm (its release pins 1.0.26)") from err
    if OFFICIAL_PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(OFFICIAL_PACKAGE, models / "__init__.py",
                                                      submodule_search_locations=[str(models)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[OFFICIAL_PACKAGE] = package
        spec.loader.exec_module(package)
    module = importlib.import_module(f"{OFFICIAL_PACKAGE}.cavmae_dp")
    return type("OfficialTGDP", (module.CAVMAE_DP,), {"ranked_masking": ranked_masking})


def official_kwargs(cfg: Config, second_pass: bool) -> dict[str, Any]:
    """``CAVMAE_DP`` arguments for tgdp's ``cfg.model`` (the released retrieval model's layout:
    global tokens, registers, no contrastive heads; ``cls_full`` for the dual path)."""
    m = cfg.model
    fixed = {"model.mel_bins": (m.mel_bins, 128), "model.image_size": (m.image_size, 224),
             "model.patch_size": (m.patch_size, 16), "model.specific_depth + 1": (m.specific_depth + 1, 12),
             "model.global_token": (m.global_token, True)}
    bad = [f"{name}={have} (the official code fixes {want})" for name, (have, want) in fixed.items() if have != want]
    if bad:
        raise ValueError("the official model cannot be built at this config: " + "; ".join(bad))
    return dict(img_size=m.image_size, audio_length=m.audio_frames, patch_size=m.patch_size, in_chans=3,
                embed_dim=m.embed_dim, modality_specific_depth=m.specific_depth, num_heads=m.num_heads,
                decoder_embed_dim=m.decoder_dim, decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_heads,
                num_register_tokens=m.num_registers, mlp_ratio=m.mlp_ratio, norm_pix_loss=m.norm_pix_loss,
                cls_token=True, contrastive_heads=False, cls_full=second_pass, total_frame=cfg.data.frames_per_clip)


def build_official(path: str | Path, cfg: Config, second_pass: bool) -> torch.nn.Module:
    """The official model for ``cfg``; its prints are swallowed and the timm classes it
    replaces at construction (``vision_transformer.PatchEmbed`` / ``Block``) are put back."""
    cls = official_class(path)
    import timm.models.vision_transformer as vt

    replaced = vt.PatchEmbed, vt.Block
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return cls(**official_kwargs(cfg, second_pass))
    finally:
        vt.PatchEmbed, vt.Block = replaced


# ---------------------------------------------------------------------- its training step
class OfficialStepper:
    """The official model's training step (module docstring) on ``stepbench.random_inputs``."""

    def __init__(self, path: str, cfg_dict: dict, batch: int, second_pass: bool):
        self.cfg = cfg = Config.from_dict(cfg_dict)
        self.device = resolve_device(cfg)
        torch.manual_seed(cfg.train.seed)
        self.model = build_official(path, cfg, second_pass).to(self.device).train()
        self.teacher = copy.deepcopy(self.model).requires_grad_(False) if second_pass else None
        t = cfg.train
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], t.lr,
                                          weight_decay=t.weight_decay, betas=tuple(t.betas))
        self.autocast = autocast_for(cfg, self.device)
        self.fbank, self.frames = random_inputs(cfg, batch, self.device)

    def step(self) -> float:
        with self.autocast:
            loss = self.loss(self.fbank, self.frames)
        self.optimizer.zero_grad()  # CAV-MAE's order: after the forward
        loss.backward()
        self.optimizer.step()
        if self.teacher is not None:
            self._ema(self.cfg.teacher.momentum_start)
        return loss.item()

    def loss(self, fbank: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        o = self.cfg.objective
        kwargs = dict(mae_loss_weight=o.rec_weight, contrast_loss_weight=o.contrastive_weight)
        if self.teacher is None:
            return self.model(fbank, frames, o.rec_mask_ratio, o.rec_mask_ratio, **kwargs)[0]
        with torch.no_grad():
            rank_a, rank_v, target_a, target_v = self.teacher(fbank, frames, teacher_mode=True)
        out = self.model(fbank, frames, o.rec_mask_ratio, o.rec_mask_ratio, cls_mask_ratio=o.contrastive_mask_ratio,
                         rank_a=rank_a, rank_v=rank_v, **kwargs)
        global_a, global_v = out[-2], out[-1]  # the ranked pass's global tokens
        distill = F.mse_loss(global_a.float(), target_a.float()) + F.mse_loss(global_v.float(), target_v.float())
        return out[0] + o.distill_weight * distill

    @torch.no_grad()
    def _ema(self, momentum: float) -> None:
        for t, s in zip(self.teacher.parameters(), self.model.parameters()):
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


# ---------------------------------------------------------------------- the comparison
def compare(path: str | Path, preset: str = "base", batch: int = 8, steps: int = 3, warmup: int = 1,
            threads: int = 2, precisions: tuple[str, ...] = ("fp32", "bf16"), methods: tuple[str, ...] = ("tgdp", "sync"),
            device: str = "cpu", overrides: tuple[str, ...] = (), progress=print, flops: bool = True) -> dict[str, Any]:
    """The issue's table: per precision, the dual-path and single-pass steps of both codes,
    interleaved in one run (each pair in two fresh processes that take turns step by step)."""
    official_class(path)  # a missing clone or timm fails here, before any worker starts
    report: dict[str, Any] = {"setup": {
        "official": str(path), "official_commit": _commit(path), "preset": preset, "batch": batch, "steps": steps,
        "warmup": warmup, "threads": threads, "device": device, "machine": _machine(device), "torch": torch.__version__,
        "overrides": list(overrides)}, "rows": []}
    for precision in precisions:
        for label, method, second_pass in ROWS:
            if method not in methods:
                continue
            cfg = bench_config(preset, method, precision, device, list(overrides))
            name = f"{label.format(ratio=cfg.objective.contrastive_mask_ratio)}, {precision}"
            if progress:
                progress(f"{name}: building both models")
            workers = {"official": ("tgdp_core.bench_official:OfficialStepper", (str(path), cfg.to_dict(), batch, second_pass)),
                       "tgdp": ("tgdp_core.stepbench:TGDPStepper", (cfg.to_dict(), batch))}
            measured = interleaved(workers, warmup, steps, threads, progress=progress, flops=flops)
            official, tgdp = measured["official"], measured["tgdp"]
            report["rows"].append({"step": name, "method": method, "precision": precision, **measured,
                                   "ratio": official["step_s"] / tgdp["step_s"],
                                   "ratio_paired": paired_ratio(official, tgdp),
                                   "ratio_cpu": official["step_cpu_s"] / tgdp["step_cpu_s"]})
    report["targets"] = official_targets(report)
    return report


def official_targets(report: dict) -> list[dict[str, Any]]:
    """The issue's target per precision: the dual-path step >= 1.5x faster, with less memory."""
    out = []
    for row in report["rows"]:
        if row["method"] != "tgdp":
            continue
        faster = row["ratio"] >= SPEEDUP
        leaner = row["tgdp"]["peak_memory_bytes"] < row["official"]["peak_memory_bytes"]
        out.append({"name": f"{row['step']}: >= {SPEEDUP}x faster than the official step, less memory",
                    "ratio": row["ratio"], "less_memory": leaner, "pass": faster and leaner})
    return out


def markdown(report: dict) -> str:
    """The table of the issue, with the FLOPs each step computes and the target lines."""
    s = report["setup"]
    lines = [f"tgdp against the official TG-DP code ({s['official']}, commit {s['official_commit'] or 'unknown'}): "
             f"preset {s['preset']}, batch {s['batch']}, {s['device']} ({s['machine']}), {s['threads']} threads, "
             f"median of {s['steps']} steps after {s['warmup']} warm-up, the two codes taking turns step by step", "",
             "| step | official | tgdp | ratio | ratio per round | CPU-time ratio | GFLOP per step, official / tgdp |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        o, t = row["official"], row["tgdp"]
        cells = [f"{r['step_s']:.2f} s (CPU {r['step_cpu_s']:.1f} s), {r['peak_memory_bytes'] / 1e9:.2f} GB"
                 for r in (o, t)]
        flops = (f"{o['flops_per_sample'] * s['batch'] / 1e9:.3g} / {t['flops_per_sample'] * s['batch'] / 1e9:.3g}"
                 if "flops_per_sample" in o else "n/a")
        lines.append(f"| {row['step']} | {cells[0]} | {cells[1]} | {row['ratio']:.2f}x | {row['ratio_paired']:.2f}x | "
                     f"{row['ratio_cpu']:.2f}x | {flops} |")
    first = report["rows"][0]["tgdp"] if report["rows"] else {}
    lines += ["", "ratio: official median step time / tgdp's; per round: the median of official / tgdp over the "
              "rounds (each pair of steps ran back to back); CPU-time ratio: the same with each process's CPU "
              "seconds (all threads), which counts less of the time other work held the cores",
              f"memory: {first.get('memory_measure', '')}",
              "GFLOP: torch's FlopCounterMode on one step (math attention backend), per sample x batch", "", "targets:"]
    for t in report["targets"]:
        verdict = "PASS" if t["pass"] else "FAIL"
        lines.append(f"- {verdict}: {t['name']}: {t['ratio']:.2f}x, {'less' if t['less_memory'] else 'not less'} memory")
    return "\n".join(lines) + "\n"


def _commit(path: str | Path) -> str | None:
    """The clone's commit, when PATH is a git work tree."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
