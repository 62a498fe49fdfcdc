"""The retrieval demo: protocol, embedding cache, both endpoints through gradio_client, bad input,
the page in a real browser (Debian's Chromium driven by Playwright)."""
import argparse
import copy
import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from gradio_client import Client, handle_file
from PIL import Image

import tgdp_core as tg
from tgdp_core import bench, checkpoint, demo, evaluate, retrieval
from test_dataset import make_clips

# Gradio's queue still calls pandas options that pandas 3 deprecates; nothing here to act on.
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|The copy keyword).*")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
CLIPS = 3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny TG-DP model trained a few dozen steps on a 3-clip gallery, served on 127.0.0.1.

    An untrained model pairs audio and frames at random. With each clip's frames one flat colour
    of its own (make_clips varies them more within a clip than between clips) and a strong
    contrastive weight on full views, 30 steps make every clip retrieve itself in both
    directions with a margin; the protocol test below holds for any model. The run
    folder holds the teacher, the step and the metrics.jsonl the page shows.
    """
    root = tmp_path_factory.mktemp("demo")
    manifest = make_clips(root / "gallery", n=CLIPS)
    for k, colour in enumerate([(220, 40, 40), (40, 200, 60), (50, 70, 230)]):
        for path in (root / "gallery" / "frames").glob(f"frame_*/clip{k}.jpg"):
            Image.new("RGB", (48, 40), colour).save(path)
    cfg = tg.Config.preset("tiny", data={"workers": 0, "train_manifest": str(manifest)},
                           train={"batch_size": CLIPS, "steps": 30, "warmup_steps": 3, "lr": 1e-3, "log_every": 10,
                                  "checkpoint_every": 1000},
                           # full contrastive views: a tone fills one of the 4 frequency rows, which
                           # 50 % masking by a still-random teacher often drops (then clip0 did not
                           # find itself at tiny's 128-frame windows)
                           objective={"contrastive_weight": 1.0, "rec_weight": 0.1, "contrastive_mask_ratio": 0.0})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a batch of 3 tiny samples: threads only add contention on a busy CI box
    try:
        result = tg.train(cfg, out_dir=root / "run", resume=False)
    finally:
        torch.set_num_threads(threads)
    app = demo.build_app(result.checkpoint, manifest, root / "cache", max_upload_mb=1, progress=False)
    demo.launch(app, port=demo.free_port(), block=False, quiet=True)
    try:
        yield app, manifest, result.checkpoint
    finally:
        app.close()


@pytest.fixture(scope="module")
def client(served):
    return Client(served[0].local_url, verbose=False)


def a2v(client, path):
    status, gallery, priority, table = client.predict(handle_file(str(path)), api_name="/audio_to_visual")
    return status, gallery, priority, table


def v2a(client, path):
    status, overlay, table, *slots = client.predict(handle_file(str(path)), api_name="/visual_to_audio")
    return status, overlay, table, slots


def top_ids(table):
    return [row[1] for row in table["data"]]


# ---------------------------------------------------------------------------------- protocol
def test_a_gallery_wav_reproduces_its_gallery_embedding(served):
    """The query protocol is evaluation's: mean of the K aligned segments (any model, trained or not)."""
    r = served[0].retriever
    for i, clip in enumerate(r.clips):
        query = r.audio_query(clip.wav)
        assert torch.allclose(query.embedding, r.audio[i], atol=2e-3)  # the gallery's fbanks are cached as float16
        assert query.priority.shape == (r.cfg.model.mel_bins, r.cfg.data.clip_frames)
        assert (query.priority > 0).all()  # every fbank cell lies in some segment
        image = r.image_query(clip.frame_path(3))
        assert image.priority.shape == r.cfg.model.visual_grid
        assert torch.allclose(image.priority.sum(), torch.tensor(1.0), atol=1e-4)
    assert r.guide_source == "EMA teacher" and r.step == 30


