"""Evaluate a trained run (or checkpoint) on a data set; log it all to a child run named `evaluation`.

    python -m evaluation.evaluate --run RUN_ID --data_dir /data/celebdf [--use_tta] [--tta flip,crop,scale]
        [--tta_space logit|prob] [--mc_dropout 20] [--robustness] [--max_images 5000] [--split test]
    python -m evaluation.evaluate --checkpoint outputs/<run>/best.pt --data_dir faces.csv --no_tracking

All images of --data_dir are scored (--split test: only the test split the training config cuts from it;
--max_images: a stratified, seeded cap). Thresholds and the temperature come from the source run's
validation predictions (re-scored with the same TTA/MC settings when its images are readable here), else
they are fitted in-sample and the dashboard says so. The output folder (default
outputs/evaluations/<run>-<data>-<time>) holds the evaluation.report files (dashboard.html, errors.html,
metrics.json, ...), robustness.csv and predictions/{eval,val}.parquet; the same files and metrics go to a
run `evaluation`, a child of the source run when it is in the store (tag mlflow.parentRunId). Bad input
(unknown run, missing data folder, unreadable checkpoint) exits with status 2 and one line.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from evaluation.robustness import DEFAULT_PERTURBATIONS, Perturbation
from evaluation.tta import FLIP, NO_TTA, TTASpec
from evaluation.scoring import ScoredData, dataset_name, score_samples, with_face_crop
from evaluation.scoring import score_dataset as _score_dataset
from evaluation.sources import EvaluateError, Source, attach_run, resolve_source, run_file
from models.build import load_trained_model
from core.errors import UserError
from core.cli import ArgumentParser

log = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    """How to score: TTA views, MC-dropout passes, robustness, which images, batch settings."""

    tta: TTASpec = NO_TTA
    mc_dropout: int = 0
    robustness: bool = False
    perturbations: tuple[Perturbation, ...] = DEFAULT_PERTURBATIONS
    robustness_max_images: int | None = 2000
    max_images: int | None = None
    split: str = "all"
    batch_size: int = 64
    num_workers: int = 2
    seed: int = 0
    face_crop: str | None = None  # none | mtcnn; None = what the run trained with
    operating_point: str = "eer"
    n_boot: int = 1000
    write_png: bool = False

    def params(self) -> dict[str, str]:
        return {"tta": self.tta.describe(), "mc_dropout": str(self.mc_dropout), "robustness": str(self.robustness),
                "max_images": str(self.max_images), "split": self.split, "seed": str(self.seed),
                "face_crop": self.face_crop or "as trained",
                "operating_point": self.operating_point}


@dataclass
class EvalOutcome:
    metrics: dict[str, float]
    out_dir: Path
    data: ScoredData
    source: Source  # with the checkpoint's own run attached when it is in this store
    val_provenance: str
    files: dict[str, Path] = field(default_factory=dict)
    mlflow_run_id: str | None = None


# ------------------------------------------------------------------------------ scoring
def score_dataset(trained, data_dir: str | Path, opts: EvalOptions, split: str | None = None,
                  mc_dropout: int | None = None) -> ScoredData:
    """evaluation.scoring.score_dataset with the options' split, cap, TTA, MC passes and batch settings."""
    return _score_dataset(trained, data_dir, split=split or opts.split, max_images=opts.max_images, tta=opts.tta,
                          mc_dropout=opts.mc_dropout if mc_dropout is None else mc_dropout, seed=opts.seed,
                          batch_size=opts.batch_size, num_workers=opts.num_workers)


def gallery_input(trained):
    """paths -> what this model's evaluation loader feeds it (the error gallery's model-input thumbnails)."""
    from functools import partial

    from evaluation.gallery import model_input_images

    dc = trained.model.data_config
    return partial(model_input_images, trained.config, dc["mean"], dc["std"])


def check_supported(trained, opts: EvalOptions) -> None:
    """The video (dual-stream) model takes clips: flip is its only TTA view and robustness is image-only."""
    if trained.config.model.kind == "video" and (set(opts.tta.groups) - {"flip"} or opts.robustness):
        raise EvaluateError("the dual_stream video model supports --tta flip only and no --robustness")


