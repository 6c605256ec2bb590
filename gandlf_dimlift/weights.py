"""Pretrained weights: the `pretrained` option, smp encoders with their weight tags, and weight files.

Weights that were asked for and cannot be had are an error that says what was looked for where and how to
provide it; nothing here ever falls back to random weights.
"""

from __future__ import annotations

import difflib
import logging
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from gandlf_dimlift.options import ConfigError

logger = logging.getLogger(__name__)
T = TypeVar("T")

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


def with_encoder_weights(name: str, weights: str | None, build: Callable[[], T]) -> T:
    """Runs `build()`, which makes smp load encoder `name` with the weight tag `weights` (download and cache),
    after checking the name and the tag; a failure to get the weights becomes a clear error saying how to provide
    them offline."""
    message = check_encoder_name(name)
    if message:
        raise ConfigError(f"encoder_name = {name!r}: {message}")
    if weights is not None and weights not in weight_tags(name):
        raise ConfigError(
            f"pretrained = {weights!r} is not a weight tag of {name}; it offers {weight_tags(name)}, "
            "or give a weights file path, or false."
        )
    try:
        return build()
    except Exception as error:  # offline, a corrupt cache file, a hub error: all mean "weights not available"
        if weights is None:
            raise
        raise WeightsError(_missing_weights_message(name, weights, error)) from error


def smp_encoder(name: str, in_channels: int = 3, depth: int = 5, weights: str | None = None) -> nn.Module:
    """Builds an smp encoder through smp's own loader, with a clear error offline (`with_encoder_weights`).

    Args:
        name: smp encoder name (`tu-` for timm universal encoders).
        in_channels: Input channels; smp adapts the first convolution (sum of RGB kernels for one channel).
        depth: Encoder depth (number of downsampling stages).
        weights: A weight tag (e.g. 'imagenet') or None for random initialisation.
    """
    import segmentation_models_pytorch as smp

    return with_encoder_weights(
        name, weights, lambda: smp.encoders.get_encoder(name, in_channels=in_channels, depth=depth, weights=weights))


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
    tensors-only (see `load_tensors_file`), without DistributedDataParallel's `module.` key prefix."""
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
    return WeightsFile(path, _strip_ddp_prefix(state_dict), architecture, dimension)


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


# ---------------------------------------------------------------------------------------------------------------
# One loader for every weights file a `pretrained:` option may name.


def _strip_ddp_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DistributedDataParallel saves every key under `module.`; the models never have that prefix."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def kernel_dimension(state_dict: dict[str, torch.Tensor]) -> int | None:
    """2 or 3 from the rank of the convolution kernels (4 or 5), None when the file holds none.

    A GaNDLF checkpoint's `model.dimension` is not the answer: a 3D slice attention model has 2D kernels.
    """
    ranks = {v.dim() for k, v in state_dict.items() if k.endswith("weight") and v.dim() in (4, 5)}
    return max(ranks) - 2 if ranks else None


@dataclass(frozen=True)
class Source:
    """What a `pretrained:` option asks for: nothing (random), a weight tag, or a file with its weights.

    Attributes:
        tag: A weight tag such as 'imagenet', loaded by the encoder's own library; None otherwise.
        file: The weights file, read tensors-only; None otherwise.
        dimension: 2 or 3: the dimension of the GaNDLF run that wrote the file, else that of its kernels' rank. A
            2D file is loaded into the 2D network before lifting, a 3D one into the lifted model.
    """

    tag: str | None = None
    file: WeightsFile | None = None
    dimension: int | None = None

    @classmethod
    def parse(cls, value: Any, where: str = "model.pretrained") -> Source:
        choice = parse_pretrained(value)
        if not isinstance(choice, Path):
            return cls(tag=choice)
        file = read_weights_file(choice)
        kernels = kernel_dimension(file.state_dict)
        if kernels is None:
            raise ConfigError(f"{where} = {str(choice)!r}: the file holds no convolution kernel to load.")
        # ACS layers keep 2D-shaped kernels in a 3D model: the run's own dimension decides when it is known.
        return cls(file=file, dimension=file.dimension or kernels)

    def describe(self) -> str:
        """The file, and what wrote it when it is a GaNDLF checkpoint."""
        if self.file is None:
            return repr(self.tag)
        what = f"a {self.file.architecture} checkpoint" if self.file.architecture else "a state dict"
        return f"{self.file.path} ({what}, {self.dimension}D)"


