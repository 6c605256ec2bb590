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
import functools
from typing import Any

import torch
from torch import nn

from gandlf_dimlift import weights
from gandlf_dimlift.lift import lift
from gandlf_dimlift.models.builder import Architecture
from gandlf_dimlift.models.common import (
    FinalLayer,
    ModelSpec,
    PoolingHead,
    check_divisible,
    check_input,
    layer,
)
from gandlf_dimlift.models.unet_decoder import ConvBlock, UNetDecoder
from gandlf_dimlift.options import ConfigError, Example, Option

DXNET_KEY = "dimlift_dxnet"
OMNIANET_KEY = "dimlift_omnianet"
VARIANTS = tuple(f"b{i}" for i in range(8))
ENCODER_FAMILIES = ("efficientnet", "timm-efficientnet")
CONVERTERS = ("inflate", "inflate_center")
SLICE_PADDINGS = ("zeros", "replicate")
DEPTH = 5  # the paper's encoder stages, each halving the resolution: skips at /2 /4 /8 /16 /32
PAPER_DECODER_CHANNELS = (256, 128, 64, 32, 16)


def paper_decoder_channels(depth: int) -> tuple[int, ...]:
    """The paper's decoder widths of the stages an encoder of `depth` stages keeps (the finest)."""
    return PAPER_DECODER_CHANNELS[DEPTH - depth:]


def decoder_channels(options: dict[str, Any]) -> tuple[int, ...]:
    """The decoder's widths: as given, or the paper's for the encoder depth."""
    given = options["decoder_channels"]
    return tuple(given) if given is not None else paper_decoder_channels(options["encoder_depth"])


def encoder_name(family: str, variant: str) -> str:
    """The smp encoder name of an EfficientNet family and variant, e.g. `timm-efficientnet-b3`."""
    return f"{family}-{variant}"


class DXNet(nn.Module):
    """EfficientNet encoder with a U-Net decoder (segmentation) or a pooling head (classification, regression).

    The 2D instance is Omnia-Net; `gandlf_dimlift.lift.lift` of it is DX-Net, with the same state-dict keys.

    Args:
        encoder: An smp EfficientNet encoder (depth 5 in the paper).
        spec: GaNDLF's model contract; `spec.dimension` must be the encoder's dimension (2 before lifting).
        decoder_channels: Decoder channels per stage, coarsest first.
        dropout: Dropout before the linear head (classification, regression).
        pooling: Global pooling of the head: max or avg.
        architecture: Key used in error messages.
    """

    def __init__(
        self,
        encoder: nn.Module,
        spec: ModelSpec,
        decoder_channels: tuple[int, ...] = PAPER_DECODER_CHANNELS,
        dropout: float = 0.2,
        pooling: str = "max",
        architecture: str = OMNIANET_KEY,
    ):
        super().__init__()
        self.architecture = architecture
        self.dimension = spec.dimension
        self.problem_type = spec.problem_type
        self.encoder = encoder
        channels = list(encoder.out_channels)  # input, /2, /4, ... one per encoder stage
        depth = len(channels) - 1
        if spec.problem_type == "segmentation":
            self.full_resolution = ConvBlock(spec.in_channels, decoder_channels[-1], spec.dimension, spec.norm)
            self.decoder = UNetDecoder(
                skip_channels=[decoder_channels[-1], *channels[1:-1]],
                bottleneck_channels=channels[-1],
                decoder_channels=decoder_channels,
                strides=[(2,) * spec.dimension] * depth,
                dimension=spec.dimension,
                norm=spec.norm,
            )
            self.segmentation_head = layer("Conv", spec.dimension)(decoder_channels[-1], spec.n_outputs, 1)
            for part in (self.full_resolution, self.decoder, self.segmentation_head):
                efficientnet_reference_init(part)
        else:
            self.head = PoolingHead(channels[-1], spec.n_outputs, pooling=pooling, dropout=dropout)
        self.final = FinalLayer(spec.final_layer, spec.sigmoid_input_multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.dimension, self.architecture)
        features = self.encoder(x)
        if self.problem_type == "segmentation":
            skips = [self.full_resolution(x), *features[1:-1]]
            out = self.segmentation_head(self.decoder(features[-1], skips))
        else:
            out = self.head(features[-1])
        return self.final(out)