def validation_table(source: Source, trained, opts: EvalOptions, tmp: Path) -> tuple[pd.DataFrame | None, str]:
    """(val predictions for thresholds/temperature, where they came from). They are re-scored with the
    evaluation's TTA/MC settings when those differ from training's and the images are readable here."""
    from dataio.data import Sample

    path = run_file(source, trained, "predictions/val.parquet", tmp)
    if path is None:
        return None, "none"
    val = pd.read_parquet(path)
    trained_tta = FLIP if trained.config.train.use_tta else NO_TTA
    if opts.tta == trained_tta and opts.mc_dropout <= 1:
        return val, "source run val predictions"
    if not all(os.path.isfile(p) for p in val["path"]):
        log.warning("event=val_not_rescored reason=images_missing: thresholds come from val scored without the "
                    "evaluation's TTA/MC settings")
        return val, "source run val predictions (scored without this TTA/MC setting)"
    text = lambda v: v if isinstance(v, str) else None  # noqa: E731  (missing group/subset -> None, not NaN)
    samples = [Sample(str(r.path), int(r.label), text(getattr(r, "group", None)), text(getattr(r, "subset", None)))
               for r in val.itertuples()]
    _, table = score_samples(trained, samples, batch_size=opts.batch_size, num_workers=opts.num_workers,
                             tta=opts.tta, mc_dropout=opts.mc_dropout, seed=opts.seed, desc="val")
    return table, "source run val images, re-scored with this TTA/MC setting"


def evaluate(source: Source, data_dir: str | Path, opts: EvalOptions, out_dir: str | Path, *,
             device: str = "auto", use_amp: bool = False) -> EvalOutcome:
    """Score, then write the report (dashboard, metrics, robustness, predictions) to out_dir. No MLflow run."""
    from evaluation.report import evaluate_predictions

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    trained = with_face_crop(load_trained_model(source.checkpoint, device, use_amp), opts.face_crop)
    check_supported(trained, opts)
    source = attach_run(source, trained)
    data = score_dataset(trained, data_dir, opts)
    extra_figs: dict[str, Any] = {}
    extra_tables: dict[str, pd.DataFrame] = {}
    extra: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        val, provenance = validation_table(source, trained, opts, Path(tmp))
        hist_path = run_file(source, trained, "training_log.csv", Path(tmp))
        history = pd.read_csv(hist_path) if hist_path is not None else None
    if val is None or val["label"].nunique() < 2:
        log.warning("event=in_sample_thresholds reason=no_source_val_predictions: thresholds and temperature are "
                    "fitted on the evaluated data itself")
        val, provenance = data.table, "in-sample (no validation predictions of the source run)"
    if opts.mc_dropout > 1:
        from evaluation.uncertainty import uncertainty_panels

        extra_figs["mc_dropout"], extra_tables["MC-dropout"], summary = uncertainty_panels(data.table, opts.mc_dropout)
        extra.update(summary)
    robust = None
    if opts.robustness:
        from evaluation.robustness import robustness_panels, score_robustness

        robust = score_robustness(trained, data.samples, tta=opts.tta, perturbations=opts.perturbations,
                                  max_images=opts.robustness_max_images, seed=opts.seed, batch_size=opts.batch_size,
                                  num_workers=opts.num_workers, clean=data.table if opts.mc_dropout <= 1 else None)
        extra_figs["robustness"], extra_tables["Robustness"], metrics = robustness_panels(robust)
        extra.update(metrics)
    report = evaluate_predictions(
        val, data.table, history, out_dir, n_boot=opts.n_boot, seed=opts.seed, operating_point=opts.operating_point,
        write_png=opts.write_png, extra_figures=extra_figs, extra_tables=extra_tables,
        title=f"Evaluation: {source.label} on {data.name}", model_input=gallery_input(trained))
    files = dict(report.files)
    (out_dir / "predictions").mkdir(parents=True, exist_ok=True)
    files["predictions"] = out_dir / "predictions" / "eval.parquet"
    data.table.to_parquet(files["predictions"])
    val.to_parquet(out_dir / "predictions" / "val.parquet")
    if robust is not None:
        files["robustness_csv"] = out_dir / "robustness.csv"
        robust.to_csv(files["robustness_csv"], index=False)
    metrics = {**report.metrics, **{k: float(v) for k, v in extra.items() if math.isfinite(v)},
               "n_images": float(len(data.table)), "seconds": time.perf_counter() - t0}
    doc = json.loads(files["metrics_json"].read_text())
    doc["flat"] = metrics
    doc["setup"] = {"source": source.label, "source_run_id": source.run_id, "checkpoint": trained.info["path"],
                    "data_dir": str(data_dir), "data_digest": data.digest, "n_images": len(data.table),
                    "thresholds_from": provenance, **opts.params()}
    if robust is not None:
        doc["robustness"] = json.loads(robust.to_json(orient="records"))  # NaN -> null
    files["metrics_json"].write_text(json.dumps(doc, indent=2))
    log.info("event=evaluated source=%s data=%s n=%d auc=%.4f out=%s", source.label, data.name, len(data.table),
             metrics.get("test_auc", float("nan")), out_dir)
    return EvalOutcome(metrics, out_dir, data, source, provenance, files)


