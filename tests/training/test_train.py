"""End-to-end: train(cfg) on tiny models lands in MLflow, resumes exactly, reaches real accuracy."""
from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from core.checkpoints import load_checkpoint
from core.config import REPO_ROOT, ConfigError, load_config
from evaluation.evaluate import evaluate_config
from training import train_unified
from training.trainer import NonFiniteLossError, train


def test_two_epoch_demo_run_lands_in_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_cfg,
                                            heap_depth) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # default 10 s: longer than this run
    import training.trainer as trainer_module

    bars: list[tuple[object, io.StringIO]] = []

    epochs_in_kept_heap: list[bool] = []
    passes_in_kept_heap: list[bool] = []  # the val passes and the test split's

    def recorded_predict(*args, real=trainer_module.predict, **kwargs):
        passes_in_kept_heap.append(heap_depth() > 0)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "predict", recorded_predict)

    def shown_tqdm(*args, **kwargs):  # the epoch bar as a terminal would show it, refreshed every step
        epochs_in_kept_heap.append(heap_depth() > 0)
        out = io.StringIO()
        bar = real_tqdm(*args, **{**kwargs, "disable": False, "file": out, "mininterval": 0})
        bars.append((bar, out))
        return bar

    real_tqdm = trainer_module.tqdm
    monkeypatch.setattr(trainer_module, "tqdm", shown_tqdm)
    result = train(tiny_cfg(tmp_path, **{"tracking.run_name": "demo-2ep"}))
    assert result.status == "COMPLETE" and result.epochs_run == 2
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "demo-2ep"
    assert run.data.params["model.model_type"] == "test_efficientnet"
    assert run.data.params["optim.lr"] == "0.003"
    for tag in ("model_type", "freeze_strategy", "loss_type", "git_commit", "data_digest"):
        assert tag in run.data.tags
    client = mlflow.MlflowClient()
    for metric in ("train_loss", "val_loss", "val_auc", "val_ap", "lr", "images_per_s"):
        hist = client.get_metric_history(result.run_id, metric)
        assert [m.step for m in hist] == [0, 1], metric
    # a short list of charts: the curves above, the kept epoch's val values and a few test metrics; the
    # rest is in training_log.csv and evaluation/metrics.json
    assert "system/cpu_utilization_percentage" in run.data.metrics  # tracking.system_metrics is on by default
    model_metrics = {k for k in run.data.metrics if not k.startswith("system/")}
    assert model_metrics == {"train_loss", "val_loss", "val_auc", "val_ap", "lr", "images_per_s", "best_val_loss",
                             "best_val_auc", "best_val_ap", "test_auc", "test_ap", "test_eer", "test_accuracy",
                             "test_loss"}, model_metrics
    assert run.data.tags["best_epoch"] == str(result.best_epoch)
    assert [bar.desc for bar, _ in bars] == ["epoch 1/2", "epoch 2/2"]  # "/N", counted from 1
    # no per-step page faults in the epochs and the val and test passes, then glibc's defaults back
    assert epochs_in_kept_heap == [True, True] and passes_in_kept_heap == [True] * 3 and heap_depth() == 0
    frames = bars[0][1].getvalue().split("\r")
    losses = {m.group(1) for f in frames if (m := re.search(r"loss=(\d\.\d{4})", f))}
    assert len(losses) >= 2  # the running loss moves within the epoch (4 steps), not every 20 steps
    arts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "training_log.csv", "predictions", "parameter_summary.json", "skipped_files.csv",
            "checkpoints"} <= arts
    preds = {a.path for a in client.list_artifacts(result.run_id, "predictions")}
    assert {"predictions/val.parquet", "predictions/test.parquet"} <= preds
    test_preds = pd.read_parquet(result.output_dir / "predictions" / "test.parquet")
    assert list(test_preds.columns[:4]) == ["path", "label", "score", "logit"]
    log = pd.read_csv(result.output_dir / "training_log.csv")
    assert list(log["epoch"]) == [0, 1]
    # the logged model scores a batch of images
    model = mlflow.pyfunc.load_model(run.data.tags["model_uri"])
    out = np.asarray(model.predict(np.random.rand(3, 3, 32, 32).astype(np.float32)))
    assert out.shape == (3, 1) and ((out >= 0) & (out <= 1)).all()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_kill_and_resume_equals_uninterrupted_run(tmp_path: Path, tiny_cfg) -> None:
    """SIGKILL a CLI run after its first epoch checkpoint; --resume finishes it identically, same MLflow run."""
    common = {"train.num_epochs": 3, "tracking.log_model": False, "data.aug_policy": "basic",
              "train.max_steps_per_epoch": 3}
    full = train(tiny_cfg(tmp_path / "a", **common))
    out = tmp_path / "b" / "outputs"
    sets = [f"{k}={v}" for k, v in {**tiny_cfg.overrides, **common, "train.output_dir": out,
                                     "tracking.tracking_uri": f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"}.items()]
    argv = [sys.executable, str(REPO_ROOT / "training" / "train_unified.py")] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    last = None
    while time.time() < deadline and proc.poll() is None:
        found = list(out.glob("*/last.pt"))
        if found:
            last = found[0]
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last is not None, "first epoch never checkpointed"
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] < 2, "the run finished before it could be killed"
    resumed = train(load_config(overrides={**tiny_cfg.overrides, "train.resume": str(last)}))
    assert resumed.run_id == ckpt["run_id"] and resumed.epochs_run == 3
    a, b = _weights(full.output_dir / "last.pt"), _weights(last)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    hist = mlflow.MlflowClient().get_metric_history(resumed.run_id, "val_auc")
    assert sorted({m.step for m in hist}) == [0, 1, 2]  # a kill between logging and saving repeats a step
    assert mlflow.get_run(resumed.run_id).info.status == "FINISHED"


def test_nan_loss_raises_clear_error(tmp_path: Path, tiny_cfg) -> None:
    with pytest.raises(NonFiniteLossError, match="lower the LR"):
        train(tiny_cfg(tmp_path, **{"optim.lr": 1e30, "optim.optimizer": "sgd", "train.num_epochs": 3,
                                    "tracking.enabled": False}))


def test_eval_only_scores_another_dataset(tmp_path: Path, capsys: pytest.CaptureFixture, tiny_cfg) -> None:
    """--eval_only is the evaluation path: a run `evaluation` nested under the checkpoint's run."""
    first = train(tiny_cfg(tmp_path, **{"train.num_epochs": 1, "tracking.log_model": False}))
    cfg = tiny_cfg(tmp_path, **{"train.eval_only": True, "train.checkpoint": str(first.output_dir / "best.pt"),
                                "train.use_tta": True})
    outcome = evaluate_config(cfg)
    assert 0.0 <= outcome.metrics["test_auc"] <= 1.0 and outcome.source.run_id == first.run_id
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.get_run(outcome.mlflow_run_id)
    assert run.data.tags["source_run_id"] == first.run_id and run.data.tags["mlflow.parentRunId"] == first.run_id
    assert run.data.params["tta"] == "flip: 2 views, logit"
    with pytest.raises(ConfigError, match="--eval_only"):  # train(cfg) trains; evaluation has one path
        train(cfg)
    args = ["--eval_only", "--checkpoint", str(first.output_dir / "best.pt"), "--num_workers", "0", "--no_tracking",
            "--output_dir", str(tmp_path / "cli")]
    assert train_unified.main(args) == 0
    assert "auc=" in capsys.readouterr().out


@pytest.mark.slow
def test_frozen_offline_mobilenet_on_lfw_faceswap(tmp_path: Path, shared_data: Path) -> None:
    """Real ImageNet MobileNetV2 (offline package), frozen, 1 epoch on real face swaps: val AUC > 0.8.

    LFW photos are whole 250 px frames with the face in the middle: data.center_crop keeps the face."""
    cfg = load_config(overrides={
        "model.model_type": "mobilenetv2", "model.pretrained": True, "model.dropout": 0.0,
        "data.data_dir": str(shared_data / "lfw_faceswap"), "data.center_crop": 0.5, "data.aug_policy": "none",
        "data.image_size": 128, "data.batch_size": 16, "data.num_workers": 1,
        "train.freeze_strategy": "frozen", "train.num_epochs": 1, "optim.lr": 3e-3, "optim.scheduler": "none",
        "train.output_dir": str(tmp_path / "outputs"),
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'm.db'}", "tracking.log_model": False,
    })
    result = train(cfg)
    assert result.val_metrics["val_auc"] > 0.8, result.val_metrics
    assert result.epochs_run == 1


