"""``python -m tgdp_core prepare VIDEOS OUT``: videos -> the CAV-MAE data layout.

    OUT/audio/{video_id}.wav                  16 kHz mono PCM16, exactly --seconds long
    OUT/frames/frame_{i}/{video_id}.jpg       --num-frames frames, evenly spaced over --seconds
    OUT/manifest.json                         {"data": [{"video_id", "wav", "video_path", "labels"}]}
    OUT/labels.csv                            index,mid,display_name
    OUT/rejects.csv                           path,reason: every video that could not be used
    OUT/prepare.json                          the settings, so a resumed run cannot mix two
    OUT/sources.jsonl                         each clip's video as extracted: path, size, mtime

Runs are resumable: a clip whose wav and frames all exist and whose video is unchanged since
it was extracted (same size and modification time) is skipped and kept in the manifest; Ctrl-C
stops the workers at once (a second one cannot hang it) and keeps every finished clip.
A bad video never stops the batch; it is listed with its reason in the summary and rejects.csv.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import multiprocessing
import re
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .folders import check_writable
from .formats import SAMPLE_RATE
from .media import MediaError, clip_paths, extract_clip, temporary_name, write_atomic

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
SHOWN_REJECTS = 20  # rejects printed in the summary; all of them are in rejects.csv
SOURCES = "sources.jsonl"  # one line per extracted clip: {"video_id", "path", "size", "mtime_ns"}

LABELS_HELP = """\
labels: without --labels a video's label is the name of the folder that holds it
(VIDEOS/dog/clip1.mp4 -> "dog"; a video directly in VIDEOS gets VIDEOS's own name).
With --labels CSV, the CSV has a header row and one row per video:
  video_id  the video's id: its file stem (clip1 for dog/clip1.mp4); stems shared by several
            files get a suffix, _ and 8 hex digits of their path, to keep ids unique
  filename  instead of video_id: the file name (clip1.mp4), folders ignored
  labels    one or more label names separated by ';' or ',' (quote a field holding commas):
            dog;animal  or  "dog,animal"
  mids      optional, the labels' ids in the same order, e.g. AudioSet mids /m/0bt9lr;/m/0jbk.
            Without it a label's id (its mid in labels.csv and the manifest) is its name.
`label` and `mid` are accepted for `labels` and `mids`; a CSV may give mids only. A video listed
twice gets the labels of both rows; a video the CSV does not list is rejected.
labels.csv lists every label that some clip of the manifest has, sorted by display name.
"""

Label = tuple[str, str]  # (mid, display_name)


@dataclass
class PrepareSummary:
    """What a prepare run did; ``str(summary)`` is the report the CLI prints."""

    done: int  # clips extracted by this run
    skipped: int  # clips already complete in OUT (a resumed run); still in the manifest
    rejects: list[tuple[str, str]]  # (video path, reason), also in OUT/rejects.csv
    manifest: Path
    elapsed: float  # seconds
    padded: int = 0  # clips of this run shorter than --seconds: silence / last frame appended
    notes: list[str] = field(default_factory=list)  # things the user should know, e.g. unused CSV rows

    @property
    def rejected(self) -> int:
        return len(self.rejects)

    def __str__(self) -> str:
        lines = [f"prepare: {self.done} done, {self.skipped} skipped (already done), {self.rejected} rejected "
                 f"in {self.elapsed:.1f} s"]
        if self.padded:
            lines.append(f"  {self.padded} clip(s) were shorter than the clip length and were padded")
        lines += [f"  note: {note}" for note in self.notes]
        for path, reason in self.rejects[:SHOWN_REJECTS]:
            lines.append(f"  rejected {path}: {reason}")
        if self.rejected > SHOWN_REJECTS:
            lines.append(f"  ... and {self.rejected - SHOWN_REJECTS} more")
        out = self.manifest.parent
        lines.append(f"  manifest {self.manifest} ({self.done + self.skipped} clips), labels {out / 'labels.csv'}"
                     + (f", rejects {out / 'rejects.csv'}" if self.rejects else ""))
        return "\n".join(lines)


@dataclass
class _Video:
    path: Path
    video_id: str
    labels: list[Label] = field(default_factory=list)


def prepare(videos: str | Path, out_dir: str | Path, labels_csv: str | Path | None = None, workers: int = 2,
            frame_size: int = 224, num_frames: int = 16, seconds: float = 10.0) -> PrepareSummary:
    """Extract audio and frames of every video into ``out_dir`` and write its manifest and labels.

    ``videos`` is a folder, searched recursively for .mp4 .webm .mkv .avi .mov (any case), or a
    text file with one video path per line (relative paths are relative to the text file's
    folder; blank lines and lines starting with # are ignored). Labels: see LABELS_HELP.
    ``workers`` processes decode in parallel; 0 or 1 decodes in this process.
    Raises ValueError for unusable arguments (no videos, a malformed labels CSV, an OUT folder
    prepared with other settings); problems with single videos become rejects instead.
    """
    start = time.perf_counter()
    if num_frames < 1 or frame_size < 1 or not seconds > 0:
        raise ValueError(f"num_frames ({num_frames}), frame_size ({frame_size}) and seconds ({seconds}) "
                         "must be positive")
    out = Path(out_dir).resolve()
    check_writable(out, "choose another OUT folder", create=False)
    listed, rejects = find_videos(videos)
    found = _assign_ids(listed)
    notes: list[str] = []
    if labels_csv is None:
        vocabulary = _folder_labels(found)
    else:
        vocabulary, unlisted, unused = _csv_labels(found, labels_csv)
        rejects += [(str(v.path), f"not listed in the labels CSV {labels_csv}") for v in unlisted]
        if unused:
            notes.append(f"{unused} row(s) of {labels_csv} match no video")
        found = [v for v in found if v.labels]
    _claim(out, {"sample_rate": SAMPLE_RATE, "seconds": float(seconds), "num_frames": num_frames,
                 "frame_size": frame_size})

    sources = _read_sources(out)
    pending = [v for v in found if not _complete(out, v, num_frames, sources.get(v.video_id))]
    extracted, failed = _extract_all(pending, out, workers, frame_size=frame_size, num_frames=num_frames,
                                     seconds=seconds)
    rejects += failed
    rejects.sort()
    unfinished = {v.video_id for v in pending} - set(extracted)
    kept = [v for v in found if v.video_id not in unfinished]

    manifest = out / "manifest.json"
    entries = [{"video_id": v.video_id, "wav": str(clip_paths(out, v.video_id, num_frames)[0]),
                "video_path": str(out / "frames"), "labels": ",".join(mid for mid, _ in v.labels)}
               for v in sorted(kept, key=lambda v: v.video_id)]
    write_atomic(manifest, lambda tmp: Path(tmp).write_text(json.dumps({"data": entries}, indent=1) + "\n"))
    _write_sources(out, kept, {**sources, **_read_sources(out)})
    used = {label for v in kept for label in v.labels}  # labels only rejected videos had are left out
    _write_csv(out / "labels.csv", ["index", "mid", "display_name"],
               [(i, mid, name) for i, (mid, name) in enumerate(label for label in vocabulary if label in used)])
    _write_csv(out / "rejects.csv", ["path", "reason"], rejects)
    padded = sum(1 for r in extracted.values() if r["audio_seconds"] < seconds - 1e-3 or r["padded_frames"])
    return PrepareSummary(done=len(extracted), skipped=len(found) - len(pending), rejects=rejects,
                          manifest=manifest, elapsed=time.perf_counter() - start, padded=padded, notes=notes)


# ---------------------------------------------------------------------------- inputs
def find_videos(videos: str | Path) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """(absolute path, key) of every video in a folder (recursive) or listed in a text file, and
    (path, reason) of the video names that cannot be followed: symbolic-link loops, links to nothing.

    The key is the path relative to the folder, or the list file's line as written; it
    disambiguates ids of files that share a stem. A file listed twice counts once (its first
    key); sorted by path, for determinism.
    """
    root = Path(videos)
    if root.is_dir():
        named = [(p, p.relative_to(root).as_posix()) for p in root.rglob("*")
                 if p.suffix.lower() in VIDEO_EXTENSIONS and (p.is_file() or p.is_symlink())]
        where = f"under {root} (searched for {' '.join(VIDEO_EXTENSIONS)}, any case)"
    elif root.is_file():
        lines = [line.strip() for line in root.read_text().splitlines()]
        named = [(root.parent / line, line) for line in lines if line and not line.startswith("#")]
        where = f"listed in {root}"
    else:
        raise ValueError(f"VIDEOS {root} is neither a folder of videos nor a text file listing them")
    unique: dict[Path, str] = {}
    unusable = []
    for path, key in named:
        try:
            resolved = path.resolve()
        except (RuntimeError, OSError):  # Python < 3.13 raises RuntimeError for a loop, later ones OSError
            unusable.append((str(path.absolute()), "a symbolic link loop (the link leads back to itself)"))
            continue
        if path.is_symlink() and not resolved.exists():
            unusable.append((str(path.absolute()), f"a broken symbolic link (its target {resolved} does not exist)"))
            continue
        unique.setdefault(resolved, key)
    if not unique and not unusable:
        raise ValueError(f"no videos {where}")
    return sorted(unique.items()), unusable


def _assign_ids(found: list[tuple[Path, str]]) -> list[_Video]:
    """Ids are file stems; files sharing a stem all get _<8 hex of sha1(key)>: a hash of the path,
    not a counter, so ids do not depend on the order files are found in and a resumed run
    finds its clips again."""
    stems = Counter(path.stem for path, _ in found)
    videos = []
    for path, key in found:
        video_id = path.stem
        if stems[video_id] > 1:
            video_id += "_" + hashlib.sha1(key.encode()).hexdigest()[:8]
        videos.append(_Video(path, video_id))
    return videos


def _folder_labels(videos: list[_Video]) -> list[Label]:
    """Each video's label is its folder's name; its id is the name with commas replaced, since
    the manifest separates label ids with commas."""
    for video in videos:
        name = video.path.parent.name
        video.labels = [(name.replace(",", "_"), name)]
    return _vocabulary([label for v in videos for label in v.labels], "the folder names")


def _csv_labels(videos: list[_Video], labels_csv: str | Path) -> tuple[list[Label], list[_Video], int]:
    """Labels from a user CSV (format: LABELS_HELP). Returns (vocabulary, unlisted videos,
    number of rows that match no video); videos get their labels in place."""
    key_column, table = read_labels_csv(labels_csv)
    used = set()
    unlisted = []
    for video in videos:
        key = video.video_id if key_column == "video_id" else video.path.name
        video.labels = table.get(key, [])
        if video.labels:
            used.add(key)
        else:
            unlisted.append(video)
    vocabulary = _vocabulary([label for labels in table.values() for label in labels], str(labels_csv))
    return vocabulary, unlisted, len(set(table) - used)


def read_labels_csv(path: str | Path) -> tuple[str, dict[str, list[Label]]]:
    """Parse a labels CSV (format: LABELS_HELP) -> (key column, {video_id or filename: labels})."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets add a BOM
        reader = csv.DictReader(f)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        key_column = next((c for c in ("video_id", "filename") if c in columns), None)
        names_column = next((columns[c] for c in ("labels", "label") if c in columns), None)
        mids_column = next((columns[c] for c in ("mids", "mid") if c in columns), None)
        if key_column is None or (names_column is None and mids_column is None):
            raise ValueError(f"labels CSV {path} needs a video_id or filename column and a labels (or mids) "
                             f"column; its header is {', '.join(reader.fieldnames or [])}")
        table: dict[str, list[Label]] = {}
        for row_number, row in enumerate(reader, start=2):
            key = (row[columns[key_column]] or "").strip()
            names = _split(row[names_column]) if names_column else []
            mids = _split(row[mids_column]) if mids_column else names
            names = names or mids
            if not key or not names or len(mids) != len(names):
                raise ValueError(f"labels CSV {path}, line {row_number}: expected a {key_column} and as many "
                                 f"mids as labels, got {dict(row)}")
            labels = table.setdefault(key, [])
            labels += [label for label in zip(mids, names) if label not in labels]
    return key_column, table


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in re.split(r"[;,]", text or "") if part.strip()]


def _vocabulary(labels: list[Label], source: str) -> list[Label]:
    """The distinct labels sorted by display name; one mid must not name two labels."""
    names: dict[str, str] = {}
    for mid, name in labels:
        if names.setdefault(mid, name) != name:
            raise ValueError(f"{source}: label id {mid!r} is given to both {names[mid]!r} and {name!r}")
    return sorted(((mid, name) for mid, name in names.items()), key=lambda label: (label[1], label[0]))


def _claim(out: Path, settings: dict[str, Any]) -> None:
    """Record the settings in OUT/prepare.json; refuse an OUT prepared with others, whose clips
    would otherwise be skipped as done and mixed with new ones."""
    record = out / "prepare.json"
    if record.exists():
        previous = json.loads(record.read_text())
        if previous != settings:
            raise ValueError(f"{out} was prepared with {previous}; this run asks for {settings}. "
                             "Use the same settings to resume, or another OUT folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(record, lambda tmp: Path(tmp).write_text(json.dumps(settings) + "\n"))


def _complete(out: Path, video: _Video, num_frames: int, recorded: dict[str, Any] | None) -> bool:
    """Whether the clip is done: every file exists (each is renamed into place only once fully
    written) and the video is the one extracted: the size and mtime ``sources.jsonl`` recorded,
    or, for clips extracted before it existed, no newer than the wav. A video that is gone is
    trusted to be the one extracted (its clip stays)."""
    wav, frames = clip_paths(out, video.video_id, num_frames)
    if not (wav.exists() and all(frame.exists() for frame in frames)):
        return False
    try:
        now = _stamp(video.path)
    except OSError:
        return True
    if recorded is None:
        return now["mtime_ns"] <= wav.stat().st_mtime_ns
    return recorded == now


def _stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_sources(out: Path) -> dict[str, dict[str, Any]]:
    """{video_id: stamp} from OUT/sources.jsonl; the last line per clip wins, a line cut short by a kill is ignored."""
    try:
        lines = (out / SOURCES).read_text().splitlines()
    except FileNotFoundError:
        return {}
    stamps = {}
    for line in lines:
        try:
            entry = json.loads(line)
            stamps[entry.pop("video_id")] = entry
        except (ValueError, KeyError, AttributeError):
            continue
    return stamps


def _write_sources(out: Path, kept: list[_Video], stamps: dict[str, dict[str, Any]]) -> None:
    """Rewrite OUT/sources.jsonl with one line per clip of the manifest (compacting the appends)."""
    lines = [json.dumps({"video_id": v.video_id, **stamps[v.video_id]}) + "\n" for v in kept if v.video_id in stamps]
    write_atomic(out / SOURCES, lambda tmp: Path(tmp).write_text("".join(lines)))


# ---------------------------------------------------------------------------- extraction
def _extract_all(videos: list[_Video], out: Path, workers: int,
                 **settings: Any) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str]]]:
    """Extract every video, in ``workers`` processes. Returns ({video_id: extract_clip result},
    [(path, reason)] of the failures). Each finished clip's video stamp is appended to
    OUT/sources.jsonl at once, so an interrupted run keeps it."""
    extracted: dict[str, dict[str, Any]] = {}
    failed: list[tuple[str, str]] = []
    stamps = {v.video_id: _stamp(v.path) for v in videos if v.path.exists()}  # as read, before extraction
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(videos), desc="prepare", unit="video", disable=not videos) as bar, \
            open(out / SOURCES, "a") as sources:

        def collect(video: _Video, outcome: tuple[dict[str, Any] | None, str]) -> None:
            result, reason = outcome
            if result is None:
                failed.append((str(video.path), reason))
            else:
                extracted[video.video_id] = result
                if video.video_id in stamps:
                    sources.write(json.dumps({"video_id": video.video_id, **stamps[video.video_id]}) + "\n")
                    sources.flush()
            bar.update()

        if workers <= 1 or len(videos) <= 1:
            for video in videos:
                collect(video, _extract_one(video.path, out, video.video_id, settings))
        else:
            _extract_parallel(videos, out, min(workers, len(videos)), settings, collect)
    return extracted, failed