# ------------------------------------------------------------------------------ MLflow
def log_evaluation(outcome: EvalOutcome, opts: EvalOptions, experiment_name: str,
                   tracking_uri: str | None = None, run_name: str = "evaluation") -> str:
    """Log metrics, params, the data set and the output folder to a run named `run_name`: a child of the
    source run when it is in this store (tag mlflow.parentRunId), else top-level in `experiment_name`."""
    import mlflow

    from core.config import TrackingConfig
    from core.tracking import configure_mlflow, log_dataset_input

    source = outcome.source
    tags = {"run_kind": "evaluation", "eval_only": "true", "source_run_id": str(source.run_id),
            "data_source": outcome.data.data_dir, "data_digest": outcome.data.digest,
            "thresholds_from": outcome.val_provenance}
    if source.run is not None:
        exp_id = source.run.info.experiment_id
        kwargs: dict[str, Any] = {"parent_run_id": source.run_id}
    else:
        exp_id = configure_mlflow(TrackingConfig(tracking_uri=tracking_uri, experiment_name=experiment_name))
        kwargs = {}
    with mlflow.start_run(run_name=run_name, experiment_id=exp_id, tags=tags, **kwargs) as run:
        mlflow.log_params({**opts.params(), "data_dir": outcome.data.data_dir, "checkpoint": source.checkpoint,
                           "n_images": len(outcome.data.table)})
        mlflow.log_metrics({k: v for k, v in outcome.metrics.items() if pd.notna(v)})
        log_dataset_input(outcome.data.table[["path", "label"]], outcome.data.data_dir, outcome.data.name,
                          outcome.data.digest, context="evaluation")
        mlflow.log_artifacts(str(outcome.out_dir))
    outcome.mlflow_run_id = run.info.run_id
    return run.info.run_id


def evaluate_config(cfg) -> EvalOutcome:
    """The training CLI's `--eval_only`: evaluate train.checkpoint on data.data_dir (the demo set when unset),
    all splits, with the Config's TTA, batch, device, AMP and tracking settings. The same path as
    `python -m evaluation.evaluate --checkpoint`."""
    import mlflow

    from core.tracking import resolve_tracking_uri
    from dataio.pipeline import data_config

    t = cfg.train
    data_dir = str(data_config(cfg).data_dir)
    opts = EvalOptions(tta=FLIP if t.use_tta else NO_TTA, batch_size=cfg.data.batch_size,
                       num_workers=cfg.data.num_workers, seed=t.seed)
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking))  # finds the checkpoint's run to nest under
    source = resolve_source(checkpoint=t.checkpoint)
    out_dir = Path(t.output_dir) / "evaluations" / f"{Path(t.checkpoint).parent.name[:12]}-{dataset_name(data_dir)}-" \
        f"{time.strftime('%Y%m%d-%H%M%S')}"
    outcome = evaluate(source, data_dir, opts, out_dir, device=t.device, use_amp=t.use_amp)
    if cfg.tracking.enabled:
        log_evaluation(outcome, opts, cfg.tracking.experiment_name, cfg.tracking.tracking_uri,
                       run_name=cfg.tracking.run_name or "evaluation")
    return outcome


def print_summary(outcome: EvalOutcome) -> None:
    """What the CLIs print at the end of an evaluation."""
    m = outcome.metrics
    print(f"{outcome.data.name}: n={len(outcome.data.table)} auc={m.get('test_auc', float('nan')):.4f} "
          f"ap={m.get('test_ap', float('nan')):.4f} eer={m.get('test_eer', float('nan')):.4f} "
          f"(thresholds: {outcome.val_provenance})")
    print(f"dashboard: {outcome.files['dashboard_html']}")
    if outcome.mlflow_run_id:
        parent = outcome.source.run_id
        print(f"mlflow run `evaluation`: {outcome.mlflow_run_id}" + (f" (child of run {parent})" if parent else ""))


