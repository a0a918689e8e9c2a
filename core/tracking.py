"""The one module that talks to MLflow during training: store, run lifecycle, params, metrics, artifacts, model."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from core import mlflow_backend
from core.config import REPO_ROOT, Config, TrackingConfig

log = logging.getLogger(__name__)
DEFAULT_STORE = mlflow_backend.DEFAULT_STORE
artifact_root_for = mlflow_backend.artifact_root_for
log_dataset_input = mlflow_backend.log_dataset_input


def resolve_tracking_uri(tcfg: TrackingConfig) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlruns/mlflow.db."""
    return mlflow_backend.resolve_tracking_uri(tcfg.tracking_uri)


def configure_mlflow(tcfg: TrackingConfig) -> str:
    """Set the tracking URI and experiment (created with an explicit artifact_location); return its id."""
    return mlflow_backend.configure_experiment(resolve_tracking_uri(tcfg), tcfg.experiment_name)


_WARMING: dict[str, threading.Thread] = {}


def warm_up(tcfg: TrackingConfig) -> None:
    """Import MLflow and open its tracking store (SQLAlchemy models, migrations check) in a background thread,
    so the 2-5 s this takes overlaps the data scan and the model and loader build; RunTracker waits for it.
    Nothing to do when the training CLI already started a helper process for the store
    (core.mlflow_backend.start_helper), or MLflow's store is already loaded."""
    if not tcfg.enabled or "mlflow.store.tracking.sqlalchemy_store" in sys.modules:
        return
    uri = resolve_tracking_uri(tcfg)
    if mlflow_backend.has_helper(uri):
        return

    def work() -> None:
        try:
            mlflow_backend.Backend(uri).warm(tcfg.experiment_name)
        except Exception as e:  # the run's own start reports any real problem with the store
            log.debug("event=mlflow_warm_up_failed error=%r", e)

    thread = threading.Thread(target=work, name="mlflow-warm-up", daemon=True)
    _WARMING[uri] = thread
    thread.start()


def wait_warm_up(tcfg: TrackingConfig) -> None:
    thread = _WARMING.pop(resolve_tracking_uri(tcfg), None)
    if thread is not None:
        thread.join()


def wait_background(tcfg: TrackingConfig) -> None:
    """Wait until MLflow's warm-up (thread or helper process) is done: its import, and on a new store the schema's
    creation, take seconds of CPU, which would skew a timing taken meanwhile (the AMP probe)."""
    if tcfg.enabled:
        wait_warm_up(tcfg)
        mlflow_backend.wait_ready(resolve_tracking_uri(tcfg))


def setup_cli(tracking_uri: str | None = None) -> None:
    """What every MLflow-facing CLI does first: key=value logging, no artifact progress bars, the store."""
    import mlflow

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # small files: bars are noise
    mlflow.set_tracking_uri(resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri)))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def ui_link(experiment_id: str, run_id: str | None = None, port: int = 5000) -> str:
    base = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}"
    return f"{base}/runs/{run_id}?workflowType=machine_learning" if run_id else f"{base}/runs?workflowType=machine_learning"


def experiment_overview(tracking_uri: str, name: str | None = None, port: int = 5000) -> str:
    """What `make ui` prints: the store's experiments (latest run first) with their training-view links, then
    the one to open: the experiment called `name`, else the one with the latest run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    rows = []
    for exp in client.search_experiments():
        last = client.search_runs([exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"])
        rows.append((last[0].info.start_time if last else 0, exp))
    rows.sort(key=lambda r: -r[0])
    lines = [f"experiments in {tracking_uri} (latest run first):"]
    for start, exp in rows:
        when = pd.Timestamp(start, unit="ms").strftime("%Y-%m-%d %H:%M") if start else "no runs"
        lines.append(f"  {exp.experiment_id:>4}  {exp.name:<28} {when:<16}  {ui_link(exp.experiment_id, port=port)}")
    chosen = next((e for _, e in rows if e.name == name), None) if name else None
    if name and chosen is None:
        lines.append(f"no experiment named {name!r} (names above)")
    if chosen is None and rows and rows[0][0]:
        chosen = rows[0][1]
    if chosen is not None:
        lines.append(f"open {ui_link(chosen.experiment_id, port=port)}   ({chosen.name})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m core.tracking --experiment NAME --port 5000`: the experiment overview `make ui` prints."""
    
    from core.cli import ArgumentParser

    p = ArgumentParser(description="List the MLflow experiments and the training-view link to open")
    p.add_argument("--tracking_uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlruns/mlflow.db")
    p.add_argument("--experiment", help="the experiment to open (default: the one with the latest run)")
    p.add_argument("--port", type=int, default=5000)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    uri = a.tracking_uri or resolve_tracking_uri(TrackingConfig())
    print(experiment_overview(uri, a.experiment, a.port))  # noqa: T201 (a CLI's output)
    return 0


