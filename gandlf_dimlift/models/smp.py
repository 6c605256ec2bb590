"""`dimlift_smp`: every segmentation-models-pytorch decoder and encoder, in 2D or lifted to 3D.

The 2D smp model (or, for classification and regression, its encoder with a pooling head) is built with its
2D weights, then lifted with `gandlf_dimlift.lift`. The default converter is `acs`: the same parameters and
FLOPs as the 2D model with native 3D context, where GaNDLF's `imagenet_unet` defaults to soft ACS, which runs
every convolution three times.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gandlf_dimlift import weights
from gandlf_dimlift.lift import MODES, lift
from gandlf_dimlift.models.builder import Architecture
from gandlf_dimlift.models.common import (
    FinalLayer,
    ModelSpec,
    PoolingHead,
    apply_norm_type,
    check_divisible,
    check_input,
)
from gandlf_dimlift.options import ConfigError, Example, Option

KEY = "dimlift_smp"
DECODERS = {
    "unet": "Unet",
    "unetplusplus": "UnetPlusPlus",
    "fpn": "FPN",
    "linknet": "Linknet",
    "manet": "MAnet",
    "pan": "PAN",
    "pspnet": "PSPNet",
    "deeplabv3": "DeepLabV3",
    "deeplabv3plus": "DeepLabV3Plus",
}
STAGE_CHANNEL_DECODERS = ("unet", "unetplusplus", "manet")  # decoder_channels: one entry per encoder stage
WIDTH_ARGUMENT = {"fpn": "decoder_pyramid_channels", "pspnet": "psp_out_channels", "pan": "decoder_channels",
                  "deeplabv3": "decoder_channels", "deeplabv3plus": "decoder_channels"}
ATTENTION_DECODERS = ("unet", "unetplusplus")
PAN_MIN_SIZE = 128  # 16 (encoder output stride) x 8 (three 2x poolings in the attention block)
FIXED_DEPTH_DECODERS = ("pan", "deeplabv3", "deeplabv3plus")  # smp builds these on all 5 encoder stages


class EncoderClassifier(nn.Module):
    """An encoder and a global-pooling linear head (classification and regression)."""

    def __init__(self, encoder: nn.Module, head: PoolingHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[-1])


class SmpModel(nn.Module):
    """The GaNDLF-facing model: checks the input, runs the (lifted) network, applies GaNDLF's final layer."""

    def __init__(self, net: nn.Module, spec: ModelSpec):
        super().__init__()
        self.net = net
        self.final = FinalLayer(spec.final_layer, spec.sigmoid_input_multiplier)
        self.dimension = spec.dimension

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.dimension, KEY)
        return self.final(self.net(x))


def _decoder_arguments(options: dict[str, Any]) -> dict[str, Any]:
    decoder, depth, channels = options["decoder_name"], options["encoder_depth"], options["decoder_channels"]
    arguments: dict[str, Any] = {}
    if decoder in FIXED_DEPTH_DECODERS:
        if depth != 5:
            raise ConfigError(f"model.encoder_depth = {depth}: smp's {decoder} uses all 5 encoder stages; set 5.")
    else:
        arguments["encoder_depth"] = depth
    # smp's default output upsampling assumes the decoder's default depth: scale it back to the input size.
    if decoder == "pspnet":
        arguments["upsampling"] = 2**depth
    if decoder == "fpn":
        if depth < 3:
            raise ConfigError(f"model.encoder_depth = {depth}: smp's fpn needs at least 3 encoder stages.")
        arguments["upsampling"] = 2 ** (depth - 3)
    if channels is not None:
        if decoder in STAGE_CHANNEL_DECODERS:
            if not isinstance(channels, tuple) or len(channels) != depth:
                raise ConfigError(
                    f"model.decoder_channels = {channels!r}: {decoder} needs one width per encoder stage "
                    f"({depth} integers, as model.encoder_depth)."
                )
            arguments["decoder_channels"] = channels
        elif decoder in WIDTH_ARGUMENT:
            if not isinstance(channels, int):
                raise ConfigError(f"model.decoder_channels = {channels!r}: {decoder} takes one integer width.")
            arguments[WIDTH_ARGUMENT[decoder]] = channels
        else:
            raise ConfigError(f"model.decoder_channels is not used by {decoder}; remove it.")
    elif decoder in STAGE_CHANNEL_DECODERS:
        arguments["decoder_channels"] = (256, 128, 64, 32, 16)[:depth]
    if options["decoder_attention_type"] is not None:
        if decoder not in ATTENTION_DECODERS:
            raise ConfigError(
                f"model.decoder_attention_type is supported by {list(ATTENTION_DECODERS)}, not {decoder}."
            )
        arguments["decoder_attention_type"] = options["decoder_attention_type"]
    return arguments


def make(spec: ModelSpec, options: dict[str, Any], weight_tag: str | None) -> SmpModel:
    """The 2D network: smp's model (segmentation) or encoder + head, with the encoder's weights for the tag."""
    import segmentation_models_pytorch as smp

    name, depth = options["encoder_name"], options["encoder_depth"]
    if spec.problem_type == "segmentation":
        arguments = _decoder_arguments(options)
        net = weights.with_encoder_weights(name, weight_tag, lambda: getattr(smp, DECODERS[options["decoder_name"]])(
            encoder_name=name, encoder_weights=weight_tag, in_channels=spec.in_channels, classes=spec.n_outputs,
            **arguments))
        apply_norm_type(net.decoder, spec)  # the encoder keeps its own (pretrained) norms
    else:
        encoder = weights.smp_encoder(name, in_channels=spec.in_channels, depth=depth, weights=weight_tag)
        head = PoolingHead(encoder.out_channels[-1], spec.n_outputs, options["pooling"], options["dropout"])
        net = EncoderClassifier(encoder, head)
    return SmpModel(net, spec)


