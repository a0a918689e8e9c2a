"""Ensembles of finished runs, built from their logged val/test predictions (no re-inference).

    python -m serving.ensemble --study NAME | --experiment NAME | --runs ID [ID ...] \
        --top 5 --metric val_auc --method weighted [--calibrate]

Members are the top-K finished runs by a metric; their predictions/{val,test}.parquet are joined on
`path` (identical images and labels required). Methods (rule of serving.pyfunc_model.combine_scores):
mean = average logit; soft = average P(fake); weighted = P(fake) weighted by non-negative weights
summing to 1 that minimise validation log loss; rank = average rank against each member's validation
scores; hard = share of members voting fake at their validation EER threshold. `--calibrate` first
divides each member's logits by its temperature fitted on validation. Everything (members with
bootstrap 95% intervals, weights, the dashboard, and an image model of the member networks) is logged
to an MLflow run named ensemble-<method>.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import mlflow
import numpy as np
import pandas as pd
from scipy.optimize import minimize

from evaluation.calibration import fit_temperature, logits_from_scores, sigmoid
from evaluation.metrics import binary_metrics, bootstrap_ci
from serving.pyfunc_model import combine_scores, reduce_reference
from core.errors import UserError
from core.cli import ArgumentParser

log = logging.getLogger(__name__)

METHOD_RULES = {"mean": "logit", "soft": "prob", "weighted": "prob", "rank": "rank", "hard": "vote"}
LOWER_IS_BETTER = ("loss", "eer", "ece", "mce", "ace", "brier")
EXCLUDED = {"sweep_role": "parent", "run_kind": "ensemble", "eval_only": "true"}  # never ensemble members
REPORTED = ("auc", "ap", "log_loss", "ece", "accuracy", "eer")
_EPS = 1e-7


class EnsembleError(UserError):
    """Bad selection or incompatible runs; one line saying what to change."""


@dataclass
class MemberRun:
    run_id: str
    name: str
    metric: float
    experiment_id: str
    data_digest: str | None
    val: pd.DataFrame
    test: pd.DataFrame


@dataclass
class EnsembleResult:
    method: str
    rule: str
    names: list[str]
    weights: np.ndarray
    temperatures: np.ndarray
    thresholds: np.ndarray
    references: list[list[float]]
    val: pd.DataFrame  # path, label, score, logit (+ group/subset of the first member)
    test: pd.DataFrame
    members: pd.DataFrame  # one row per member + "ensemble": test metrics with 95% intervals, weight, T
    run_id: str | None = None
    model_uri: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ selection
def higher_is_better(metric: str) -> bool:
    return not any(k in metric for k in LOWER_IS_BETTER)


def candidate_runs(*, experiment: str | None = None, study: str | None = None,
                   run_ids: Sequence[str] | None = None) -> list[Any]:
    """Finished runs of an experiment, of a study's trials (tag study_name), or the given ids."""
    if sum(x is not None and x != [] for x in (experiment, study, run_ids)) != 1:
        raise EnsembleError("give exactly one of --experiment, --study or --runs")
    if run_ids:
        runs = []
        for rid in run_ids:
            try:
                runs.append(mlflow.get_run(rid))
            except mlflow.exceptions.MlflowException:
                raise EnsembleError(f"run {rid} not found in {mlflow.get_tracking_uri()}") from None
        return runs
    finished = "attributes.status = 'FINISHED'"
    if experiment is not None:
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            raise EnsembleError(f"experiment {experiment!r} not found in {mlflow.get_tracking_uri()}")
        runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], filter_string=finished, output_format="list")
    else:
        runs = mlflow.search_runs(filter_string=f"tags.study_name = '{study}' AND {finished}",
                                  search_all_experiments=True, output_format="list")
    runs = [r for r in runs if not any(r.data.tags.get(k) == v for k, v in EXCLUDED.items())]
    if not runs:
        where = f"experiment {experiment!r}" if experiment is not None else f"study {study!r} (tag study_name)"
        raise EnsembleError(f"no finished runs in {where}")
    return runs


