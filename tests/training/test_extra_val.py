"""data.extra_val: other data sets scored every epoch, monitorable for early stopping / best checkpoint."""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from core.checkpoints import load_checkpoint
from core.config import ConfigError, load_config, monitor_names
from training.trainer import train

def test_extra_val_logged_per_epoch_and_monitored(tmp_path: Path, shared_data: Path, tiny_cfg) -> None:
    extra = [f"gan={shared_data / 'hardfake_vs_real'}", str(shared_data / "lfw_faceswap")]
    result = train(tiny_cfg(tmp_path, **{"data.max_samples_per_split": 24, "train.num_epochs": 3,
                                         "tracking.log_model": False, "data.extra_val": extra,
                                         "train.monitor": "val_gan_auc"}))
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
