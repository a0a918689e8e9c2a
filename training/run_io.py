"""What a run writes at its end: best weights -> test predictions -> report -> artifacts -> model."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from core.checkpoints import atomic_save, load_checkpoint
from core.config import Config
from models.outputs import ScoreModel

if TYPE_CHECKING:
    from training.trainer import Trainer
    from core.tracking import RunTracker

log = logging.getLogger(__name__)

# What MLflow charts per epoch (everything else is in training_log.csv): losses, the two ranking metrics, the
# head's learning rate and throughput, plus the monitor and the extra_val sets' AUCs when the run has them.
EPOCH_CURVES = ("train_loss", "val_loss", "val_auc", "val_ap", "lr", "images_per_s")
# Logged once at the end with the kept weights (the full report is evaluation/metrics.json).
TEST_METRICS = ("auc", "ap", "eer", "accuracy", "loss")


def epoch_curves(row: dict[str, float], monitor: str) -> dict[str, float]:
    """The per-epoch metrics MLflow gets out of one training_log row."""
    extra = {k for k in row if k.startswith("val_") and k.endswith("_auc") and k != "val_auc"}  # data.extra_val
    keep = set(EPOCH_CURVES) | {monitor} | extra
    return {k: v for k, v in row.items() if k in keep}


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
    experiment_id: str | None = None


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
               out_dir: Path, model_input=None, full: bool = True) -> dict[str, float]:
    """The evaluation dashboard and metrics (evaluation.report); returns flat metrics for MLflow.
    `model_input(paths)` gives the error gallery what the model saw (evaluation.gallery.model_input_images);
    `full=False` (train.report=metrics) writes the metrics files only."""
    if val_table is None or val_table["label"].nunique() < 2:
        return {}
    from evaluation.report import evaluate_predictions

    report = evaluate_predictions(val_table, test_table, history, out_dir, model_input=model_input, figures=full)
    return dict(report.metrics)


def finish_run(trainer: "Trainer", tracker: "RunTracker", status: str) -> "TrainResult":
    """Load the best weights, score the test split, write and log everything the run keeps."""
    cfg, run_dir = trainer.cfg, trainer.run_dir
    best_path = run_dir / "best.pt"
    if trainer.best_state is not None:  # kept in memory (no train.save_last): the one write of best.pt
        trainer.eval_model.load_state_dict(trainer.best_state["model"])
        atomic_save(trainer.best_state, best_path)
    elif best_path.exists():
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
    from functools import partial

    from evaluation.gallery import model_input_images

    dc = trainer.model.data_config
    run_report(val_table, test_table, history, run_dir / "evaluation",  # everything: evaluation/metrics.json
               partial(model_input_images, cfg, dc["mean"], dc["std"]), full=cfg.train.report == "full")
    # best_<m>: each validation curve at the kept (best) epoch, the monitor included (ensemble selection)
    curves = epoch_curves(trainer.best_val_metrics, cfg.train.monitor)
    at_best = {f"best_{k}": v for k, v in curves.items() if k.startswith("val_")}
    final = {**final_test_metrics(test_metrics, [e.name for e in trainer.extra_sets]), **at_best,
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
    tracker.set_tags({"run_status": status, "run_dir": str(run_dir.resolve()), "best_epoch": str(trainer.best_epoch),
                      "report": cfg.train.report})
    log.info("event=run_end status=%s best_epoch=%d best_%s=%.4f %s", status, trainer.best_epoch,
             cfg.train.monitor, trainer.best_metric, " ".join(f"{k}={v:.4f}" for k, v in test_metrics.items()))
    return TrainResult(
        run_id=tracker.run_id, status=status, best_metric=float(trainer.best_metric), best_epoch=trainer.best_epoch,
        epochs_run=len(trainer.history), val_metrics=dict(trainer.best_val_metrics), test_metrics=test_metrics,
        output_dir=run_dir, experiment_id=tracker.experiment_id,
    )


def final_test_metrics(test_metrics: dict[str, float], extra_names: list[str]) -> dict[str, float]:
    """The few test_* metrics MLflow gets: TEST_METRICS on the run's test split, AUC on each extra_val set."""
    keep = {f"test_{m}" for m in TEST_METRICS} | {f"test_{n}_auc" for n in extra_names}
    return {k: v for k, v in test_metrics.items() if k in keep}


def copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