def efficientnet_reference_init(model: nn.Module) -> None:
    """Initialises every convolution of `model` as the EfficientNet reference does (Tan & Le's TF code, and timm):
    normal with std sqrt(2 / fan_out), fan_out = kernel volume x output channels / groups; biases zero.

    Used for the U-Net decoder and head, which no encoder weights cover. With torch's default (std 1/sqrt(3 fan_in))
    the 1x1 head's initial logits are ~3x smaller and a softmax + Dice Omnia-Net learned the conformance check's
    task far more slowly than GaNDLF's `unet` (train Dice 0.61 vs 0.85 after 4 epochs); with this one it is ahead
    (docs/conformance.md). The encoder keeps smp's initialisation: this one there made DX-Net's classifier collapse
    to a constant output in the same check. Weights loaded afterwards (a GaNDLF checkpoint) replace it.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            # not nn.init.kaiming_normal_(mode="fan_out"): torch takes a transposed conv's fan_out from its input
            # channels (weight dim 0) and ignores groups
            fan_out = module.out_channels // module.groups * module.weight[0, 0].numel()
            nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _slice_strides(options: dict[str, Any]) -> tuple[int, ...]:
    """Stride along the slice axis of encoder stages 1..depth: 1 before `slice_stride_from_stage`, 2 from it on."""
    from_stage = options.get("slice_stride_from_stage", 1)
    return tuple(1 if stage < from_stage else 2 for stage in range(1, options["encoder_depth"] + 1))


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


def make(spec: ModelSpec, options: dict[str, Any], weight_tag: str | None, architecture: str) -> DXNet:
    """The 2D network (Omnia-Net; lifted, DX-Net) with the encoder's weights for the tag."""
    name = encoder_name(options["encoder_family"], options["variant"])
    if weight_tag is not None:
        _check_weight_tag(name, weight_tag)
    encoder = weights.smp_encoder(name, in_channels=spec.in_channels, depth=options["encoder_depth"],
                                  weights=weight_tag)
    return DXNet(encoder, spec, decoder_channels=decoder_channels(options), dropout=options["dropout"],
                 pooling=options["pooling"], architecture=architecture)


def check(spec: ModelSpec, options: dict[str, Any], architecture: str) -> None:
    """Segmentation: one decoder width per encoder stage, and patches that halve exactly at every stage (the
    decoder concatenates the skips)."""
    if spec.problem_type != "segmentation":
        return
    depth, widths = options["encoder_depth"], decoder_channels(options)
    if len(widths) != depth:
        raise ConfigError(
            f"model.decoder_channels = {list(widths)} has {len(widths)} widths; the decoder needs one per encoder "
            f"stage ({depth}, model.encoder_depth), e.g. {list(paper_decoder_channels(depth))}."
        )
    from_stage = options.get("slice_stride_from_stage", 1)
    slice_divisor = 2 ** sum(s == 2 for s in _slice_strides(options))
    divisors = (2**depth,) * (spec.dimension - 1) + ((slice_divisor,) if spec.dimension == 3 else (2**depth,))
    why = f"the encoder halves every axis {depth} times"
    if from_stage > 1:
        why = f"the encoder halves the in-plane axes {depth} times and the slice axis from stage {from_stage} on"
    check_divisible(spec.patch_size, divisors, architecture, why)


def parts(model: DXNet) -> weights.Parts:
    segmentation = model.problem_type == "segmentation"
    return weights.Parts(
        encoder="encoder",
        body=("full_resolution", "decoder") if segmentation else (),
        head=("segmentation_head",) if segmentation else ("head",),
        hint="the same model.variant, model.encoder_family, model.encoder_depth, model.decoder_channels and "
        "num_channels",
    )


# ---------------------------------------------------------------------------------------------------------------
# Lifting to 3D.


def _lift(model_2d: DXNet, spec: ModelSpec, options: dict[str, Any]) -> DXNet:
    """Lifts the 2D twin to 3D (in place: the builder owns it and has set its `dimension` to 3) with the chosen
    converter, slice strides and slice padding."""
    keep = _kept_slice_resolution(model_2d, _slice_strides(options))
    if options["converter_type"] == "inflate_center" and hasattr(model_2d, "decoder"):
        # A transposed conv of stride 2 has no centre form (every other output plane would get no input): its
        # kernel equals its stride, so inflating it (one tap per output plane) is the only transfer that keeps the
        # 2D response.
        for index, stage in enumerate(model_2d.decoder.stages):
            kept = [""] if f"decoder.stages.{index}.up" in keep else []
            stage.up = lift(stage.up, mode="inflate", axis="z", keep_axis_resolution=kept, inplace=True)
    return lift(model_2d, mode=options["converter_type"], axis="z", keep_axis_resolution=keep,
                axis_padding=options["slice_padding"], inplace=True)


def _encoder_stages(encoder: nn.Module, depth: int) -> list[nn.Module]:
    """smp's stages 1..depth of an EfficientNet encoder (stage 0 is the identity)."""
    return list(encoder.get_stages()[1 : depth + 1])


