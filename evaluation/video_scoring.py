"""Video-level scores: frame models are aggregated per video, the dual-stream model scores clips.

    python -m evaluation.video_scoring --checkpoint RUN/best.pt --pairs training_pairs.csv --output-dir results
    python -m evaluation.video_scoring --checkpoint RUN/best.pt --data-dir FACES --rule confident
    python -m evaluation.video_scoring --checkpoint RUN/best.pt --video-dir FACES/fake/id10_id3_0003
    python -m evaluation.video_scoring --checkpoint RUN/best.pt --video clip.mp4    # extracts faces first

Writes to the output folder:
  predictions.csv        one row per video: video, label (1 fake, 0 real, -1 unknown), score, prediction,
                         n_frames[, subset]
  frame_predictions.csv  frame models only: path, label, score, logit, group (= video)
  metrics.json           {"video": {auc, ap, eer, accuracy, ...}, "frame": {...} (frame models),
                          "rule", "n_videos", "model_kind"}; metrics need labelled real and fake videos
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from evaluation.aggregation import AGGREGATORS, aggregate_groups
from evaluation.metrics import MetricError, binary_metrics
from models.video import DualStreamDetector
from dataio.data import _CLASS_RE, _LABEL_WORDS, Sample
from dataio.loaders import ImageDataset, collate_drop_none
from core.device import resolve_device
from evaluation.inference import predict
from dataio.video_data import (
    VideoClipDataset, VideoSettings, collate_clips, find_videos, frame_samples, list_frames, read_pairs,
)
from core.cli import ArgumentParser

log = logging.getLogger(__name__)

PREDICTIONS_FILE, FRAMES_FILE, METRICS_FILE = "predictions.csv", "frame_predictions.csv", "metrics.json"
REPORTED = ("auc", "ap", "eer", "accuracy", "precision", "recall", "f1", "log_loss")


# ------------------------------------------------------------------------------ model
def load_model(checkpoint: str | Path) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode on CPU, its training Config) rebuilt from a checkpoint; no weights download."""
    from models.build import load_trained_model

    trained = load_trained_model(checkpoint, "cpu")
    return trained.model.to(memory_format=torch.contiguous_format), trained.config


# ------------------------------------------------------------------------------ which videos
def label_from_path(path: str | Path) -> int:
    """1 / 0 when the nearest class folder on the path is fake / real (also 1_fake, 0_real), else -1."""
    for part in reversed(Path(path).parts):
        m = _CLASS_RE.match(part)
        if m:
            return _LABEL_WORDS[m.group(1).lower()]
    return -1


def videos_in_dir(root: str | Path) -> list[Sample]:
    """Every video folder under root/{real,fake}/** (labelled), or under root itself (label from the path)."""
    root = Path(root)
    if list_frames(root):
        return [Sample(str(root), label_from_path(root), str(root))]
    skipped: list[tuple[str, str]] = []
    videos = find_videos(root, skipped=skipped)
    if skipped:
        log.warning("skipped %d entr%s under %s: %s", len(skipped), "y" if len(skipped) == 1 else "ies", root,
                    "; ".join(f"{p} ({r})" for p, r in skipped[:5]))
    if not videos:
        raise FileNotFoundError(f"no folders of frames under {root}")
    return [Sample(str(v), label_from_path(v), v.relative_to(root).as_posix()) for v in videos]


def videos_from_pairs(csv_path: str | Path, split: str | None = None) -> list[Sample]:
    """The videos of a pairs CSV (training_pairs.csv), optionally one split only."""
    samples, splits = read_pairs(Path(csv_path))
    return [s for s, sp in zip(samples, splits) if split is None or sp == split]


def videos_from_file(video: str | Path, faces_dir: str | Path, **extract: Any) -> list[Sample]:
    """Extract the faces of one raw video into faces_dir, then list it (label from its path, else -1)."""
    from preprocessing.extract_faces import ExtractOptions, extract_dataset

    video = Path(video)
    summary = extract_dataset(video, faces_dir, ExtractOptions(**extract), progress=False)
    folder = Path(faces_dir) / video.stem
    if summary.failed or not list_frames(folder):
        reason = summary.failed[0][1] if summary.failed else "no face crops written"
        raise ValueError(f"cannot score {video}: {reason}")
    return [Sample(str(folder), label_from_path(video), video.stem)]


