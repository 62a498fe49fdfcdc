"""`prepare`: a folder or list of videos -> wavs, frames, manifest, labels, rejects; resumable."""
import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
from PIL import Image

import tgdp_core as tg
from test_media import truncate, write_video
from tgdp_core.prepare import add_arguments, main, prepare

SETTINGS = dict(frame_size=32, num_frames=16, seconds=2.0)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """VIDEOS/{dog,cat}/...: four good clips (two share a stem), three bad ones, one non-video."""
    root = tmp_path_factory.mktemp("videos")
    for folder in ("dog", "cat", "cat/kitten"):
        (root / folder).mkdir(parents=True)
    write_video(root / "dog" / "bark.mp4")
    write_video(root / "dog" / "same.mp4", seconds=1.0)
    write_video(root / "cat" / "same.mp4", seconds=1.0)
    write_video(root / "cat" / "kitten" / "meow.WEBM", vcodec="libvpx", acodec="libopus", rate=48000)
    write_video(root / "dog" / "silent.mp4", acodec=None)
    truncate(write_video(root / "cat" / "broken.mp4"))
    (root / "cat" / "empty.mkv").write_bytes(b"")
    (root / "cat" / "notes.txt").write_text("not a video")
    return root


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_prepare_folder_writes_clips_manifest_labels_and_rejects(videos, tmp_path):
    out = tmp_path / "out"
    summary = prepare(videos, out, workers=2, **SETTINGS)

    assert (summary.done, summary.skipped, summary.rejected) == (4, 0, 3)
    reasons = dict(summary.rejects)
    assert "no audio stream" in reasons[str(videos / "dog" / "silent.mp4")]
    assert "truncated" in reasons[str(videos / "cat" / "broken.mp4")]
    assert "empty file" in reasons[str(videos / "cat" / "empty.mkv")]
    assert read_csv(out / "rejects.csv") == [["path", "reason"], *map(list, summary.rejects)]
    assert summary.padded == 4  # every clip is shorter than 2 s
    text = str(summary)
    assert "4 done, 0 skipped (already done), 3 rejected" in text and "no audio stream" in text

    entries = json.loads((out / "manifest.json").read_text())["data"]
    same_ids = [e["video_id"] for e in entries if e["video_id"].startswith("same_")]
    assert len(same_ids) == 2 and len(set(same_ids)) == 2  # a shared stem gets unique ids
    assert [e["video_id"] for e in entries] == sorted(["bark", "meow", *same_ids])
    labels = {e["video_id"]: e["labels"] for e in entries}
    assert labels["bark"] == "dog" and labels["meow"] == "kitten"
    assert sorted(labels[i] for i in same_ids) == ["cat", "dog"]
    assert read_csv(out / "labels.csv") == [["index", "mid", "display_name"], ["0", "cat", "cat"],
                                            ["1", "dog", "dog"], ["2", "kitten", "kitten"]]
    for entry in entries:
        assert entry["video_path"] == str(out.resolve() / "frames")
        assert entry["wav"] == str(out.resolve() / "audio" / f"{entry['video_id']}.wav")
        wav, rate = sf.read(entry["wav"])
        assert rate == 16000 and wav.shape == (32000,)
        frames = [Path(entry["video_path"]) / f"frame_{i}" / f"{entry['video_id']}.jpg" for i in range(16)]
        assert all(Image.open(f).size == (32, 32) for f in frames)
    assert len(list((out / "frames").iterdir())) == 16


def test_second_run_skips_done_clips_and_redoes_incomplete_ones(videos, tmp_path):
    out = tmp_path / "out"
    prepare(videos, out, workers=0, **SETTINGS)
    manifest = (out / "manifest.json").read_bytes()

    again = prepare(videos, out, workers=0, **SETTINGS)
    assert (again.done, again.skipped, again.rejected) == (0, 4, 3)
    assert (out / "manifest.json").read_bytes() == manifest

    (out / "frames" / "frame_7" / "bark.jpg").unlink()  # as if interrupted mid-clip
    third = prepare(videos, out, workers=0, **SETTINGS)
    assert (third.done, third.skipped) == (1, 3)
    assert (out / "manifest.json").read_bytes() == manifest

    with pytest.raises(ValueError, match="prepared with"):
        prepare(videos, out, workers=0, **{**SETTINGS, "num_frames": 8})


