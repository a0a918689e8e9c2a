"""Register a run's image model and gate the `champion` alias on its test predictions.

    python -m serving.promote --run RUN_ID [--name deepfake-detector] [--margin 0.0] [--force]

The run (single or ensemble) gets its image pyfunc registered (logged into the run as `image_model`
first when it only has the tensor model), alias `challenger`. It then replaces `champion` only if its
test AUC is not below the champion's by more than `margin`, both scored on the same test images
(paired bootstrap 95% interval of the difference and each model's ECE are recorded). No champion
yet: it becomes champion. `--force` moves the alias regardless. Exit status: 0 champion (now or
already), 1 refused by the gate, 2 bad input.
"""
from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from evaluation.metrics import MetricError, binary_metrics, bootstrap_distribution
from core.errors import UserError
from core.cli import ArgumentParser

log = logging.getLogger(__name__)

DEFAULT_NAME = "deepfake-detector"
CHAMPION, CHALLENGER = "champion", "challenger"
VERSION_METRICS = ("auc", "ap", "ece", "log_loss", "accuracy", "eer")


class PromotionError(UserError):
    """A run or registry state that cannot be promoted; one line saying what to fix."""


@dataclass
class PromotionResult:
    model_name: str
    version: str
    run_id: str
    model_uri: str
    promoted: bool  # True when this version holds `champion` afterwards
    reason: str
    metric: str
    challenger_value: float
    challenger_ece: float
    champion_version: str | None = None  # the champion it was compared with
    champion_value: float | None = None
    champion_ece: float | None = None
    diff: float | None = None  # challenger - champion on `metric`
    diff_ci: tuple[float, float] | None = None


def test_predictions(run_id: str) -> pd.DataFrame:
    """The run's predictions/test.parquet (path, label, score, ...)."""
    from serving.ensemble import read_predictions

    with tempfile.TemporaryDirectory(prefix="promote-") as tmp:
        df = read_predictions(run_id, "test", tmp)
    if df is None:
        raise PromotionError(f"run {run_id} has no predictions/test.parquet artifact; promotion compares test "
                             "predictions, so train with a test split")
    return df


def ensure_image_model(run, example_path: str | None) -> str:
    """The run's image pyfunc URI (tag image_model_uri); logs one from its checkpoint when missing."""
    from serving.pyfunc_model import log_image_model, member_from_run
    from core.checkpoints import CheckpointError

    uri = run.data.tags.get("image_model_uri")
    if uri:
        return uri
    try:
        member = member_from_run(run.info.run_id)
    except CheckpointError as e:
        raise PromotionError(str(e)) from None
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run.info.run_id:
        return log_image_model([member], [1.0], name="image_model", example_path=example_path).model_uri
    if active is not None:
        raise PromotionError(f"run {active.info.run_id} is active; end it before promoting {run.info.run_id}")
    with mlflow.start_run(run_id=run.info.run_id):  # reopens the finished run; it is FINISHED again on exit
        info = log_image_model([member], [1.0], name="image_model", example_path=example_path)
    return info.model_uri