def test_gallery_embeddings_are_cached_and_keyed_by_checkpoint_and_manifest(served, tmp_path, monkeypatch):
    app, manifest, ckpt = served
    r = app.retriever
    assert r.cache_file.exists()
    monkeypatch.setattr(evaluate, "embed_clips", lambda *a, **k: pytest.fail("cache miss: embedded the gallery again"))
    again = retrieval.Retriever(ckpt, manifest, r.cache_file.parents[1], progress=False)
    assert again.cache_file == r.cache_file and torch.equal(again.visual, r.visual)
    monkeypatch.undo()

    copy = tmp_path / "copy.pt"
    shutil.copy(ckpt, copy)
    other = retrieval.Retriever(copy, manifest, tmp_path / "cache", progress=False)
    entries = json.loads(manifest.read_text())["data"][:2]
    smaller = manifest.with_name("two.json")
    smaller.write_text(json.dumps({"data": entries}))
    two = retrieval.Retriever(copy, smaller, tmp_path / "cache", progress=False)
    assert len({r.cache_file.name, other.cache_file.name, two.cache_file.name}) == 3
    assert torch.allclose(two.audio, r.audio[:2], atol=1e-5)
    os.utime(copy, ns=(0, 0))  # same path, new modification time: recomputed
    assert retrieval.Retriever(copy, manifest, tmp_path / "cache", progress=False).cache_file != other.cache_file


def test_an_export_folder_serves_the_same_gallery(served, tmp_path):
    from tgdp_core.export import export_checkpoint

    app, manifest, ckpt = served
    folder = export_checkpoint(ckpt, tmp_path / "exported")
    r = retrieval.Retriever(folder, manifest, tmp_path / "cache", progress=False)
    assert r.exported and not r.official and r.guide_source == "student" and r.info()["format"] == "tgdp export"
    assert torch.allclose(r.visual, app.retriever.visual, atol=1e-5)
    assert torch.allclose(r.audio, app.retriever.audio, atol=1e-5)


def test_an_untrained_checkpoint_without_teacher_uses_the_student(tmp_path, monkeypatch):
    manifest = make_clips(tmp_path / "gallery", n=2)
    path = checkpoint.save_checkpoint(checkpoint.model_payload(tg.build_model(tg.Config.preset("tiny"))),
                                      tmp_path / "model.pt")
    r = retrieval.Retriever(path, manifest, progress=False)
    assert r.guide_source == "student" and r.step is None
    assert r.cache_file.parent == manifest.parent / ".tgdp_cache" / "demo"
    hits = r.search(r.audio_query(r.clips[1].wav).embedding, "visual", k=5)
    assert [h.rank for h in hits] == [1, 2] and hits[0].score >= hits[1].score
    monkeypatch.setattr(retrieval, "MAX_IMAGE_PIXELS", 40 * 40)  # refused from the header, before decoding
    with pytest.raises(retrieval.QueryError, match="48 x 40 pixels; images are limited to"):
        r.image_query(r.clips[0].frame_path(0))


# ---------------------------------------------------------------------------------- endpoints
def test_both_endpoints_retrieve_a_gallery_query_first(served, client):
    app, manifest, _ = served
    root = manifest.parent
    for k in range(CLIPS):
        status, gallery, priority, table = a2v(client, root / "audio" / f"clip{k}.wav")
        assert top_ids(table)[0] == f"clip{k}", status
        assert status.startswith("Top 3 of 3") and len(gallery) == 3
        assert gallery[0]["caption"].startswith(f"#1 · clip{k} · ")
        assert Path(priority).is_file()
        status, overlay, table, slots = v2a(client, root / "frames" / "frame_4" / f"clip{k}.jpg")
        assert top_ids(table)[0] == f"clip{k}", status
        assert len(slots) == 2 * CLIPS and Path(overlay).is_file()
        assert slots[0]["label"].startswith(f"#1 · clip{k}") and Path(slots[0]["value"]).is_file()
    assert len(client.predict(1, api_name="/gallery_page")) == 3  # the browser's first page


def write_tone(path, seconds, rate=16000, amplitude=0.3):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, subtype="PCM_16")
    return path