def test_labels_from_user_csv_and_a_list_file(videos, tmp_path):
    listing = tmp_path / "videos.txt"
    relative = os.path.relpath(videos / "dog" / "bark.mp4", tmp_path)  # relative to the list's folder
    listing.write_text(f"# clips\n{videos / 'dog' / 'bark.mp4'}\n\n{videos / 'cat/kitten/meow.WEBM'}\n"
                       f"{videos / 'dog' / 'same.mp4'}\nnowhere/lost.mp4\n{relative}\n")  # bark twice: once
    labels = tmp_path / "labels.csv"
    labels.write_text('video_id,labels,mids\nbark,Dog;Animal,/m/0bt9lr;/m/0jbk\n'
                      'meow,"Cat,Animal","/m/01yrx,/m/0jbk"\nlost,Dog,/m/0bt9lr\nunused,Cow,/m/01xq0k1\n')
    summary = prepare(listing, tmp_path / "out", labels_csv=labels, workers=0, **SETTINGS)

    assert (summary.done, summary.rejected) == (2, 2)
    reasons = dict(summary.rejects)
    assert "not listed in the labels CSV" in reasons[str(videos / "dog" / "same.mp4")]
    assert "file not found" in reasons[str(tmp_path / "nowhere" / "lost.mp4")]
    assert summary.notes == [f"1 row(s) of {labels} match no video"]
    entries = json.loads((tmp_path / "out" / "manifest.json").read_text())["data"]
    assert {e["video_id"]: e["labels"] for e in entries} == {"bark": "/m/0bt9lr,/m/0jbk", "meow": "/m/01yrx,/m/0jbk"}
    assert read_csv(tmp_path / "out" / "labels.csv") == [  # Cow labels no clip of the manifest: left out
        ["index", "mid", "display_name"], ["0", "/m/0jbk", "Animal"], ["1", "/m/01yrx", "Cat"],
        ["2", "/m/0bt9lr", "Dog"]]


def test_labels_csv_by_filename_without_mids(videos, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,label\nbark.mp4,barking; loud\nmeow.WEBM,mewing\nsame.mp4,twin\n")
    listing = tmp_path / "videos.txt"
    listing.write_text("\n".join(str(videos / p) for p in ("dog/bark.mp4", "cat/kitten/meow.WEBM")))
    prepare(listing, tmp_path / "out", labels_csv=labels, workers=0, **SETTINGS)
    entries = json.loads((tmp_path / "out" / "manifest.json").read_text())["data"]
    assert [e["labels"] for e in entries] == ["barking,loud", "mewing"]


@pytest.mark.parametrize("text, message", [
    ("name,labels\nbark,dog\n", "needs a video_id or filename column"),
    ("video_id,labels,mids\nbark,dog;cat,/m/1\n", "line 2"),
    ("video_id,labels,mids\nbark,dog,/m/1\nmeow,cat,/m/1\n", "given to both"),
])
def test_malformed_labels_csv_is_one_clear_error(videos, tmp_path, text, message):
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(ValueError, match=message):
        prepare(videos, tmp_path / "out", labels_csv=tmp_path / "labels.csv", workers=0, **SETTINGS)
    assert not (tmp_path / "out").exists()


def test_a_folder_without_videos_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no videos under"):
        prepare(tmp_path, tmp_path / "out")


def test_cli_arguments_and_summary(videos, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="prepare")
    add_arguments(parser)
    assert "--labels CSV" in parser.format_help() and "separated by ';' or ','" in parser.format_help()
    args = parser.parse_args([str(videos), str(tmp_path / "out"), "--workers", "0", "--frame-size", "32",
                              "--num-frames", "16", "--seconds", "2"])
    assert (args.labels, args.workers, args.frame_size, args.num_frames, args.seconds) == (None, 0, 32, 16, 2.0)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "4 done, 0 skipped (already done), 3 rejected" in printed and "manifest" in printed
    defaults = parser.parse_args(["v", "o"])
    assert (defaults.workers, defaults.frame_size, defaults.num_frames, defaults.seconds) == (2, 224, 16, 10.0)


# ---------------------------------------------------------------------------- issue 17
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def twelve(tmp_path_factory) -> Path:
    """VIDEOS/clips/v00..v11.mp4: enough decoding work for a Ctrl-C to land while workers run."""
    root = tmp_path_factory.mktemp("twelve")
    (root / "clips").mkdir()
    for i in range(12):
        write_video(root / "clips" / f"v{i:02d}.mp4", seconds=3.0)
    return root


def _spawned_children(pid: int) -> list[int]:
    """pids of the multiprocessing workers (spawn_main) whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc")
def test_a_second_ctrl_c_still_ends_prepare_promptly_and_its_output_resumes(twelve, tmp_path):
    """Item 5: `timeout -s INT` signals the process and then its group, so the parent gets SIGINT
    twice (the second during its cleanup) and the workers once; 4 of 14 such runs hung."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "tgdp_core", "prepare", str(twelve), str(out), "--workers", "2",
                             "--frame-size", "32", "--seconds", "3"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not list((out / "audio").glob("*.wav")):  # the workers are decoding
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        workers = _spawned_children(proc.pid)
        os.kill(proc.pid, signal.SIGINT)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)  # a hang fails here
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and "interrupted; the clips finished so far are kept" in err, err
    assert "Traceback" not in err, err
    assert workers and not any(_running(pid) for pid in workers)  # no worker left decoding
    assert not list(out.rglob("*.tmp"))  # the interrupted clips' temporaries are gone
    summary = prepare(twelve, out, workers=0, frame_size=32, seconds=3.0)
    assert summary.skipped >= 1 and summary.done + summary.skipped == 12 and not summary.rejects


