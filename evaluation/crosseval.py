"""Cross-dataset matrix: several trained runs x several data sets -> AUC, AP, EER, ECE and accuracy per cell.

    python -m evaluation.crosseval --runs RUN_A RUN_B --datasets /data/ffpp /data/celebdf /data/dfdc
    python -m evaluation.crosseval --runs outputs/<run>/best.pt RUN_B --datasets a.csv b/ --max_images 2000

Each --runs entry is an MLflow run id or a checkpoint (file, run folder, runs:/ URI). Scoring is
evaluation.evaluate's (same TTA flags, all images of each data set, --max_images cap). A data set that is
the run's own training data (same data_dir) is scored on its test split only (--in_domain_split; the
split the training config cuts), so the diagonal is not inflated by training images.

Accuracy is taken at each run's own operating threshold, chosen on that run's validation predictions
(predictions/val.parquet it logged; re-scored when --tta differs from training's) by --operating_point
(default eer: the val EER threshold; also best_f1, youden_j, target_fpr, default = 0.5), as a deployed
detector would use it; a run without val predictions falls back to 0.5 (named in `threshold_from`).
`accuracy_at_0.5` is there too. ECE is the 15-bin expected calibration error of P(fake).

Writes crosseval.csv (long: run, dataset, auc, ap, eer, ece, accuracy, threshold, accuracy_at_0.5, n,
in_domain, split, threshold_from), auc_matrix.csv (runs x data sets), crosseval.html (heatmaps + table,
self-contained) and predictions/<run>__<data>.parquet, and logs them to an MLflow run named `crosseval`
(in the first source run's experiment, else --experiment_name) with one metric per cell and measure:
`<auc|ap|eer|ece|accuracy>_<run>__<data set>`, plus `threshold_<run>`.
"""
from __future__ import annotations

import gc
import logging
import math
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from evaluation.evaluate import (
    EvalOptions, add_scoring_args, check_supported, dataset_name, is_bad_input, score_dataset, setup_cli, tta_from_args,
    validation_table,
)
from evaluation.sources import EvaluateError, Source, attach_run, resolve_source
from core.cli import ArgumentParser

log = logging.getLogger(__name__)

CELL_METRICS = ("auc", "ap", "eer", "ece", "accuracy")  # accuracy at the run's val-chosen threshold


@dataclass
class CrossEvalResult:
    long: pd.DataFrame  # one row per (run, dataset)
    matrix: pd.DataFrame  # AUC, runs x datasets
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)
    mlflow_run_id: str | None = None


def _key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def source_for(ref: str) -> Source:
    """A run id of this tracking store, else a checkpoint reference."""
    if Path(ref).exists() or ref.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        return Source(ref)
    return resolve_source(run_id=ref)


def _same_data(a: str | Path | None, b: str | Path) -> bool:
    return a is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def cell_metrics(table: pd.DataFrame, threshold: float = 0.5) -> dict[str, float]:
    """AUC, AP, EER, ECE, accuracy at `threshold` and at 0.5 of one predictions table.

    A one-class table (e.g. a folder of fakes only) gets NaN for the ranking and calibration measures but
    still its accuracies (the detection rate of that class)."""
    import numpy as np

    from evaluation.metrics import MetricError, binary_metrics

    y, s = table["label"].to_numpy(), table["score"].to_numpy(dtype=float)
    accuracy = {"accuracy": float(np.mean((s >= threshold) == (y == 1))) if len(y) else math.nan,
                "accuracy_at_0.5": float(np.mean((s >= 0.5) == (y == 1))) if len(y) else math.nan}
    try:
        m = binary_metrics(y, s, threshold)
        return {**{k: float(m[k]) for k in CELL_METRICS}, **accuracy}
    except MetricError as e:
        log.warning("event=crosseval_cell_nan reason=%s", e)
        return {**{k: math.nan for k in CELL_METRICS}, **accuracy}


def val_threshold(source: Source, trained, opts: EvalOptions) -> tuple[float, str]:
    """(threshold, where it came from): `opts.operating_point` chosen on the run's own val predictions."""
    from evaluation.thresholds import choose_thresholds

    with tempfile.TemporaryDirectory() as tmp:
        val, provenance = validation_table(source, trained, opts, Path(tmp))
    if val is None or val["label"].nunique() < 2:
        log.warning("event=crosseval_no_val_threshold source=%s: accuracy at 0.5", source.label)
        return 0.5, "0.5 (the run logged no two-class val predictions)"
    thresholds = choose_thresholds(val["label"], val["score"])
    if opts.operating_point not in thresholds:
        raise EvaluateError(f"--operating_point must be one of {', '.join(thresholds)}; got {opts.operating_point!r}")
    return float(thresholds[opts.operating_point]), f"{opts.operating_point} on {provenance}"


