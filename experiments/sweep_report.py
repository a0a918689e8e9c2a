"""What a sweep reports: MLflow runs (one parent per invocation, one nested run per trial) and the
end-of-sweep table of the best trials.

Plain values in (no Optuna import here; experiments/sweep.py and experiments/study.py talk to Optuna).
Tags: trials carry `study_name`, `trial_number`, `trial_state` (RUNNING -> COMPLETE | PRUNED | FAIL)
and `fail_reason`; the parent carries `study_name`, `sweep_storage`, `sweep_file`, `git_commit`, and
`sweep_host` / `sweep_pid` (a later sweep of the study closes a parent whose process is gone).
"""
from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import Config, TrackingConfig

if TYPE_CHECKING:  # annotations only: the sweep CLI reports a bad sweep file without importing pandas
    import pandas as pd

log = logging.getLogger(__name__)
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def safe_url(url: str) -> str:
    """A storage URL without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: drop any credentials part
        return url.split("@")[-1]


def configure(tcfg: TrackingConfig) -> str | None:
    """Tracking URI + experiment as training does it; None when tracking is disabled."""
    if not tcfg.enabled:
        return None
    from core.tracking import configure_mlflow

    return configure_mlflow(tcfg)


def start_parent(study_name: str, storage: str, sweep_file: str | Path, params: dict[str, Any],
                 extra_tags: dict[str, str]) -> str:
    """Open the parent run `sweep-<study>` (nested under a caller's active run if there is one)."""
    import mlflow

    from core.tracking import git_commit

    tags = {"study_name": study_name, "sweep_storage": safe_url(storage), "sweep_file": str(sweep_file),
            "git_commit": git_commit(), "sweep_role": "parent", "sweep_host": socket.gethostname(),
            "sweep_pid": str(os.getpid()), **extra_tags}
    run = mlflow.start_run(run_name=f"sweep-{study_name}", nested=mlflow.active_run() is not None, tags=tags)
    mlflow.log_params(params)
    return run.info.run_id


def start_trial(number: int, study_name: str, parent_run_id: str | None, retry_of: int | None,
                system_metrics: bool = False) -> tuple[str, str]:
    """Open `trial-<n>` before train() runs (train logs into the active run); return its run id and UI link.
    In a worker process the parent is not active here, so the child is attached with the mlflow.parentRunId tag."""
    import mlflow

    from core.tracking import ui_link

    tags = {"study_name": study_name, "trial_number": str(number), "trial_state": "RUNNING"}
    if retry_of is not None:
        tags["retry_of_trial"] = str(retry_of)
    if mlflow.active_run() is not None:
        run = mlflow.start_run(run_name=f"trial-{number}", nested=True, tags=tags, log_system_metrics=system_metrics)
    else:
        run = mlflow.start_run(run_name=f"trial-{number}", tags={**tags, "mlflow.parentRunId": parent_run_id or ""},
                               log_system_metrics=system_metrics)
    return run.info.run_id, ui_link(run.info.experiment_id, run.info.run_id)


def log_trial_params(cfg: Config, keys: list[str]) -> None:
    """The sampled keys with their resolved Config values, exactly as train() logs them."""
    import mlflow

    flat = cfg.flat()
    mlflow.log_params({k: "" if flat[k] is None else str(flat[k]) for k in keys})


def end_trial(state: str, reason: str = "") -> None:
    import mlflow

    mlflow.set_tags({"trial_state": state, **({"fail_reason": reason} if reason else {})})
    mlflow.end_run(status=MLFLOW_STATUS.get(state, "FAILED"))


def close_stale(run_id: str) -> None:
    """Mark the run of a trial whose worker died (its Optuna trial was failed by the heartbeat check)."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "trial_state", "FAIL")
            client.set_tag(run_id, "fail_reason", "worker died (heartbeat stale)")
            client.set_terminated(run_id, "KILLED")
    except Exception as e:  # the store may be elsewhere: the Optuna state is what counts
        log.warning("event=sweep_stale_run run_id=%s error=%r", run_id, str(e)[:200])


def close_orphan_parents(study_name: str, experiment_id: str) -> list[str]:
    """Parent runs of this study left RUNNING by a sweep process that is gone (kill -9, a lost machine) are
    marked KILLED, so the UI does not show a sweep running forever; returns their run ids. Only runs started on
    this host whose process no longer exists: a sweep on another machine, or still alive here, is left alone."""
    from mlflow import MlflowClient

    closed: list[str] = []
    try:
        client = MlflowClient()
        runs = client.search_runs([experiment_id], "tags.sweep_role = 'parent' and attributes.status = 'RUNNING'",
                                  max_results=1000)
        for run in runs:
            tags = run.data.tags
            if (tags.get("study_name") != study_name or tags.get("sweep_host") != socket.gethostname()
                    or not _process_gone(tags.get("sweep_pid"))):
                continue
            client.set_tag(run.info.run_id, "sweep_end", f"process {tags['sweep_pid']} gone before the sweep ended")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    except Exception as e:  # noqa: BLE001 (the store may be elsewhere): the Optuna study is what counts
        log.warning("event=sweep_orphan_parents_failed error=%r", str(e)[:200])
    return closed


def _process_gone(pid: str | None) -> bool:
    """True only when `pid` names no process on this host (a reused pid reads as alive: the run is kept)."""
    try:
        n = int(pid or "")
        if n <= 0:  # 0 and negatives name process groups
            return False
        os.kill(n, 0)
    except ProcessLookupError:
        return True
    except (ValueError, OverflowError, OSError):  # PermissionError: it exists, someone else's
        return False
    return False


def finish_parent(status: str, counts: dict[str, int], metric: str, best: dict[str, Any] | None,
                  trials: pd.DataFrame, figures: list[tuple[str, Any]], description: str = "") -> None:
    """Counts, best value/params, the description (top-trials table), trials CSV and Optuna's figures on the
    parent; end it."""
    import mlflow

    try:
        if description:
            mlflow.set_tag("mlflow.note.content", description[:7900])  # the run page's Description
        mlflow.log_metrics({f"n_{k}": v for k, v in counts.items()})
        if best is not None:
            mlflow.log_metrics({"best_value": best["value"], f"best_{metric}": best["value"]})
            mlflow.log_params({f"best_{k}": v for k, v in best["params"].items()})
            mlflow.set_tags({"best_trial_number": str(best["number"]), "best_run_id": best["run_id"] or ""})
        with tempfile.TemporaryDirectory() as tmp:
            csv = Path(tmp) / "trials.csv"
            trials.to_csv(csv, index=False)
            mlflow.log_artifact(str(csv), "optuna")
            if figures:  # one page, plotly.js inlined once (~4.8 MB), so the UI shows every plot offline
                from evaluation.dashboard import write_dashboard

                page = write_dashboard(Path(tmp) / "plots.html", dict(figures), title="Optuna study",
                                       subtitle=f"{len(figures)} plots from optuna.visualization")
                mlflow.log_artifact(str(page), "optuna")
    finally:
        mlflow.end_run(status=status)


# ---------------------------------------------------------------------------- the end-of-sweep table
def top_trials(trials: list[Any], direction: str, k: int = 5) -> list[dict[str, Any]]:
    """The k best of finished Optuna FrozenTrials as rows: completed by value, then pruned by their
    last reported value, then failed."""
    sign = -1.0 if direction == "maximize" else 1.0

    def key(t: Any) -> tuple[int, float]:
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        v = t.value if t.state.name == "COMPLETE" else last
        return {"COMPLETE": 0, "PRUNED": 1}.get(t.state.name, 2), sign * v if v is not None else math.inf

    return [{"number": t.number, "value": t.value, "state": t.state.name, "params": t.params,
             "run_id": t.user_attrs.get("mlflow_run_id", ""), "fail_reason": t.user_attrs.get("fail_reason", ""),
             "output_dir": t.user_attrs.get("output_dir", "")}
            for t in sorted(trials, key=key)[:k]]


def full_reports(rows: list[dict[str, Any]], with_mlflow: bool) -> list[int]:
    """The full evaluation report (dashboard, error gallery) of each completed trial in `rows` (top_trials) that
    lacks one, built from its logged predictions (trials write the metrics files only: train.report=metrics)
    and logged to its run; returns the trial numbers reported. A failure is a warning: the study's results stand."""
    from training.full_report import build_full_report, report_run

    done = []
    for r in rows:
        if r["state"] != "COMPLETE" or not r["output_dir"] or (Path(r["output_dir"]) / "evaluation" / "dashboard.html").exists():
            continue
        try:
            if with_mlflow and r["run_id"]:
                report_run(r["run_id"])
            else:
                build_full_report(r["output_dir"])
            done.append(r["number"])
        except Exception as e:  # noqa: BLE001 (files or store gone): the trials and the study are already recorded
            log.warning("event=full_report_failed trial=%d error=%r", r["number"], str(e).splitlines()[0][:200])
    return done


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows of `top_trials` as a text table (param keys shortened to their last part)."""
    lines = [f"{'trial':>5}  {'value':>8}  {'state':<8}  {'mlflow run':<32}  params"]
    for r in rows:
        value = f"{r['value']:.4f}" if r["value"] is not None else "-"
        params = " ".join(f"{k.split('.')[-1]}={f'{v:.3g}' if isinstance(v, float) else v}" for k, v in r["params"].items())
        lines.append(f"{r['number']:>5}  {value:>8}  {r['state']:<8}  {r['run_id'] or '-':<32}  {params}")
    return "\n".join(lines)


def description_markdown(study_name: str, metric: str, rows: list[dict[str, Any]], counts: dict[str, int],
                         experiment_id: str | None) -> str:
    """The parent run's Description (mlflow.note.content): counts and the top trials as a markdown table,
    each linked to its run page."""
    lines = [f"**Optuna study `{study_name}`**: " + ", ".join(f"{v} {k}" for k, v in counts.items())
             + " in this invocation. Top trials by `" + metric + "` (completed, then pruned, then failed):", "",
             f"| trial | {metric} | state | params | run |", "|---:|---:|---|---|---|"]
    for r in rows:
        value = f"{r['value']:.4f}" if r["value"] is not None else "-"
        params = ", ".join(f"{k.split('.')[-1]}={f'{v:.3g}' if isinstance(v, float) else v}"
                           for k, v in r["params"].items()).replace("|", "/")
        run = (f"[trial-{r['number']}](#/experiments/{experiment_id}/runs/{r['run_id']})"
               if r["run_id"] and experiment_id else "-")
        lines.append(f"| {r['number']} | {value} | {r['state']} | {params} | {run} |")
    lines += ["", "Plots: artifact `optuna/plots.html`; all trials: `optuna/trials.csv`."]
    return "\n".join(lines)
