"""DX-Net (3D) and Omnia-Net (2D): EfficientNet U-Nets with cross-dimensional transfer.

Messaoudi et al., "Cross-dimensional transfer learning in medical image segmentation" (arXiv 2307.15872) make a
pretrained 2D classifier the encoder of a U-Net (*weight transfer*, Omnia-Net in 2D) and extrapolate 2D weights
into a 3D network (*dimensional transfer*, DX-Net). Both keys here share one module tree: the 2D model is built
from smp's EfficientNet encoder, and the 3D model is that 2D model lifted by `gandlf_dimlift.lift.lift`. The same
state-dict keys in 2D and 3D make the paper's second principle a plain load: a trained 2D `dimlift_omnianet`
GaNDLF checkpoint is loaded into the 2D twin, encoder AND decoder, and lifted.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gandlf_dimlift import weights
from gandlf_dimlift.lift import lift
from gandlf_dimlift.models.common import (
    FinalLayer,
    ModelSpec,
    PoolingHead,
    check_divisible,
    check_input,
    layer,
)
from gandlf_dimlift.models.unet_decoder import ConvBlock, UNetDecoder
from gandlf_dimlift.options import Architecture, ConfigError, Example, Option

logger = logging.getLogger(__name__)

DXNET_KEY = "dimlift_dxnet"
OMNIANET_KEY = "dimlift_omnianet"
VARIANTS = tuple(f"b{i}" for i in range(8))
ENCODER_FAMILIES = ("efficientnet", "timm-efficientnet")
CONVERTERS = ("inflate", "inflate_center")
SLICE_PADDINGS = ("zeros", "replicate")
DEPTH = 5  # encoder stages, each halving the resolution: skips at /2 /4 /8 /16 /32
PAPER_DECODER_CHANNELS = (256, 128, 64, 32, 16)


def encoder_name(family: str, variant: str) -> str:
    """The smp encoder name of an EfficientNet family and variant, e.g. `timm-efficientnet-b3`."""
    return f"{family}-{variant}"


class DXNet(nn.Module):
    """EfficientNet encoder with a U-Net decoder (segmentation) or a pooling head (classification, regression).

    The 2D instance is Omnia-Net; `gandlf_dimlift.lift.lift` of it is DX-Net, with the same state-dict keys.

    Args:
        encoder: An smp EfficientNet encoder of depth 5 (its unused classifier head already removed).
        spec: GaNDLF's model contract; `spec.dimension` must be the encoder's dimension (2 before lifting).
        decoder_channels: Decoder channels per stage, coarsest first.
        slice_strides: Stride along the slice axis of each encoder stage (all 2 when isotropic).
        dropout: Dropout before the linear head (classification, regression).
        pooling: Global pooling of the head: avg or max.
        architecture: Key used in error messages.
    """

    def __init__(
        self,
        encoder: nn.Module,
        spec: ModelSpec,
        decoder_channels: tuple[int, ...] = PAPER_DECODER_CHANNELS,
        slice_strides: tuple[int, ...] = (2,) * DEPTH,
        dropout: float = 0.2,
        pooling: str = "avg",
        architecture: str = OMNIANET_KEY,
    ):
        super().__init__()
        self.architecture = architecture
        self.dimension = spec.dimension
        self.problem_type = spec.problem_type
        self.slice_strides = tuple(slice_strides)
        self.encoder = encoder
        channels = list(encoder.out_channels)  # input, /2, /4, /8, /16, /32
        if spec.problem_type == "segmentation":
            strides = [_stage_stride(spec.dimension, s) for s in slice_strides]
            self.full_resolution = ConvBlock(spec.in_channels, decoder_channels[-1], spec.dimension, spec.norm)
            self.decoder = UNetDecoder(
                skip_channels=[decoder_channels[-1], *channels[1:-1]],
                bottleneck_channels=channels[-1],
                decoder_channels=decoder_channels,
                strides=list(reversed(strides)),
                dimension=spec.dimension,
                norm=spec.norm,
            )
            self.segmentation_head = layer("Conv", spec.dimension)(decoder_channels[-1], spec.n_outputs, 1)
        else:
            self.head = PoolingHead(channels[-1], spec.n_outputs, pooling=pooling, dropout=dropout)
        self.final = FinalLayer(spec.final_layer, spec.sigmoid_input_multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.dimension, self.architecture)
        if self.training:
            _check_batch_norm_values(x, self.bottleneck_factors(), self.architecture)
        features = self.encoder(x)
        if self.problem_type == "segmentation":
            skips = [self.full_resolution(x), *features[1:-1]]
            out = self.segmentation_head(self.decoder(features[-1], skips))
        else:
            out = self.head(features[-1])
        return self.final(out)

    def bottleneck_factors(self) -> tuple[int, ...]:
        """How much the encoder shrinks each spatial axis (32, or less along an anisotropic slice axis)."""
        slice_factor = 2 ** sum(s == 2 for s in self.slice_strides) if self.dimension == 3 else 2**DEPTH
        return (2**DEPTH,) * (self.dimension - 1) + (slice_factor,)


def _check_batch_norm_values(x: torch.Tensor, factors: tuple[int, ...], architecture: str) -> None:
    """EfficientNet's batch norms need more than one value per channel at the bottleneck in training."""
    values = x.shape[0]
    for size, factor in zip(x.shape[2:], factors, strict=True):
        values *= -(-size // factor)
    if values <= 1:
        raise ValueError(
            f"{architecture}: a training batch of shape {tuple(x.shape)} leaves one value per channel at the /32 "
            "bottleneck, where EfficientNet's batch norms need more than one. Use batch_size >= 2 or a patch larger "
            "than 32 along one axis."
        )


def _stage_stride(dimension: int, slice_stride: int) -> tuple[int, ...]:
    return (2,) * (dimension - 1) + (slice_stride if dimension == 3 else 2,)


def _slice_strides(slice_stride_from_stage: int) -> tuple[int, ...]:
    """Stride along the slice axis of encoder stages 1..5: 1 before `slice_stride_from_stage`, 2 from it on."""
    return tuple(1 if stage < slice_stride_from_stage else 2 for stage in range(1, DEPTH + 1))


def _strip_classifier(encoder: nn.Module) -> nn.Module:
    """Removes the 1x1 head conv and its norm, which the encoder's feature path never uses."""
    for name in ("_conv_head", "_bn1", "_avg_pooling", "_dropout", "conv_head", "bn2", "global_pool"):
        if hasattr(encoder, name) and isinstance(getattr(encoder, name), nn.Module):
            delattr(encoder, name)
    return encoder


def _check_weight_tag(name: str, tag: str) -> None:
    tags = weights.weight_tags(name)
    if tag in tags:
        return
    variant = name.rsplit("-", 1)[1]
    others = [
        f"{encoder_name(family, variant)} ({', '.join(weights.weight_tags(encoder_name(family, variant)))})"
        for family in ENCODER_FAMILIES
        if encoder_name(family, variant) != name
    ]
    near = difflib.get_close_matches(tag, tags, n=1)
    raise ConfigError(
        f"model.pretrained = {tag!r} is not a weight tag of {name}, which offers {tags}"
        f"{f' (did you mean {near[0]!r}?)' if near else ''}. Other families: {'; '.join(others)} "
        "(choose with model.encoder_family). Or give a weights file path, or false."
    )


def _build_encoder(options: dict[str, Any], in_channels: int, tag: str | None) -> nn.Module:
    name = encoder_name(options["encoder_family"], options["variant"])
    if tag is not None:
        _check_weight_tag(name, tag)
    return _strip_classifier(weights.smp_encoder(name, in_channels=in_channels, depth=DEPTH, weights=tag))


def _build_2d(spec: ModelSpec, options: dict[str, Any], tag: str | None, architecture: str) -> DXNet:
    spec_2d = ModelSpec(**{**spec.__dict__, "dimension": 2, "patch_size": spec.patch_size[:2]})
    return DXNet(
        _build_encoder(options, spec.in_channels, tag),
        spec_2d,
        decoder_channels=tuple(options["decoder_channels"]),
        slice_strides=_slice_strides(options.get("slice_stride_from_stage", 1)),
        dropout=options["dropout"],
        pooling=options["pooling"],
        architecture=architecture,
    )


# ---------------------------------------------------------------------------------------------------------------
# Weights files: a GaNDLF checkpoint of either key, a plain model state dict, or a 2D EfficientNet state dict.


def _strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _state_dimension(state_dict: dict[str, torch.Tensor]) -> int | None:
    """2 or 3 from the rank of the first convolution kernel (4 or 5), None when no kernel is found."""
    for key, value in state_dict.items():
        if key.endswith("weight") and value.dim() in (4, 5) and ("stem" in key or key.startswith("encoder.")):
            return value.dim() - 2
    ranks = {v.dim() for k, v in state_dict.items() if k.endswith("weight") and v.dim() in (4, 5)}
    return ranks.pop() - 2 if len(ranks) == 1 else None


def _describe_source(source: weights.WeightsFile) -> str:
    what = f"{source.path}"
    if source.architecture:
        what += f" (architecture {source.architecture}"
        what += f", {source.dimension}D)" if source.dimension else ")"
    return what


def _read_source(path: Path, architecture: str, dimension: int) -> tuple[str, weights.WeightsFile, int]:
    """Reads a weights file and says what it holds: ("model", file, dim) or ("encoder", file, 2).

    Raises:
        ConfigError: The file comes from another architecture, or is 3D while the model is 2D.
    """
    source = weights.read_weights_file(path)
    state = _strip_module_prefix(source.state_dict)
    source = weights.WeightsFile(source.path, state, source.architecture, source.dimension)
    ours = (DXNET_KEY, OMNIANET_KEY)
    if source.architecture is not None and source.architecture not in ours:
        raise ConfigError(
            f"model.pretrained = {str(path)!r} is a checkpoint of architecture {source.architecture!r}, which "
            f"{architecture} cannot load. Give a checkpoint of {OMNIANET_KEY} (2D) or {DXNET_KEY} (3D), a 2D "
            "EfficientNet state dict, a weight tag such as 'imagenet', or false."
        )
    is_model = source.architecture is not None or any(k.startswith("encoder.") for k in state)
    file_dimension = source.dimension or _state_dimension(state)
    if file_dimension is None:
        raise ConfigError(f"model.pretrained = {str(path)!r}: the file holds no convolution kernel to load.")
    if file_dimension == 3 and dimension == 2:
        raise ConfigError(
            f"model.pretrained = {str(path)!r} holds 3D weights ({_describe_source(source)}); {architecture} is a "
            f"2D model. Dimensional transfer goes from 2D to 3D: load a 2D {OMNIANET_KEY} checkpoint into "
            f"{DXNET_KEY}, not the reverse."
        )
    if not is_model and file_dimension == 3:
        raise ConfigError(
            f"model.pretrained = {str(path)!r} holds 3D weights without `encoder.` keys; give a {DXNET_KEY} "
            "checkpoint or a 2D EfficientNet state dict."
        )
    return ("model" if is_model else "encoder"), source, file_dimension


def _load_encoder_file(model: DXNet, source: weights.WeightsFile, options: dict[str, Any], in_channels: int) -> None:
    """Loads a 2D EfficientNet state dict (smp, efficientnet_pytorch or timm keys) into a 2D model's encoder."""
    name = encoder_name(options["encoder_family"], options["variant"])
    encoder = _strip_classifier(weights.smp_encoder(name, in_channels=3, depth=DEPTH, weights=None))
    try:
        weights.load_matching(encoder, source.state_dict, str(source.path))
    except weights.WeightsError as error:
        raise weights.WeightsError(
            f"{error} An encoder state dict must hold the keys of smp's {name} (model.variant and "
            "model.encoder_family select it)."
        ) from error
    encoder.set_in_channels(in_channels, pretrained=True)
    model.encoder.load_state_dict(encoder.state_dict())


def _load_model_file(model: DXNet, source: weights.WeightsFile, architecture: str) -> None:
    """Loads a full model state dict: encoder and decoder strictly, the output layer when it fits."""
    state = source.state_dict
    where = _describe_source(source)
    hint = (
        " The file must come from a run with the same model.variant, model.encoder_family, "
        "model.decoder_channels and num_channels."
    )
    parts = ["encoder"]
    if model.problem_type == "segmentation":
        if any(k.startswith("decoder.") for k in state):
            parts += ["full_resolution", "decoder"]
        else:
            logger.warning("%s has no decoder weights (not a segmentation run): the decoder of %s starts random.",
                           where, architecture)
    for part in parts:
        try:
            weights.load_matching(getattr(model, part), state, where, prefix=f"{part}.")
        except weights.WeightsError as error:
            raise weights.WeightsError(f"{error}{hint}") from error
    head = "segmentation_head" if model.problem_type == "segmentation" else "head"
    try:
        weights.load_matching(getattr(model, head), state, where, prefix=f"{head}.")
        logger.info("Loaded encoder, decoder and output layer of %s from %s.", architecture, where)
    except weights.WeightsError:
        logger.info("Loaded %s of %s from %s; the output layer does not fit (other classes) and starts random.",
                    " and ".join(parts), architecture, where)


# ---------------------------------------------------------------------------------------------------------------
# Lifting to 3D.


def _lift(model_2d: DXNet, spec: ModelSpec, options: dict[str, Any]) -> DXNet:
    """Lifts the 2D twin to 3D with the chosen converter, slice strides and slice padding."""
    keep = _kept_slice_resolution(model_2d, _slice_strides(options["slice_stride_from_stage"]))
    model_2d.dimension = 3  # the lifted forward checks for 5D input
    if options["converter_type"] == "inflate_center" and hasattr(model_2d, "decoder"):
        # A transposed conv of stride 2 has no centre form (every other output plane would get no input): its
        # kernel equals its stride, so inflating it (one tap per output plane) is the only transfer that keeps the
        # 2D response.
        for index, stage in enumerate(model_2d.decoder.stages):
            kept = [""] if f"decoder.stages.{index}.up" in keep else []
            stage.up = lift(stage.up, mode="inflate", axis="z", keep_axis_resolution=kept)
    try:
        model = lift(
            model_2d, mode=options["converter_type"], axis="z", keep_axis_resolution=keep,
            axis_padding=options["slice_padding"],
        )
    finally:
        model_2d.dimension = 2
    model.dimension = 3
    return model


def _encoder_stages(encoder: nn.Module) -> list[nn.Module]:
    """smp's stages 1-5 of an EfficientNet encoder (stage 0 is the identity)."""
    return list(encoder.get_stages()[1 : DEPTH + 1])


def _kept_slice_resolution(model: DXNet, slice_strides: tuple[int, ...]) -> list[str]:
    """Module paths that keep the slice resolution: the encoder stages of slice stride 1 and the decoder's matching
    upsampling convs (for `lift`'s `keep_axis_resolution`)."""
    names = {id(module): name for name, module in model.encoder.named_modules()}
    keep = []
    for stage, slice_stride in zip(_encoder_stages(model.encoder), slice_strides, strict=True):
        if slice_stride == 1:
            keep += [f"encoder.{names[id(block)]}" for block in stage.children()]
    if hasattr(model, "decoder"):
        for index, slice_stride in enumerate(reversed(slice_strides)):
            if slice_stride == 1:
                keep.append(f"decoder.stages.{index}.up")
    return keep


# ---------------------------------------------------------------------------------------------------------------
# Architecture declarations.


def _check_decoder_channels(value: tuple) -> str | None:
    if len(value) != DEPTH or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in value):
        paper = list(PAPER_DECODER_CHANNELS)
        return f"give {DEPTH} positive integers, one per decoder stage, coarsest first (the paper: {paper})."
    return None


