"""data.extra_val: other data sets scored every epoch, monitorable for early stopping / best checkpoint."""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from core.checkpoints import load_checkpoint
from core.config import ConfigError, load_config, monitor_names
from training.trainer import train

TINY = {
    "model.model_type": "test_efficientnet", "model.pretrained": False, "data.image_size": 32,
    "data.batch_size": 16, "data.num_workers": 0, "data.max_samples_per_split": 24, "train.num_epochs": 3,
    "optim.lr": 3e-3, "train.use_amp": False, "tracking.log_model": False,
}


def test_extra_val_logged_per_epoch_and_monitored(tmp_path: Path, shared_data: Path) -> None:
    extra = [f"gan={shared_data / 'hardfake_vs_real'}", str(shared_data / "lfw_faceswap")]
    cfg = load_config(overrides={**TINY, "data.extra_val": extra, "train.monitor": "val_gan_auc",
                                 "train.output_dir": str(tmp_path / "out"),
                                 "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    result = train(cfg)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    hist = {m: [x.value for x in sorted(client.get_metric_history(result.run_id, m), key=lambda x: x.step)]
            for m in ("val_auc", "val_gan_auc", "val_lfw_faceswap_auc", "val_extra_mean_auc", "val_mean_auc")}
    assert all(len(v) == 3 for v in hist.values()), hist
    np.testing.assert_allclose(hist["val_extra_mean_auc"],
                               (np.array(hist["val_gan_auc"]) + hist["val_lfw_faceswap_auc"]) / 2)
    np.testing.assert_allclose(hist["val_mean_auc"], (np.array(hist["val_gan_auc"]) + hist["val_lfw_faceswap_auc"]
                                                      + hist["val_auc"]) / 3)
    best = int(np.argmax(hist["val_gan_auc"]))  # the kept checkpoint is the best epoch on the GAN set
    assert result.best_epoch == best and result.best_metric == pytest.approx(max(hist["val_gan_auc"]))
    assert load_checkpoint(result.output_dir / "best.pt")["epoch"] == best
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["best_val_gan_auc"] == pytest.approx(hist["val_gan_auc"][best])
    assert metrics["best_val_lfw_faceswap_auc"] == pytest.approx(hist["val_lfw_faceswap_auc"][best])
    assert 0 <= metrics["test_gan_auc"] <= 1 and (result.output_dir / "predictions" / "test_gan.parquet").is_file()


def test_monitor_names_are_validated() -> None:
    assert "val_gan_auc" in monitor_names(load_config(overrides={"data.extra_val": "gan=/x"}).data)
    cfg = load_config(overrides={"data.extra_val": ["/data/hardfake_vs_real", "celeb=/data/c.csv"],
                                 "train.monitor": "val_extra_mean_auc"})
    assert cfg.data.extra_val_sets == [("hardfake_vs_real", "/data/hardfake_vs_real"), ("celeb", "/data/c.csv")]
    load_config(overrides={"train.monitor": "val_eer", "train.monitor_mode": "min"})
    with pytest.raises(ConfigError, match="did you mean val_hardfake_vs_real_auc"):
        load_config(overrides={"data.extra_val": "/data/hardfake_vs_real", "train.monitor": "val_hardfake_auc"})
    with pytest.raises(ConfigError, match="val_extra_mean_auc"):
        load_config(overrides={"train.monitor": "val_extra_mean_auc"})  # no extra sets: not logged
    with pytest.raises(ConfigError, match="both named 'a'"):
        load_config(overrides={"data.extra_val": ["a=/x", "/y/a"]})


def test_ensemble_members_selected_by_an_extra_val_metric(tmp_path: Path) -> None:
    """serving.ensemble --metric val_<name>_auc ranks runs by the value at their kept epoch (best_...)."""
    from serving.ensemble import candidate_runs, select_members
    from test_ensemble import tables

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("x", artifact_location=(tmp_path / "a").as_uri()))
    val, test = tables(40, 1), tables(40, 2, "test")
    for name, in_domain, gan in (("a", 0.99, 0.30), ("b", 0.97, 0.80), ("c", 0.98, 0.60)):
        with mlflow.start_run(run_name=name):
            mlflow.log_metrics({"best_val_auc": in_domain, "best_val_gan_auc": gan})
            for split, df in (("val", val[0]), ("test", test[0])):
                f = tmp_path / name / f"{split}.parquet"
                f.parent.mkdir(exist_ok=True)
                df.to_parquet(f)
                mlflow.log_artifact(str(f), "predictions")
    runs = candidate_runs(experiment="x")
    assert [m.name for m in select_members(runs, top=2, metric="val_gan_auc")] == ["b", "c"]
    assert [m.name for m in select_members(runs, top=2, metric="val_auc")] == ["a", "c"]
