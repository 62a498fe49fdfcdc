"""Command line: ``python -m tgdp_core COMMAND --help``.

Every command takes a config as ``--preset NAME`` (or ``--config FILE``), ``--method`` and any
number of ``--section.field=value`` overrides, e.g.
    python -m tgdp_core step --preset tiny --objective.contrastive_mask_ratio=0.65
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import avdigits, bench, demo, prepare, shards
from .config import METHODS, PRESETS, Config


def config_from_args(args: argparse.Namespace, overrides: list[str]) -> Config:
    cfg = Config.load(args.config) if args.config else Config.preset(args.preset, method=args.method or "tgdp")
    if args.config and args.method:
        cfg.override(f"method={args.method}")
    bad = [o for o in overrides if not o.startswith("--") or "=" not in o]
    if bad:
        raise SystemExit(f"error: unrecognised arguments {' '.join(bad)}; overrides look like --section.field=value")
    return cfg.override(*overrides)


CLIPS_HELP = ("a CAV-MAE manifest, or shards (their folder, index.json or a brace pattern); default: the "
              "checkpoint config's data.test_shards or data.test_manifest")


def _add_config_args(p: argparse.ArgumentParser, default: str = "tiny") -> None:
    p.add_argument("--preset", default=default, choices=list(PRESETS), help=f"model/recipe preset (default: {default})")
    p.add_argument("--method", choices=METHODS, help="tgdp (default), sync or cavmae")
    p.add_argument("--config", help="a saved config JSON instead of --preset")


def cmd_step(args: argparse.Namespace, overrides: list[str]) -> None:
    """A few training steps of the chosen method on random inputs: losses and time per step."""
    from . import build_model
    from .trainer import make_optimizer, make_teacher, train_step

    cfg = config_from_args(args, overrides)
    torch.manual_seed(cfg.train.seed)
    device = torch.device(args.device)
    model = build_model(cfg).to(device).train()
    teacher = make_teacher(model)
    optimizer = make_optimizer(model, cfg)
    m = cfg.model
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tgdp | method {cfg.method} | preset {cfg.preset_name} | {n_params / 1e6:.2f} M trainable parameters | "
          f"audio {m.num_audio_patches} + visual {m.num_visual_patches} patches | batch {args.batch} | {device}")
    print("random inputs stand in for data: the losses show the step runs, not what it learns")
    for step in range(args.steps):
        fbank = torch.randn(args.batch, m.audio_frames, m.mel_bins, device=device)
        frames = torch.randn(args.batch, 3, m.image_size, m.image_size, device=device)
        start = time.perf_counter()
        record = train_step(model, teacher, optimizer, fbank, frames, step)
        took = time.perf_counter() - start
        parts = "  ".join(f"{k} {v:.4f}" for k, v in record.items())
        print(f"step {step}: {parts}  ({took:.2f} s)")


def _at_least_one(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fields(values: list[str]) -> list[str]:
    """--allow-change values: repeated and/or comma-separated field names."""
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> None:
    """Pretrain with tgdp_core.train; resumes when OUT already holds last.pt."""
    from .trainer import train

    cfg = config_from_args(args, overrides)
    result = train(cfg, out_dir=args.out, resume=not args.fresh, allow_change=_fields(args.allow_change))
    if result.checkpoint:
        print(f"checkpoint: {result.checkpoint}\nmetrics: {result.out_dir / 'metrics.jsonl'}")


def _add_clip_choice(p: argparse.ArgumentParser) -> None:
    p.add_argument("--per-class", type=_at_least_one, default=0, metavar="K",
                   help="the first K clips of each label, in manifest order (the official protocol: 5 on VGGSound)")
    p.add_argument("--max-clips", "--clips", dest="max_clips", type=_at_least_one, default=0, metavar="N",
                   help="then the first N of those (default: all)")


def _no_overrides(overrides: list[str]) -> None:
    if overrides:
        raise SystemExit(f"error: unrecognised arguments {' '.join(overrides)}")


def cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> None:
    _no_overrides(overrides)
    status = prepare.main(args)
    if args.shards and status == 0:
        from . import shards

        # frames per clip from --num-frames; a stored fbank at the base preset's settings
        cfg = Config.preset("base", data={"frames_per_clip": args.num_frames})
        args.manifest, args.out = Path(args.out) / "manifest.json", Path(args.out) / "shards"
        status = shards.main(args, cfg)
    raise SystemExit(status)


def _eval_set(cfg: Config, source: str | None, per_class: int = 0, max_clips: int = 0):
    """(evaluation set, its video ids) of a manifest or shards; default: the config's test data."""
    from .dataset import choose_clips, eval_data

    source = source or cfg.data.test_shards or cfg.data.test_manifest
    if not source:
        raise ValueError("name the clips (a manifest or shards), or set --data.test_shards / --data.test_manifest")
    return choose_clips(eval_data(source, cfg), per_class, max_clips)


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> None:
    """Zero-shot retrieval (and a linear probe with --train-manifest) of a checkpoint."""

    from . import evaluate
    from .checkpoint import load_model
    from .folders import check_writable

    if args.out:  # before the work, not after it
        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a folder; give a file name for the metrics JSON")
        check_writable(Path(args.out).parent, "choose another --out")
    model = load_model(args.checkpoint, map_location=args.device)
    cfg = model.cfg
    if overrides:
        cfg.override(*overrides)
    test_set, ids = _eval_set(cfg, args.manifest, args.per_class, args.max_clips)
    train_set = _eval_set(cfg, args.train_manifest)[0] if args.train_manifest else None
    metrics = evaluate.evaluate_model(model, test_set, train_set, batch_size=args.batch)
    print(evaluate.markdown_table({args.name or cfg.method: metrics}))
    print(f"{len(ids)} clips" + (f" (the first {args.per_class} of each label)" if args.per_class else ""))
    base = getattr(test_set, "dataset", test_set)  # a Subset's dataset
    if getattr(base, "skipped", None):
        examples = "; ".join(f"{vid}: {why}" for vid, why in list(base.skipped.items())[:3])
        print(f"({len(base.skipped)} of the {len(base.clips)} clips in {args.manifest or cfg.data.test_manifest} were skipped "
              f"(data.on_error=skip) and are not in the table, e.g. {examples})")
    if args.out:
        out = Path(args.out)
        with open(out, "w") as f:
            json.dump(metrics, f, indent=2)
        out.with_suffix(".clips.txt").write_text("".join(f"{i}\n" for i in ids))
        print(f"metrics: {out}; the clips evaluated: {out.with_suffix('.clips.txt')}")