def test_bad_inputs_show_a_message_and_the_server_keeps_serving(served, client, tmp_path):
    app, manifest, _ = served
    good_wav, good_jpg = manifest.parent / "audio" / "clip1.wav", manifest.parent / "frames" / "frame_2" / "clip1.jpg"
    (tmp_path / "notes.wav").write_text("not audio at all")
    (tmp_path / "notes.png").write_text("not an image either")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    (tmp_path / "zero.wav").write_bytes(b"")
    write_tone(tmp_path / "blip.wav", 0.01)  # shorter than one 25 ms fbank window
    sf.write(tmp_path / "silent.wav", np.zeros(32000, np.float32), 16000, subtype="PCM_16")
    write_tone(tmp_path / "long.wav", 61, rate=8000)  # 61 s at 8 kHz: under the 1 MB test limit
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])  # header intact, pixels cut short
    cases = [(a2v, "notes.wav", "is not an audio file"), (a2v, "empty.wav", "is empty"),
             (a2v, "zero.wav", "is empty (0 bytes)"), (a2v, "blip.wav", "is too short"),
             (a2v, "silent.wav", "is silent"), (a2v, "long.wav", "limited to 60 s"),
             (v2a, "notes.png", "not an image"), (v2a, "cut.jpg", "corrupt")]
    for call, name, message in cases:
        status, *rest = call(client, tmp_path / name)
        assert status.startswith("⚠️") and message in status and name in status, (name, status)
        if call is a2v:  # the previous results are cleared
            assert rest[:2] == [[], None] and rest[2]["data"] == []
        else:
            assert rest[0] is None and rest[1]["data"] == []
            assert all(s is None or s.get("value") is None for s in rest[2])
        # a good query right after still works, in both directions
        assert top_ids(a2v(client, good_wav)[3])[0] == "clip1"
        assert top_ids(v2a(client, good_jpg)[2])[0] == "clip1"

    # over the upload limit: the client refuses to send it, and the server refuses it too (413)
    big = tmp_path / "big.wav"
    write_tone(big, 40)  # 1.3 MB > 1 MB
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        a2v(client, big)
    with open(big, "rb") as f:
        response = httpx.post(client.upload_url, files=[("files", ("big.wav", f))])
    assert response.status_code == 413
    # a path typed into a request never reaches the file system: only Gradio's uploads are read
    secret = tmp_path / "secret.wav"
    write_tone(secret, 1)
    url = app.local_url.rstrip("/") + "/gradio_api/call/audio_to_visual"
    event = httpx.post(url, json={"data": [{"path": str(secret), "meta": {"_type": "gradio.FileData"}}]}).json()
    stream = httpx.get(f"{url}/{event['event_id']}", timeout=30).text
    assert "event: error" in stream and "Best match" not in stream
    assert top_ids(a2v(client, good_wav)[3])[0] == "clip1"


def test_handlers_read_only_gradio_uploads_within_the_size_limit(tmp_path):
    from gradio.utils import get_upload_folder

    with pytest.raises(retrieval.QueryError, match="Gradio's own temporary files"):
        demo._upload("/etc/hostname", 2**20)
    with pytest.raises(retrieval.QueryError, match="Gradio's own temporary files"):
        demo._upload({"path": str(write_tone(tmp_path / "a.wav", 1))}, 2**20)
    folder = Path(get_upload_folder()) / "tgdp-test"
    folder.mkdir(parents=True, exist_ok=True)
    inside = write_tone(folder / "b.wav", 1)
    try:
        assert demo._upload({"path": str(inside), "orig_name": "mine.wav"}, 2**20) == (inside.resolve(), "mine.wav")
        with pytest.raises(retrieval.QueryError, match="mine.wav is 0.0 MB; uploads are limited to 0 MB"):
            demo._upload({"path": str(inside), "orig_name": "mine.wav"}, 1000)
    finally:
        shutil.rmtree(folder)


# ---------------------------------------------------------------------------------- panels, CLI, latency
def test_model_panel_shows_the_run(served):
    r = served[0].retriever
    text = demo._model_markdown(r, r.info())
    assert "| step | 30 |" in text and "EMA teacher" in text and "metrics.jsonl" in text and "| contrastive |" in text


