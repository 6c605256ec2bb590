"""Pretrained weights: the `pretrained` option, smp encoders with their weight tags, and weight files.

Weights that were asked for and cannot be had are an error that says what was looked for where and how to
provide it; nothing here ever falls back to random weights.
"""

from __future__ import annotations

import difflib
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gandlf_dimlift.options import ConfigError

NO_WEIGHTS = ("false", "none", "no", "")


class WeightsError(RuntimeError):
    """Requested pretrained weights could not be loaded."""


def check_pretrained(value: Any) -> str | None:
    """`Option.check` for `pretrained`: a file path must exist."""
    choice = parse_pretrained(value)
    if isinstance(choice, Path) and not choice.is_file():
        return f"the weights file {choice} does not exist (a path, a weight tag such as 'imagenet', or false)."
    return None


def parse_pretrained(value: Any) -> None | str | Path:
    """Maps the `pretrained` option to None (random init), a weight tag, or a file path."""
    if value is None or value is False:
        return None
    if value is True:
        return "imagenet"
    text = str(value).strip()
    if text.lower() in NO_WEIGHTS:
        return None
    if text.lower() == "true":
        return "imagenet"
    looks_like_file = os.sep in text or text.endswith((".pth", ".pt", ".tar", ".bin", ".safetensors"))
    return Path(text).expanduser() if looks_like_file or Path(text).is_file() else text


def smp_encoder_names() -> list[str]:
    import segmentation_models_pytorch as smp

    return sorted(smp.encoders.get_encoder_names())


def check_encoder_name(name: str) -> str | None:
    """`Option.check` for `encoder_name`: an smp encoder, or `tu-<timm model>`."""
    if name.startswith("tu-"):
        import timm

        if timm.is_model(name[3:]):
            return None
        near = difflib.get_close_matches(name[3:], timm.list_models(), n=3)
        return f"timm has no model {name[3:]!r}; nearest: {near}."
    names = smp_encoder_names()
    if name in names:
        return None
    near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    return f"unknown smp encoder; nearest: {near}. All: {names}."


def weight_tags(encoder_name: str) -> list[str]:
    """The weight tags smp offers for an encoder (timm encoders: 'imagenet')."""
    if encoder_name.startswith("tu-"):
        return ["imagenet"]
    import segmentation_models_pytorch as smp

    return sorted(smp.encoders.encoders[encoder_name]["pretrained_settings"])


def smp_encoder(name: str, in_channels: int = 3, depth: int = 5, weights: str | None = None) -> nn.Module:
    """Builds an smp encoder through smp's own loader (download and cache), with a clear error offline.

    Args:
        name: smp encoder name (`tu-` for timm universal encoders).
        in_channels: Input channels; smp adapts the first convolution (sum of RGB kernels for one channel).
        depth: Encoder depth (number of downsampling stages).
        weights: A weight tag (e.g. 'imagenet') or None for random initialisation.
    """
    import segmentation_models_pytorch as smp

    message = check_encoder_name(name)
    if message:
        raise ConfigError(f"encoder_name = {name!r}: {message}")
    if weights is not None and weights not in weight_tags(name):
        raise ConfigError(
            f"pretrained = {weights!r} is not a weight tag of {name}; it offers {weight_tags(name)}, "
            "or give a weights file path, or false."
        )
    try:
        return smp.encoders.get_encoder(name, in_channels=in_channels, depth=depth, weights=weights)
    except Exception as error:  # offline, a corrupt cache file, a hub error: all mean "weights not available"
        if weights is None:
            raise
        raise WeightsError(_missing_weights_message(name, weights, error)) from error


def _missing_weights_message(name: str, weights: str, error: Exception) -> str:
    if name.startswith("tu-"):
        cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
        where = (
            f"timm fetches {name[3:]} from the Hugging Face hub (cache: {cache}). "
            "Download it on a machine with network access into that cache, or save the 2D weights and set "
            "`pretrained:` to the file path."
        )
    else:
        import segmentation_models_pytorch as smp

        url = smp.encoders.encoders[name]["pretrained_settings"][weights]["url"]
        cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        where = (
            f"smp loads {url} through torch.hub into {cache} (set TORCH_HOME to move the cache). "
            f"Download that file on a machine with network access and place it at {cache}, "
            "or set `pretrained:` to a weights file path."
        )
    return f"Could not load the '{weights}' weights of encoder {name}: {type(error).__name__}: {error}. {where}"


@dataclass(frozen=True)
class WeightsFile:
    """A weights file: a plain state dict, or a GaNDLF checkpoint with what its run directory says of it.

    Attributes:
        path: The file.
        state_dict: The model weights.
        architecture: The GaNDLF architecture that wrote it, when known (from parameters.pkl or the file name).
        dimension: The GaNDLF model dimension that wrote it, when known.
    """

    path: Path
    state_dict: dict[str, torch.Tensor]
    architecture: str | None = None
    dimension: int | None = None


