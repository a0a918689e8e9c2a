"""Self-describing checkpoints, written atomically (temp file + rename) and loaded with weights_only."""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from core.errors import CheckpointError

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
SLOW_WRITE_ENV = "DFSWEEP_TEST_CHECKPOINT_WRITE_SECONDS"  # tests only: pause between the temp file and the rename


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get(SLOW_WRITE_ENV):  # crash tests: a window to kill the process mid-write
            time.sleep(float(os.environ[SLOW_WRITE_ENV]))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve_checkpoint_path(ref: str | Path) -> Path:
    """A file, a run folder (-> last.pt) or an MLflow artifact URI (runs:/RUN_ID/path) -> local file."""
    ref = str(ref)
    if ref.startswith(("runs:/", "mlflow-artifacts:/", "models:/")):
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
        except Exception as e:  # MlflowException, OSError: report in one line
            raise CheckpointError(f"cannot download checkpoint {ref}: {str(e).splitlines()[0]}") from None
        if local.is_dir():
            pts = sorted(local.rglob("*.pt"))
            if not pts:
                raise CheckpointError(f"{ref} holds no .pt checkpoint")
            local = next((p for p in pts if p.name == "best.pt"), pts[0])
        return local
    p = Path(ref)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(ref: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict (weights_only=True). Bare state_dicts come back as {"model": sd}."""
    path = resolve_checkpoint_path(ref)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a checkpoint or state_dict")
    if "model" not in obj:
        obj = {"model": obj}
    obj["path"] = str(path)
    return obj


def model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of a module's state_dict (contiguous, so channels_last weights save portably)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
