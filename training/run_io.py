"""What a run writes at its end: best weights -> test predictions -> report -> artifacts -> model."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from core.checkpoints import load_checkpoint
from core.config import VAL_METRICS, Config
from models.outputs import ScoreModel

if TYPE_CHECKING:
    from training.trainer import Trainer
    from core.tracking import RunTracker

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: str | None
    status: str  # COMPLETE | EARLY_STOPPED
    best_metric: float
    best_epoch: int
    epochs_run: int
    val_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    output_dir: Path = Path(".")


def start_tags(cfg: Config, index) -> dict[str, str]:
    """Tags every run carries: what was trained on what."""
    counts = index.class_counts()
    return {
        "model_type": cfg.model.model_name or cfg.model.model_type, "freeze_strategy": cfg.train.freeze_strategy,
        "loss_type": cfg.loss.loss_type, "data_digest": index.digest, "data_source": str(index.source),
        "class_counts": json.dumps(counts), "skipped_files": str(len(index.skipped)),
        "face_crop": cfg.data.face_crop,
        **({"extra_val": json.dumps(dict(cfg.data.extra_val_sets))} if cfg.data.extra_val else {}),
    }


def index_table(index) -> pd.DataFrame:
    """One row per sample (split, path, label): the dataset logged as an MLflow input."""
    rows = [(split, s.path, s.label) for split in ("train", "val", "test") for s in getattr(index, split)]
    return pd.DataFrame(rows, columns=["split", "path", "label"])


def write_skipped(index, path: Path) -> None:
    pd.DataFrame(index.skipped, columns=["path", "reason"]).to_csv(path, index=False)


def run_report(val_table: pd.DataFrame | None, test_table: pd.DataFrame | None, history: pd.DataFrame | None,
               out_dir: Path) -> dict[str, float]:
    """The evaluation dashboard and metrics (evaluation.report); returns flat metrics for MLflow."""
    if val_table is None or val_table["label"].nunique() < 2:
        return {}
    from evaluation.report import evaluate_predictions

    report = evaluate_predictions(val_table, test_table, history, out_dir)
    return dict(report.metrics)


def finish_run(trainer: "Trainer", tracker: "RunTracker", status: str) -> "TrainResult":
    """Load the best weights, score the test split, write and log everything the run keeps."""
    cfg, run_dir = trainer.cfg, trainer.run_dir
    best_path = run_dir / "best.pt"
    if best_path.exists():
        trainer.eval_model.load_state_dict(load_checkpoint(best_path)["model"])
    pred_dir = run_dir / "predictions"
    val_table = trainer.best_val_table
    if val_table is not None:
        val_table.to_parquet(pred_dir / "val.parquet")
    test_metrics: dict[str, float] = {}
    test_table = None
    if "test" in trainer.loaders and len(trainer.index.test):
        test_metrics, test_table = trainer.validate("test")
        test_table.to_parquet(pred_dir / "test.parquet")
    from training.extra_val import score_extra

    extra_metrics, extra_tables = score_extra(trainer, "test")
    test_metrics.update(extra_metrics)
    for name, table in extra_tables.items():
        table.to_parquet(pred_dir / f"test_{name}.parquet")
    history = pd.DataFrame(trainer.history)
    write_skipped(trainer.index, run_dir / "skipped_files.csv")
    (run_dir / "parameter_summary.json").write_text(json.dumps({
        "total": int(sum(p.numel() for p in trainer.model.parameters())),
        "per_epoch": [{"epoch": int(r["epoch"]), "trainable": int(r["trainable_params"]), "frozen": int(r["frozen_params"])}
                      for r in trainer.history],
    }, indent=1))
    report_metrics = run_report(val_table, test_table, history, run_dir / "evaluation")
    per_epoch = set(history.columns)  # the report's val_* at the best epoch repeat per-epoch curves: not again
    report_metrics = {k: v for k, v in report_metrics.items() if k not in per_epoch}
    # best_<m>: the value at the kept (best) epoch, for the monitor and the cross-dataset metrics (ensemble selection)
    at_best = {f"best_{k}": v for k, v in trainer.best_val_metrics.items()
               if k.startswith("val_") and k.removeprefix("val_") not in VAL_METRICS}
    final = {**test_metrics, **report_metrics, **at_best, "best_epoch": trainer.best_epoch,
             f"best_{cfg.train.monitor}": trainer.best_metric}
    tracker.log_metrics(final, step=max(trainer.best_epoch, 0))
    if cfg.train.checkpoint_out and best_path.exists():
        copy_atomic(best_path, Path(cfg.train.checkpoint_out))
        log.info("event=checkpoint_out path=%s", cfg.train.checkpoint_out)
    for name in ("config.yaml", "training_log.csv", "parameter_summary.json", "skipped_files.csv"):
        tracker.log_artifacts(run_dir / name)
    tracker.log_artifacts(pred_dir, "predictions")
    tracker.log_artifacts(run_dir / "evaluation", "evaluation")
    if cfg.tracking.log_checkpoint and best_path.exists():
        tracker.log_artifacts(best_path, "checkpoints")
    tracker.log_model(ScoreModel(trainer.eval_model), cfg.data.image_size)
    tracker.set_tags({"run_status": status, "run_dir": str(run_dir.resolve())})
    log.info("event=run_end status=%s best_epoch=%d best_%s=%.4f %s", status, trainer.best_epoch,
             cfg.train.monitor, trainer.best_metric, " ".join(f"{k}={v:.4f}" for k, v in test_metrics.items()))
    return TrainResult(
        run_id=tracker.run_id, status=status, best_metric=float(trainer.best_metric), best_epoch=trainer.best_epoch,
        epochs_run=len(trainer.history), val_metrics=dict(trainer.best_val_metrics), test_metrics=test_metrics,
        output_dir=run_dir,
    )


def copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