def read_predictions(run_id: str, split: str, tmp: str) -> pd.DataFrame | None:
    """The run's predictions/<split>.parquet, or None when it was not logged."""
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"predictions/{split}.parquet",
                                                    dst_path=tmp)
    except (mlflow.exceptions.MlflowException, OSError):
        return None
    return pd.read_parquet(local)


def report_metric(run_id: str, metric: str) -> float:
    """`metric` from a run's evaluation/metrics.json ("flat" section); NaN when the run has no such file or key."""
    try:
        flat = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/evaluation/metrics.json")).get("flat", {})
    except Exception:  # no evaluation logged (e.g. one-class val) or an unreadable store
        return math.nan
    v = flat.get(metric)
    return float(v) if v is not None else math.nan


def select_members(runs: Sequence[Any], top: int, metric: str, keep_all: bool = False) -> list[MemberRun]:
    """The best `top` runs by `metric` that have val and test predictions. The value is best_<metric> (at the
    kept epoch) when logged, else the metric itself, else the run's evaluation/metrics.json (where the
    metrics MLflow does not chart live, e.g. val_eer or val_f1 of the kept weights)."""
    sign = -1.0 if higher_is_better(metric) else 1.0
    if metric.startswith("test_"):
        log.warning("event=select_on_test metric=%s (selecting members on test leaks the test set)", metric)
    cache: dict[str, float] = {}

    def value(run) -> float:
        m, rid = run.data.metrics, run.info.run_id
        if f"best_{metric}" in m or metric in m:
            return float(m.get(f"best_{metric}", m.get(metric)))
        if rid not in cache:
            cache[rid] = report_metric(rid, metric)
        return cache[rid]

    ranked = sorted(runs, key=lambda r: (math.isnan(value(r)), 0.0 if math.isnan(value(r)) else sign * value(r)))
    members: list[MemberRun] = []
    with tempfile.TemporaryDirectory(prefix="ensemble-preds-") as tmp:
        for run in ranked:
            if len(members) >= top and not keep_all:
                break
            rid = run.info.run_id
            if math.isnan(value(run)) and not keep_all:
                log.info("event=skip_run run_id=%s reason=no_metric metric=%s", rid, metric)
                continue
            val, test = read_predictions(rid, "val", tmp), read_predictions(rid, "test", tmp)
            if val is None or test is None:
                log.warning("event=skip_run run_id=%s reason=missing_predictions val=%s test=%s", rid,
                            val is not None, test is not None)
                continue
            members.append(MemberRun(rid, run.info.run_name or rid[:8], value(run), run.info.experiment_id,
                                     run.data.tags.get("data_digest"), val, test))
    if len(members) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 runs with predictions/val.parquet and test.parquet; "
                            f"found {len(members)} among {len(runs)} candidate runs")
    names = [m.name for m in members]
    for m in members:  # readable but unique member names (run names repeat across experiments)
        if names.count(m.name) > 1:
            m.name = f"{m.name}-{m.run_id[:6]}"
    digests = {m.data_digest for m in members}
    if len(digests) > 1:
        log.warning("event=mixed_data_digest digests=%s (predictions are still joined on path)",
                    sorted(map(str, digests)))
    return members


