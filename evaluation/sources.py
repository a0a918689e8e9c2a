"""What an evaluation scores and where the source run's files are: a checkpoint, or an MLflow run's best.pt,
with the run attached when it is in this tracking store (the evaluation is logged as its child)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import UserError

log = logging.getLogger(__name__)


class EvaluateError(UserError):
    """Bad input for an evaluation (unknown run, missing data, empty split); one line."""


@dataclass
class Source:
    """What is evaluated: a checkpoint reference and, when known, its MLflow run."""

    checkpoint: str
    run_id: str | None = None
    run: Any = None  # mlflow.entities.Run

    @property
    def label(self) -> str:
        if self.run is not None:
            return f"{self.run.info.run_name or 'run'} ({self.run_id[:8]})"
        return Path(self.checkpoint).parent.name or Path(self.checkpoint).stem


def _find_run(run_id: str):
    import mlflow

    try:
        return mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None


def resolve_source(run_id: str | None = None, checkpoint: str | None = None) -> Source:
    """--run: the run's local best.pt (tag run_dir) or its checkpoints/best.pt artifact; --checkpoint: as given."""
    import mlflow

    if (run_id is None) == (checkpoint is None):
        raise EvaluateError("give exactly one of --run RUN_ID or --checkpoint FILE")
    if checkpoint is not None:
        return Source(str(checkpoint))
    run = _find_run(run_id)
    if run is None:
        raise EvaluateError(f"run {run_id} not found in {mlflow.get_tracking_uri()} (set --tracking_uri or "
                            "$MLFLOW_TRACKING_URI to the store that holds it)")
    run_dir = run.data.tags.get("run_dir")
    local = Path(run_dir) / "best.pt" if run_dir else None
    ref = str(local) if local is not None and local.is_file() else f"runs:/{run_id}/checkpoints/best.pt"
    return Source(ref, run_id, run)


def attach_run(source: Source, trained) -> Source:
    """A --checkpoint written by a run of this tracking store gets that run (to nest the evaluation under it)."""
    if source.run is None and trained.run_id:
        run = _find_run(trained.run_id)
        if run is not None:
            return Source(source.checkpoint, trained.run_id, run)
    return source


def run_file(source: Source, trained, rel: str, dst: Path) -> Path | None:
    """A file the source run wrote (e.g. predictions/val.parquet): beside the checkpoint, in its run_dir,
    else downloaded from its artifacts into `dst`; None when nowhere."""
    import mlflow

    folders = [Path(trained.info["path"]).parent]
    if source.run is not None and source.run.data.tags.get("run_dir"):
        folders.append(Path(source.run.data.tags["run_dir"]))
    for folder in folders:
        if (folder / rel).is_file():
            return folder / rel
    if source.run_id is None:
        return None
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=source.run_id, artifact_path=rel, dst_path=str(dst)))
    except Exception as e:  # MlflowException / OSError: the run did not log it
        log.info("event=run_file_missing run_id=%s path=%s reason=%s", source.run_id, rel, str(e).splitlines()[0][:120])
        return None