# ------------------------------------------------------------------------------ scoring
def _loadable(samples: Sequence[Sample]) -> list[Sample]:
    """Unknown labels (-1) as 0 for the loaders; the tables take labels from the original samples."""
    return [replace(s, label=max(s.label, 0)) for s in samples]


def score_frames(model: torch.nn.Module, videos: Sequence[Sample], image_size: int, *, device: torch.device,
                 batch_size: int = 32, max_frames_per_video: int | None = None, tta: bool = False,
                 channels_last: bool = False) -> pd.DataFrame:
    """Frame table (path, label, score, logit, group) from an image detector."""
    from augmentation.policies import build_transform

    frames = frame_samples([replace(v, group=v.path) for v in videos], max_frames_per_video)  # group = video
    dc = model.data_config
    ds = ImageDataset(_loadable(frames), build_transform("none", image_size, dc["mean"], dc["std"], False),
                      image_size)
    loader = DataLoader(ds, batch_size=batch_size, collate_fn=partial(collate_drop_none, image_size=image_size))
    preds = predict(model, loader, device, channels_last=channels_last, tta=tta, desc="frames")
    return pd.DataFrame({"path": [frames[i].path for i in preds.indices],
                         "label": [frames[i].label for i in preds.indices],
                         "score": preds.scores.astype(float), "logit": preds.logits.astype(float),
                         "group": [frames[i].group for i in preds.indices]})


def score_clips(model: DualStreamDetector, videos: Sequence[Sample], settings: VideoSettings, *,
                device: torch.device, batch_size: int = 8, tta: bool = False, channels_last: bool = False) -> pd.DataFrame:
    """Video table (video, label, score, logit, n_frames) from the dual-stream model (one centred clip each)."""
    dc = model.data_config
    ds = VideoClipDataset(_loadable(videos), settings, model.hq_size, dc["mean"], dc["std"])
    collate = partial(collate_clips, length=settings.sequence_length, size=model.hq_size, lq_size=model.lq_size)
    preds = predict(model, DataLoader(ds, batch_size=batch_size, collate_fn=collate), device,
                    channels_last=channels_last, tta=tta, desc="clips")
    return pd.DataFrame({"video": [videos[i].path for i in preds.indices],
                         "label": [videos[i].label for i in preds.indices],
                         "score": preds.scores.astype(float), "logit": preds.logits.astype(float),
                         "n_frames": [len(list_frames(videos[i].path)) for i in preds.indices]})


def aggregate_frames(frames: pd.DataFrame, rule: str = "mean", margin: float = 0.3) -> pd.DataFrame:
    """Per-video rows (video, label, score, n_frames[, subset]) by evaluation.aggregation's rule."""
    videos = aggregate_groups(frames, rule, margin)
    return videos.rename(columns={"group": "video"})


def safe_metrics(table: pd.DataFrame, threshold: float = 0.5) -> dict[str, Any]:
    """binary_metrics over the labelled rows; {"error": ...} when they hold a single class (or none)."""
    known = table[table["label"] >= 0]
    try:
        m = binary_metrics(known["label"].to_numpy(), known["score"].to_numpy(), threshold)
    except MetricError as e:
        return {"error": str(e), "n": int(len(known))}
    out: dict[str, Any] = {k: float(m[k]) for k in REPORTED if k in m and math.isfinite(float(m[k]))}
    out["n"] = int(len(known))
    return out


