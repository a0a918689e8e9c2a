"""The MLflow calls of one training run, made in this process (`Backend`) or in a helper process (`Helper`).

A fresh training CLI spends ~1.5 s importing MLflow and opening its SQLAlchemy store. That is Python work
holding the GIL, so a thread cannot overlap it with the CLI's own start-up (importing torch and timm, also
Python): the two only take turns. A process can: `start_helper` launches one before those imports, on the
core they leave idle; it imports MLflow, opens the store and then makes the run's calls (`Backend`'s
methods) sent over a pipe, while the training process never imports MLflow at all (except to log a model).

The helper runs in its own session and ignores SIGINT and SIGTERM: Ctrl-C or a kill of the process group reaches
the training process only, which ends the run as KILLED through the helper. If the training process dies without ending the run (SIGKILL, OOM), the helper
exits within a second and leaves the run RUNNING, as a killed in-process run is: `--resume` continues it.

This module imports neither torch nor MLflow at the top, so the training CLI can start the helper first.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STORE = REPO_ROOT / "mlruns"


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The given value, else $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlruns/mlflow.db."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    DEFAULT_STORE.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_STORE / 'mlflow.db'}"


def artifact_root_for(uri: str) -> Path:
    """Artifacts live beside a sqlite store (…/mlruns/artifacts), never under the process's CWD."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts"
    return DEFAULT_STORE / "artifacts"


def configure_experiment(uri: str, experiment_name: str) -> str:
    """Set the tracking URI and experiment (created with an explicit artifact_location); return its id."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment_name)
    if exp is None:
        location = artifact_root_for(uri) / experiment_name
        try:
            eid = mlflow.create_experiment(experiment_name, artifact_location=location.as_uri())
        except Exception:  # created meanwhile by another worker
            exp = mlflow.get_experiment_by_name(experiment_name)
            if exp is None:
                raise
            eid = exp.experiment_id
    else:
        eid = exp.experiment_id
    mlflow.set_experiment(experiment_id=eid)
    return eid


def log_dataset_input(table: Any, source: str, name: str, digest: str, context: str) -> None:
    """Log a (path, label) table as the active run's dataset input (float labels: no integer-schema hint)."""
    import mlflow

    with warnings.catch_warnings():  # a local path matches two registered LocalArtifactDatasetSource classes
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        ds = mlflow.data.from_pandas(table.astype({"label": "float64"}), source=source, name=name, targets="label",
                                     digest=digest)
    mlflow.log_input(ds, context=context)


