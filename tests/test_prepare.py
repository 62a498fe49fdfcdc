"""`prepare`: a folder or list of videos -> wavs, frames, manifest, labels, rejects; resumable."""
import argparse
import csv
import json
import os
from pathlib import Path

import pytest
import soundfile as sf
from PIL import Image

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
    assert read_csv(tmp_path / "out" / "labels.csv") == [
        ["index", "mid", "display_name"], ["0", "/m/0jbk", "Animal"], ["1", "/m/01yrx", "Cat"],
        ["2", "/m/01xq0k1", "Cow"], ["3", "/m/0bt9lr", "Dog"]]


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