# ------------------------------------------------------------------------------ CLI
def add_scoring_args(p: argparse.ArgumentParser) -> None:
    """Flags shared with evaluation.crosseval."""
    p.add_argument("--use_tta", action="store_true", help="test-time augmentation (views from --tta, default flip)")
    p.add_argument("--tta", default=None, help="TTA views: any of flip,crop,scale (implies --use_tta)")
    p.add_argument("--tta_space", choices=["logit", "prob"], default="logit", help="average logits or P(fake)")
    p.add_argument("--max_images", type=int, default=None, help="score at most N images (stratified, seeded)")
    p.add_argument("--face_crop", nargs="+", choices=["none", "mtcnn"], default=None,
                   help="preprocessing of the data: MTCNN face crop or none (default: what the run trained with; "
                        "crosseval: one value, or one per --datasets entry)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--use_amp", action="store_true", help="bf16 autocast on CPU, fp16 on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default=None)
    p.add_argument("--tracking_uri", default=None, help="default $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlruns/mlflow.db")
    p.add_argument("--experiment_name", default="deepfake-detection", help="for runs without a source run")
    p.add_argument("--no_tracking", action="store_true", help="write the files only")
    p.add_argument("-v", "--verbose", action="store_true")


def tta_from_args(a: argparse.Namespace) -> TTASpec:
    from evaluation.tta import parse_tta

    if not (a.use_tta or a.tta):
        return NO_TTA
    try:
        return parse_tta(a.tta or "flip", a.tta_space)
    except ValueError as e:
        raise EvaluateError(str(e)) from None


def setup_cli(a: argparse.Namespace) -> str:
    """Logging, quiet third-party loggers, tracking URI; returns the URI."""
    import mlflow

    from core.config import TrackingConfig
    from core.tracking import resolve_tracking_uri

    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow.store", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = resolve_tracking_uri(TrackingConfig(tracking_uri=a.tracking_uri))
    mlflow.set_tracking_uri(uri)
    return uri


def one_face_crop(values: list[str] | None) -> str | None:
    if values and len(values) > 1:
        raise EvaluateError("--face_crop takes one value here (none or mtcnn)")
    return values[0] if values else None


def is_bad_input(e: Exception) -> bool:
    """Bad input (a core.errors.UserError: config, names, data, checkpoint, metrics, offline weights)."""
    return isinstance(e, UserError)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m evaluation.evaluate", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="MLflow run id of a training run")
    src.add_argument("--checkpoint", help="checkpoint file, run folder or runs:/RUN_ID/checkpoints/best.pt")
    p.add_argument("--data_dir", required=True, help="folder ({real,fake}/ or {train,val,test}/) or CSV index")
    p.add_argument("--split", default="all", choices=["all", "train", "val", "test"])
    p.add_argument("--mc_dropout", type=int, default=0, metavar="N", help="MC-dropout passes (0 = off)")
    p.add_argument("--robustness", action="store_true", help="metrics under JPEG/blur/downscale/noise")
    p.add_argument("--perturbations", default=None, help="e.g. jpeg:50,blur:2 (default: the full set)")
    p.add_argument("--robustness_max_images", type=int, default=2000, help="cap for the robustness passes (0 = all)")
    p.add_argument("--operating_point", default="eer", help="threshold for confusion matrix and error gallery")
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples for the AUC/AP intervals")
    p.add_argument("--png", action="store_true", help="also PNG figures (needs Chrome/Chromium)")
    add_scoring_args(p)
    a = p.parse_args(argv)
    uri = setup_cli(a)
    try:
        from evaluation.robustness import parse_perturbations

        try:
            perturbations = parse_perturbations(a.perturbations)
        except ValueError as e:
            raise EvaluateError(str(e)) from None
        if a.mc_dropout < 0 or (a.max_images is not None and a.max_images < 1):
            raise EvaluateError("--mc_dropout must be >= 0 and --max_images >= 1")
        opts = EvalOptions(tta=tta_from_args(a), mc_dropout=a.mc_dropout, robustness=a.robustness,
                           perturbations=perturbations, robustness_max_images=a.robustness_max_images or None,
                           max_images=a.max_images, split=a.split, batch_size=a.batch_size,
                           num_workers=a.num_workers, seed=a.seed, face_crop=one_face_crop(a.face_crop),
                           operating_point=a.operating_point,
                           n_boot=a.n_boot, write_png=a.png)
        if not Path(a.data_dir).expanduser().exists():
            raise EvaluateError(f"data dir not found: {a.data_dir}")
        source = resolve_source(a.run, a.checkpoint)
        out_dir = Path(a.output_dir) if a.output_dir else Path("outputs") / "evaluations" / (
            f"{(source.run_id or Path(source.checkpoint).parent.name)[:12]}-{dataset_name(a.data_dir)}-"
            f"{time.strftime('%Y%m%d-%H%M%S')}")
        outcome = evaluate(source, a.data_dir, opts, out_dir, device=a.device, use_amp=a.use_amp)
        if not a.no_tracking:
            log_evaluation(outcome, opts, a.experiment_name, uri)
    except Exception as e:
        if not is_bad_input(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(outcome)
    return 0


if __name__ == "__main__":
    from core.cli import exit_now

    exit_now(main())