def cmd_embed(args: argparse.Namespace, overrides: list[str]) -> None:
    """Per-clip, per-frame embeddings and global features of a checkpoint to a safetensors file."""

    from .checkpoint import load_model, load_teacher_encoder
    from .embed import write_embeddings

    model = load_model(args.checkpoint, map_location=args.device)
    cfg = model.cfg
    if overrides:
        cfg.override(*overrides)
    encoder = model.encoder
    if args.teacher:
        encoder = load_teacher_encoder(args.checkpoint, model, map_location=args.device)
        if encoder is None:
            raise ValueError(f"{args.checkpoint} holds no EMA teacher (official or exported weights, or a method "
                             "without one); leave out --teacher to embed with the student")
    data, ids = _eval_set(cfg, args.clips, args.per_class, args.max_clips)
    meta = {"encoder": "teacher" if args.teacher else "student", "checkpoint": str(args.checkpoint),
            "clips": str(args.clips),
            "config": json.dumps(cfg.to_dict())}
    tensors = write_embeddings(encoder, data, args.out, batch_size=args.batch, metadata=meta)
    N, K, D = tensors["audio"].shape
    print(f"{args.out}: {N} clips x {K} frames x {D} dims ({meta['encoder']}), clip ids in its metadata")


def cmd_shard(args: argparse.Namespace, overrides: list[str]) -> None:
    """A CAV-MAE manifest -> WebDataset shards (tgdp_core/shards.py)."""
    from . import shards

    raise SystemExit(shards.main(args, config_from_args(args, overrides)))


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> None:
    """Weights without pickle: OUT/model.safetensors and OUT/config.json."""
    _no_overrides(overrides)
    from .export import WEIGHTS, export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, teacher=args.teacher)
    size = (out / WEIGHTS).stat().st_size
    print(f"{out / WEIGHTS} ({size / 1e6:.1f} MB, {'EMA teacher' if args.teacher else 'student'} encoder) "
          f"and {out / 'config.json'}; load with tgdp_core.load_model({str(out)!r})")