def test_a_run_without_last_pt_writes_best_pt_once_with_the_best_epochs_weights(
        tmp_path: Path, tiny_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """No train.save_last (sweep trials): the best weights stay in memory and best.pt is written once, at the end,
    holding the same weights as a resumable run's best.pt (written at each improving epoch)."""
    import training.run_io as run_io
    import training.trainer as trainer_module

    common = {"train.num_epochs": 3, "tracking.log_model": False, "train.max_steps_per_epoch": 3,
              "train.monitor": "val_loss", "train.monitor_mode": "min"}
    on_disk = train(tiny_cfg(tmp_path / "a", **common))
    writes: list[Path] = []
    for module in (run_io, trainer_module):
        original = module.atomic_save
        monkeypatch.setattr(module, "atomic_save", lambda obj, path, f=original: writes.append(Path(path)) or f(obj, path))
    in_memory = train(tiny_cfg(tmp_path / "b", **common, **{"train.save_last": False}))
    assert [p.name for p in writes] == ["best.pt"]
    assert not (in_memory.output_dir / "last.pt").exists()
    assert not (in_memory.output_dir / "predictions" / "val_best.parquet").exists()
    a, b = load_checkpoint(on_disk.output_dir / "best.pt"), load_checkpoint(in_memory.output_dir / "best.pt")
    assert a["epoch"] == b["epoch"] == in_memory.best_epoch == on_disk.best_epoch
    assert b["best_metric"] == in_memory.best_metric and b["run_id"] == in_memory.run_id
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert in_memory.test_metrics == on_disk.test_metrics  # the test split was scored with the best weights
