"""The retrieval demo: a Gradio page over ``tgdp_core.retrieval.Retriever``.

    python -m tgdp_core demo [--checkpoint runs/quickstart/tgdp/last.pt] [--gallery MANIFEST]

    from tgdp_core import demo                       # in a notebook cell
    demo.launch(checkpoint="runs/quickstart/tgdp/last.pt", inline=True)
    app = demo.build_app(checkpoint, gallery); demo.launch(app, inline=True)   # the same, in two steps

Tabs: audio -> image (upload, record or pick a gallery clip's wav; the top-k clips' frames and
the query's token priority over its spectrogram), image -> audio (the top-k clips, playable,
with their spectrograms), a gallery browser and the model's details. The query protocol, the
gallery's embedding cache and the token priority are the retriever's (``tgdp_core.retrieval``);
the pictures come from ``tgdp_core.imaging``. This module holds the page and nothing else.

Safety: the server binds to 127.0.0.1 unless told otherwise and never opens a share link; no
field of the page takes a path; the handlers receive Gradio's upload records unprocessed
(``preprocess=False``) and read only files inside Gradio's upload folder; uploads over
``max_upload_mb`` are refused by the server (and again by the handlers), audio over 60 s and
images over 40 megapixels before they are decoded (``retrieval``).
"""
# No `from __future__ import annotations`: Gradio injects event data (gr.SelectData) by reading a
# handler's annotation as an object. Gradio is imported where it is used, so that building the
# CLI parser (add_arguments) does not pay for it.
import argparse
import logging
import math
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import media
from .avdigits import DEFAULT_DIR as AVDIGITS_DIR
from .imaging import mosaic, priority_overlay, spectrogram_image
from .retrieval import Hit, QueryError, Retriever

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = Path("runs/quickstart/tgdp/last.pt")  # what `python -m tgdp_core quickstart` trains
DEFAULT_GALLERY = AVDIGITS_DIR / "test.json"  # the built-in benchmark's test split
DEFAULT_HOST = "127.0.0.1"
TOP_K = 5
MAX_UPLOAD_MB = 20
EXAMPLES = 4  # gallery clips offered as example queries
PAGE_SIZE = 24  # clips per page of the gallery browser
QUICKSTART = "python -m tgdp_core quickstart"


def check_inputs(checkpoint: Path, gallery: Path) -> None:
    """Raise FileNotFoundError naming the command that creates a missing checkpoint or gallery."""
    if not checkpoint.is_file():
        hint = (f"`{QUICKSTART}` trains the quickstart model and writes it there"
                if checkpoint == DEFAULT_CHECKPOINT else f"the quickstart's checkpoint is {DEFAULT_CHECKPOINT} "
                f"(made by `{QUICKSTART}`)")
        raise FileNotFoundError(f"no checkpoint at {checkpoint}: {hint}; --checkpoint also takes a run's "
                                "last.pt or an official CAV-MAE Sync / TG-DP checkpoint")
    if not gallery.is_file():
        hint = (f"`{QUICKSTART}` generates the built-in AV-Digits benchmark, whose test split is the default "
                "gallery" if gallery.resolve() == DEFAULT_GALLERY.resolve() else
                f"make a manifest from videos with `python -m tgdp_core prepare VIDEOS OUT`, or run "
                f"`{QUICKSTART}` for the default gallery ({DEFAULT_GALLERY})")
        raise FileNotFoundError(f"no gallery manifest at {gallery}: {hint}")



def caption(hit: Hit) -> str:
    return f"#{hit.rank} · {hit.video_id} · {hit.score:.3f}" + (f" · {hit.labels}" if hit.labels else "")