def cmd_probe(args: argparse.Namespace, overrides: list[str]) -> None:
    """Attention / linear / kNN probes of a checkpoint's frozen features: a table and JSON."""

    from .evaluate import markdown_table
    from .probe import run_probes

    _no_overrides(overrides)
    options = {"knn": {"k": args.k, "temperature": args.temperature}}
    for kind in ("attention", "linear"):
        options[kind] = {key: value for key, value in (("epochs", args.epochs), ("lr", args.lr)) if value is not None}
    result = run_probes(args.checkpoint, args.train, args.test, args.kind, args.features, label_csv=args.labels,
                        cache_dir=args.cache_dir, cache=not args.no_cache, batch_size=args.batch,
                        device=args.device, options=options)
    print(f"{result['task']}: {result['train clips']} train / {result['test clips']} test clips, "
          f"frozen features of {args.checkpoint}")
    print(markdown_table(result["rows"]))
    if args.out:
        result.update(checkpoint=str(args.checkpoint), train=str(args.train), test=str(args.test))
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def cmd_quickstart(args: argparse.Namespace, overrides: list[str]) -> None:
    """Tiny TG-DP vs the single-pass baseline on AV-Digits: one table, checkpoints, plots."""
    _no_overrides(overrides)
    from .evaluate import markdown_table
    from .experiments import QUICKSTART_COLUMNS, quickstart

    start = time.perf_counter()
    rows = quickstart(args.out, steps=args.steps)
    print("\n" + markdown_table(rows, QUICKSTART_COLUMNS))
    print(f"\n(percent; 'chance' is what a model that knows nothing scores; {time.perf_counter() - start:.0f} s in all)")
    phases = json.loads((Path(args.out) / "timing.json").read_text())
    print("where the time went: " + "; ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items()))
    print(f"results, checkpoints and plots: {args.out}/  (table.md, results.json, quickstart.png, tgdp/last.pt)")
    print("next: `python -m tgdp_core demo` for retrieval in the browser with the TG-DP checkpoint;")
    print("      `.venv/bin/jupyter lab notebooks/` for the walkthroughs (01_pretraining.ipynb first)")


def cmd_ablate(args: argparse.Namespace, overrides: list[str]) -> None:
    """The paper's ablation rows on AV-Digits, several seeds each, under one curriculum."""
    _no_overrides(overrides)
    from .experiments import ablate

    ablate(args.out, budget=args.budget, seeds=args.seeds, rows=args.rows, curriculum=args.curriculum,
           cfg=Config.preset(args.preset))
    print((Path(args.out) / f"ablation-{args.curriculum}.md").read_text())


def cmd_ablate_merge(args: argparse.Namespace, overrides: list[str]) -> None:
    """One table from several ablations' per-seed files that share the TG-DP runs."""
    _no_overrides(overrides)
    from .experiments import merge_ablations

    merge_ablations(args.seed_csvs, args.out, args.curriculum)
    print((Path(args.out) / f"ablation-{args.curriculum}.md").read_text())


def cmd_ablate_pairs(args: argparse.Namespace, overrides: list[str]) -> None:
    """Paired differences of an ablation's rows against any one of its rows."""
    _no_overrides(overrides)
    from .experiments import pairs_markdown

    print(pairs_markdown(args.seed_csv, args.against, args.rows))


def _add_ablate_commands(sub) -> None:
    p = sub.add_parser("ablate", help="the paper's ablation table on the built-in benchmark")
    p.add_argument("--out", default="runs/ablate", help="run folder (default: runs/ablate); finished rows are reused")
    p.add_argument("--budget", type=float,
                   help="scales the steps per row (1 = 400: about 3.5 min per TG-DP row and seed on 2 CPU cores; "
                        "default: 2 for --curriculum none, where rows need 800 steps to learn, else 1)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per row (3 to 5 for the intervals; default 3)")
    p.add_argument("--rows", nargs="*", help="rows by name, or 'all' (default: all but the guided reconstruction "
                   "rows); the TG-DP row always runs")
    p.add_argument("--curriculum", default="equal",  # checked by experiments.ablate (its CURRICULA)
                   help="mask-ratio ramps: equal (every row ramps the view its contrastive loss sees; default), "
                        "none (no ramp), preset (the preset's own: only the dual-path rows ramp)")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="the recipe every row starts from (default: tiny; small: its 400 steps take about 40 min "
                        "per row and seed on 2 CPU cores)")
    p.set_defaults(func=cmd_ablate)
    p = sub.add_parser("ablate-merge", help="one ablation table from the -seeds.csv of ablations that ran different "
                       "rows with the same TG-DP runs (rows split across machines or sessions)")
    p.add_argument("seed_csvs", nargs="+", help="ablation-<curriculum>-seeds.csv files that ablate wrote")
    p.add_argument("--out", required=True, help="folder for the merged ablation-<curriculum>.{md,csv,png}")
    p.add_argument("--curriculum", required=True, help="the curriculum the ablations ran with (names the files)")
    p.set_defaults(func=cmd_ablate_merge)
    p = sub.add_parser("ablate-pairs", help="paired differences of an ablation's rows against any one of its rows "
                       "(the table's are against TG-DP)")
    p.add_argument("seed_csv", help="an ablation-<curriculum>-seeds.csv that ablate or ablate-merge wrote")
    p.add_argument("--against", required=True, help="the reference row, by name")
    p.add_argument("--rows", nargs="*", help="rows to compare with it (default: every other row)")
    p.set_defaults(func=cmd_ablate_pairs)


