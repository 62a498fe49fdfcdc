"""Can the tiny encoders recognise AV-Digits' digits at all? Two checks for choosing the knobs.

`--modality audio|visual` trains one modality's encoder of a preset with a linear head on the
digit each training pair shows (the manifests' frame_labels) and prints the running accuracy.
Contrastive pretraining cannot align what neither encoder can recognise, so this is the first
measurement when choosing the benchmark's difficulty knobs.

`--modality both` trains the two encoders with InfoNCE alone on the full (unmasked) views, the
easiest form of the contrastive task, and prints the loss, the mean within-modality cosine
(near 1: collapsed) and the in-batch class precision (does the top visual match of each audio
segment show the same digit; about 0.13 by chance at batch 32).

    python data/avdigits/probe_learnability.py data/generated/avdigits --modality visual --steps 400
    python data/avdigits/probe_learnability.py data/generated/avdigits --modality both --steps 1000
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import tgdp_core as tg
from tgdp_core.dataset import AVDataset, StepSampler
from tgdp_core.losses import info_nce


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", help="an AV-Digits folder (train.json, labels.csv)")
    p.add_argument("--modality", choices=("audio", "visual", "both"), default="visual")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature (--modality both)")
    p.add_argument("--mask-ratio", type=float, default=0.0,
                   help="--modality both: share of each view's patches removed at random before InfoNCE")
    p.add_argument("--pool", choices=("global", "mean"), default="global",
                   help="supervised: classify the global token or the mean of the patch tokens")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()

    torch.manual_seed(0)
    cfg = tg.Config.preset(args.preset, data={"train_manifest": f"{args.root}/train.json",
                                              "label_csv": f"{args.root}/labels.csv", "workers": 1})
    data = AVDataset(cfg.data.train_manifest, cfg, train=True)
    if (data.frame_labels < 0).any():
        raise SystemExit(f"{args.root}: the manifest has no frame_labels (regenerate with the current AV-Digits)")
    model = tg.build_model(cfg)
    enc = model.encoder
    head = torch.nn.Linear(cfg.model.embed_dim, int(data.frame_labels.max()) + 1)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=args.lr)
    sampler = StepSampler(len(data), cfg.data.frames_per_clip, args.batch, 0, 0, args.steps)
    hits, start = [], time.perf_counter()
    for step, batch in enumerate(DataLoader(data, batch_sampler=sampler, num_workers=1), 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / max(1, args.warmup))
        y = data.frame_labels[batch["index"], batch["frame"]]  # (B,) the digit this pair shows
        if args.modality == "both":
            contrastive_step(model, opt, batch, y, args.temperature, args.mask_ratio, step, hits, start)
            continue
        if args.modality == "visual":
            tokens, m = enc.specific(enc.embed_visual(batch["frames"]), "v"), "v"
        else:
            tokens, m = enc.specific(enc.embed_audio(batch["fbank"]), "a"), "a"
        g = enc.global_feature(tokens, m)[0] if args.pool == "global" else tokens[:, 1:].mean(1)
        logits = head(g)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hits.append((logits.argmax(1) == y).float().mean().item())
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.3f}, accuracy over the last 50 steps "
                  f"{100 * sum(hits[-50:]) / 50:.1f} % (chance {100 / head.out_features:.0f} %), "
                  f"{time.perf_counter() - start:.0f} s", flush=True)


def contrastive_step(model, opt, batch, y, temperature, mask_ratio, step, hits, start) -> None:
    """One InfoNCE step (views randomly masked when mask_ratio > 0); every 50 steps, print the
    loss, the collapse and the class precision."""
    if mask_ratio > 0:  # the model's own contrastive view, its other losses switched off
        o = model.cfg.objective
        o.rec_weight, o.distill_weight, o.contrastive_weight, o.contrastive_mask_ratio = 0.0, 0.0, 1.0, mask_ratio
        o.temperature = temperature
        out = model(batch["fbank"], batch["frames"])
        a, v, loss = F.normalize(out.audio, dim=-1), F.normalize(out.visual, dim=-1), out.loss
    else:
        a, v = model.encode_audio(batch["fbank"]), model.encode_visual(batch["frames"])
        loss = info_nce(a, v, temperature)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        hits.append((y[(a @ v.T).argmax(1)] == y).float().mean().item())
        if step % 50 == 0:
            print(f"step {step}: InfoNCE {loss.item():.3f} (ln B = {math.log(len(y)):.3f}), within-modality "
                  f"cosine audio {(a @ a.T).mean().item():.2f} visual {(v @ v.T).mean().item():.2f}, in-batch "
                  f"class P@1 over the last 50 steps {sum(hits[-50:]) / 50:.2f}, {time.perf_counter() - start:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