# ---------------------------------------------------------------------------------- answers
# Each answer returns the outputs of one page event; the Gradio handlers below add the upload
# checks. Bad input is a message in the status field, never an exception: the page stays usable.
TABLE_HEADERS = ["rank", "clip", "score", "labels"]
# Result images go out as JPEG: it encodes a 1024 px spectrogram in ~2 ms where WebP (Gradio's
# default) takes ~30, which decides whether a 5-result answer stays well under 300 ms.
OUT = "jpeg"
HINT_AUDIO = "Upload or record a sound, or pick an example."
HINT_IMAGE = "Upload an image, or pick an example."


def _table(hits: list[Hit]) -> list[list[Any]]:
    return [[h.rank, h.video_id, round(h.score, 4), h.labels] for h in hits]


def _md(text: str) -> str:
    """Text (an uploaded file's name, say) shown literally in Markdown."""
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", text)


def _ok(what: str, r: Retriever, hits: list[Hit], start: float, note: str = "") -> str:
    ms = 1000 * (time.perf_counter() - start)
    best = f" Best match: **{_md(hits[0].video_id)}** ({hits[0].score:.3f})." if hits else ""
    return f"Top {len(hits)} of {len(r.clips):,} gallery clips for **{_md(what)}**{note}.{best} ({ms:.0f} ms)"


def _problem(message: str) -> str:
    return f"⚠️ **Cannot use this input.** {_md(message)}"


def answer_audio(r: Retriever, path: str | Path, name: str, k: int = TOP_K) -> tuple:
    """Audio -> visual: (status, [(mosaic, caption)], priority image, table rows)."""
    start = time.perf_counter()
    query = r.audio_query(path, name)
    hits = r.search(query.embedding, "visual", k)
    clip_s = r.cfg.data.clip_frames * media.FRAME_SHIFT_MS / 1000
    cropped = query.seconds > clip_s + 0.05
    note = f" ({query.seconds:.2f} s" + (f"; the first {clip_s:.2f} s were used)" if cropped else ")")
    gallery = [(mosaic(r.frames(h.index)), caption(h)) for h in hits]
    heat = spectrogram_image(query.fbank, query.priority)
    return _ok(name, r, hits, start, note), gallery, heat, _table(hits)


def answer_image(r: Retriever, path: str | Path, name: str, k: int = TOP_K) -> tuple:
    """Visual -> audio: (status, priority overlay, table rows, then per hit: audio, spectrogram)."""
    import gradio as gr

    start = time.perf_counter()
    query = r.image_query(path, name)
    hits = r.search(query.embedding, "audio", k)
    slots = []
    for h in hits:
        slots += [gr.update(value=r.waveform(h.index), label=caption(h)), spectrogram_image(r.fbank(h.index))]
    return (_ok(name, r, hits, start), priority_overlay(query.frame, query.priority), _table(hits), *slots)


def _upload(payload: Any, limit_bytes: int) -> tuple[Path, str]:
    """The file behind a Gradio upload record; refuses anything outside Gradio's upload folder."""
    from gradio.utils import get_upload_folder

    if isinstance(payload, str):  # a bare path is never accepted from the page
        raise QueryError("uploads are read only from Gradio's own temporary files")
    path = Path(payload.get("path") or "").resolve()
    name = Path(payload.get("orig_name") or path.name).name
    if not path.is_relative_to(Path(get_upload_folder()).resolve()) or not path.is_file():
        raise QueryError("uploads are read only from Gradio's own temporary files")
    size = path.stat().st_size
    if size == 0:
        raise QueryError(f"{name} is empty (0 bytes)")
    if size > limit_bytes:
        raise QueryError(f"{name} is {size / 2**20:.1f} MB; uploads are limited to {limit_bytes / 2**20:.0f} MB")
    return path, name


def _handler(answer: Callable, r: Retriever, k: int, limit_bytes: int, empty: tuple, hint: str) -> Callable:
    """A page event: upload record -> outputs, every refusal or failure as a message in the status field."""

    def handle(payload):
        if not payload:
            return (hint, *empty)
        try:
            path, name = _upload(payload, limit_bytes)
            return answer(r, path, name, k)
        except QueryError as err:
            return (_problem(str(err)), *empty)
        except Exception as err:  # a bug or an unforeseen file: say so in the page, keep serving
            log.exception("query failed")
            return (_problem(f"the query failed unexpectedly ({type(err).__name__}: {err})"), *empty)

    return handle