@dataclass(frozen=True)
class Parts:
    """Where a model's weights live, for loading files that hold all of it or only its encoder.

    Attributes:
        encoder: Path of the encoder module; a file must fit it at least.
        body: Paths of the rest of the network (decoder, pooling), loaded with the encoder when the file has them.
        head: Paths of the output layers, loaded when their shapes fit (another class count starts them random).
        hint: The options a file must share with the config, for the message when it does not fit.
    """

    encoder: str
    body: tuple[str, ...] = ()
    head: tuple[str, ...] = ()
    hint: str = "the same architecture options and num_channels"


def _find_prefix(keys: list[str], state_dict: dict[str, torch.Tensor]) -> str | None:
    """The prefix under which `state_dict` holds most keys of `keys` (e.g. 'net.encoder.'), the shortest of
    equals; None when it holds none of them under any prefix that ends at a key boundary."""
    candidates = {k[: len(k) - len(key)] for key in keys[:3] for k in state_dict
                  if k.endswith(key) and (len(k) == len(key) or k[len(k) - len(key) - 1] == ".")}
    if not candidates:
        return None
    return max(sorted(candidates, key=len), key=lambda p: sum(p + k in state_dict for k in keys))


def _fit(own: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], prefix: str,
         adapt_first_conv: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of `own` taken from `state_dict[prefix + key]`, and the keys that are missing or of another
    shape. With `adapt_first_conv`, the first kernel may differ in its input channels (an RGB encoder for grey or
    multi-channel input): it is adapted as smp and timm do (summed for one channel, else cycled and rescaled)."""
    fitted, problems = {}, []
    first_kernel = next((k for k, v in own.items() if k.endswith("weight") and v.dim() in (4, 5)), None)
    for key, tensor in own.items():
        theirs = state_dict.get(prefix + key)
        if theirs is None:
            problems.append(f"missing {prefix + key}")
        elif theirs.shape == tensor.shape:
            fitted[key] = theirs
        elif adapt_first_conv and key == first_kernel and theirs.shape[2:] == tensor.shape[2:] and (
                theirs.shape[0] == tensor.shape[0]):
            fitted[key] = adapt_channels(theirs, tensor.shape[1])
        else:
            problems.append(f"{prefix + key}: file {tuple(theirs.shape)} vs model {tuple(tensor.shape)}")
    return fitted, problems


def adapt_channels(kernel: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first-convolution kernel for `in_channels` inputs: one channel gets the sum of the existing kernels, N
    channels the existing kernels repeated cyclically and scaled by C_old / N (smp's and timm's convention), so a
    grey image replicated on every channel gives the original response."""
    if in_channels == 1:
        return kernel.sum(1, keepdim=True)
    index = torch.arange(in_channels, device=kernel.device) % kernel.shape[1]
    return kernel.index_select(1, index) * (kernel.shape[1] / in_channels)


def _load(model: nn.Module, state_dict: dict[str, torch.Tensor], bases: dict[str, str],
          adapt_first_conv: bool = False) -> list[str]:
    """Loads the submodules `bases` names (path -> prefix of their tensors in the file) when all of them fit;
    returns the problems otherwise (and loads nothing)."""
    fitted, problems = {}, []
    for path, prefix in bases.items():
        own = model.get_submodule(path).state_dict()
        part, bad = _fit(own, state_dict, prefix, adapt_first_conv)
        fitted.update({f"{path}.{k}": v for k, v in part.items()})
        problems += bad
    if not problems:
        model.load_state_dict(fitted, strict=False)
    return problems