def _add_export_and_probe(sub) -> None:
    p = sub.add_parser("export", help="a checkpoint's weights as OUT/model.safetensors + OUT/config.json (no pickle)")
    p.add_argument("checkpoint", help="a tgdp checkpoint (last.pt, best.pt), an official state dict or an export")
    p.add_argument("out", help="folder to write (created); load_model reads it")
    p.add_argument("--teacher", action="store_true",
                   help="the EMA teacher's encoder in place of the student's (the decoder stays the student's)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("probe", help="attention / linear / kNN probes on a checkpoint's frozen features")
    p.add_argument("checkpoint", help="a tgdp checkpoint, an export folder or an official state dict")
    p.add_argument("train", help="manifest of the clips the probe is fitted on")
    p.add_argument("test", help="manifest of the clips it is scored on")
    p.add_argument("--kind", nargs="+", default=["attention"], choices=["attention", "linear", "knn"],
                   help="one or more probes (default: attention)")
    p.add_argument("--features", nargs="+", default=["both"], choices=["audio", "visual", "both"],
                   help="which embeddings the probe reads (default: both)")
    p.add_argument("--labels", help="label CSV (index,mid,display_name); default: data.label_csv or labels.csv "
                   "beside the train manifest")
    p.add_argument("--epochs", type=int, help="attention / linear probe epochs (default: 30 / 100)")
    p.add_argument("--lr", type=float, help="attention / linear probe learning rate (default: 1e-3)")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours (default: 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature (default: 0.07, DINO)")
    p.add_argument("--batch", type=int, default=16, help="clips per batch when embedding")
    p.add_argument("--cache-dir", help="where frozen features are cached (default: .tgdp_cache/probe_features "
                   "beside each manifest)")
    p.add_argument("--no-cache", action="store_true", help="embed again, do not read or write the feature cache")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=cmd_probe)


def _add_clip_commands(sub) -> None:
    """The commands that read clips of a manifest or shards: eval, embed, shard (issue 13)."""
    p = sub.add_parser("eval", help="zero-shot retrieval R@1/5/10 both directions (+ linear probe) of a checkpoint")
    p.add_argument("checkpoint", help="a tgdp checkpoint or an official CAV-MAE Sync / TG-DP state dict")
    p.add_argument("manifest", nargs="?", help=f"the test clips: {CLIPS_HELP}")
    _add_clip_choice(p)
    p.add_argument("--train-manifest", help="also fit a linear probe on these clips' frozen features (manifest or shards)")
    p.add_argument("--batch", type=_at_least_one, default=16, help="clips per batch")
    p.add_argument("--name", help="row name in the table (default: the method)")
    p.add_argument("--out", help="write the metrics as JSON here, and the evaluated clip ids beside it (.clips.txt)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("embed", help="per-clip, per-frame embeddings of a checkpoint to a safetensors file")
    p.add_argument("checkpoint", help="a tgdp checkpoint or an official CAV-MAE Sync / TG-DP state dict")
    p.add_argument("clips", metavar="MANIFEST_OR_SHARDS", help=CLIPS_HELP.split("; default")[0])
    p.add_argument("out", metavar="OUT", help="the safetensors file to write (layout: tgdp_core/embed.py)")
    _add_clip_choice(p)
    p.add_argument("--teacher", action="store_true", help="embed with the checkpoint's EMA teacher")
    p.add_argument("--batch", type=_at_least_one, default=16, help="clips per batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=cmd_embed)
    p = sub.add_parser("shard", help="a CAV-MAE manifest -> WebDataset shards with an index (for data at scale)")
    _add_config_args(p, default="base")
    shards.add_arguments(p)
    p.set_defaults(func=cmd_shard)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tgdp_core", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("step", help="run a few training steps on random inputs and print the losses")
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=cmd_step)
    p = sub.add_parser("train", help="pretrain a model (single process, or under torchrun for DDP)")
    _add_config_args(p)
    p.add_argument("--out", help="run folder (default: runs/<time>-<preset>-<method>); resumes if it holds last.pt")
    p.add_argument("--fresh", action="store_true", help="ignore an existing last.pt in --out")
    p.add_argument("--allow-change", action="append", default=[], metavar="FIELD",
                   help="on resume, let this config field differ from the checkpoint's, e.g. train.steps to "
                        "extend a run (repeat it or separate fields with commas; any other change is refused)")
    p.set_defaults(func=cmd_train)
    _add_clip_commands(sub)
    _add_export_and_probe(sub)
    p = sub.add_parser("quickstart", help="tiny TG-DP vs CAV-MAE Sync on the built-in benchmark (about 10 min on 2 CPU cores)")
    p.add_argument("--out", default="runs/quickstart", help="run folder (default: runs/quickstart); finished runs are reused")
    p.add_argument("--steps", type=int, help="training steps per method (default: the tiny preset's)")
    p.set_defaults(func=cmd_quickstart)
    _add_ablate_commands(sub)
    p = sub.add_parser("bench", help="time each method's training step, the loader and the demo (issue #7)")
    bench.add_arguments(p)
    p.set_defaults(func=lambda args, overrides: sys.exit(bench.main(args, overrides)))
    p = sub.add_parser("demo", help="Gradio cross-modal retrieval demo (binds to 127.0.0.1)")
    demo.add_arguments(p)
    p.set_defaults(func=lambda args, overrides: _no_overrides(overrides) or sys.exit(demo.main(args)))
    p = sub.add_parser("avdigits", help="generate the built-in AV-Digits benchmark")
    avdigits.add_arguments(p)
    p.set_defaults(func=lambda args, overrides: _no_overrides(overrides) or sys.exit(avdigits.main(args)))
    p = sub.add_parser("prepare", help="videos -> 16 kHz wavs, frames and a CAV-MAE manifest (and shards)")
    prepare.add_arguments(p)
    p.add_argument("--shards", action="store_true", help="also write WebDataset shards of the clips into OUT/shards "
                                                         "(--fbank at the base preset's settings)")
    shards.add_arguments(p, positional=False)
    p.set_defaults(func=cmd_prepare)
    args, overrides = parser.parse_known_args(argv)
    try:
        args.func(args, overrides)
    except ValueError as err:  # config and input errors: one clear line, no traceback
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