# ---------------------------------------------------------------------------------- the page
CSS = """
.tgdp-status { min-height: 2.6em; }
.tgdp-status p { margin: 0.2em 0; }
#a2v-results .caption-label { white-space: normal; max-width: 96%; }
footer { display: none !important; }
"""


def _theme():
    import gradio as gr

    # System fonts: the default theme fetches Google Fonts, which an offline machine cannot reach.
    return gr.themes.Soft(primary_hue="indigo", font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def build_app(checkpoint: str | Path = DEFAULT_CHECKPOINT, gallery: str | Path = DEFAULT_GALLERY,
              cache_dir: str | Path | None = None, *, top_k: int = TOP_K, device: str = "cpu",
              max_upload_mb: float = MAX_UPLOAD_MB, examples: int = EXAMPLES, progress: bool = True,
              retriever: Retriever | None = None):
    """The demo page (a ``gradio.Blocks``) for a checkpoint and a gallery manifest; serve it with ``launch``.

    ``retriever`` reuses a loaded ``Retriever`` (then checkpoint, gallery and cache_dir are
    ignored). Endpoints: ``/audio_to_visual`` and ``/visual_to_audio`` take one file each.
    """
    import gradio as gr

    if retriever is None:
        check_inputs(Path(checkpoint), Path(gallery))
    r = retriever or Retriever(checkpoint, gallery, cache_dir, device, progress)
    k = max(1, min(top_k, len(r.clips)))
    limit = int(max_upload_mb * 2**20)
    picks = sorted({round(i * (len(r.clips) - 1) / max(1, examples - 1)) for i in range(examples)})
    with gr.Blocks(title="TG-DP retrieval", analytics_enabled=False) as app:
        step = f", step {r.step}" if r.step is not None else ""
        gr.Markdown(f"## TG-DP cross-modal retrieval\n`{r.checkpoint}` · {r.cfg.method} ({r.cfg.preset_name}){step} · "
                    f"gallery `{r.gallery.name}`: {len(r.clips):,} clips of {r.cfg.data.frames_per_clip} frames")
        with gr.Tabs():
            _audio_tab(r, k, limit, picks)
            _image_tab(r, k, limit, picks)
            _gallery_tab(r)
            _model_tab(r)
    app.retriever = r  # bench.query_latency and the tests reach the state through the app
    app.max_upload_bytes = limit
    app.top_k = k
    return app


def _audio_tab(r: Retriever, k: int, limit: int, picks: list[int]) -> None:
    """Audio -> image: a sound in, the top-k clips' frames and the query's priority out."""
    import gradio as gr

    K = r.cfg.data.frames_per_clip
    with gr.Tab("Audio → image", id="a2v"):
        with gr.Row():
            with gr.Column(scale=2, min_width=300):
                audio_in = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio query",
                                    elem_id="a2v-query")
                gr.Examples([[r.clips[i].wav] for i in picks], audio_in, label="Gallery clips as queries",
                            example_labels=[f"{r.clips[i].video_id} ({r.labels[i]})" for i in picks])
                status = gr.Markdown(HINT_AUDIO, label="status", elem_classes="tgdp-status", elem_id="a2v-status")
            with gr.Column(scale=3):
                results = gr.Gallery(label=f"Top {k} clips (all {K} frames each)", format=OUT, columns=min(k, 3),
                                     height="auto", object_fit="contain", elem_id="a2v-results")
        heat = gr.Image(label=f"Token priority over the query's spectrogram ({r.guide_source}; bright = kept "
                              "first by guided masking)", format=OUT, interactive=False, elem_id="a2v-priority")
        table = gr.Dataframe(headers=TABLE_HEADERS, label="Ranking", interactive=False)
    # preprocess=False: the handler gets Gradio's upload record and checks it itself
    audio_in.change(_handler(answer_audio, r, k, limit, ([], None, []), HINT_AUDIO), audio_in,
                    [status, results, heat, table], api_name="audio_to_visual", preprocess=False,
                    show_progress="minimal")