def crosseval(sources: list[Source], datasets: list[str], opts: EvalOptions, out_dir: str | Path, *,
              device: str = "auto", use_amp: bool = False, in_domain_split: str = "test",
              face_crops: list[str | None] | None = None) -> CrossEvalResult:
    """Score every source on every dataset; write the long table, the AUC matrix and the heatmap page.
    face_crops: per data set none | mtcnn | None (what each run trained with)."""
    from dataio.data import DataError
    from evaluation.scoring import with_face_crop
    from models.build import load_trained_model

    out_dir = Path(out_dir)
    (out_dir / "predictions").mkdir(parents=True, exist_ok=True)
    for d in datasets:
        if not Path(d).expanduser().exists():
            raise EvaluateError(f"data dir not found: {d}")
    data_names = _unique([dataset_name(d) for d in datasets])
    face_crops = list(face_crops or [None])
    if len(face_crops) == 1:
        face_crops *= len(datasets)
    if len(face_crops) != len(datasets):
        raise EvaluateError(f"--face_crop takes one value or one per data set ({len(datasets)}); got {len(face_crops)}")
    rows, labels, attached = [], [], []
    for source in sources:
        trained = load_trained_model(source.checkpoint, device, use_amp)
        check_supported(trained, opts)
        source = attach_run(source, trained)
        attached.append(source)
        label = source.label if source.label not in labels else f"{source.label}_{len(labels) + 1}"
        labels.append(label)
        threshold, threshold_from = val_threshold(source, trained, opts)
        for data_dir, name, face_crop in zip(datasets, data_names, face_crops):
            in_domain = _same_data(trained.config.data.data_dir, data_dir)
            data_trained = with_face_crop(trained, face_crop)
            split = in_domain_split if in_domain else "all"
            try:
                data = score_dataset(data_trained, data_dir, opts, split=split, mc_dropout=0)
            except DataError:
                if not in_domain or split == "all":
                    raise
                log.warning("event=in_domain_split_empty data=%s split=%s: scoring all images", data_dir, split)
                split, data = "all", score_dataset(data_trained, data_dir, opts, split="all", mc_dropout=0)
            data.table.to_parquet(out_dir / "predictions" / f"{_key(label)}__{_key(name)}.parquet")
            rows.append({"run": label, "run_id": source.run_id, "dataset": name, "data_dir": str(data_dir),
                         "face_crop": data_trained.config.data.face_crop,
                         **cell_metrics(data.table, threshold), "threshold": threshold, "n": len(data.table),
                         "in_domain": in_domain, "split": split, "threshold_from": threshold_from})
            log.info("event=crosseval_cell run=%s data=%s auc=%.4f accuracy=%.4f threshold=%.4f n=%d", label, name,
                     rows[-1]["auc"], rows[-1]["accuracy"], threshold, len(data.table))
        del trained
        gc.collect()
    long = pd.DataFrame(rows)
    matrix = long.pivot(index="run", columns="dataset", values="auc").reindex(index=labels, columns=data_names)
    matrix.index.name, matrix.columns.name = "run", "dataset"
    result = CrossEvalResult(long, matrix, out_dir, sources=attached)
    result.files = write_outputs(result)
    return result


def write_outputs(result: CrossEvalResult) -> dict[str, Path]:
    """crosseval.csv, auc_matrix.csv and crosseval.html (AUC and AP heatmaps, the long table)."""
    from evaluation.dashboard import write_dashboard
    from evaluation.figures import heatmap_figure

    out = result.out_dir
    files = {"long_csv": out / "crosseval.csv", "auc_matrix_csv": out / "auc_matrix.csv"}
    result.long.to_csv(files["long_csv"], index=False)
    result.matrix.to_csv(files["auc_matrix_csv"])
    def pivot(measure: str) -> pd.DataFrame:
        return result.long.pivot(index="run", columns="dataset", values=measure).reindex_like(result.matrix)

    figures = {"auc_matrix": heatmap_figure(result.matrix, "Cross-dataset AUC (rows: runs, columns: data sets)",
                                            zmin=0.0, zmax=1.0),
               "ap_matrix": heatmap_figure(pivot("ap"), "Cross-dataset AP", zmin=0.0, zmax=1.0),
               "accuracy_matrix": heatmap_figure(pivot("accuracy"), "Accuracy at each run's val-chosen threshold",
                                                 zmin=0.0, zmax=1.0),
               "eer_matrix": heatmap_figure(pivot("eer"), "EER (lower is better)", zmin=0.0, zmax=1.0),
               "ece_matrix": heatmap_figure(pivot("ece"), "ECE of P(fake) (lower is better)", zmin=0.0, zmax=1.0)}
    table = result.long.drop(columns=["data_dir"]).set_index(["run", "dataset"])
    table.attrs["caption"] = ("accuracy at the threshold each run chose on its own validation set (threshold, "
                              "threshold_from), accuracy_at_0.5 at 0.5; ECE over 15 equal-width bins; in_domain rows "
                              "(the run's own training data) use the split named in 'split'")
    files["html"] = write_dashboard(out / "crosseval.html", figures, {"Cells": table}, "Cross-dataset evaluation",
                                    subtitle=f"{len(result.matrix)} runs x {result.matrix.shape[1]} data sets")
    return files


