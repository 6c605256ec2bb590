"""GaNDLF's model contract, shared by every family: parsed parameters, final layer, heads, patch checks."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from gandlf_dimlift.options import PROBLEM_TYPES, ConfigError

FINAL_LAYERS = ("sigmoid", "softmax", "logsoftmax", "tanh", "identity", "logits", "regression", "none")


def _channels(model: dict[str, Any], headers: dict[str, Any] | None, dimension: int) -> int:
    """`model.num_channels`, checked against the data CSV's channel columns when GaNDLF has read them."""
    value = model.get("num_channels", 3)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"model.num_channels = {value!r}: give the number of input channels, a positive integer (one per "
            "Channel column of the data CSV for 3D NIfTI images; 3 for RGB 2D images)."
        )
    columns = list((headers or {}).get("channelHeaders") or [])
    # A 2D RGB image is one column with three channels; a 3D NIfTI column is one channel.
    if columns and (value < len(columns) or (dimension == 3 and value != len(columns))):
        raise ConfigError(
            f"model.num_channels is {value} but the data CSV has {len(columns)} channel column"
            f"{'s' if len(columns) != 1 else ''}: set model.num_channels: {len(columns)}. (GaNDLF uses 3 when the "
            "key is absent, whatever the CSV holds.)"
        )
    return value


def layer(kind: str, dimension: int) -> type[nn.Module]:
    """Returns the torch layer class of `kind` (e.g. "Conv", "BatchNorm", "MaxPool") for 1, 2 or 3 dimensions."""
    return getattr(nn, f"{kind}{dimension}d")


@dataclass(frozen=True)
class ModelSpec:
    """What GaNDLF asks of a model, read from its parameters dictionary.

    Attributes:
        architecture: The `model.architecture` key.
        dimension: 2 or 3.
        in_channels: Input channels (`model.num_channels`).
        n_outputs: Classes for segmentation and classification, targets for regression.
        problem_type: One of segmentation, classification, regression.
        final_layer: GaNDLF's `model.final_layer`, lowercased.
        norm_type: batch, instance or none.
        patch_size: Spatial patch size, one entry per dimension.
        sigmoid_input_multiplier: GaNDLF's scale applied before a sigmoid final layer.
    """

    architecture: str
    dimension: int
    in_channels: int
    n_outputs: int
    problem_type: str
    final_layer: str
    norm_type: str
    patch_size: tuple[int, ...]
    sigmoid_input_multiplier: float = 1.0

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> ModelSpec:
        """Reads GaNDLF's parameters dictionary.

        Raises:
            ConfigError: A dimension, channel count, class list, final layer or patch size the model cannot use,
                or a `num_channels` that disagrees with the data CSV's channel columns.
        """
        model = parameters["model"]
        dimension = int(model.get("dimension") or 3)
        if dimension not in (2, 3):
            raise ConfigError(f"model.dimension must be 2 or 3, not {dimension}.")
        problem_type = parameters.get("problem_type")
        if problem_type is None and "metrics" in parameters:
            # No CSV read yet (e.g. OpenFL's `fx plan initialize`): infer it as GaNDLF does from the config.
            from GANDLF.utils.parameter_processing import find_problem_type_from_parameters

            problem_type = find_problem_type_from_parameters(parameters)
        if problem_type not in PROBLEM_TYPES:
            raise ConfigError(
                f"parameters['problem_type'] is {problem_type!r}; expected one of {list(PROBLEM_TYPES)}. "
                "GaNDLF sets it from the CSV headers; set it yourself when building a model from Python."
            )
        in_channels = _channels(model, parameters.get("headers"), dimension)
        n_outputs = int(model.get("num_classes") or len(model.get("class_list") or []) or 1)
        if problem_type != "regression" and n_outputs < 2:
            raise ConfigError(
                f"model.class_list = {model.get('class_list')!r} has {n_outputs} class; {problem_type} needs at "
                "least two (for a yes/no task: class_list: [0, 1], with the background or negative class). "
                "One output to fit is a regression: a ValueToPredict column with final_layer: none."
            )
        final_layer = str(model.get("final_layer", "none")).lower()
        if final_layer not in FINAL_LAYERS:
            raise ConfigError(f"model.final_layer = {final_layer!r}; choose one of {list(FINAL_LAYERS)}.")
        patch = parameters.get("patch_size") or []
        patch = [patch] * dimension if isinstance(patch, (int, float)) else list(patch)
        if len(patch) < dimension:
            raise ConfigError(f"patch_size {patch} has fewer than {dimension} entries for a {dimension}D model.")
        return cls(
            architecture=str(model.get("architecture", "")).lower(),
            dimension=dimension,
            in_channels=in_channels,
            n_outputs=n_outputs,
            problem_type=problem_type,
            final_layer=final_layer,
            norm_type=str(model.get("norm_type") or "batch").lower(),
            patch_size=tuple(int(p) for p in patch[:dimension]),
            sigmoid_input_multiplier=float(model.get("sigmoid_input_multiplier", 1.0)),
        )

    def planar(self) -> ModelSpec:
        """The contract of the 2D network that is lifted to this 3D model."""
        return replace(self, dimension=2, patch_size=self.patch_size[:2])

    def norm(self, channels: int) -> nn.Module:
        """A normalisation layer of GaNDLF's `norm_type` for this dimension."""
        if self.norm_type == "batch":
            return layer("BatchNorm", self.dimension)(channels)
        if self.norm_type == "instance":
            return layer("InstanceNorm", self.dimension)(channels, affine=True)
        return nn.Identity()