def _image_tab(r: Retriever, k: int, limit: int, picks: list[int]) -> None:
    """Image -> audio: a frame in, the top-k clips (players and spectrograms) out."""
    import gradio as gr

    K = r.cfg.data.frames_per_clip
    with gr.Tab("Image → audio", id="v2a"):
        with gr.Row():
            with gr.Column(scale=2, min_width=300):
                image_in = gr.Image(sources=["upload", "clipboard"], type="filepath", label="Image query",
                                    height=288, elem_id="v2a-query")
                gr.Examples([[r.clips[i].frame_path(K // 2)] for i in picks], image_in, label="Gallery frames as queries",
                            example_labels=[f"{r.clips[i].video_id}, frame {K // 2}" for i in picks])
                status = gr.Markdown(HINT_IMAGE, label="status", elem_classes="tgdp-status", elem_id="v2a-status")
                heat = gr.Image(label=f"Token priority ({r.guide_source})", format=OUT, interactive=False,
                                height=288, elem_id="v2a-priority")
            with gr.Column(scale=3):
                table = gr.Dataframe(headers=TABLE_HEADERS, label="Ranking", interactive=False)
                slots = []  # per rank: a player and the clip's spectrogram
                for rank in range(1, k + 1):
                    with gr.Row(equal_height=True):
                        slots.append(gr.Audio(label=f"#{rank}", interactive=False, scale=2, min_width=260,
                                              elem_id=f"v2a-audio-{rank}"))
                        slots.append(gr.Image(label=f"#{rank} spectrogram", show_label=False, format=OUT,
                                              interactive=False, height=150, scale=3, elem_id=f"v2a-spec-{rank}"))
    empty_slots = [x for rank in range(1, k + 1) for x in (gr.update(value=None, label=f"#{rank}"), None)]
    image_in.change(_handler(answer_image, r, k, limit, (None, [], *empty_slots), HINT_IMAGE), image_in,
                    [status, heat, table, *slots], api_name="visual_to_audio", preprocess=False,
                    show_progress="minimal")


def _gallery_tab(r: Retriever) -> None:
    """A paged browser of the gallery's clips: select one to see its frames and hear it."""
    import gradio as gr

    with gr.Tab("Gallery", id="gallery"):
        pages = math.ceil(len(r.clips) / PAGE_SIZE)
        page = gr.Slider(1, max(pages, 2), value=1, step=1, label=f"Page (of {pages}, {PAGE_SIZE} clips each)",
                         visible=pages > 1)
        thumbs = gr.Gallery(_page(r, 1), format=OUT, columns=8, height="auto", allow_preview=False,
                            show_label=False, elem_id="gallery-thumbs")
        with gr.Row():
            with gr.Column(scale=2):
                picked = gr.Markdown("Select a clip to see its frames and hear it.", elem_id="gallery-picked")
                picked_audio = gr.Audio(label="Audio", interactive=False)
            picked_frames = gr.Image(label="Frames", format=OUT, interactive=False, scale=3, elem_id="gallery-frames")
        picked_spec = gr.Image(label="Spectrogram", format=OUT, interactive=False)
    page.change(lambda p: _page(r, int(p)), page, thumbs, api_name="gallery_page", show_progress="hidden",
                trigger_mode="always_last")

    def show_clip(p, evt: gr.SelectData):
        index = (int(p) - 1) * PAGE_SIZE + evt.index
        c, labels = r.clips[index], r.labels[index]
        text = f"**{_md(c.video_id)}**" + (f" · {_md(labels)}" if labels else "") + f"\n\n{_md(Path(c.wav).name)}"
        return text, r.waveform(index), mosaic(r.frames(index)), spectrogram_image(r.fbank(index))

    thumbs.select(show_clip, page, [picked, picked_audio, picked_frames, picked_spec], api_visibility="private")


def _model_tab(r: Retriever) -> None:
    import gradio as gr

    with gr.Tab("Model", id="model"):
        gr.Markdown(_model_markdown(r, r.info()))
        with gr.Accordion("Config", open=False):
            gr.JSON(r.cfg.to_dict())


def _page(r: Retriever, page: int) -> list[tuple[np.ndarray, str]]:
    """The gallery browser's thumbnails: each clip's middle frame with its id (labels show on selection)."""
    K = r.cfg.data.frames_per_clip
    start = (page - 1) * PAGE_SIZE
    return [(r.frames(i)[K // 2], r.clips[i].video_id) for i in range(start, min(start + PAGE_SIZE, len(r.clips)))]


def _model_markdown(r: Retriever, info: dict[str, Any]) -> str:
    lines = ["| model | |", "|---|---|"]
    for key, value in info.items():
        if key == "skipped":
            value = (", ".join(f"{vid} ({why})" for vid, why in value.items()) or "none")
        elif key == "parameters":
            value = f"{value / 1e6:.2f} M"
        is_path = key in ("checkpoint", "gallery", "embedding_cache")
        lines.append(f"| {key} | `{value}` |" if is_path else f"| {key} | {value} |")
    metrics = r.run_metrics()
    if metrics:
        lines += ["", f"`{r.checkpoint.parent / 'metrics.jsonl'}`", "", "| metrics | |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
                  for key, value in metrics.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- serving
def launch(app=None, *, checkpoint: str | Path = DEFAULT_CHECKPOINT, gallery: str | Path = DEFAULT_GALLERY,
           host: str = DEFAULT_HOST, port: int | None = None, inline: bool = False, block: bool = True,
           quiet: bool = False, **build_kwargs):
    """Serve the demo (building it from ``checkpoint`` and ``gallery`` unless ``app`` is given).

    host: 127.0.0.1 (this machine only) unless told otherwise; no share link is ever opened.
    inline=True shows the page in a notebook cell (notebooks never block). block=False returns
    while the server runs in a background thread; stop it with ``app.close()``. Returns the app.
    """
    app = app if app is not None else build_app(checkpoint, gallery, **build_kwargs)
    app.launch(server_name=host, server_port=port, inline=inline, share=False, prevent_thread_lock=not block,
               max_file_size=app.max_upload_bytes, theme=_theme(), css=CSS, quiet=quiet, ssr_mode=False,
               mcp_server=False, pwa=False, enable_monitoring=False)
    return app


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``demo`` subcommand (see ``main``)."""
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                        help=f"a tgdp checkpoint or an official CAV-MAE Sync / TG-DP one "
                             f"(default: {DEFAULT_CHECKPOINT}, made by `{QUICKSTART}`)")
    parser.add_argument("--gallery", default=str(DEFAULT_GALLERY),
                        help="manifest of the clips to search (default: the AV-Digits test split, "
                             "data/generated/avdigits/test.json)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default 127.0.0.1: this machine only; "
                             "0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    parser.add_argument("--cache-dir", help="where gallery features and embeddings are cached "
                                            "(default: .tgdp_cache beside the manifest)")
    parser.add_argument("--top-k", type=int, default=TOP_K, help=f"results per query (default {TOP_K})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main(args: argparse.Namespace) -> int:
    """``python -m tgdp_core demo``: build the page and serve it until interrupted."""
    try:
        app = build_app(args.checkpoint, args.gallery, args.cache_dir, top_k=args.top_k, device=args.device)
    except (FileNotFoundError, ValueError) as err:  # CheckpointError and MediaError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.host not in (DEFAULT_HOST, "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the demo",
              file=sys.stderr)
    launch(app, host=args.host, port=args.port)
    return 0
