"""Score images with a registered model, a run or a checkpoint; write predictions.csv (+ metrics.json).

    python -m serving.predict --model models:/deepfake-detector@champion --input photos/ --out preds.csv
    python -m serving.predict --run RUN_ID --input list.txt --out preds.csv
    python -m serving.predict --checkpoint outputs/<run>/best.pt --input a.jpg b.png --out preds.csv

--input: folders (searched recursively), image files, or .txt/.csv lists (a `path` column or one path a
line; relative paths are relative to the list). A label is known when the image sits under a folder
named real or fake (also 0_real, 1-fake, ...): then metrics.json (binary_metrics, bootstrap 95% AUC
interval) is written beside the CSV. Unreadable images are skipped with a warning and listed in the log.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from core.errors import UserError
from core.cli import ArgumentParser

log = logging.getLogger(__name__)

CLASS_DIR = re.compile(r"^(?:\d+[_-])?(real|fake)$", re.IGNORECASE)


class PredictError(UserError):
    """Bad input (no images, unknown model reference); one line."""


def label_from_path(path: str | Path) -> int | None:
    """1 / 0 when the nearest real/fake folder above the file says so, else None."""
    for part in reversed(Path(path).parent.parts):
        m = CLASS_DIR.match(part)
        if m:
            return int(m.group(1).lower() == "fake")
    return None


def _read_list(path: Path) -> list[str]:
    if path.suffix.lower() == ".csv":
        df = pd.read_csv(path)
        if "path" not in df.columns:
            raise PredictError(f"{path}: a CSV list needs a 'path' column; got {list(df.columns)}")
        items = df["path"].astype(str).tolist()
    else:
        items = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return [str(p if Path(p).is_absolute() else path.parent / p) for p in items]


def collect_images(inputs: Sequence[str | Path]) -> list[str]:
    """Image files from folders (recursive, sorted), files and .txt/.csv lists; order kept, duplicates dropped."""
    from dataio.data import IMAGE_EXTENSIONS

    out: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():
            out += sorted(str(p) for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif item.suffix.lower() in (".txt", ".csv") and item.is_file():
            out += _read_list(item)
        elif item.is_file():
            out.append(str(item))
        else:
            raise PredictError(f"input not found: {item}")
    out = list(dict.fromkeys(out))
    if not out:
        raise PredictError(f"no images found in {', '.join(map(str, inputs))}")
    return out


def load_scorer(model: str | None = None, run: str | None = None, checkpoint: str | None = None):
    """An object with .predict(DataFrame path) -> DataFrame path, fake_prob, from exactly one reference."""
    import mlflow

    from serving.pyfunc_model import ImageEnsembleModel, member_from_checkpoint, member_from_run

    if sum(x is not None for x in (model, run, checkpoint)) != 1:
        raise PredictError("give exactly one of --model, --run or --checkpoint")
    if model is not None:
        try:
            return mlflow.pyfunc.load_model(model)
        except Exception as e:  # MlflowException, OSError: one line naming the URI
            raise PredictError(f"cannot load model {model}: {str(e).splitlines()[0]}") from None
    if run is not None:
        try:
            uri = mlflow.get_run(run).data.tags.get("image_model_uri")
        except mlflow.exceptions.MlflowException:
            raise PredictError(f"run {run} not found in {mlflow.get_tracking_uri()}") from None
        if uri:
            return mlflow.pyfunc.load_model(uri)
        member = member_from_run(run)
    else:
        member = member_from_checkpoint(checkpoint)
    model_impl = ImageEnsembleModel.from_members([member])
    return _InProcess(model_impl)


class _InProcess:
    """Same call as a loaded pyfunc for a model built in this process."""

    def __init__(self, impl) -> None:
        self.impl = impl

    def predict(self, df: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return self.impl.predict(None, df, params)


def allow_local_files(paths: Sequence[str]) -> None:
    """Let this process's model read the user's own files: their folders join DFSWEEP_DATA_ROOTS.

    The served model accepts paths only under those roots (serving.image_inputs); this CLI runs as the user
    who named the files, so their folders are allowed here (the variable changes in this process only)."""
    import os

    from serving.image_inputs import ROOTS_ENV

    folders = dict.fromkeys(os.path.dirname(os.path.realpath(p)) for p in paths)
    current = [r for r in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if r.strip()]
    os.environ[ROOTS_ENV] = os.pathsep.join(dict.fromkeys(current + list(folders)))


def score_images(scorer, paths: Sequence[str], batch_size: int = 32, threshold: float = 0.5, num_workers: int = -1
                 ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """(predictions path, fake_prob, prediction[, label]; skipped (path, reason)) for readable images.

    The paths go to the model in requests that fit its size limits (serving.image_inputs.chunks)."""
    from dataio.data import check_image
    from serving.image_inputs import chunks

    with ThreadPoolExecutor(max_workers=8) as pool:  # file reads and header checks overlap
        reasons = list(pool.map(check_image, paths))
    skipped = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    for p, r in skipped:
        log.warning("event=image_skipped path=%s reason=%s", p, r)
    good = [p for p, r in zip(paths, reasons) if r is None]
    if not good:
        raise PredictError(f"none of the {len(paths)} images is readable")
    allow_local_files(good)
    params = {"batch_size": batch_size, "num_workers": num_workers}
    df = pd.concat([pd.DataFrame(scorer.predict(pd.DataFrame({"path": part}), params=params)) for part in chunks(good)],
                   ignore_index=True)
    df["prediction"] = np.where(df["fake_prob"] >= threshold, "fake", "real")
    labels = [label_from_path(p) for p in df["path"]]
    if any(label is not None for label in labels):
        df["label"] = pd.array(labels, dtype="Int64")
    return df, skipped


def labelled_metrics(df: pd.DataFrame, threshold: float = 0.5) -> dict[str, float] | None:
    """binary_metrics (+ bootstrap AUC CI) over the labelled rows; accuracy only when one class is present."""
    from evaluation.metrics import binary_metrics, bootstrap_ci

    if "label" not in df.columns:
        return None
    known = df[df["label"].notna()]
    y, s = known["label"].to_numpy(np.int64), known["fake_prob"].to_numpy(np.float64)
    if len(np.unique(y)) < 2:
        log.warning("event=one_class_labels n=%d: AUC and calibration need both real and fake images", len(y))
        return {"accuracy": float(np.mean((s >= threshold) == y)), "n": float(len(y)), "n_pos": float(y.sum())}
    out = binary_metrics(y, s, threshold)
    out["auc_ci_low"], out["auc_ci_high"] = bootstrap_ci(y, s, "auc")
    out["n_unlabelled"] = float(len(df) - len(known))
    return out


VIDEO_FLAGS = {"--test-pairs": "--pairs", "--video-dir": "--video-dir", "--video": "--video"}


def _flag(arg: str) -> str:
    """'--test_pairs=x' -> '--test-pairs' (either spelling of a flag, core.cli)."""
    return arg.split("=")[0].replace("_", "-") if arg.startswith("--") else arg


def _to_video_scoring(arg: str) -> str:
    """The seed guide's video flags under evaluation.video_scoring's names (--test-pairs -> --pairs)."""
    flag, eq, value = arg.partition("=")
    return VIDEO_FLAGS[_flag(flag)] + eq + value if _flag(flag) in VIDEO_FLAGS else arg


def predict_videos(argv: list[str]) -> int:
    """Seed-guide video scoring: --checkpoint with --test-pairs/--video-dir/--video goes to
    evaluation.video_scoring; a registry/pyfunc --model with --video scores the extracted faces per frame."""
    from evaluation import video_scoring

    if "--model" not in argv:
        return video_scoring.main([_to_video_scoring(a) for a in argv])
    p = ArgumentParser(prog="python -m serving.predict")
    p.add_argument("--model", required=True)
    p.add_argument("--video", required=True, help="with --model: one raw video file (faces are extracted first)")
    p.add_argument("--output-dir", default="results")
    p.add_argument("--n-frames", type=int, default=32)
    p.add_argument("--rule", default="mean")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--tracking-uri")
    a = p.parse_args(argv)
    from core.tracking import setup_cli
    from dataio.video_data import list_frames
    from serving.image_inputs import chunks

    setup_cli(a.tracking_uri)
    try:
        video = video_scoring.videos_from_file(a.video, Path(a.output_dir) / "faces", n_frames=a.n_frames)[0]
        frames = list_frames(video.path)
        scorer = load_scorer(model=a.model)
        allow_local_files(frames)
        scored = pd.concat([pd.DataFrame(scorer.predict(pd.DataFrame({"path": part}))) for part in chunks(frames)],
                           ignore_index=True)
    except (OSError, ValueError, PredictError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    table = pd.DataFrame({"path": frames, "label": video.label, "score": np.asarray(scored["fake_prob"], float),
                          "group": video.group})
    videos = video_scoring.aggregate_frames(table, a.rule)
    video_scoring.write_report(videos, a.output_dir, table, threshold=a.threshold)
    print(f"{a.video}: fake_prob={videos['score'].iloc[0]:.4f} over {len(frames)} face frame(s) -> {a.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(_flag(arg) in VIDEO_FLAGS for arg in argv):
        return predict_videos(argv)
    p = ArgumentParser(prog="python -m serving.predict", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="pyfunc URI, e.g. models:/deepfake-detector@champion or runs:/ID/image_model")
    src.add_argument("--run", help="run id: its image model, else its best checkpoint")
    src.add_argument("--checkpoint", help="checkpoint file, run folder or runs:/RUN_ID/checkpoints/best.pt")
    p.add_argument("--input", nargs="+", required=True, help="folders, image files or .txt/.csv lists")
    p.add_argument("--out", default="predictions.csv", help="CSV to write (metrics.json goes beside it)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.5, help="P(fake) at or above which an image is fake")
    p.add_argument("--num-workers", type=int, default=-1,
                   help="image decoding threads; -1: none for one batch, else up to 4")
    p.add_argument("--tracking-uri", help="default $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db")
    a = p.parse_args(argv)
    from core.tracking import setup_cli

    setup_cli(a.tracking_uri)
    try:
        paths = collect_images(a.input)
        df, skipped = score_images(load_scorer(a.model, a.run, a.checkpoint), paths, a.batch_size, a.threshold,
                                   a.num_workers)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    metrics = labelled_metrics(df, a.threshold)
    if metrics is not None:
        (out.parent / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"{len(df)} images scored ({len(skipped)} skipped) -> {out}"
          + (f"; metrics -> {out.parent / 'metrics.json'}: " + ", ".join(
              f"{k}={metrics[k]:.4f}" for k in ("auc", "accuracy") if k in metrics) if metrics else ""))
    return 0


if __name__ == "__main__":
    from core.cli import exit_now

    exit_now(main())
