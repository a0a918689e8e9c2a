"""Videos (or photos) -> face crops: `out/{real,fake}/<video>/<frame>.jpg` plus an index CSV.

    python -m preprocessing.extract_faces --src /data/celebdf/videos --out /data/celebdf/faces \
        [--every_k 10 | --n_frames 32] [--margin 0.3] [--size 224] [--border shift|reflect] [--track]

`--src` holds `{real,fake}/**` videos (.mp4 .avi .mov .mkv .webm) and/or photos; a single video or
photo file also works (its label is then unknown). Faces come from facenet-pytorch's MTCNN (weights
ship in the wheel), batched over frames. The square crop is the face box grown by `margin`; where it
leaves the frame it is shifted inside (default) or the frame is reflect-padded, never filled with a
constant colour (a constant border is a dataset signature detectors learn). Outputs:
  out/{real,fake}/<video>/<frame:06d>.jpg   photos: out/{real,fake}/<name>.jpg (same layout as the input)
  out/faces_index.csv        video, frame, path, x1, y1, x2, y2, det_score, label, outside_fraction
  out/extraction_report.csv  video, reason   (could not open, no frames, no face, errors)
Resumable: each finished source is appended to out/.extraction_state.jsonl and skipped next time.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Literal

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from preprocessing.faces import Border, FaceDetector, crop_face, pick_face
from core.naming import CLASS_RE as _CLASS_RE, IMAGE_EXTENSIONS  # the class-folder spelling and photo types of training data
from core.cli import ArgumentParser

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
INDEX_FILE, REPORT_FILE, STATE_FILE = "faces_index.csv", "extraction_report.csv", ".extraction_state.jsonl"
INDEX_COLUMNS = ["video", "frame", "path", "x1", "y1", "x2", "y2", "det_score", "label", "outside_fraction"]


@dataclass(frozen=True)
class ExtractOptions:
    every_k: int = 10  # keep every k-th frame (ignored when n_frames is set)
    n_frames: int | None = None  # N evenly spaced frames per video instead
    margin: float = 0.3  # square crop side = (1 + margin) * longer box side
    size: int = 224
    border: Border = "shift"
    track: bool = False  # keep the face nearest the previous frame's box instead of the largest
    min_score: float = 0.9  # MTCNN probability below which a detection is ignored
    batch_size: int = 16  # frames per MTCNN call
    detect_max_side: int = 640  # frames are downscaled to this for detection (boxes mapped back); 0 = off
    jpeg_quality: int = 95
    device: str = "cpu"


@dataclass(frozen=True)
class SourceItem:
    path: Path
    label: str  # "real" | "fake" | "" (unknown)
    key: str  # output id relative to out/, e.g. "fake/Deepfakes/000_003"
    kind: Literal["video", "image"]


@dataclass
class ExtractSummary:
    out_dir: Path
    processed: int = 0
    resumed: int = 0  # finished in an earlier run, skipped
    faces: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (video, reason), this run and earlier ones
    index_path: Path | None = None
    report_path: Path | None = None


# ------------------------------------------------------------------------------ sources and frames
def find_sources(src: Path) -> list[SourceItem]:
    """Videos and photos under src/{real,fake}/** (class folders as in dataio.data), or src itself."""
    src = Path(src)
    if src.is_file():
        kind = "video" if src.suffix.lower() in VIDEO_EXTENSIONS else "image"
        return [SourceItem(src, "", src.stem, kind)]
    if not src.is_dir():
        raise FileNotFoundError(f"--src not found: {src}")
    items: list[SourceItem] = []
    class_dirs = sorted(d for d in src.iterdir() if d.is_dir() and _CLASS_RE.match(d.name))
    if not class_dirs:
        raise ValueError(f"{src} has no real/ or fake/ folder; expected SRC/{{real,fake}}/** videos or photos")
    for d in class_dirs:
        label = _CLASS_RE.match(d.name).group(1).lower()  # type: ignore[union-attr]
        for p in sorted(d.rglob("*")):
            ext = p.suffix.lower()
            if p.is_file() and (ext in VIDEO_EXTENSIONS or ext in IMAGE_EXTENSIONS) and not p.name.startswith("."):
                rel = p.relative_to(d).with_suffix("").as_posix()
                items.append(SourceItem(p, label, f"{label}/{rel}", "video" if ext in VIDEO_EXTENSIONS else "image"))
    keys = [it.key for it in items]  # a.mp4 beside a.avi: keep both, told apart by their extension
    return [replace(it, key=f"{it.key}_{it.path.suffix[1:].lower()}") if keys.count(it.key) > 1 else it for it in items]


def frame_indices(total: int, every_k: int = 10, n_frames: int | None = None) -> list[int]:
    """Which frames to keep: N evenly spaced (n_frames) or every k-th, out of `total`."""
    if total <= 0:
        return []
    if n_frames:
        return sorted({int(round(x)) for x in np.linspace(0, total - 1, min(n_frames, total))})
    return list(range(0, total, max(every_k, 1)))


def _frame_count(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    if n <= 0:  # some containers do not store it: count by grabbing
        while cap.grab():
            n += 1
    cap.release()
    return n


class VideoReadError(RuntimeError):
    """A video that OpenCV cannot open or decode."""


def iter_video_frames(path: Path, opts: ExtractOptions) -> Iterator[tuple[int, np.ndarray]]:
    """(frame number, RGB uint8) for the kept frames; grab() skips the rest without decoding them."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoReadError("cannot open video")
    try:
        wanted: set[int] | None = set(frame_indices(_frame_count(path), n_frames=opts.n_frames)) if opts.n_frames else None
        last = max(wanted) if wanted else None
        i = 0
        while cap.grab():
            if (i in wanted) if wanted is not None else i % opts.every_k == 0:
                ok, bgr = cap.retrieve()
                if ok and bgr is not None:
                    yield i, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            if last is not None and i >= last:
                break
            i += 1
    finally:
        cap.release()


def _batches(frames: Iterator[tuple[int, np.ndarray]], n: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    """Groups of up to n frames of one size (MTCNN batches need equal shapes)."""
    batch: list[tuple[int, np.ndarray]] = []
    for f in frames:
        if batch and (len(batch) == n or f[1].shape != batch[0][1].shape):
            yield batch
            batch = []
        batch.append(f)
    if batch:
        yield batch


# ------------------------------------------------------------------------------ one source
def _row(item: SourceItem, frame: int, rel_path: str, box: np.ndarray, score: float, frac: float) -> dict:
    x1, y1, x2, y2 = (round(float(v), 2) for v in box)
    return {"video": item.key, "frame": frame, "path": rel_path, "x1": x1, "y1": y1, "x2": x2, "y2": y2,
            "det_score": round(float(score), 5), "label": item.label, "outside_fraction": round(frac, 5)}


def _write_jpeg(path: Path, rgb: np.ndarray, quality: int) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]):
        raise OSError(f"cannot write {path}")


def extract_video(item: SourceItem, out_dir: Path, detector: FaceDetector, opts: ExtractOptions) -> tuple[list[dict], str | None]:
    """Crop the face in the kept frames of one video into out_dir/<key>/ (written atomically).

    Returns (index rows, failure reason or None); frames without a face are left out.
    """
    final = out_dir / item.key
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows: list[dict] = []
    previous: np.ndarray | None = None
    seen = 0
    try:
        for batch in _batches(iter_video_frames(item.path, opts), opts.batch_size):
            seen += len(batch)
            for (idx, rgb), (boxes, scores) in zip(batch, detector.detect(np.stack([f for _, f in batch]))):
                k = pick_face(boxes, scores, previous if opts.track else None, opts.min_score)
                if k is None:
                    continue
                previous = boxes[k]
                crop, frac = crop_face(rgb, boxes[k], opts.margin, opts.size, opts.border)
                _write_jpeg(tmp / f"{idx:06d}.jpg", crop, opts.jpeg_quality)
                rows.append(_row(item, idx, f"{item.key}/{idx:06d}.jpg", boxes[k], scores[k], frac))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, VideoReadError):
            return [], str(e)
        raise
    if not rows:
        shutil.rmtree(tmp, ignore_errors=True)
        return [], "no frames decoded" if seen == 0 else f"no face found in {seen} frames"
    shutil.rmtree(final, ignore_errors=True)  # a folder left by a run that crashed before recording it
    tmp.rename(final)
    return rows, None


def extract_image(item: SourceItem, out_dir: Path, detector: FaceDetector, opts: ExtractOptions) -> tuple[list[dict], str | None]:
    """Crop the largest face of one photo to out_dir/<key>.jpg."""
    bgr = cv2.imread(str(item.path), cv2.IMREAD_COLOR)
    if bgr is None:
        return [], "cannot read image"
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    boxes, scores = detector.detect(rgb[None])[0]
    k = pick_face(boxes, scores, None, opts.min_score)
    if k is None:
        return [], "no face found"
    crop, frac = crop_face(rgb, boxes[k], opts.margin, opts.size, opts.border)
    target = out_dir / f"{item.key}.jpg"
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_jpeg(target, crop, opts.jpeg_quality)
    return [_row(item, 0, f"{item.key}.jpg", boxes[k], scores[k], frac)], None


# ------------------------------------------------------------------------------ a whole folder
def _read_state(path: Path) -> dict[str, dict]:
    state: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                state[entry["key"]] = entry
            except (json.JSONDecodeError, KeyError):  # a line cut by a crash: that source is redone
                continue
    return state


def _ends_mid_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def extract_dataset(src: str | Path, out: str | Path, opts: ExtractOptions = ExtractOptions(),
                    detector: FaceDetector | None = None, progress: bool = True,
                    retry_failed: bool = False) -> ExtractSummary:
    """Extract faces from every source under `src` into `out`; resumes where a previous run stopped
    (sources that failed then are skipped too, unless `retry_failed`)."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = find_sources(Path(src))
    state_path = out_dir / STATE_FILE
    state = _read_state(state_path)
    options_path = out_dir / "extraction_options.json"
    if state and options_path.is_file() and json.loads(options_path.read_text()) != json.loads(json.dumps(asdict(opts))):
        log.warning("event=options_changed out=%s: finished sources keep the crops of the earlier options", out_dir)
    options_path.write_text(json.dumps(asdict(opts), indent=1))
    summary = ExtractSummary(out_dir)
    todo = [it for it in items if it.key not in state or (retry_failed and state[it.key]["reason"])]
    summary.resumed = len(items) - len(todo)
    if todo:
        detector = detector or FaceDetector(opts.device, opts.detect_max_side)
    log.info("event=extract_start src=%s out=%s sources=%d resumed=%d", src, out_dir, len(items), summary.resumed)
    with state_path.open("a") as state_file:
        if _ends_mid_line(state_path):
            state_file.write("\n")  # a line cut by a crash must not swallow the next entry
        for item in tqdm(todo, desc="faces", unit="src", disable=not progress or None):
            try:
                fn = extract_video if item.kind == "video" else extract_image
                rows, reason = fn(item, out_dir, detector, opts)  # type: ignore[arg-type]
            except Exception as e:  # one bad file must never stop a long extraction
                rows, reason = [], f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            entry = {"key": item.key, "source": str(item.path), "reason": reason, "rows": rows}
            state_file.write(json.dumps(entry) + "\n")
            state_file.flush()
            state[item.key] = entry
            summary.processed += 1
            if reason:
                log.warning("event=extract_failed video=%s reason=%s", item.key, reason)
    keys = {it.key for it in items}
    rows = [r for k, e in state.items() if k in keys for r in e["rows"]]
    summary.failed = [(k, e["reason"]) for k, e in state.items() if k in keys and e["reason"]]
    summary.faces = len(rows)
    summary.index_path, summary.report_path = out_dir / INDEX_FILE, out_dir / REPORT_FILE
    pd.DataFrame(rows, columns=INDEX_COLUMNS).to_csv(summary.index_path, index=False)
    pd.DataFrame(summary.failed, columns=["video", "reason"]).to_csv(summary.report_path, index=False)
    log.info("event=extract_done processed=%d resumed=%d faces=%d failed=%d index=%s", summary.processed,
             summary.resumed, summary.faces, len(summary.failed), summary.index_path)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m preprocessing.extract_faces", description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="folder with {real,fake}/** videos or photos, or one file")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--every_k", type=int, default=10, help="keep every k-th frame (default 10)")
    which.add_argument("--n_frames", type=int, default=None, help="keep N evenly spaced frames instead")
    p.add_argument("--margin", type=float, default=0.3, help="crop side = (1 + margin) x face box (default 0.3)")
    p.add_argument("--size", type=int, default=224, help="crop size in pixels (default 224)")
    p.add_argument("--border", choices=("shift", "reflect"), default="shift", help="box leaving the frame")
    p.add_argument("--track", action="store_true", help="follow the same face instead of the largest")
    p.add_argument("--min_score", type=float, default=0.9, help="MTCNN probability threshold (default 0.9)")
    p.add_argument("--batch_size", type=int, default=16, help="frames per MTCNN call")
    p.add_argument("--detect_max_side", type=int, default=640, help="detect on frames downscaled to this; 0 = off")
    p.add_argument("--device", default="cpu", help="MTCNN device (cpu, cuda)")
    p.add_argument("--retry_failed", action="store_true", help="try the sources reported as failed again")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = ExtractOptions(every_k=args.every_k, n_frames=args.n_frames, margin=args.margin, size=args.size,
                          border=args.border, track=args.track, min_score=args.min_score,
                          batch_size=args.batch_size, detect_max_side=args.detect_max_side, device=args.device)
    if opts.every_k < 1 or (opts.n_frames is not None and opts.n_frames < 1) or opts.margin < 0 or opts.size < 8:
        print("error: --every_k/--n_frames must be >= 1, --margin >= 0, --size >= 8")
        return 2
    try:
        s = extract_dataset(args.src, args.out, opts, retry_failed=args.retry_failed)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    print(f"{s.faces} face crops from {s.processed} new source(s) ({s.resumed} done earlier), "
          f"{len(s.failed)} failed -> {s.index_path} (report: {s.report_path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
