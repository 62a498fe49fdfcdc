"""Does a training recipe learn AV-Digits from scratch within N steps? The measurement behind the
tiny preset's recipe and the benchmark's default knobs (README, "Learning from scratch").

It trains a preset's model with the trainer's own ``train_step`` (or InfoNCE alone on full views,
``--objective nce``) on pairs drawn straight from the feature cache, so a run costs only its
steps, and prints every ``--every`` steps the losses, the in-batch class precision of the full
views (does each audio segment's top frame in the batch show the same digit; about 0.1 by
chance) and the mean within-modality cosine of the full-view embeddings (near 1: collapsed).
At the end it evaluates pair-level class retrieval and R@k on the first ``--test-clips`` test
clips, as the quickstart does on all of them.

    python data/avdigits/probe_recipe.py data/generated/avdigits
    python data/avdigits/probe_recipe.py DIR --objective nce --set train.steps=400
    python data/avdigits/probe_recipe.py DIR --set objective.rec_weight=1 --set train.seed=1

Pairs are drawn with replacement from a generator seeded by ``train.seed``: runs with the same
arguments repeat (on one thread), but they do not see the trainer's epoch order.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.utils.data import Subset

import tgdp_core as tg
from tgdp_core import media
from tgdp_core.dataset import AVDataset, segment_bounds
from tgdp_core.evaluate import embed_clips, pair_class_precision, retrieval_metrics
from tgdp_core.losses import info_nce
from tgdp_core.trainer import lr_at, make_optimizer, make_teacher, mask_generator, train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", help="an AV-Digits folder (train.json, test.json, labels.csv)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--method", default="tgdp", choices=tg.config.METHODS)
    p.add_argument("--objective", choices=("step", "nce"), default="step",
                   help="step: the method's training step; nce: InfoNCE alone on full views")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override, repeatable (e.g. --set objective.distill_weight=1)")
    p.add_argument("--every", type=int, default=50, help="steps between printed lines")
    p.add_argument("--test-clips", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    cfg = tg.Config.preset(args.preset, method=args.method).override(*args.set)
    cfg.data.train_manifest, cfg.data.test_manifest = f"{args.root}/train.json", f"{args.root}/test.json"
    cfg.data.label_csv, cfg.data.workers = f"{args.root}/labels.csv", 0
    train = AVDataset(cfg.data.train_manifest, cfg, train=True)
    test = AVDataset(cfg.data.test_manifest, cfg, train=False)
    fbanks = torch.from_numpy(np.asarray(train.cache.fbank, dtype=np.float32))  # (N, clip_frames, F)
    frames = torch.from_numpy(np.asarray(train.cache.frames))  # (N, K, S, S, 3) uint8
    N, K = frames.shape[:2]
    segments = torch.stack([torch.arange(*segment_bounds(i, K, cfg.data.clip_frames, cfg.model.audio_frames))
                            for i in range(K)])  # (K, T): the fbank frames aligned to each video frame

    torch.manual_seed(cfg.train.seed)
    model = tg.build_model(cfg).train()
    teacher = make_teacher(model) if args.objective == "step" else None
    optimizer = make_optimizer(model, cfg)
    draw = torch.Generator().manual_seed(cfg.train.seed + 12345)
    B, start = cfg.train.batch_size, time.time()
    for step in range(cfg.train.steps):
        clip, frame = torch.randint(0, N, (B,), generator=draw), torch.randint(0, K, (B,), generator=draw)
        fbank = fbanks[clip[:, None], segments[frame]]  # (B, T, F)
        image = media.normalize_frames(frames[clip, frame])  # (B, 3, S, S)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        if args.objective == "nce":
            optimizer.zero_grad(set_to_none=True)
            loss = info_nce(model.encode_audio(fbank), model.encode_visual(image), cfg.objective.temperature)
            loss.backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            record = {"contrastive": loss.item()}
        else:
            record = train_step(model, teacher, optimizer, fbank, image, step,
                                generator=mask_generator(cfg, step, torch.device("cpu")))
        if (step + 1) % args.every == 0:
            report(model, record, fbank, image, train.frame_labels[clip, frame], step + 1, start)
    model.eval()
    emb = embed_clips(model, Subset(test, range(min(args.test_clips, len(test)))), progress=False)
    metrics = pair_class_precision(emb.audio, emb.visual, emb.frame_labels)
    metrics.update(retrieval_metrics(emb.audio, emb.visual))
    metrics["train s"] = time.time() - start
    print("RESULT", json.dumps({k: round(v, 2) for k, v in metrics.items()}), flush=True)


@torch.no_grad()
def report(model, record, fbank, image, y, step, start) -> None:
    a, v = model.encode_audio(fbank), model.encode_visual(image)
    precision = (y[(a @ v.T).argmax(1)] == y).float().mean().item()
    losses = " ".join(f"{k} {record[k]:.3f}" for k in ("loss", "rec", "distill", "contrastive") if k in record)
    print(f"step {step}: {losses}, in-batch class P@1 {precision:.2f}, within-modality cosine audio "
          f"{(a @ a.T).mean():.2f} visual {(v @ v.T).mean():.2f}, {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