# ------------------------------------------------------------------------------------ the maths
def align(tables: Sequence[pd.DataFrame], names: Sequence[str], split: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Join member tables on `path`: (first member's rows: path, label[, group, subset]; logits (N, K))."""
    base = tables[0].reset_index(drop=True)
    keep = [c for c in ("path", "label", "group", "subset") if c in base.columns]
    logits = np.empty((len(base), len(tables)))
    for k, (df, name) in enumerate(zip(tables, names)):
        missing = [c for c in ("path", "label", "score") if c not in df.columns]
        if missing:
            raise EnsembleError(f"{split} predictions of {name} lack column(s) {missing}")
        if df["path"].duplicated().any():
            dup = df["path"][df["path"].duplicated()].iloc[0]
            raise EnsembleError(f"{split} predictions of {name} list a path twice: {dup}")
        if set(df["path"]) != set(base["path"]):
            common = len(set(df["path"]) & set(base["path"]))
            raise EnsembleError(
                f"runs were evaluated on different {split} data: {names[0]} has {len(base)} images, {name} has "
                f"{len(df)}, {common} in common; ensemble runs trained on the same data and split (data_digest)")
        row = df.set_index("path").loc[base["path"]]
        if not np.array_equal(row["label"].to_numpy(), base["label"].to_numpy()):
            bad = base["path"][row["label"].to_numpy() != base["label"].to_numpy()].iloc[0]
            raise EnsembleError(f"{split} labels differ between {names[0]} and {name} (e.g. {bad})")
        z = row["logit"].to_numpy(np.float64) if "logit" in row.columns else logits_from_scores(row["score"])
        logits[:, k] = z
    return base[keep].copy(), logits


def log_loss_of(p: np.ndarray, y: np.ndarray) -> float:
    q = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def fit_weights(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Weights >= 0 summing to 1 minimising the log loss of probs @ w (convex; SLSQP from equal weights)."""
    p, y = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
    k = p.shape[1]

    def loss(w: np.ndarray) -> float:
        return log_loss_of(p @ w, y)

    def grad(w: np.ndarray) -> np.ndarray:
        q = np.clip(p @ w, _EPS, 1 - _EPS)
        return -(p * (y / q - (1 - y) / (1 - q))[:, None]).mean(axis=0)

    res = minimize(loss, np.full(k, 1.0 / k), jac=grad, method="SLSQP", bounds=[(0.0, 1.0)] * k,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(k)}],
                   options={"ftol": 1e-12, "maxiter": 1000})
    w = np.clip(res.x, 0.0, None)
    w = w / w.sum() if w.sum() > 0 else np.full(k, 1.0 / k)
    # guard against a solver that stopped early: never worse than equal weights or the best single member
    best = min([w, np.full(k, 1.0 / k), *np.eye(k)], key=loss)
    log.info("event=weights_fitted converged=%s val_log_loss=%.5f weights=%s", res.success, loss(best),
             np.round(best, 4).tolist())
    return best


def ensemble_predictions(val_tables: Sequence[pd.DataFrame], test_tables: Sequence[pd.DataFrame],
                         names: Sequence[str], method: str = "weighted", calibrate: bool = False,
                         n_boot: int = 1000, seed: int = 0) -> EnsembleResult:
    """Fit the ensemble on validation predictions and score test; members and ensemble with 95% CIs."""
    if method not in METHOD_RULES:
        raise EnsembleError(f"unknown method {method!r}; valid: {', '.join(METHOD_RULES)}")
    rule, k = METHOD_RULES[method], len(names)
    val, zv = align(val_tables, names, "val")
    test, zt = align(test_tables, names, "test")
    yv, yt = val["label"].to_numpy(np.int64), test["label"].to_numpy(np.int64)
    temps = np.array([fit_temperature(zv[:, i], yv) for i in range(k)]) if calibrate else np.ones(k)
    pv, pt = sigmoid(zv / temps), sigmoid(zt / temps)
    thresholds = np.array([binary_metrics(yv, pv[:, i])["eer_threshold"] for i in range(k)]) \
        if rule == "vote" else np.full(k, 0.5)
    refs = [reduce_reference(zv[:, i] / temps[i]) for i in range(k)]
    weights = fit_weights(pv, yv) if method == "weighted" else np.full(k, 1.0 / k)
    args = (rule, weights, temps, thresholds, refs)
    val["score"], test["score"] = combine_scores(zv, *args), combine_scores(zt, *args)
    for df in (val, test):
        df["logit"] = logits_from_scores(df["score"])
    rows = [_report_row(n, yt, pt[:, i], pv[:, i], yv, n_boot, seed) | {"weight": weights[i], "temperature": temps[i]}
            for i, n in enumerate(names)]
    rows.append(_report_row("ensemble", yt, test["score"].to_numpy(), val["score"].to_numpy(), yv, n_boot, seed)
                | {"weight": float(weights.sum()), "temperature": math.nan})
    table = pd.DataFrame(rows).set_index("member")
    log.info("event=ensemble method=%s members=%d test_auc=%.4f [%.4f, %.4f] best_member_test_auc=%.4f", method, k,
             table.loc["ensemble", "test_auc"], table.loc["ensemble", "test_auc_ci_low"],
             table.loc["ensemble", "test_auc_ci_high"], table["test_auc"].iloc[:-1].max())
    return EnsembleResult(method, rule, list(names), weights, temps, thresholds, refs, val, test, table)


def _report_row(name: str, yt: np.ndarray, st: np.ndarray, sv: np.ndarray, yv: np.ndarray, n_boot: int,
                seed: int) -> dict[str, Any]:
    m = binary_metrics(yt, st)
    row: dict[str, Any] = {"member": name, **{f"test_{k}": m[k] for k in REPORTED}}
    for metric in ("auc", "ap"):  # same seed -> the same resamples for every member (paired)
        row[f"test_{metric}_ci_low"], row[f"test_{metric}_ci_high"] = bootstrap_ci(yt, st, metric, n_boot, seed)
    row["val_log_loss"] = log_loss_of(sv, yv.astype(np.float64))
    return row


# ------------------------------------------------------------------------------------ MLflow
def log_ensemble_run(result: EnsembleResult, members: Sequence[MemberRun], selection: dict[str, Any],
                     out_dir: Path, log_model: bool = True) -> EnsembleResult:
    """Write predictions, members table and dashboard to out_dir; log them as run ensemble-<method>."""
    from evaluation.report import evaluate_predictions

    (out_dir / "predictions").mkdir(parents=True, exist_ok=True)
    result.val.to_parquet(out_dir / "predictions" / "val.parquet")
    result.test.to_parquet(out_dir / "predictions" / "test.parquet")
    result.members.to_csv(out_dir / "members.csv")
    report = evaluate_predictions(result.val, result.test, None, out_dir / "evaluation",
                                  extra_tables={"Ensemble members (test, 95% bootstrap CI)": result.members.round(4)},
                                  title=f"Ensemble ({result.method}, {len(members)} members)")
    digests = {m.data_digest for m in members}
    ids = [m.run_id for m in members]
    spec = {"method": result.method, "rule": result.rule, "members": ids, "names": result.names,
            "weights": result.weights.tolist(), "temperatures": result.temperatures.tolist(),
            "thresholds": result.thresholds.tolist(), **selection}
    (out_dir / "ensemble.json").write_text(json.dumps(spec, indent=1))
    tags = {"run_kind": "ensemble", "model_type": "ensemble", "ensemble_method": result.method,
            "ensemble_members": ",".join(ids), "data_digest": digests.pop() if len(digests) == 1 else "mixed",
            "run_dir": str(out_dir.resolve())}
    eid = members[0].experiment_id
    with mlflow.start_run(experiment_id=eid, run_name=f"ensemble-{result.method}", tags=tags) as run:
        mlflow.log_params({"method": result.method, "rule": result.rule, "n_members": len(ids),
                           **{k: str(v) for k, v in selection.items()},
                           **{f"member_{i}": r for i, r in enumerate(ids)}})
        metrics = dict(report.metrics)
        for i, (_, row) in enumerate(result.members.iloc[:-1].iterrows()):
            metrics[f"weight_{i}"] = float(row["weight"])
            metrics.update({f"member_{i}_{c}": float(row[c])
                            for c in ("test_auc", "test_auc_ci_low", "test_auc_ci_high")})
        mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
        for name in ("members.csv", "ensemble.json"):
            mlflow.log_artifact(str(out_dir / name))
        mlflow.log_artifacts(str(out_dir / "predictions"), "predictions")
        mlflow.log_artifacts(str(out_dir / "evaluation"), "evaluation")
        if log_model:
            result.model_uri = _log_members_model(result, ids)
        result.run_id, result.metrics = run.info.run_id, metrics
    return result


def _log_members_model(result: EnsembleResult, run_ids: Sequence[str]) -> str | None:
    """The member networks as one image pyfunc (name image_model); skipped when a checkpoint is missing."""
    from serving.pyfunc_model import log_image_model, member_from_run
    from core.checkpoints import CheckpointError

    try:
        specs = [member_from_run(rid, temperature=float(t), threshold=float(th), reference=ref)
                 for rid, t, th, ref in zip(run_ids, result.temperatures, result.thresholds, result.references)]
    except CheckpointError as e:
        log.warning("event=ensemble_model_skipped reason=%r", str(e))
        return None
    example = next((p for p in result.test["path"] if Path(p).is_file()), None)
    return log_image_model(specs, result.weights.tolist(), rule=result.rule, example_path=example,
                           tags={"ensemble_method": result.method}).model_uri


def run_ensemble(*, experiment: str | None = None, study: str | None = None, run_ids: Sequence[str] | None = None,
                 top: int = 5, metric: str = "val_auc", method: str = "weighted", calibrate: bool = False,
                 log_model: bool = True, out_dir: str | Path | None = None, n_boot: int = 1000) -> EnsembleResult:
    """Select members, fit and evaluate the ensemble, log the `ensemble-<method>` run (see module doc)."""
    if top < 2:
        raise EnsembleError(f"--top must be at least 2; got {top}")
    runs = candidate_runs(experiment=experiment, study=study, run_ids=run_ids)
    members = select_members(runs, top, metric, keep_all=bool(run_ids))
    result = ensemble_predictions([m.val for m in members], [m.test for m in members], [m.name for m in members],
                                  method, calibrate, n_boot)
    selection = {"selection": "runs" if run_ids else ("study" if study else "experiment"),
                 "selection_value": study or experiment or "explicit", "metric": metric, "top": top,
                 "calibrate": calibrate}
    out = Path(out_dir) if out_dir else Path("outputs") / time.strftime(f"ensemble-{method}-%Y%m%d-%H%M%S")
    return log_ensemble_run(result, members, selection, out, log_model)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m serving.ensemble", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--experiment", help="MLflow experiment name: its finished runs")
    src.add_argument("--study", help="Optuna study name: its trial runs (tag study_name)")
    src.add_argument("--runs", nargs="+", metavar="RUN_ID", help="explicit run ids (all are used)")
    p.add_argument("--top", type=int, default=5, help="number of members (default 5)")
    p.add_argument("--metric", default="val_auc", help="selection metric (default val_auc; *loss/eer/ece: lower)")
    p.add_argument("--method", default="weighted", choices=list(METHOD_RULES))
    p.add_argument("--calibrate", action="store_true", help="temperature-scale each member on validation first")
    p.add_argument("--no-model", action="store_true", help="do not log the member networks as an image model")
    p.add_argument("--out", help="output folder (default outputs/ensemble-<method>-<time>)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--tracking-uri", help="default $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db")
    a = p.parse_args(argv)
    from core.tracking import setup_cli

    setup_cli(a.tracking_uri)
    try:
        r = run_ensemble(experiment=a.experiment, study=a.study, run_ids=a.runs, top=a.top, metric=a.metric,
                         method=a.method, calibrate=a.calibrate, log_model=not a.no_model, out_dir=a.out,
                         n_boot=a.n_boot)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cols = ["weight", "temperature", "test_auc", "test_auc_ci_low", "test_auc_ci_high", "test_log_loss", "test_ece"]
    print(r.members[cols].round(4).to_string())
    print(f"ensemble run: {r.run_id}" + (f"  image model: {r.model_uri}" if r.model_uri else ""))
    return 0


if __name__ == "__main__":
    from core.cli import exit_now

    exit_now(main())