def _check_dropout(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else "dropout is a probability in [0, 1)."


COMMON_OPTIONS = (
    Option("variant", "b0", "EfficientNet variant of the encoder.", choices=VARIANTS),
    Option(
        "encoder_family",
        "efficientnet",
        "smp's EfficientNet: efficientnet-b* (weights imagenet, advprop) or timm-efficientnet-b* "
        "(imagenet, advprop, noisy-student).",
        choices=ENCODER_FAMILIES,
    ),
    Option(
        "decoder_channels",
        PAPER_DECODER_CHANNELS,
        "Channels of the five U-Net decoder stages, coarsest first (segmentation).",
        types=(tuple,),
        check=_check_decoder_channels,
    ),
    Option("dropout", 0.2, "Dropout before the linear head (classification, regression).", types=(float,),
           check=_check_dropout),
    Option("pooling", "avg", "Global pooling before the linear head (classification, regression).",
           choices=("avg", "max")),
)

_PRETRAINED_HELP = (
    "false, a weight tag of the encoder (imagenet, advprop, noisy-student), or a file: a 2D EfficientNet state "
    "dict, or a GaNDLF checkpoint of "
)
PRETRAINED_2D = Option(
    "pretrained", "imagenet", _PRETRAINED_HELP + f"{OMNIANET_KEY}.", types=(bool, str), check=weights.check_pretrained
)
PRETRAINED_3D = Option(
    "pretrained",
    "imagenet",
    _PRETRAINED_HELP + f"{OMNIANET_KEY} (2D: dimensional transfer of encoder and decoder) or {DXNET_KEY}.",
    types=(bool, str),
    check=weights.check_pretrained,
)

LIFT_OPTIONS = (
    Option(
        "converter_type",
        "inflate",
        "How 2D kernels become 3D: inflate (repeat along the slice axis, divided by its size) or inflate_center "
        "(the 2D kernel in the middle plane, zeros elsewhere).",
        choices=CONVERTERS,
    ),
    Option(
        "slice_stride_from_stage",
        1,
        "Anisotropic inflation for thick slices: encoder stages before this one (1-5) keep stride 1 along the "
        "slice axis; 1 is isotropic (the paper), 6 never downsamples along the slice axis.",
        types=(int,),
        choices=(1, 2, 3, 4, 5, 6),
    ),
    Option(
        "slice_padding",
        "zeros",
        "Padding along the slice axis: zeros (the paper) or replicate (border slices repeated; with inflate, a "
        "volume constant along the slice axis then gives exactly the 2D network's features, squeeze-excitation "
        "included).",
        choices=SLICE_PADDINGS,
    ),
)


def _make(spec: ModelSpec, options: dict[str, Any], architecture: str) -> DXNet:
    options = {"converter_type": "inflate", "slice_stride_from_stage": 1, "slice_padding": "zeros", **options}
    if spec.problem_type == "segmentation":
        in_plane = 2**DEPTH
        slice_divisor = 2 ** sum(s == 2 for s in _slice_strides(options["slice_stride_from_stage"]))
        divisors = (in_plane,) * (spec.dimension - 1) + ((slice_divisor,) if spec.dimension == 3 else (in_plane,))
        why = "the encoder halves every axis 5 times"
        if options["slice_stride_from_stage"] > 1:
            why = (f"the encoder halves the in-plane axes 5 times and the slice axis from stage "
                   f"{options['slice_stride_from_stage']} on")
        check_divisible(spec.patch_size, divisors, architecture, why)
    choice = weights.parse_pretrained(options["pretrained"])
    tag = choice if isinstance(choice, str) else None
    kind = source = None
    file_dimension = 2
    if isinstance(choice, Path):
        kind, source, file_dimension = _read_source(choice, architecture, spec.dimension)
    model = _build_2d(spec, options, tag, architecture)
    if kind == "encoder":
        _load_encoder_file(model, source, options, spec.in_channels)
    elif kind == "model" and file_dimension == 2:
        _load_model_file(model, source, architecture)
    if spec.dimension == 2:
        return model
    model = _lift(model, spec, options)
    if kind == "model" and file_dimension == 3:
        _load_model_file(model, source, architecture)
    return model


def make_dxnet(spec: ModelSpec, options: dict[str, Any]) -> DXNet:
    """Builds `dimlift_dxnet`: the 2D Omnia-Net lifted to 3D."""
    return _make(spec, options, DXNET_KEY)


def make_omnianet(spec: ModelSpec, options: dict[str, Any]) -> DXNet:
    """Builds `dimlift_omnianet`: EfficientNet encoder, U-Net decoder (or pooling head), 2D."""
    return _make(spec, options, OMNIANET_KEY)


_SMALL = {"pretrained": False, "variant": "b0"}

DXNET = Architecture(
    key=DXNET_KEY,
    summary="DX-Net: 2D EfficientNet B0-B7 (ImageNet or a trained Omnia-Net) inflated to a 3D U-Net or classifier.",
    make=make_dxnet,
    options=(PRETRAINED_3D, *COMMON_OPTIONS, *LIFT_OPTIONS),
    dimensions=(3,),
    examples=(
        Example("segmentation", 3, _SMALL, patch_size=(32, 32, 32)),
        Example("classification", 3, _SMALL, patch_size=(32, 32, 32)),
        Example("regression", 3, _SMALL, patch_size=(32, 32, 32), n_outputs=1),
    ),
)

OMNIANET = Architecture(
    key=OMNIANET_KEY,
    summary="Omnia-Net: 2D EfficientNet B0-B7 encoder with a U-Net decoder or a pooling head; the 2D twin of DX-Net.",
    make=make_omnianet,
    options=(PRETRAINED_2D, *COMMON_OPTIONS),
    dimensions=(2,),
    examples=(
        Example("segmentation", 2, _SMALL, patch_size=(32, 32)),
        Example("classification", 2, _SMALL, patch_size=(32, 32)),
        Example("regression", 2, _SMALL, patch_size=(32, 32), n_outputs=1),
    ),
)
