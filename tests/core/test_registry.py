"""Registries: names are read from the entry modules' source without importing them, and agree with what
importing them registers; a misspelt name exits 2 from the CLIs before torch (or MLflow, ...) is imported."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import core.registry
from core.errors import UnknownNameError
from core.registry import FAMILIES, Registry

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "albumentations", "cv2", "timm", "mlflow")  # what a typo must not wait for


def _heavy_after(code: str, *args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; its last stdout line lists the HEAVY modules it imported."""
    probe = f"{code}\nimport sys\nprint(*[m for m in {HEAVY!r} if m in sys.modules])"
    return subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("key", sorted(FAMILIES))
def test_names_read_from_source_are_the_registered_names(key: str) -> None:
    """What the Config and --help read without importing a family's module is exactly what importing it
    registers; a module that registers computed names is imported to list them, so it must import nothing heavy."""
    registry = FAMILIES[key]
    declared = registry.declared_names()
    if declared is None:
        proc = _heavy_after(f"import {registry.entry_module}")
        assert proc.returncode == 0 and proc.stdout.strip() == "", (
            f"{registry.entry_module} registers computed names, so listing them imports it; it imports "
            f"{proc.stdout.strip()}{proc.stderr[-300:]}: register literal names instead")
    else:
        assert declared == set(registry.load().names())


def test_reader_follows_aliases_and_gives_up_on_computed_names(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "entries_literal.py").write_text(
        "from core.registry import TEST_FAMILY as T\nALIAS = T\n\n"
        "@ALIAS.register('alpha', num_outputs=1)\ndef a(): ...\n\n"
        "T.register('beta', a)\nOTHER_FAMILY_CALL = object()\n")
    (tmp_path / "entries_computed.py").write_text(
        "from core.registry import TEST_FAMILY\nfor n in ('x', 'y'):\n    TEST_FAMILY.register(n, print)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    literal = Registry("widget", "entries_literal")
    monkeypatch.setattr(core.registry, "TEST_FAMILY", literal, raising=False)
    assert literal.declared_names() == {"alpha", "beta"}
    with pytest.raises(UnknownNameError, match=r"unknown widget 'alpah' \(did you mean 'alpha'\?\); valid: alpha, beta"):
        literal.check("alpah")
    assert "entries_literal" not in sys.modules  # checked and listed without importing it
    assert literal.names() == ["alpha", "beta"] and "entries_literal" not in sys.modules
    assert literal.meta("alpha") == {"num_outputs": 1} and "entries_literal" in sys.modules
    computed = Registry("widget", "entries_computed")
    monkeypatch.setattr(core.registry, "TEST_FAMILY", computed)
    assert computed.declared_names() is None
    assert computed.names() == ["x", "y"]  # listing them imports the module
    for name in ("entries_literal", "entries_computed"):
        monkeypatch.delitem(sys.modules, name)


def _sweep_file(path: Path, model_type: str) -> Path:
    path.write_text(f"study: {{name: typo, metric: val_auc, direction: maximize, n_trials: 1}}\n"
                    f"base:\n  model: {{model_type: {model_type}, pretrained: false}}\n"
                    f"space:\n  optim.lr: {{type: float, low: 1.0e-4, high: 1.0e-3, log: true}}\n")
    return path


@pytest.mark.parametrize("cli, argv, key, hint", [
    ("training/train_unified.py", ["--loss_type", "focl"], "loss.loss_type", "'focal'"),
    ("training/train_unified.py", ["--freeze_strategy", "partal:2"], "train.freeze_strategy", "'partial'"),
    ("training/train_unified.py", ["--set", "data.aug_policy=basik"], "data.aug_policy", "'basic'"),
    ("experiments/sweep.py", ["--sweep", "{tmp}/typo.yaml"], "model.model_type", "'test_efficientnet'"),
    ("experiments/sweep.py", ["--sweep", "{tmp}/ok.yaml", "--set", "optim.scheduler=cosin"], "optim.scheduler",
     "'cosine'"),
    ("training/train_unified.py", ["--batch_size", "0"], "data.batch_size", None),  # any bad value, not only names
])
def test_a_misspelt_name_exits_2_before_anything_heavy_is_imported(tmp_path: Path, cli: str, argv: list[str],
                                                                   key: str, hint: str | None) -> None:
    """One line naming the key and the closest name, exit 2, no MLflow store, Optuna study or output folder, and
    neither torch, albumentations, timm nor mlflow imported: the Config rejects the value before they load."""
    _sweep_file(tmp_path / "typo.yaml", "test_efficientnt")
    _sweep_file(tmp_path / "ok.yaml", "test_efficientnet")
    work = tmp_path / "cwd"
    work.mkdir()
    argv = [a.format(tmp=tmp_path) for a in argv]
    if cli.startswith("experiments"):
        argv += ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]
    # the CLIs end with core.cli.exit_now (os._exit after the atexit handlers): sys.exit here, so the probe below runs
    code = (f"import runpy, sys\nsys.path.insert(0, {str(REPO_ROOT)!r})\nimport core.cli\ncore.cli.exit_now = sys.exit\n"
            "sys.argv = sys.argv[1:]\ntry:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n    print('exit', e.code)")
    proc = _heavy_after(code, str(REPO_ROOT / cli), *argv, "--set", f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
                        f"train.output_dir={work}/outputs", cwd=work)
    assert proc.stdout.splitlines()[-2:] == ["exit 2", ""], proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and (hint is None or f"did you mean {hint}" in lines[0]), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "ok.yaml", "typo.yaml"] and not any(work.iterdir())