class Backend:
    """One run's MLflow calls through MLflow's fluent API, in this process. `start` reuses an active run (sweep
    trials), resumes a run id or starts a run; only a run it started is ended by `end`."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.owns_run = False

    def warm(self, experiment_name: str) -> None:
        """Import MLflow and open the store (SQLAlchemy models, schema check): what the first real call would pay."""
        import mlflow

        mlflow.MlflowClient(tracking_uri=self.uri).get_experiment_by_name(experiment_name)

    def ping(self) -> None:
        """Nothing: the helper answers it once warm (serve() warms up before taking calls)."""

    def start(self, experiment_name: str, run_name: str | None, resume_run_id: str | None,
              system_metrics: bool) -> tuple[str, str, bool]:
        """(run id, experiment id, whether this backend owns the run)."""
        import mlflow

        active = mlflow.active_run()
        if active is not None:
            return active.info.run_id, active.info.experiment_id, False
        eid = configure_experiment(self.uri, experiment_name)
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=system_metrics)
        else:
            run = mlflow.start_run(run_name=run_name, log_system_metrics=system_metrics)
        self.owns_run = True
        return run.info.run_id, eid, True

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        """Params the run does not have yet (a resumed run keeps its own)."""
        import mlflow

        existing = mlflow.get_run(run_id).data.params
        mlflow.log_params({k: v for k, v in params.items() if k not in existing})

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        mlflow.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import mlflow

        mlflow.log_metrics(metrics, step=step)

    def log_input(self, table: Any, source: str, name: str, digest: str, context: str) -> None:
        log_dataset_input(table, source, name, digest, context)

    def log_artifacts(self, path: str, artifact_path: str | None) -> None:
        import mlflow

        if Path(path).is_dir():
            mlflow.log_artifacts(path, artifact_path)
        else:
            mlflow.log_artifact(path, artifact_path)

    def end(self, status: str) -> None:
        import mlflow

        if self.owns_run:
            mlflow.end_run(status=status)
            self.owns_run = False


class TrackingError(RuntimeError):
    """An MLflow call failed in the helper process (the message names the MLflow error)."""


class Helper:
    """`Backend` in a child process; `call(name, *args)` runs `Backend.name(*args)` there and returns its result."""

    def __init__(self, uri: str, experiment_name: str) -> None:
        from multiprocessing import Pipe

        self.uri = uri
        ours, theirs = Pipe()
        # sys.argv[0] as in this process: MLflow's run context (source name, git commit) is read from it
        code = (f"import sys; sys.argv[0] = {sys.argv[0]!r}; sys.path.insert(0, {str(REPO_ROOT)!r}); "
                f"from core.mlflow_backend import serve; serve({theirs.fileno()}, {uri!r}, {experiment_name!r})")
        # its own session: Ctrl-C and `kill -- -PGID` reach the training process's group, not the helper
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                     stdout=sys.stderr.fileno() if _has_fileno(sys.stderr) else None,
                                     start_new_session=True)
        theirs.close()
        self.conn = ours

    def call(self, name: str, *args: Any) -> Any:
        try:
            self.conn.send((name, args))
            kind, value = self.conn.recv()
        except (EOFError, OSError) as e:
            raise TrackingError(f"the MLflow helper process ended (exit {self.proc.poll()}) during {name}") from e
        if kind == "error":
            raise TrackingError(value)
        return value

    def close(self, timeout: float = 30.0) -> None:
        """Let the helper finish and reap it. It is told to stop: processes forked from this one since it started
        (DataLoader workers) hold copies of the pipe, so closing ours alone would not end its wait."""
        try:
            self.conn.send(None)
        except OSError:  # it is gone already
            pass
        self.conn.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):  # pytest's captured streams have none
        return False


_HELPERS: dict[str, Helper] = {}


def start_helper(tracking_uri: str | None, experiment_name: str) -> None:
    """Start the helper process for this store now (it warms up while the caller imports torch); `take_helper`
    hands it to the run. Used by the training CLI; library callers (sweeps, tests) track in-process."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri not in _HELPERS:
        try:
            _HELPERS[uri] = Helper(uri, experiment_name)
        except OSError as e:  # no process to spare: track in-process, as library callers do
            log.warning("event=mlflow_helper_unavailable error=%r", e)


def close_helpers() -> None:
    """Stop helpers no run took (the run failed before it started, or resumed into another store)."""
    while _HELPERS:
        _HELPERS.popitem()[1].close()


def wait_ready(uri: str) -> None:
    """Return once the helper for this store (if any) has finished warming up."""
    helper = _HELPERS.get(uri)
    if helper is not None:
        helper.call("ping")


def has_helper(uri: str) -> bool:
    return uri in _HELPERS


def take_helper(uri: str) -> Helper | None:
    return _HELPERS.pop(uri, None)


def serve(fd: int, uri: str, experiment_name: str) -> None:
    """The helper process: warm up, then run each call that arrives, until told to stop or the training process
    is gone."""
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the training process decides how the run ends
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parent = os.getppid()
    conn = Connection(fd)
    backend = Backend(uri)
    try:
        backend.warm(experiment_name)
    except Exception as e:  # noqa: BLE001  (the run's start reports a real problem with the store)
        log.debug("event=mlflow_warm_up_failed error=%r", e)
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:  # killed (SIGKILL, OOM): leave the run as it is, RUNNING and resumable, as
                os._exit(0)             # a killed in-process run is (not via atexit, where MLflow would end it)
            continue
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the training process is gone
            request = None
        if request is None:  # Helper.close, after the run's end; or gone: exit without interpreter teardown
            sys.stderr.flush()
            os._exit(0)
        name, args = request
        try:
            conn.send(("ok", getattr(backend, name)(*args)))
        except Exception as e:  # noqa: BLE001  (sent back: the training process raises it)
            conn.send(("error", f"{type(e).__name__}: {e}"))