def test_an_unusable_out_folder_is_refused_before_any_work(tmp_path):
    """Item 10: checked first (VIDEOS does not even exist here), nothing created."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(tg.folders.FolderError, match=f"{tmp_path / 'file'} is a file, not a folder; choose another OUT"):
        prepare(tmp_path / "no-videos", tmp_path / "file")
    with pytest.raises(tg.folders.FolderError, match=f"cannot create the folder {tmp_path / 'file' / 'out'}"):
        prepare(tmp_path / "no-videos", tmp_path / "file" / "out")
    if Path("/proc/self").is_dir():  # unwritable even for root
        with pytest.raises(tg.folders.FolderError, match="cannot write to /proc, where the folder /proc/tgdp-out"):
            prepare(tmp_path / "no-videos", "/proc/tgdp-out")


def test_a_changed_video_is_extracted_again(videos, tmp_path):
    """Item 13: a video whose size or mtime changed was skipped as done."""
    source = tmp_path / "videos" / "dog"
    source.mkdir(parents=True)
    for name in ("bark.mp4", "same.mp4"):
        shutil.copy2(videos / "dog" / name, source / name)
    out = tmp_path / "out"
    assert prepare(source.parent, out, workers=0, **SETTINGS).done == 2
    frame = out / "frames" / "frame_12" / "bark.jpg"
    before = frame.read_bytes()
    write_video(source / "bark.mp4", seconds=1.0)  # replaced: another length, so another frame 12
    again = prepare(source.parent, out, workers=0, **SETTINGS)
    assert (again.done, again.skipped) == (1, 1) and frame.read_bytes() != before
    os.utime(source / "same.mp4")  # touched: same size, new mtime
    assert (prepare(source.parent, out, workers=0, **SETTINGS).done, ) == (1, )
    assert prepare(source.parent, out, workers=0, **SETTINGS).skipped == 2  # unchanged: done
    (out / "sources.jsonl").unlink()  # an OUT prepared before the stamps: videos older than their wavs are done
    assert prepare(source.parent, out, workers=0, **SETTINGS).skipped == 2
    future = time.time() + 3600
    os.utime(source / "bark.mp4", (future, future))
    (out / "sources.jsonl").unlink()
    assert prepare(source.parent, out, workers=0, **SETTINGS).done == 1  # newer than its wav: extracted again


def test_labels_csv_lists_only_labels_of_kept_clips_and_link_loops_are_rejects(videos, tmp_path):
    """Item 13: a label only rejected videos had, and symbolic-link loops (dropped silently)."""
    root = tmp_path / "videos"
    (root / "dog").mkdir(parents=True)
    (root / "ghost").mkdir()
    shutil.copy2(videos / "dog" / "bark.mp4", root / "dog" / "bark.mp4")
    shutil.copy2(videos / "cat" / "broken.mp4", root / "ghost" / "broken.mp4")  # ghost's only video is bad
    (root / "dog" / "loop.mp4").symlink_to("loop.mp4")
    (root / "dog" / "gone.mp4").symlink_to("missing.mp4")
    summary = prepare(root, tmp_path / "out", workers=0, **SETTINGS)
    assert summary.done == 1
    reasons = dict(summary.rejects)
    assert "symbolic link loop" in reasons[str(root / "dog" / "loop.mp4")]
    assert "broken symbolic link" in reasons[str(root / "dog" / "gone.mp4")]
    assert "truncated" in reasons[str(root / "ghost" / "broken.mp4")]
    assert read_csv(tmp_path / "out" / "labels.csv") == [["index", "mid", "display_name"], ["0", "dog", "dog"]]
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root / 'dog' / 'bark.mp4'}\n{root / 'dog' / 'loop.mp4'}\n")
    listed = prepare(listing, tmp_path / "out2", workers=0, **SETTINGS)
    assert listed.done == 1 and "symbolic link loop" in dict(listed.rejects)[str(root / "dog" / "loop.mp4")]