def paired_difference(labels: np.ndarray, challenger: np.ndarray, champion: np.ndarray, metric: str = "auc",
                      n_boot: int = 1000, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """challenger - champion on `metric` with a paired stratified bootstrap 95% interval.

    bootstrap_distribution draws its resamples from (seed, labels) only, so the same seed gives both
    models the same resampled images: the differences are paired."""
    a = bootstrap_distribution(labels, challenger, metric, n_boot, seed)
    b = bootstrap_distribution(labels, champion, metric, n_boot, seed)
    if a.size != b.size or a.size == 0:
        raise MetricError(f"paired bootstrap of {metric}: unequal or empty resamples ({a.size} vs {b.size})")
    point = binary_metrics(labels, challenger)[metric] - binary_metrics(labels, champion)[metric]
    low, high = np.quantile(a - b, [0.025, 0.975])
    return float(point), (float(low), float(high))


def _same_test_set(chal: pd.DataFrame, champ: pd.DataFrame, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, challenger scores, champion scores) on identical test images, else PromotionError."""
    a, b = set(chal["path"]), set(champ["path"])
    if a != b or len(chal) != len(champ):
        raise PromotionError(f"challenger and {what} were tested on different images ({len(a)} vs {len(b)}, "
                             f"{len(a & b)} in common); compare models evaluated on the same test split")
    other = champ.drop_duplicates("path").set_index("path").loc[chal["path"]]
    if not np.array_equal(other["label"].to_numpy(), chal["label"].to_numpy()):
        raise PromotionError(f"challenger and {what} disagree on test labels for the same paths")
    return chal["label"].to_numpy(), chal["score"].to_numpy(np.float64), other["score"].to_numpy(np.float64)


def _version_for(client: MlflowClient, name: str, run, model_uri: str, metrics: dict[str, float]):
    """Register model_uri under `name` (reusing a version of this run with the same source); tag + describe it."""
    rid = run.info.run_id
    try:
        existing = [mv for mv in client.search_model_versions(f"name='{name}' and tag.run_id='{rid}'")
                    if mv.source == model_uri]
    except MlflowException:
        existing = []
    if existing:
        mv = existing[0]
    else:
        mv = mlflow.register_model(model_uri, name)
        if not (client.get_registered_model(name).description or ""):
            client.update_registered_model(name, description="Deepfake detector: image paths or arrays -> P(fake). "
                                           "Aliases champion/challenger are moved by serving.promote.")
    tags = run.data.tags
    kind = "ensemble" if tags.get("run_kind") == "ensemble" else "single"
    digest = tags.get("data_digest", "unknown")
    vtags = {"run_id": rid, "run_name": run.info.run_name or "", "data_digest": digest, "model_kind": kind,
             "model_type": tags.get("model_type", ""), "n_test": str(int(metrics["n"])),
             **{f"test_{k}": f"{metrics[k]:.4f}" for k in VERSION_METRICS}}
    if kind == "ensemble":
        vtags["ensemble_members"] = tags.get("ensemble_members", "")[:4000]
    for k, v in vtags.items():
        client.set_model_version_tag(name, mv.version, k, v)
    desc = (f"Run {rid} ({run.info.run_name}, {kind} {tags.get('model_type', '')}), data digest {digest}: test "
            + ", ".join(f"{k}={metrics[k]:.4f}" for k in VERSION_METRICS) + f" (n={int(metrics['n'])})")
    client.update_model_version(name, mv.version, description=desc)
    return mv


def promote(run_id: str, model_name: str = DEFAULT_NAME, margin: float = 0.0, force: bool = False,
            metric: str = "auc", n_boot: int = 1000, seed: int = 0) -> PromotionResult:
    """Register the run's model as `challenger`; move `champion` to it unless it is worse beyond margin."""
    if metric not in ("auc", "ap"):
        raise PromotionError(f"--metric must be auc or ap; got {metric!r}")
    if margin < 0:
        raise PromotionError(f"--margin must be >= 0; got {margin}")
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise PromotionError(f"run {run_id} not found in {mlflow.get_tracking_uri()}") from None
    chal_df = test_predictions(run_id)
    chal_m = binary_metrics(chal_df["label"], chal_df["score"])
    example = next((p for p in chal_df["path"] if Path(p).is_file()), None)
    model_uri = ensure_image_model(run, example)
    mv = _version_for(client, model_name, run, model_uri, chal_m)
    client.set_registered_model_alias(model_name, CHALLENGER, mv.version)
    result = PromotionResult(model_name, str(mv.version), run_id, model_uri, False, "", metric,
                             chal_m[metric], chal_m["ece"])
    try:
        champ = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        champ = None
    if champ is None:
        result.promoted, result.reason = True, "no champion yet"
        _tag_gate(client, result, margin)
    elif str(champ.version) == str(mv.version):
        result.promoted, result.reason = True, "already champion"
    else:
        result.champion_version = str(champ.version)
        try:
            _compare(result, chal_df, champ, metric, n_boot, seed)
        except PromotionError as e:
            if not force:
                raise
            result.reason = f"comparison impossible ({e})"
        worse = result.diff is not None and result.diff < -margin
        result.promoted = force or not worse
        verdict = (f"challenger {metric}={result.challenger_value:.4f} vs champion v{champ.version} "
                   f"{result.champion_value:.4f}: diff {result.diff:+.4f} (95% CI {result.diff_ci[0]:+.4f}, "
                   f"{result.diff_ci[1]:+.4f}), margin {margin}") if result.diff is not None else result.reason
        forced = force and (worse or result.diff is None)
        result.reason = (("forced; " if forced else "") + verdict) if result.promoted else (
            f"refused: {verdict}; champion stays v{champ.version} (use --force to override)")
        _tag_gate(client, result, margin)
    if result.promoted and (champ is None or str(champ.version) != str(mv.version)):
        client.set_registered_model_alias(model_name, CHAMPION, mv.version)
        if champ is not None:
            client.set_model_version_tag(model_name, champ.version, "replaced_by_version", str(mv.version))
    log.info("event=promotion name=%s version=%s run_id=%s promoted=%s reason=%r", model_name, mv.version, run_id,
             result.promoted, result.reason)
    return result


def _compare(result: PromotionResult, chal_df: pd.DataFrame, champ, metric: str, n_boot: int, seed: int) -> None:
    champ_run = champ.tags.get("run_id") or champ.run_id
    if not champ_run:
        raise PromotionError(f"champion v{champ.version} names no run; cannot compare test predictions")
    y, s_chal, s_champ = _same_test_set(chal_df, test_predictions(champ_run), f"champion v{champ.version}")
    champ_m = binary_metrics(y, s_champ)
    result.champion_value, result.champion_ece = champ_m[metric], champ_m["ece"]
    result.diff, result.diff_ci = paired_difference(y, s_chal, s_champ, metric, n_boot, seed)


def _tag_gate(client: MlflowClient, r: PromotionResult, margin: float) -> None:
    tags = {"gate_vs_version": r.champion_version or "", "gate_metric": r.metric, "gate_margin": str(margin),
            "gate_decision": "promoted" if r.promoted else "refused", "gate_reason": r.reason[:4000]}
    if r.diff is not None:
        tags.update({"gate_diff": f"{r.diff:.4f}", "gate_ci_low": f"{r.diff_ci[0]:.4f}",
                     "gate_ci_high": f"{r.diff_ci[1]:.4f}", "gate_champion_ece": f"{r.champion_ece:.4f}",
                     "gate_challenger_ece": f"{r.challenger_ece:.4f}"})
    for k, v in tags.items():
        client.set_model_version_tag(r.model_name, r.version, k, v)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m serving.promote", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, metavar="RUN_ID", help="training or ensemble run to promote")
    p.add_argument("--name", default=DEFAULT_NAME, help=f"registered model name (default {DEFAULT_NAME})")
    p.add_argument("--margin", type=float, default=0.0, help="allowed drop of test AUC vs the champion")
    p.add_argument("--metric", default="auc", choices=["auc", "ap"])
    p.add_argument("--force", action="store_true", help="move champion even if the gate refuses")
    p.add_argument("--tracking-uri", help="default $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db")
    a = p.parse_args(argv)
    from core.tracking import setup_cli

    setup_cli(a.tracking_uri)
    try:
        r = promote(a.run, a.name, a.margin, a.force, a.metric)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{r.model_name} v{r.version} (run {r.run_id}) is {CHALLENGER}"
          + (f" and {CHAMPION}" if r.promoted else "") + f": {r.reason}")
    return 0 if r.promoted else 1


if __name__ == "__main__":
    from core.cli import exit_now

    exit_now(main())