def read_weights_file(path: str | Path) -> WeightsFile:
    """Reads a state dict or a GaNDLF `<arch>_best.pth.tar` checkpoint (with its run's `parameters.pkl`),
    tensors-only: see `load_tensors_file`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"The weights file {path} does not exist; set `pretrained:` to an existing file or false.")
    content = load_tensors_file(path)
    architecture = dimension = None
    if isinstance(content, dict) and "model_state_dict" in content:
        state_dict = content["model_state_dict"]
        # GaNDLF's save_model stores the run's parameters in the checkpoint; its run folder has them too.
        parameters = content.get("parameters")
        parameters_file = path.parent / "parameters.pkl"
        if not isinstance(parameters, dict) and parameters_file.is_file():
            parameters = read_parameters_file(parameters_file)
        if isinstance(parameters, dict) and "model" in parameters:
            architecture = str(parameters["model"]["architecture"]).lower()
            dimension = int(parameters["model"]["dimension"])
        elif path.name.endswith(".pth.tar"):
            architecture = path.name.rsplit("_", 1)[0]
    elif isinstance(content, dict) and "state_dict" in content:
        state_dict = content["state_dict"]
    elif isinstance(content, dict) and all(isinstance(v, torch.Tensor) for v in content.values()):
        state_dict = content
    else:
        raise WeightsError(f"{path} holds neither a state dict nor a GaNDLF checkpoint ({type(content).__name__}).")
    return WeightsFile(path, state_dict, architecture, dimension)


def _allowed_globals() -> dict[str, Any]:
    """The only classes and functions a weights or parameters file may name, by their pickled names.

    Beyond torch's own tensors-only set: what GaNDLF 0.1.5 stores in a checkpoint's "parameters" (read from real
    `gandlf_run` checkpoints): numpy arrays, dtypes and scalars, the pandas tables of the training and validation
    subjects, and `slice`. Each rebuilds a value from data; none calls anything the file names.
    """
    import numpy as np
    import pandas as pd
    from pandas._libs.internals import _unpickle_block
    from pandas.core.indexes.base import _new_Index
    from pandas.core.internals.managers import BlockManager

    multiarray = np.core.multiarray if hasattr(np, "core") else np._core.multiarray
    dtype_classes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGOUSV"} | {type(np.dtype("M8[ns]")),
                                                                                      type(np.dtype("m8[ns]"))}
    objects = [np.ndarray, np.dtype, *dtype_classes, multiarray._reconstruct, multiarray.scalar, slice,
               pd.DataFrame, pd.Series, pd.Index, pd.RangeIndex, BlockManager, _unpickle_block, _new_Index]
    allowed = {f"{obj.__module__}.{obj.__qualname__}": obj for obj in objects}
    for name in ("_reconstruct", "scalar"):  # numpy 2 writes numpy._core, numpy 1 numpy.core
        for package in ("numpy.core", "numpy._core"):
            allowed[f"{package}.multiarray.{name}"] = getattr(multiarray, name)
    return allowed


def load_tensors_file(path: str | Path) -> Any:
    """Loads a torch file without running code from it: `torch.load(weights_only=True)` allowing only tensors,
    plain Python data and `_allowed_globals()`.

    Raises:
        WeightsError: Naming the file, when it holds anything else (nothing of it is executed) or is no torch file.
    """
    path = Path(path).expanduser()
    allowed = [(obj, name) for name, obj in _allowed_globals().items()]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = " ".join(str(error).split())
        named = re.search(r"(?:GLOBAL|unrecognized function|new object for|build instance of) <?([^\s>]+)", text)
        if named is None:  # no refused object: not a torch file at all
            detail = text.split("WeightsUnpickler error:")[-1].split(" Check the documentation")[0].strip()[:200]
            raise WeightsError(f"Could not read {path}: not a torch weights file or corrupt ({detail}).") from None
        detail = f"it names {named.group(1).rstrip('.,')}, which is not on the allow-list"
        raise WeightsError(_refused_message(path, detail)) from None
    except Exception as error:  # noqa: BLE001 - torch reports a corrupt file in many ways
        detail = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        raise WeightsError(f"Could not read {path}: not a torch weights file or corrupt ({detail}).") from None


class _AllowListUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only the names of `_allowed_globals()`, so no other callable can run."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals()
        if f"{module}.{name}" not in allowed:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not on the allow-list")
        return allowed[f"{module}.{name}"]


def read_parameters_file(path: str | Path) -> Any:
    """Reads a GaNDLF `parameters.pkl` with the allow-list of `load_tensors_file`.

    Raises:
        WeightsError: Naming the file, when it names any other class or function (nothing of it is executed).
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _AllowListUnpickler(handle).load()
    except pickle.UnpicklingError as error:
        if "allow-list" in str(error):
            raise WeightsError(_refused_message(path, str(error))) from None
        raise WeightsError(f"Could not read {path}: not a pickle file or corrupt ({error}).") from None
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise WeightsError(f"Could not read {path}: not a pickle file or corrupt ({type(error).__name__}: "
                           f"{error}).") from None


def _refused_message(path: Path, detail: str) -> str:
    return (
        f"{path} was not loaded: besides tensors and plain data it holds Python objects ({detail}), and reading "
        "them could run code. gandlf-dimlift reads weights tensors-only. If you trust whoever made the file, load "
        "it yourself and save only its state dict (torch.save(model_state_dict, 'weights.pth')), then use that file."
    )


def load_matching(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str, prefix: str = "") -> None:
    """Loads every tensor of `module` from `state_dict[prefix + name]`, requiring names and shapes to match."""
    own = module.state_dict()
    wanted = {prefix + k: v for k, v in own.items()}
    missing = sorted(k for k in wanted if k not in state_dict)
    mismatched = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in wanted.items()
        if k in state_dict and state_dict[k].shape != v.shape
    )
    if missing or mismatched:
        shown = [f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}"] if missing else []
        details = "; ".join(shown + mismatched[:5])
        raise WeightsError(
            f"The weights in {source} do not fit this model ({len(missing)} missing, {len(mismatched)} of another "
            f"shape: {details}). Check that the file comes from the same architecture and options."
        )
    module.load_state_dict({k: state_dict[prefix + k] for k in own})
