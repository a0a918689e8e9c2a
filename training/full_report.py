"""A run's full evaluation report (dashboard.html, errors.html and the metrics files), built from what the run
logged: its val/test predictions, training log and config. No model, no re-scoring.

Sweep trials run with train.report=metrics (the metrics files, not the figures, which cost most of the
report's time); the sweep builds this for its best trials when it ends (study.full_reports) and logs it to
their runs. Any other run, later:

    python -m training.full_report --run RUN_ID          # logs evaluation/ into that run (its artifacts)
    python -m training.full_report --run_dir outputs/sweeps/<study>/trial-0003/<run_id>   # files only

A run's folder is used when it is still on disk (tag run_dir), else its artifacts are downloaded. Bad input
(unknown run, no predictions) exits with status 2 and one line.
"""
from __future__ import annotations

import logging
import sys
import tempfile
from functools import partial
from pathlib import Path

import pandas as pd
import yaml

from core.cli import ArgumentParser
from core.errors import UserError, error_line

log = logging.getLogger(__name__)
INPUTS = ("config.yaml", "training_log.csv", "predictions/val.parquet", "predictions/test.parquet")


class ReportError(UserError):
    """The run or its logged predictions cannot be found."""


def build_full_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the full report of the run folder `run_dir` (as train() leaves it) to `out_dir`
    (default run_dir/evaluation, replacing the metrics-only files with the same metrics); returns that folder."""
    from core.schema import Config
    from evaluation.gallery import model_input_images
    from training.run_io import run_report

    run_dir = Path(run_dir)
    val_path = run_dir / "predictions" / "val.parquet"
    if not val_path.is_file():
        raise ReportError(f"{val_path} not found: the run logged no validation predictions (did it finish?)")
    val = pd.read_parquet(val_path)
    test_path = run_dir / "predictions" / "test.parquet"
    test = pd.read_parquet(test_path) if test_path.is_file() else None
    log_path = run_dir / "training_log.csv"
    history = pd.read_csv(log_path) if log_path.is_file() else None
    cfg_path = run_dir / "config.yaml"
    model_input = None
    if cfg_path.is_file():  # the gallery shows the model's input beside each file (the run's eval transform)
        cfg = Config.model_validate(yaml.safe_load(cfg_path.read_text()))
        # normalising then de-normalising cancels: mean 0 / std 1 shows the same pixels without the model
        model_input = partial(model_input_images, cfg, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    out = Path(out_dir) if out_dir is not None else run_dir / "evaluation"
    if not run_report(val, test, history, out, model_input, full=True):
        raise ReportError(f"{val_path}: validation predictions hold one class; no report")
    return out


def report_run(run_id: str) -> Path:
    """Build the full report of MLflow run `run_id` (its folder if still on disk, else its artifacts) and log
    it to the run as evaluation/; returns the local report folder."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ReportError(f"run {run_id} not found in {mlflow.get_tracking_uri()} (set --tracking_uri or "
                          "$MLFLOW_TRACKING_URI to the store that holds it)") from None
    run_dir = Path(run.data.tags.get("run_dir", "")) if run.data.tags.get("run_dir") else None
    if run_dir is None or not (run_dir / "predictions" / "val.parquet").is_file():
        run_dir = Path(tempfile.mkdtemp(prefix=f"dfsweep-report-{run_id[:8]}-"))
        for rel in INPUTS:
            try:
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=rel, dst_path=str(run_dir))
            except Exception as e:  # MlflowException / OSError: not logged (a test split is optional)
                log.info("event=report_input_missing run_id=%s path=%s reason=%s", run_id, rel,
                         str(e).splitlines()[0][:120])
    out = build_full_report(run_dir)
    client.log_artifacts(run_id, str(out), "evaluation")
    client.set_tag(run_id, "report", "full")
    log.info("event=full_report run_id=%s out=%s", run_id, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description="Build a run's full evaluation report (dashboard, error gallery) from its "
                                   "logged predictions")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="MLflow run id: the report is logged into that run")
    src.add_argument("--run_dir", help="a run folder (outputs/.../<run>): files only, no MLflow")
    p.add_argument("--tracking_uri", default=None, help="default $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlruns/mlflow.db")
    a = p.parse_args(argv)
    try:
        if a.run_dir:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
            out = build_full_report(a.run_dir)
        else:
            from core.tracking import setup_cli

            setup_cli(a.tracking_uri)
            out = report_run(a.run)
    except UserError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    print(f"report: {out / 'dashboard.html'}")
    return 0


if __name__ == "__main__":
    from core.cli import exit_now

    exit_now(main())