WHOLE_MODEL, OUTPUT_LAYER = "the whole model", "the output layer"  # in `transfer`'s account of what it loaded


def loaded_output_layer(loaded: str | None) -> bool:
    """Whether `transfer`'s account of what it loaded (None: nothing) includes the output layer."""
    return loaded is not None and (loaded == WHOLE_MODEL or OUTPUT_LAYER in loaded)


def transfer(model: nn.Module, source: Source, parts: Parts, architecture: str, accepts: str = "") -> str:
    """Loads a weights file into `model`: every tensor when the whole model fits, else the encoder, with the rest
    of the network when the file holds it. Returns what was loaded, in words.

    Raises:
        ConfigError: Nothing in the file fits the encoder (a file of another kind of network).
        WeightsError: The file holds the encoder's or the network's tensors, but of other shapes.
    """
    state, where = source.file.state_dict, source.describe()
    whole, problems = _fit(model.state_dict(), state, "")
    if not problems:
        model.load_state_dict(whole)
        return WHOLE_MODEL
    prefix = _find_prefix(list(model.get_submodule(parts.encoder).state_dict()), state)
    if prefix is None:
        kind = f"a checkpoint of architecture {source.file.architecture!r}" if source.file.architecture else (
            "a state dict")
        raise ConfigError(
            f"model.pretrained = {str(source.file.path)!r} is {kind} whose weights fit neither the whole "
            f"{architecture} model nor its encoder (first missing: {problems[0]}). model.pretrained of "
            f"{architecture} takes {accepts or 'a weights file of the same network or of its encoder'}"
        )
    hint = f" The file must come from a run with {parts.hint}."

    def fail(what: str, problems: list[str]) -> WeightsError:
        shown = "; ".join(problems[:5]) + ("..." if len(problems) > 5 else "")
        return WeightsError(f"The weights in {where} do not fit {what} of {architecture} ({len(problems)} tensors "
                            f"missing or of another shape: {shown}).{hint}")

    problems = _load(model, state, {parts.encoder: prefix}, adapt_first_conv=True)
    if problems:
        raise fail("the encoder", problems)
    loaded = ["the encoder"]
    # The file's network root relative to its encoder: "" for a checkpoint of this architecture.
    end = parts.encoder + "."
    root = prefix[: -len(end)] if prefix == end or prefix.endswith("." + end) else None
    for what, paths in (("the rest of the network", parts.body), (OUTPUT_LAYER, parts.head)):
        if root is None or not any(k.startswith(f"{root}{p}.") for p in paths for k in state):
            continue
        problems = _load(model, state, {p: f"{root}{p}." for p in paths})
        if problems and paths is parts.head:
            logger.info("%s: the output layer in %s does not fit (%s); it starts random.", architecture, where,
                        problems[0])
        elif problems:
            raise fail(what, problems)
        else:
            loaded.append(what)
    if parts.body and "the rest of the network" not in loaded:
        logger.info("%s: %s holds only the encoder; the rest of the network starts random.", architecture, where)
    return ", ".join(loaded[:-1]) + " and " + loaded[-1] if len(loaded) > 1 else loaded[0]


def load_matching(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Loads every tensor of `module` from `state_dict`, requiring the same names and shapes (a strict load that
    says what does not fit)."""
    fitted, problems = _fit(module.state_dict(), state_dict, "")
    if problems:
        missing = sorted(p[len("missing "):] for p in problems if p.startswith("missing "))
        mismatched = sorted(p for p in problems if not p.startswith("missing "))
        shown = [f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}"] if missing else []
        raise WeightsError(
            f"The weights in {source} do not fit this model ({len(missing)} missing, {len(mismatched)} of another "
            f"shape: {'; '.join(shown + mismatched[:5])}). Check that the file comes from the same architecture and "
            "options."
        )
    module.load_state_dict(fitted)