def test_query_latency_reports_both_directions_on_a_1000_clip_gallery(served):
    """The gallery tiled to 1,000 clips (embeddings, media rows): the page's whole answer per query.
    The figure itself is for the benchmark command to report; a test only checks it is measured."""
    r = copy.copy(served[0].retriever)
    reps = -(-1000 // len(r.clips))
    r.clips, r.labels = (r.clips * reps)[:1000], (r.labels * reps)[:1000]
    r.audio, r.visual = r.audio.repeat(reps, 1)[:1000], r.visual.repeat(reps, 1)[:1000]
    r.dataset = copy.copy(r.dataset)
    r.dataset.valid = (r.dataset.valid * reps)[:1000]
    latency = bench.query_latency(r, n=10, k=5)
    assert latency["clips"] == 1000 and latency["k"] == 5
    for direction in ("audio_to_visual", "visual_to_audio"):
        assert latency[direction]["median_ms"] > 0, latency


def test_cli_defaults_and_missing_files_name_the_quickstart(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args([])
    assert args.host == "127.0.0.1" and args.checkpoint == "runs/quickstart/tgdp/last.pt"
    assert args.gallery.endswith("data/generated/avdigits/test.json")
    args = parser.parse_args(["--checkpoint", str(tmp_path / "none.pt"), "--port", "0"])
    assert demo.main(args) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "python -m tgdp_core quickstart" in err
    path = checkpoint.save_checkpoint(checkpoint.model_payload(tg.build_model(tg.Config.preset("tiny"))),
                                      tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="no gallery manifest at .*python -m tgdp_core quickstart"):
        demo.build_app(path, tmp_path / "none.json")


# ---------------------------------------------------------------------------------- the page in a browser
def test_page_in_a_browser_runs_an_example_in_each_direction(served, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; CI must install it: apt-get install -y chromium")
        pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium); CI runs this test")
    from playwright.sync_api import expect, sync_playwright

    app = served[0]
    folders = [tmp_path] + ([Path(os.environ["TGDP_SCREENSHOT_DIR"])] if os.environ.get("TGDP_SCREENSHOT_DIR") else [])

    def shoot(page, name):
        page.wait_for_timeout(500)  # let the "updated" highlights fade
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=folder / f"demo_{name}.png", full_page=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(app.local_url, wait_until="domcontentloaded")
            expect(page.get_by_text("TG-DP cross-modal retrieval")).to_be_visible(timeout=30_000)

            # a bad upload: the message shows in the page, then an example query still works
            (tmp_path / "notes.wav").write_text("not audio")
            page.locator("#a2v-query input[type=file]").set_input_files(tmp_path / "notes.wav")
            expect(page.locator("#a2v-status")).to_contain_text("notes.wav is not an audio file", timeout=30_000)
            shoot(page, "bad_upload")
            page.get_by_text("clip0 (even)", exact=True).click()  # an audio example
            expect(page.locator("#a2v-status")).to_contain_text("Best match: clip0", timeout=30_000)
            expect(page.locator("#a2v-results img").first).to_be_visible(timeout=30_000)
            expect(page.locator("#a2v-priority img")).to_be_visible(timeout=30_000)
            shoot(page, "audio_to_image")

            page.get_by_role("tab", name="Image → audio").click()
            page.get_by_text("clip2, frame 4", exact=True).click()  # an image example
            expect(page.locator("#v2a-status")).to_contain_text("Best match: clip2", timeout=30_000)
            expect(page.locator("#v2a-audio-1")).to_contain_text("#1 · clip2", timeout=30_000)
            expect(page.locator("#v2a-spec-1 img")).to_be_visible(timeout=30_000)
            shoot(page, "image_to_audio")

            page.get_by_role("tab", name="Gallery").click()
            page.locator("#gallery-thumbs").get_by_text("clip1", exact=True).click()  # clip1's frames and sound
            expect(page.locator("#gallery-picked")).to_contain_text("clip1", timeout=30_000)
            expect(page.locator("#gallery-frames img")).to_be_visible(timeout=30_000)
            shoot(page, "gallery")
            page.get_by_role("tab", name="Model").click()
            expect(page.get_by_text("EMA teacher, patch_to_global")).to_be_visible(timeout=30_000)
            shoot(page, "model")
        finally:
            browser.close()
    assert (tmp_path / "demo_audio_to_image.png").stat().st_size > 10_000