def log_crosseval(result: CrossEvalResult, opts: EvalOptions, experiment_name: str,
                  tracking_uri: str | None = None) -> str:
    """An MLflow run named `crosseval`: one metric per cell and measure (`<measure>_<run>__<data>` for auc, ap, eer,
    ece, accuracy; `threshold_<run>`), the files as artifacts."""
    import mlflow

    from core.config import TrackingConfig
    from core.tracking import configure_mlflow

    first = next((s for s in result.sources if s.run is not None), None)
    exp_id = (first.run.info.experiment_id if first is not None else
              configure_mlflow(TrackingConfig(tracking_uri=tracking_uri, experiment_name=experiment_name)))
    run_ids = [s.run_id for s in result.sources if s.run_id]
    tags = {"run_kind": "crosseval", "eval_only": "true", "source_run_ids": ",".join(run_ids)[:5000]}
    with mlflow.start_run(run_name="crosseval", experiment_id=exp_id, tags=tags) as run:
        mlflow.log_params({**opts.params(), "runs": ",".join(result.matrix.index)[:5000],
                           "datasets": ",".join(result.long["data_dir"].unique())[:5000]})
        metrics = {}
        for r in result.long.to_dict("records"):
            for m in CELL_METRICS:
                if math.isfinite(r[m]):
                    metrics[f"{m}_{_key(r['run'])}__{_key(r['dataset'])}"[:250]] = float(r[m])
            metrics[f"threshold_{_key(r['run'])}"[:250]] = float(r["threshold"])
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(result.out_dir))
    result.mlflow_run_id = run.info.run_id
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m evaluation.crosseval", description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="MLflow run ids or checkpoints")
    p.add_argument("--datasets", nargs="+", required=True, help="data folders or CSV indexes")
    p.add_argument("--in_domain_split", default="test", choices=["all", "test", "val"],
                   help="split scored when a data set is the run's own training data")
    p.add_argument("--operating_point", default="eer",
                   choices=["eer", "best_f1", "youden_j", "target_fpr", "default"],
                   help="threshold chosen on each run's own val predictions for the accuracy column")
    add_scoring_args(p)
    a = p.parse_args(argv)
    uri = setup_cli(a)
    try:
        if a.max_images is not None and a.max_images < 1:
            raise EvaluateError("--max_images must be >= 1")
        opts = EvalOptions(tta=tta_from_args(a), max_images=a.max_images, batch_size=a.batch_size,
                           num_workers=a.num_workers, seed=a.seed, operating_point=a.operating_point)
        sources = [source_for(r) for r in a.runs]
        out_dir = Path(a.output_dir or Path("outputs") / "crosseval" / time.strftime("%Y%m%d-%H%M%S"))
        result = crosseval(sources, a.datasets, opts, out_dir, device=a.device, use_amp=a.use_amp,
                           in_domain_split=a.in_domain_split, face_crops=a.face_crop)
        if not a.no_tracking:
            log_crosseval(result, opts, a.experiment_name, uri)
    except Exception as e:
        if not is_bad_input(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    with pd.option_context("display.width", 160, "display.float_format", "{:.4f}".format):
        print(result.matrix.to_string())
        print()
        print(result.long[["run", "dataset", *CELL_METRICS, "threshold", "n"]].to_string(index=False))
    print(f"matrix: {result.files['auc_matrix_csv']}  heatmap: {result.files['html']}")
    if result.mlflow_run_id:
        print(f"mlflow run `crosseval`: {result.mlflow_run_id}")
    return 0


if __name__ == "__main__":
    from core.cli import exit_now

    exit_now(main())