def _extract_parallel(videos: list[_Video], out: Path, workers: int, settings: dict[str, Any], collect) -> None:
    """``_extract_one`` of every video in ``workers`` spawned processes, results to ``collect``.

    Ctrl-C (or any error) stops the workers at once instead of letting them finish their
    videos: what is finished is complete, what is not has only temporary files, which are
    removed. The workers ignore SIGINT, so only this process decides.
    """
    # spawn: decoding in a fork of a process that has started torch's threads can deadlock.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
    before = set(multiprocessing.active_children())
    futures = {}
    try:
        with _sigint_ignored():  # inherited: the workers start (on the first submits) ignoring Ctrl-C
            for v in videos[:workers]:
                futures[pool.submit(_extract_one, v.path, out, v.video_id, settings)] = v
        for v in videos[workers:]:
            futures[pool.submit(_extract_one, v.path, out, v.video_id, settings)] = v
        for future in as_completed(futures):
            try:
                outcome = future.result()
            except BrokenProcessPool:
                outcome = (None, "a worker process died (this or another video crashed the decoder); "
                                 "run prepare again to retry, finished clips are kept")
            collect(futures[future], outcome)
    except BaseException:
        with _sigint_ignored():  # milliseconds of cleanup that a second Ctrl-C must not cut short
            pool.shutdown(wait=False, cancel_futures=True)
            processes = [p for p in multiprocessing.active_children() if p not in before]  # the pool's workers
            _stop(processes, [futures[f] for f in futures if not f.done()], out, settings["num_frames"])
        raise
    pool.shutdown()


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent handles it
    torch.set_num_threads(1)  # one decoding thread per process: the processes already use the cores