def _kept_slice_resolution(model: DXNet, slice_strides: tuple[int, ...]) -> list[str]:
    """Module paths that keep the slice resolution: the encoder stages of slice stride 1 and the decoder's matching
    upsampling convs (for `lift`'s `keep_axis_resolution`)."""
    names = {id(module): name for name, module in model.encoder.named_modules()}
    keep = []
    for stage, slice_stride in zip(_encoder_stages(model.encoder, len(slice_strides)), slice_strides, strict=True):
        if slice_stride == 1:
            keep += [f"encoder.{names[id(block)]}" for block in stage.children()]
    if hasattr(model, "decoder"):
        for index, slice_stride in enumerate(reversed(slice_strides)):
            if slice_stride == 1:
                keep.append(f"decoder.stages.{index}.up")
    return keep


# ---------------------------------------------------------------------------------------------------------------
# Architecture declarations.


def _check_decoder_channels(value: tuple | None) -> str | None:
    if value is None:
        return None
    if not 1 <= len(value) <= DEPTH or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0
                                                for c in value):
        paper = list(PAPER_DECODER_CHANNELS)
        return (f"give positive integers, one per encoder stage (model.encoder_depth), coarsest first (the paper: "
                f"{paper}).")
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
        "encoder_depth",
        DEPTH,
        "Encoder stages, each halving the patch: 5 is the paper's whole EfficientNet; fewer keep larger deepest "
        "features for small patches (GaNDLF's own test flows shrink imagenet_unet so for 32^3).",
        choices=tuple(range(1, DEPTH + 1)),
    ),
    Option(
        "decoder_channels",
        None,
        "Channels of the U-Net decoder stages, one per encoder stage, coarsest first (segmentation); by default the "
        f"paper's {list(PAPER_DECODER_CHANNELS)}, its finest encoder_depth entries.",
        types=(tuple, type(None)),
        check=_check_decoder_channels,
        problem_types=("segmentation",),
    ),
    Option("dropout", 0.2, "Dropout before the linear head (classification, regression).", types=(float,),
           check=_check_dropout, problem_types=("classification", "regression")),
    # max by default: every EfficientNet stage ends in batch norms with no nonlinearity after them, so in training
    # the spatial average of a batch's features is fixed by those norms' biases (at batch_size 1 a constant, at 2
    # mirror images) and a linear head cannot place the whole batch; the maximum is not fixed so (docs/dxnet.md).
    Option("pooling", "max", "Global pooling before the linear head (classification, regression): max (by default: "
           "it learns at GaNDLF's small batch sizes) or avg (EfficientNet's ImageNet classifier).",
           choices=("avg", "max"), problem_types=("classification", "regression")),
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
        dimensions=(3,),
    ),
    Option(
        "slice_stride_from_stage",
        1,
        "Anisotropic inflation for thick slices: encoder stages before this one (1-5) keep stride 1 along the "
        "slice axis; 1 is isotropic (the paper), 6 never downsamples along the slice axis.",
        types=(int,),
        choices=(1, 2, 3, 4, 5, 6),
        dimensions=(3,),
    ),
    Option(
        "slice_padding",
        "zeros",
        "Padding along the slice axis: zeros (the paper) or replicate (border slices repeated; with inflate, a "
        "volume constant along the slice axis then gives exactly the 2D network's features, squeeze-excitation "
        "included).",
        choices=SLICE_PADDINGS,
        dimensions=(3,),
    ),
)


_SMALL = {"pretrained": False, "variant": "b0"}

DXNET = Architecture(
    key=DXNET_KEY,
    summary="DX-Net: 2D EfficientNet B0-B7 (ImageNet or a trained Omnia-Net) inflated to a 3D U-Net or classifier.",
    make=functools.partial(make, architecture=DXNET_KEY),
    options=(PRETRAINED_3D, *COMMON_OPTIONS, *LIFT_OPTIONS),
    lift=_lift,
    parts=parts,
    check=functools.partial(check, architecture=DXNET_KEY),
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
    make=functools.partial(make, architecture=OMNIANET_KEY),
    options=(PRETRAINED_2D, *COMMON_OPTIONS, *LIFT_OPTIONS),
    parts=parts,
    check=functools.partial(check, architecture=OMNIANET_KEY),
    dimensions=(2,),
    examples=(
        Example("segmentation", 2, _SMALL, patch_size=(32, 32)),
        Example("classification", 2, _SMALL, patch_size=(32, 32)),
        Example("regression", 2, _SMALL, patch_size=(32, 32), n_outputs=1),
    ),
)