class RunTracker:
    """Context manager around one MLflow run. Reuses an active run (sweep trials), resumes a run id,
    or starts a new run. The calls go to the training CLI's helper process when it started one for this store
    (core.mlflow_backend), else to MLflow in this process. A no-op when tracking is disabled."""

    def __init__(self, cfg: Config, resume_run_id: str | None = None) -> None:
        self.cfg = cfg
        self.enabled = cfg.tracking.enabled
        self.resume_run_id = resume_run_id
        self.owns_run = False
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.uri = resolve_tracking_uri(cfg.tracking) if self.enabled else ""
        self.helper: mlflow_backend.Helper | None = None
        self.backend: mlflow_backend.Backend | None = None

    def _call(self, name: str, *args: Any) -> Any:
        if self.helper is not None:
            return self.helper.call(name, *args)
        return getattr(self.backend, name)(*args)

    def __enter__(self) -> "RunTracker":
        if not self.enabled:
            return self
        self.helper = mlflow_backend.take_helper(self.uri)
        if self.helper is None:
            wait_warm_up(self.cfg.tracking)
            self.backend = mlflow_backend.Backend(self.uri)
        t = self.cfg.tracking
        try:
            self.run_id, self.experiment_id, self.owns_run = self._call(
                "start", t.experiment_name, t.run_name, self.resume_run_id, t.system_metrics)
        except BaseException:
            self._close_helper()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled:
            return
        try:
            if self.owns_run:
                if exc_type is None:
                    status = "FINISHED"
                elif issubclass(exc_type, KeyboardInterrupt) or exc_type.__name__ == "TrialPruned":
                    status = "KILLED"
                else:
                    status = "FAILED"
                self._call("end", status)
        finally:
            self._close_helper()

    def _close_helper(self) -> None:
        if self.helper is not None:
            self.helper.close()
            self.helper = None

    # ------------------------------------------------------------------ logging
    def log_start(self, tags: dict[str, str], params_extra: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        params = {k: ("" if v is None else str(v)) for k, v in self.cfg.flat().items()}
        params.update({k: str(v) for k, v in (params_extra or {}).items()})
        self._call("log_params", self.run_id, params)
        self._call("set_tags", {**tags, **self.cfg.tracking.tags, "git_commit": git_commit()})

    def log_dataset(self, table: pd.DataFrame, source: str, name: str, digest: str) -> None:
        if not self.enabled:
            return
        self._call("log_input", table, source, name, digest, "training")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}
        self._call("log_metrics", finite, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            self._call("set_tags", tags)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        if self.enabled and folder.exists():
            self._call("log_artifacts", str(folder), artifact_path)

    def log_model(self, scorer: torch.nn.Module, image_size: int, name: str = "model") -> str | None:
        """Log a scorer (models.outputs.ScoreModel: input -> P(fake) (N,1)) in eval mode, CPU, fp32, as a pt2
        pytorch model with signature + example.

        Image models take (N,3,H,W); the dual-stream video model takes HQ clips (N,T,3,H,W)."""
        if not (self.enabled and self.cfg.tracking.log_model):
            return None
        import mlflow
        from mlflow.models import infer_signature

        if self.helper is not None:  # the run lives in the helper process: log into it by id from here
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_experiment(experiment_id=self.experiment_id)
        model = scorer.to("cpu", memory_format=torch.contiguous_format).float().eval()
        shape = (2, 3, image_size, image_size)
        if self.cfg.model.kind == "video":
            shape = (2, self.cfg.data.sequence_length, 3, image_size, image_size)
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        with torch.no_grad():
            y = model(torch.from_numpy(x)).numpy()
        sig = infer_signature(x, y)
        reqs = [f"torch=={torch.__version__.split('+')[0]}", "numpy"]
        try:
            info = mlflow.pytorch.log_model(model, name=name, signature=sig, input_example=x, pip_requirements=reqs,
                                            run_id=self.run_id)
        except Exception as e:  # torch.export can refuse some architectures: fall back to pickle + code
            log.warning("event=model_export_fallback reason=%r", str(e).splitlines()[0][:200])
            info = mlflow.pytorch.log_model(
                model, name=name, signature=sig, input_example=x, pip_requirements=reqs,
                serialization_format="pickle", run_id=self.run_id,
                code_paths=[str(REPO_ROOT / p) for p in ("core", "dataio", "models")],
            )
        self.set_tags({"model_uri": info.model_uri})
        return info.model_uri


if __name__ == "__main__":
    raise SystemExit(main())