def _stop(processes: list, unfinished: list[_Video], out: Path, num_frames: int) -> None:
    """Terminate the worker ``processes`` now and delete the temporary files they were writing
    for the ``unfinished`` clips (write_atomic names them after the writer's pid)."""
    for p in processes:
        p.terminate()
    for p in processes:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    for video in unfinished:
        wav, frames = clip_paths(out, video.video_id, num_frames)
        for path in (wav, *frames):
            for p in processes:
                temporary_name(path, p.pid).unlink(missing_ok=True)


@contextmanager
def _sigint_ignored():
    """SIGINT ignored inside the block (in the main thread; no other thread can set signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _extract_one(path: Path, out: Path, video_id: str, settings: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """extract_clip that reports instead of raising: (result, "") or (None, reason)."""
    try:
        return extract_clip(path, out, video_id, sample_rate=SAMPLE_RATE, **settings), ""
    except MediaError as err:
        return None, err.reason
    except Exception as err:  # noqa: BLE001 - one odd file must not stop a batch of thousands
        return None, f"unexpected {type(err).__name__} while extracting: {err}"


def _write_csv(path: Path, header: list[str], rows: list[tuple[Any, ...]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text.getvalue()))


# ---------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register prepare's arguments on a (sub)parser."""
    parser.description = __doc__.split("\n\n")[0].replace("``", "")
    parser.epilog = LABELS_HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the epilog's layout
    parser.add_argument("videos", metavar="VIDEOS",
                        help="a folder of videos (searched recursively for .mp4 .webm .mkv .avi .mov) "
                             "or a text file with one video path per line")
    parser.add_argument("out", metavar="OUT", help="output folder: audio/, frames/, manifest.json, labels.csv, "
                                                   "rejects.csv")
    parser.add_argument("--labels", metavar="CSV", help="labels CSV (format below); default: folder names")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="decoding processes; 0 or 1 decodes in this process (default: 2)")
    parser.add_argument("--frame-size", type=int, default=224, metavar="PIXELS",
                        help="side of the square frames (default: 224)")
    parser.add_argument("--num-frames", type=int, default=16, metavar="N",
                        help="frames per clip, evenly spaced over --seconds (default: 16)")
    parser.add_argument("--seconds", type=float, default=10.0, metavar="S",
                        help="clip length; audio is padded or cut to it (default: 10)")


def main(args: argparse.Namespace) -> int:
    """Run prepare from parsed arguments and print its summary; exit status 0 when the manifest
    holds at least one clip, 1 otherwise. Bad arguments raise ValueError."""
    try:
        summary = prepare(args.videos, args.out, labels_csv=args.labels, workers=args.workers,
                          frame_size=args.frame_size, num_frames=args.num_frames, seconds=args.seconds)
    except KeyboardInterrupt:
        print(f"\nprepare: interrupted; the clips finished so far are kept in {args.out}: run the same command "
              "again to resume", file=sys.stderr)
        return 130
    print(summary)
    return 0 if summary.done + summary.skipped else 1
