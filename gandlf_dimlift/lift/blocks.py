"""Lifted replacements for encoder blocks that do 2D work in ``forward`` (functional calls).

Each replacement keeps the original children under the same names, so state dict keys do not change,
and re-implements the block's ``forward`` for ``(B, C, X, Y, Z)``: squeeze-excitation pools over all
three axes (over the two in-plane axes in ``2.5d``, so the lifted model stays the 2D model per slice).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .convert import Lifted, register, replacement
from .layers import lift_batchnorm, lift_conv
from .spec import LiftSpec


@register("efficientnet_pytorch.utils.Conv2dStaticSamePadding", "efficientnet_pytorch.utils.Conv2dDynamicSamePadding",
          "timm.layers.conv2d_same.Conv2dSame")
def _lift_same_conv(m: nn.Module, spec: LiftSpec, path: str) -> nn.Module:
    # the static padding was computed for one 2D image size; the lifted conv recomputes it per axis
    return lift_conv(m, spec, path, tf_same=True)  # type: ignore[arg-type]


@register("timm.layers.norm_act.BatchNormAct2d")
def _lift_bn_act(m: nn.Module, spec: LiftSpec, path: str) -> nn.Module:
    return lift_batchnorm(m, spec, path)  # type: ignore[arg-type]


class LiftedMBConvBlock(Lifted):
    """efficientnet-pytorch's ``MBConvBlock`` in 3D: 3D squeeze-excitation and a 5D drop-connect mask."""

    def forward(self, inputs: torch.Tensor, drop_connect_rate: float | None = None) -> torch.Tensor:  # noqa: D102
        args = self._block_args
        x = inputs
        if args.expand_ratio != 1:
            x = self._swish(self._bn0(self._expand_conv(x)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        if self.has_se:
            s = x.mean(self.pool_dims, keepdim=True)
            s = self._se_expand(self._swish(self._se_reduce(s)))
            x = torch.sigmoid(s) * x
        x = self._bn2(self._project_conv(x))
        if self.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
            if drop_connect_rate and self.training:
                keep = 1.0 - drop_connect_rate
                shape = (x.shape[0],) + (1,) * (x.dim() - 1)
                mask = torch.floor(keep + torch.rand(shape, dtype=x.dtype, device=x.device))
                x = x / keep * mask
            x = x + inputs
        return x


register("efficientnet_pytorch.model.MBConvBlock")(
    replacement(LiftedMBConvBlock, "_block_args", "has_se", "id_skip", "_bn_mom", "_bn_eps")
)


class LiftedSqueezeExcite(Lifted):
    """timm's efficientnet ``SqueezeExcite`` in 3D (children ``conv_reduce``, ``act1``, ``conv_expand``, ``gate``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        s = x.mean(self.pool_dims, keepdim=True)
        s = self.conv_expand(self.act1(self.conv_reduce(s)))
        return x * self.gate(s)


register("timm.models._efficientnet_blocks.SqueezeExcite")(replacement(LiftedSqueezeExcite))


def _vgg_stages(self: nn.Module) -> list[nn.Module]:
    # smp's VGGEncoder.get_stages splits ``features`` at nn.MaxPool2d: split at the lifted pools
    stages, current = [], []
    for module in self.features:
        if isinstance(module, nn.MaxPool3d):
            stages.append(nn.Sequential(*current))
            current = []
        current.append(module)
    stages.append(nn.Sequential(*current))
    return stages


@register("segmentation_models_pytorch.encoders.vgg.VGGEncoder")
def _lift_vgg(m: nn.Module, spec: LiftSpec, path: str) -> nn.Module:
    m.get_stages = types.MethodType(_vgg_stages, m)
    return m


class LiftedMobileOneSE(Lifted):
    """MobileOne's ``SEBlock`` in 3D (children ``reduce``, ``expand``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        s = torch.relu(self.reduce(x.mean(self.pool_dims, keepdim=True)))
        return x * torch.sigmoid(self.expand(s))


register("segmentation_models_pytorch.encoders.mobileone.SEBlock")(replacement(LiftedMobileOneSE))


class LiftedSEModule(Lifted):
    """timm's ``SEModule`` (RegNetY, ...) in 3D (children ``fc1``, ``bn``, ``act``, ``fc2``, ``gate``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        s = x.mean(self.pool_dims, keepdim=True)
        if self.add_maxpool:
            s = 0.5 * s + 0.5 * x.amax(self.pool_dims, keepdim=True)
        s = self.fc2(self.act(self.bn(self.fc1(s))))
        return x * self.gate(s)


register("timm.layers.squeeze_excite.SEModule")(replacement(LiftedSEModule, "add_maxpool"))


class LiftedSplitAttn(Lifted):
    """timm's ``SplitAttn`` (ResNeSt split attention) in 3D."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.act0(self.drop(self.bn0(self.conv(x))))
        b, rc = x.shape[:2]
        spatial = x.shape[2:]
        if self.radix > 1:
            x = x.reshape(b, self.radix, rc // self.radix, *spatial)
            gap = x.sum(dim=1)
        else:
            gap = x
        gap = self.act1(self.bn1(self.fc1(gap.mean(self.pool_dims, keepdim=True))))
        attn = self.rsoftmax(self.fc2(gap))  # (B, C) for every view of the pooled map
        if self.radix > 1:
            keep = gap.shape[2:]  # (1, 1, 1), or (1, 1, Z) per slice
            attn = attn.reshape(b, self.radix, rc // self.radix, *keep)
            return (x * attn).sum(dim=1).contiguous()
        return (x * attn.reshape(b, -1, *gap.shape[2:])).contiguous()


register("timm.layers.split_attn.SplitAttn")(replacement(LiftedSplitAttn, "radix"))


class LiftedSelectiveKernelAttn(Lifted):
    """timm's ``SelectiveKernelAttn`` (SKNet) in 3D: input ``(B, paths, C, X, Y, Z)``; pools the path sum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.shape[1] != self.num_paths:
            raise ValueError(f"expected {self.num_paths} stacked paths, got {x.shape[1]}")
        s = x.sum(1).mean(self.pool_dims, keepdim=True)
        s = self.fc_select(self.act(self.bn(self.fc_reduce(s))))
        b, c = s.shape[:2]
        s = s.view(b, self.num_paths, c // self.num_paths, *s.shape[2:])
        return torch.softmax(s, dim=1)


register("timm.layers.selective_kernel.SelectiveKernelAttn")(replacement(LiftedSelectiveKernelAttn, "num_paths"))
