"""Sweep files: every shipped file loads; conditions; each kind of mistake is one ConfigError naming key and file."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from optuna.trial import FixedTrial

from experiments.search_space import load_sweep
from core.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO_ROOT / "experiments" / "sweeps").glob("*.yaml"))

SPACE = {
    "loss.loss_type": {"type": "categorical", "choices": ["bce", "focal"]},
    "loss.focal_gamma": {"type": "float", "low": 0.5, "high": 4.0, "when": {"loss.loss_type": "focal"}},
    "aug.use_mixup": {"type": "categorical", "choices": [False, True]},
    "aug.mixup_alpha": {"type": "float", "low": 0.1, "high": 0.5, "when": {"aug.use_mixup": True}},
    "optim.lr": {"type": "float", "low": "1e-5", "high": 1.0e-2, "log": True},
    "optim.gradient_accumulation": {"type": "int", "low": 1, "high": 4, "step": 1},
}


def write(tmp_path: Path, doc: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def base_doc(**space_changes: dict) -> dict:
    space = {**SPACE, **space_changes}
    return {"study": {"name": "t", "n_trials": 3},
            "base": {"model": {"model_type": "test_efficientnet", "pretrained": False}, "data": {"image_size": 32}},
            "space": {k: v for k, v in space.items() if v is not None}}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_shipped_sweep_files_load(path: Path) -> None:
    spec = load_sweep(path)
    assert spec.params and spec.study.n_trials >= 1
    assert spec.base.train.monitor == spec.study.metric


def test_default_sweep_covers_the_issue_choices() -> None:
    spec = load_sweep(REPO_ROOT / "experiments" / "sweeps" / "default.yaml")
    keys = {p.key: p for p in spec.params}
    assert set(keys["train.freeze_strategy"].choices) == {"frozen", "full", "progressive", "partial:2"}
    assert set(keys["loss.loss_type"].choices) == {"bce", "focal", "label_smoothing"}
    assert set(keys["optim.scheduler"].choices) == {"cosine", "plateau", "onecycle"}
    assert keys["optim.gradient_accumulation"].choices == (1, 2, 4)
    assert keys["optim.backbone_lr"].log and keys["optim.classifier_lr"].log
    assert keys["loss.focal_gamma"].when == (("loss.loss_type", ("focal",)),)
    assert keys["aug.mixup_alpha"].when == (("aug.use_mixup", (True,)),)
    assert keys["train.unfreeze_epoch"].when == (("train.freeze_strategy", ("progressive",)),)
    assert spec.base.model.model_type == "efficientnet_lite0" and spec.base.data.image_size == 64
    assert spec.base.train.use_amp == "auto" and "train.use_amp" not in keys  # resolved per trial, not swept
    assert spec.base.train.save_last is False  # a killed trial is retried, not resumed


def test_sweeps_use_auto_amp_and_no_last_checkpoint_unless_the_file_says_so(tmp_path: Path) -> None:
    base = load_sweep(write(tmp_path, base_doc())).base.train
    assert base.use_amp == "auto" and base.save_last is False
    doc = base_doc()
    doc["base"]["train"] = {"save_last": True}
    assert load_sweep(write(tmp_path, doc)).base.train.save_last is True
    doc = base_doc()
    doc["base"]["train"] = {"use_amp": False}
    assert not load_sweep(write(tmp_path, doc)).base.train.use_amp
    doc = base_doc()
    doc["space"]["train.use_amp"] = {"type": "categorical", "choices": [True, False]}
    spec = load_sweep(write(tmp_path, doc))
    assert {spec.trial_config({"train.use_amp": v}).train.use_amp for v in (True, False)} == {True, False}


def test_conditional_params_follow_their_parent(tmp_path: Path) -> None:
    spec = load_sweep(write(tmp_path, base_doc()))
    common = {"optim.lr": 1e-3, "optim.gradient_accumulation": 2}
    focal = spec.sample(FixedTrial({**common, "loss.loss_type": "focal", "loss.focal_gamma": 2.0,
                                    "aug.use_mixup": False}))
    assert focal["loss.focal_gamma"] == 2.0 and "aug.mixup_alpha" not in focal
    bce = spec.sample(FixedTrial({**common, "loss.loss_type": "bce", "aug.use_mixup": True, "aug.mixup_alpha": 0.3}))
    assert "loss.focal_gamma" not in bce and bce["aug.mixup_alpha"] == 0.3
    cfg = spec.trial_config(bce)
    assert cfg.aug.use_mixup and cfg.aug.mixup_alpha == 0.3 and cfg.loss.focal_gamma == 2.0  # default kept


def test_base_preset_set_and_study_flags_layer_in_order(tmp_path: Path) -> None:
    doc = base_doc()
    doc["config"] = "efficientnet_b3_focal.yaml"
    doc["base"]["train"] = {"num_epochs": 2}
    spec = load_sweep(write(tmp_path, doc), overrides={"data.batch_size": 8},
                      study_overrides={"n_trials": 7, "pruner": "hyperband", "metric": "val_loss",
                                       "direction": "minimize"})
    assert spec.base.model.use_attention  # from the preset
    assert spec.base.model.model_type == "test_efficientnet" and spec.base.train.num_epochs == 2  # base wins
    assert spec.base.data.batch_size == 8  # --set wins
    assert (spec.study.n_trials, spec.study.pruner, spec.study.pruner_options) == (7, "hyperband", {})
    assert (spec.base.train.monitor, spec.base.train.monitor_mode) == ("val_loss", "min")


def test_grid_space_enumerates_steps(tmp_path: Path) -> None:
    doc = base_doc(**{"optim.lr": None, "loss.focal_gamma": {"type": "float", "low": 1.0, "high": 2.0, "step": 0.5,
                                                             "when": {"loss.loss_type": "focal"}},
                      "aug.mixup_alpha": None})
    doc["study"]["sampler"] = "grid"
    grid = load_sweep(write(tmp_path, doc)).grid_space()
    assert grid["loss.focal_gamma"] == [1.0, 1.5, 2.0]
    assert grid["optim.gradient_accumulation"] == [1, 2, 3, 4]


BAD = [  # (space changes or a callable editing the doc, words the one-line error must contain)
    ({"optim.lrr": {"type": "float", "low": 0.1, "high": 1.0}}, ["optim.lrr", "did you mean optim.lr"]),
    ({"optim.lr": {"type": "float", "low": 0.1, "high": 0.01}}, ["space.optim.lr", "low (0.1) must be < high"]),
    ({"optim.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, ["space.optim.lr", "low > 0"]),
    ({"optim.lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True, "step": 1e-4}}, ["space.optim.lr", "step and log"]),
    ({"loss.loss_type": {"type": "categorical", "choices": []}}, ["space.loss.loss_type", "non-empty"]),
    ({"loss.loss_type": {"type": "categorical", "choices": ["bce", "nope"]}}, ["loss.loss_type", "nope"]),
    ({"loss.focal_gamma": {"type": "float", "low": 1, "high": 2, "when": {"model.dropout": 0.1}}},
     ["space.loss.focal_gamma.when.model.dropout", "not a param in space"]),
    ({"loss.focal_gamma": {"type": "float", "low": 1, "high": 2, "when": {"loss.loss_type": "focall"}}},
     ["space.loss.focal_gamma.when.loss.loss_type", "'focall' is not among the choices"]),
    ({"optim.gradient_accumulation": {"type": "int", "low": 1.5, "high": 4}}, ["optim.gradient_accumulation", "integer"]),
    ({"optim.gradient_accumulation": {"type": "integer", "low": 1, "high": 4}}, ["optim.gradient_accumulation", "type"]),
    ({"optim.gradient_accumulation": {"type": "int", "low": 1, "high": 4, "stepp": 1}}, ["gradient_accumulation", "stepp"]),
    ({"train.freeze_strategy": {"type": "categorical", "choices": ["full", "partial:0"]}}, ["train.freeze_strategy", "partial:0"]),
    ({"data.aug_policy": {"type": "categorical", "choices": ["basic", "fancy"]}}, ["data.aug_policy", "fancy", "valid"]),
    ({"model.dropout": {"type": "float", "low": 0.0, "high": 1.5}}, ["model.dropout", "space.model.dropout"]),
]


@pytest.mark.parametrize("changes,words", BAD, ids=[w[0] for _, w in BAD])
def test_bad_space_is_one_config_error_naming_the_key(tmp_path: Path, changes: dict, words: list[str]) -> None:
    path = write(tmp_path, base_doc(**changes))
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    for w in words:
        assert w in msg


def test_condition_on_a_later_param_is_an_error(tmp_path: Path) -> None:
    doc = base_doc()
    doc["space"] = {"loss.focal_gamma": SPACE["loss.focal_gamma"], "loss.loss_type": SPACE["loss.loss_type"]}
    with pytest.raises(ConfigError, match="must be defined above it"):
        load_sweep(write(tmp_path, doc))


@pytest.mark.parametrize("edit,words", [
    (lambda d: d["study"].update(sampler="cmaes"), ["study.sampler", "cmaes"]),
    (lambda d: d["study"].update(pruner={"type": "median", "patience": 2}), ["patience", "median"]),
    (lambda d: d["study"].update(direction="up"), ["study.direction"]),
    (lambda d: d["study"].update(n_trials=0), ["study.n_trials"]),
    (lambda d: d["study"].update(metrik="val_auc"), ["study.metrik"]),
    (lambda d: d["study"].update(metric="auc"), ["train.monitor", "auc"]),
    (lambda d: d["base"].update(optim={"lrr": 1.0}), ["optim.lrr", "base"]),
    (lambda d: d["base"].update(loss={"loss_type": "bce"}), ["loss.loss_type", "also swept"]),
    (lambda d: d["base"]["model"].update(model_type="efficientnet_b99"), ["model.model_type", "efficientnet_b99"]),
    (lambda d: d.update(config="no_such_preset.yaml"), ["no_such_preset.yaml"]),
    (lambda d: d.update(spaces={}), ["spaces"]),
    (lambda d: d["study"].update(sampler="grid"), ["loss.focal_gamma", "grid", "step"]),
])
def test_bad_study_or_base_is_one_config_error(tmp_path: Path, edit, words: list[str]) -> None:
    doc = base_doc()
    edit(doc)
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg


def test_set_on_a_swept_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="optim.lr.*--set.*also swept"):
        load_sweep(write(tmp_path, base_doc()), overrides={"optim.lr": 1e-3})


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_shipped_sweep_files_sample_valid_trials(path: Path) -> None:
    """Combinations, not just each value alone (load_sweep checks those): every param at its first value, every
    param at its last, and 40 random trials all compose into a valid Config. Keys that exclude each other
    (aug.artifact_prob with aug.artifact_fake_prob) need a `when:` or a trial fails."""
    import optuna

    spec = load_sweep(path)
    ends = [{p.key: p.probe_values()[i] for p in spec.params} for i in (0, -1)]
    for fixed in ends:
        spec.trial_config(spec.sample(FixedTrial({k: v for k, v in fixed.items()})))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        spec.trial_config(spec.sample(study.ask()))