def lift_net(model: SmpModel, spec: ModelSpec, options: dict[str, Any]) -> SmpModel:
    """Lifts the network inside the GaNDLF-facing model (whose forward checks the input layout first)."""
    model.net = lift(model.net, mode=options["converter_type"], axis=options["slice_axis"], inplace=True)
    return model


def check(spec: ModelSpec, options: dict[str, Any]) -> None:
    depth = options["encoder_depth"]
    if spec.problem_type != "segmentation":
        return
    # the decoder concatenates skips: sizes must halve exactly (2.5d keeps the slice axis)
    divisors = [2**depth] * spec.dimension
    if spec.dimension == 3 and options["converter_type"] == "2.5d":
        divisors["xyz".index(options["slice_axis"])] = 1
    check_divisible(spec.patch_size, tuple(divisors), KEY, f"the encoder's total stride 2^{depth}")
    if options["decoder_name"] == "pan" and min(spec.patch_size) < PAN_MIN_SIZE:
        raise ConfigError(
            f"patch_size {list(spec.patch_size)} is too small for smp's pan: its feature pyramid attention pools "
            f"the /16 features three times, so every axis needs at least {PAN_MIN_SIZE} voxels."
        )


def parts(model: SmpModel) -> weights.Parts:
    head = "net.segmentation_head" if hasattr(model.net, "segmentation_head") else "net.head"
    return weights.Parts(
        encoder="net.encoder",
        body=("net.decoder",) if hasattr(model.net, "decoder") else (),
        head=(head,),
        hint="the same encoder_name, encoder_depth, decoder_name, decoder_channels and num_channels",
    )


def _check_depth(depth: int) -> str | None:
    return None if 1 <= depth <= 5 else "encoder_depth is the number of encoder stages, 1 to 5."


def _check_channels(value: Any) -> str | None:
    values = value if isinstance(value, tuple) else (value,)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    return None if ok else "give a positive integer or a list of them."


def _check_dropout(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else "dropout is a probability in [0, 1)."


OPTIONS = (
    Option("encoder_name", "resnet18", "Any smp encoder, or tu-<timm model>.", types=(str,),
           check=weights.check_encoder_name),
    Option("decoder_name", "unet", "smp decoder (segmentation).", choices=tuple(DECODERS),
           problem_types=("segmentation",)),
    Option("converter_type", "acs", "How 2D layers become 3D.", choices=MODES, dimensions=(3,)),
    Option("slice_axis", "z", "The slice axis for inflate and 2.5d; z is GaNDLF's last axis.", choices=("x", "y", "z"),
           dimensions=(3,)),
    Option("encoder_depth", 5, "Encoder stages; the patch size must be divisible by 2^depth.", check=_check_depth),
    Option("decoder_channels", None, "Decoder widths: a list per stage (unet, unetplusplus, manet) or one integer.",
           types=(tuple, int, type(None)), check=lambda v: None if v is None else _check_channels(v),
           problem_types=("segmentation",)),
    Option("decoder_attention_type", None, "Decoder attention (unet, unetplusplus).", types=(str, type(None)),
           choices=(None, "scse"), problem_types=("segmentation",)),
    Option("pretrained", "imagenet",
           f"false, a weight tag of the encoder (e.g. imagenet), or a file: a 2D state dict or a {KEY} checkpoint.",
           types=(bool, str), check=weights.check_pretrained),
    Option("pooling", "avg", "Global pooling of the head (classification, regression).", choices=("avg", "max"),
           problem_types=("classification", "regression")),
    Option("dropout", 0.0, "Dropout before the linear head (classification, regression).", types=(float,),
           check=_check_dropout, problem_types=("classification", "regression")),
)

_SMALL = {"encoder_name": "resnet18", "encoder_depth": 3, "pretrained": False}
_SMALL_3D = (16, 16, 16)
ARCHITECTURE = Architecture(
    key=KEY,
    summary="smp encoders and decoders, 2D or lifted to 3D (ACS, soft/mean ACS, 2.5D, I3D inflation).",
    make=make,
    options=OPTIONS,
    lift=lift_net,
    parts=parts,
    check=check,
    smaller_bottleneck="a smaller model.encoder_depth (each stage halves the patch)",
    examples=(  # 3D at 16^3: a 2^3 bottleneck after three halvings, an eighth of the work of 32^3
        *(Example("segmentation", 3, {**_SMALL, "decoder_name": d}, patch_size=_SMALL_3D)
          for d in ("unet", "fpn", "linknet")),
        Example("classification", 3, dict(_SMALL), patch_size=_SMALL_3D),
        Example("regression", 3, {**_SMALL, "converter_type": "inflate"}, patch_size=_SMALL_3D, n_outputs=1),
        Example("segmentation", 2, {**_SMALL, "decoder_name": "unet"}, patch_size=(32, 32)),
        Example("classification", 2, dict(_SMALL), patch_size=(32, 32)),
    ),
)
