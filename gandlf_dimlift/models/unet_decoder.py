"""The U-Net decoder of Omnia-Net / DX-Net (Messaoudi et al., arXiv 2307.15872), for any spatial dimension.

Each stage upsamples by a transposed convolution whose kernel equals its stride, concatenates the encoder skip of
that resolution and applies two (3x3 or 3x3x3) convolution + norm + SiLU blocks. Omnia-Net adds a block at full
resolution on the input whose output is the skip of the last stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from gandlf_dimlift.models.common import layer

Norm = Callable[[int], nn.Module]


class ConvBlock(nn.Sequential):
    """Two convolution + norm + SiLU layers with kernel 3 and padding 1 on every axis."""

    def __init__(self, in_channels: int, out_channels: int, dimension: int, norm: Norm):
        conv = layer("Conv", dimension)
        super().__init__(
            conv(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            norm(out_channels),
            nn.SiLU(inplace=True),
            conv(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            norm(out_channels),
            nn.SiLU(inplace=True),
        )


class UpStage(nn.Module):
    """Transposed-convolution upsampling, concatenation with the skip, and a ConvBlock."""

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        stride: tuple[int, ...],
        dimension: int,
        norm: Norm,
    ):
        super().__init__()
        self.up = layer("ConvTranspose", dimension)(in_channels, out_channels, kernel_size=stride, stride=stride)
        self.block = ConvBlock(out_channels + skip_channels, out_channels, dimension, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class UNetDecoder(nn.Module):
    """Decoder over encoder features ordered from the finest skip to the bottleneck.

    Args:
        skip_channels: Channels of the skips, finest first; the last stage's skip is `skip_channels[0]`.
        bottleneck_channels: Channels of the deepest encoder feature.
        decoder_channels: Output channels per stage, coarsest first (the paper: 256, 128, 64, 32, 16).
        strides: Upsampling factor per stage (a tuple over the spatial axes), coarsest first.
        dimension: 2 or 3.
        norm: Builds the normalisation layer for a channel count.
    """

    def __init__(
        self,
        skip_channels: Sequence[int],
        bottleneck_channels: int,
        decoder_channels: Sequence[int],
        strides: Sequence[tuple[int, ...]],
        dimension: int,
        norm: Norm,
    ):
        super().__init__()
        if not len(skip_channels) == len(decoder_channels) == len(strides):
            raise ValueError(
                f"UNetDecoder needs one skip, channel count and stride per stage; got {len(skip_channels)} skips, "
                f"{len(decoder_channels)} decoder channels, {len(strides)} strides."
            )
        stages = []
        previous = bottleneck_channels
        for skip, channels, stride in zip(reversed(list(skip_channels)), decoder_channels, strides, strict=True):
            stages.append(UpStage(previous, skip, channels, tuple(stride), dimension, norm))
            previous = channels
        self.stages = nn.ModuleList(stages)
        self.out_channels = previous

    def forward(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decodes `bottleneck` with `skips` ordered finest first."""
        x = bottleneck
        for stage, skip in zip(self.stages, reversed(list(skips)), strict=True):
            x = stage(x, skip)
        return x