def apply_norm_type(module: nn.Module, spec: ModelSpec) -> None:
    """Replaces the batch norms of `module` (a decoder the plugin adopts, e.g. smp's) by GaNDLF's `norm_type`.

    Pretrained encoders keep their own norms: their weights were learnt with them.
    """
    if spec.norm_type == "batch":
        return
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is layer("BatchNorm", spec.dimension):
                setattr(parent, name, spec.norm(child.num_features))


class FinalLayer(nn.Module):
    """GaNDLF's `final_layer`, applied by the model itself (GaNDLF expects activated outputs)."""

    def __init__(self, name: str, sigmoid_input_multiplier: float = 1.0):
        super().__init__()
        if name not in FINAL_LAYERS:
            raise ConfigError(f"final_layer = {name!r}; choose one of {list(FINAL_LAYERS)}.")
        self.name = name
        self.sigmoid_input_multiplier = sigmoid_input_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "sigmoid":
            return torch.sigmoid(x * self.sigmoid_input_multiplier)
        if self.name == "softmax":
            return torch.softmax(x, dim=1)
        if self.name == "logsoftmax":
            return torch.log_softmax(x, dim=1)
        if self.name == "tanh":
            return torch.tanh(x)
        return x

    def extra_repr(self) -> str:
        return self.name


class PoolingHead(nn.Module):
    """Global pooling over every spatial axis, dropout and a linear layer: the classification/regression head."""

    def __init__(self, in_features: int, n_outputs: int, pooling: str = "avg", dropout: float = 0.0):
        super().__init__()
        if pooling not in ("avg", "max"):
            raise ConfigError(f"pooling = {pooling!r}; choose one of ['avg', 'max'].")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, n_outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.flatten(2)
        pooled = flat.mean(-1) if self.pooling == "avg" else flat.amax(-1)
        return self.linear(self.dropout(pooled))


def check_divisible(patch_size: tuple[int, ...], divisors: tuple[int, ...], architecture: str, why: str) -> None:
    """Raises ConfigError naming the first spatial axis whose size is not a multiple of its divisor."""
    for axis, (size, divisor) in enumerate(zip(patch_size, divisors, strict=True)):
        if size % divisor:
            lower = max(divisor, size - size % divisor)
            upper = size - size % divisor + divisor
            raise ConfigError(
                f"patch_size axis {'xyz'[axis]} (index {axis}) is {size}, which is not divisible by {divisor} "
                f"({why}) for {architecture}; the nearest valid sizes are {lower} and {upper}."
            )


def check_input(x: torch.Tensor, dimension: int, architecture: str) -> None:
    """Raises a clear error when a tensor is not (B, C, *spatial) with `dimension` spatial axes."""
    if x.dim() != dimension + 2:
        layout = "(B, C, X, Y, Z)" if dimension == 3 else "(B, C, X, Y)"
        raise ValueError(
            f"{architecture} is a {dimension}D model and expects input {layout}; got shape {tuple(x.shape)}."
        )