def write_report(videos: pd.DataFrame, out_dir: str | Path, frames: pd.DataFrame | None = None, *,
                 threshold: float = 0.5, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """predictions.csv (+ frame_predictions.csv) and metrics.json in out_dir; returns the metrics dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    videos = videos.copy()
    videos["prediction"] = np.where(videos["score"] >= threshold, "fake", "real")
    cols = [c for c in ("video", "label", "score", "prediction", "n_frames", "subset", "logit") if c in videos]
    videos[cols].to_csv(out / PREDICTIONS_FILE, index=False)
    metrics: dict[str, Any] = {**(extra or {}), "threshold": threshold, "n_videos": int(len(videos)),
                               "video": safe_metrics(videos, threshold)}
    if frames is not None:
        frames.to_csv(out / FRAMES_FILE, index=False)
        metrics["frame"] = safe_metrics(frames, threshold)
        metrics["n_frames"] = int(len(frames))
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    log.info("event=video_scores out=%s videos=%d video_auc=%s", out, len(videos), metrics["video"].get("auc"))
    return metrics


def score_videos(model: torch.nn.Module, videos: Sequence[Sample], out_dir: str | Path, *, image_size: int,
                 settings: VideoSettings | None = None, rule: str = "mean", margin: float = 0.3,
                 threshold: float = 0.5, device: str | torch.device = "cpu", batch_size: int = 16,
                 max_frames_per_video: int | None = None, tta: bool = False) -> dict[str, Any]:
    """Score every video with `model` (dual-stream: per clip; image detector: per frame, then `rule`)
    and write the report to out_dir. Returns the metrics dict."""
    if not videos:
        raise ValueError("no videos to score")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    channels_last = bool(getattr(model, "is_convnet", False))
    model.to(dev, memory_format=torch.channels_last if channels_last else torch.preserve_format).eval()
    if isinstance(model, DualStreamDetector):
        table = score_clips(model, videos, settings or VideoSettings(), device=dev, batch_size=batch_size, tta=tta,
                            channels_last=channels_last)
        if any(v.subset for v in videos):
            subsets = {v.path: v.subset for v in videos}
            table["subset"] = table["video"].map(subsets)
        return write_report(table, out_dir, threshold=threshold, extra={"model_kind": "sequence", "rule": "clip"})
    frames = score_frames(model, videos, image_size, device=dev, batch_size=batch_size,
                          max_frames_per_video=max_frames_per_video, tta=tta, channels_last=channels_last)
    table = aggregate_frames(frames, rule, margin)
    return write_report(table, out_dir, frames, threshold=threshold, extra={"model_kind": "frame", "rule": rule})


# ------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m evaluation.video_scoring", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="best.pt / last.pt / run folder / runs:/RUN_ID/path")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="training_pairs.csv (video_path,label[,split])")
    src.add_argument("--data-dir", help="folder of {real,fake}/<video>/ frame folders")
    src.add_argument("--video-dir", help="one folder of frames")
    src.add_argument("--video", help="one raw video file (faces are extracted first)")
    p.add_argument("--n-frames", type=int, default=32, help="with --video: evenly spaced frames to extract")
    p.add_argument("--split", choices=("train", "val", "test"), help="with --pairs: score this split only")
    p.add_argument("--output-dir", default="results", help="where predictions.csv and metrics.json go")
    p.add_argument("--rule", default="mean", choices=AGGREGATORS.names(), help="frame models: per-video aggregation")
    p.add_argument("--margin", type=float, default=0.3, help="confident rule: keep frames with |s-0.5| >= margin")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-frames", type=int, default=None, help="frame models: at most N frames per video")
    p.add_argument("--device", default="auto")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped input")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model, cfg = load_model(args.checkpoint)
        if args.pairs:
            videos = videos_from_pairs(args.pairs, args.split)
        elif args.data_dir or args.video_dir:
            videos = videos_in_dir(args.data_dir or args.video_dir)
        else:
            videos = videos_from_file(args.video, Path(args.output_dir) / "faces", size=cfg.data.image_size,
                                      n_frames=args.n_frames)
        metrics = score_videos(model, videos, args.output_dir, image_size=cfg.data.image_size,
                               settings=VideoSettings.from_config(cfg), rule=args.rule, margin=args.margin,
                               threshold=args.threshold, device=args.device, batch_size=args.batch_size,
                               max_frames_per_video=args.max_frames, tta=args.tta)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return 2
    video = metrics["video"]
    summary = " ".join(f"{k}={video[k]:.4f}" for k in ("auc", "ap", "eer", "accuracy") if k in video)
    print(f"{metrics['n_videos']} video(s) -> {Path(args.output_dir) / PREDICTIONS_FILE}; {summary or video.get('error', '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
