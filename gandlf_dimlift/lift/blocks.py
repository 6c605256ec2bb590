"""Lifted replacements for encoder blocks that do 2D work in ``forward`` (functional calls).

Each replacement keeps the original children under the same names, so state dict keys do not change,
and re-implements the block's ``forward`` for ``(B, C, X, Y, Z)``: squeeze-excitation pools over all
three axes (over the two in-plane axes in ``2.5d``, so the lifted model stays the 2D model per slice).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .convert import register
from .layers import lift_batchnorm, lift_conv
from .spec import LiftSpec


def pool_dims(spec: LiftSpec) -> tuple[int, ...]:
    """Tensor dims a global pool reduces: all spatial ones, or the in-plane ones in ``2.5d``."""
    if spec.per_slice:
        return tuple(2 + d for d in spec.plane_dims)
    return (2, 3, 4)


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Move ``old``'s children, parameters and buffers onto ``new`` under the same names; keep the training flag."""
    for name, child in old.named_children():
        setattr(new, name, child)
    for name, param in old.named_parameters(recurse=False):
        new.register_parameter(name, param)
    for name, buf in old.named_buffers(recurse=False):
        new.register_buffer(name, buf, persistent=name not in old._non_persistent_buffers_set)
    new.train(old.training)
    return new


@register("efficientnet_pytorch.utils.Conv2dStaticSamePadding", "efficientnet_pytorch.utils.Conv2dDynamicSamePadding",
          "timm.layers.conv2d_same.Conv2dSame")
def _lift_same_conv(m: nn.Module, spec: LiftSpec, path: str) -> nn.Module:
    # the static padding was computed for one 2D image size; the lifted conv recomputes it per axis
    return lift_conv(m, spec, path, tf_same=True)  # type: ignore[arg-type]


@register("timm.layers.norm_act.BatchNormAct2d")
def _lift_bn_act(m: nn.Module, spec: LiftSpec, path: str) -> nn.Module:
    return lift_batchnorm(m, spec, path)  # type: ignore[arg-type]


class LiftedMBConvBlock(nn.Module):
    """efficientnet-pytorch's ``MBConvBlock`` in 3D: 3D squeeze-excitation and a 5D drop-connect mask.

    Args:
        old: The 2D block (its children are adopted).
        spec: The lift spec.
    """

    def __init__(self, old: nn.Module, spec: LiftSpec) -> None:
        super().__init__()
        self._block_args = old._block_args
        self.has_se = old.has_se
        self.id_skip = old.id_skip
        self._bn_mom, self._bn_eps = old._bn_mom, old._bn_eps
        self._pool_dims = pool_dims(spec)
        _adopt(self, old)

    def forward(self, inputs: torch.Tensor, drop_connect_rate: float | None = None) -> torch.Tensor:  # noqa: D102
        args = self._block_args
        x = inputs
        if args.expand_ratio != 1:
            x = self._swish(self._bn0(self._expand_conv(x)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        if self.has_se:
            s = x.mean(self._pool_dims, keepdim=True)
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


@register("efficientnet_pytorch.model.MBConvBlock")
def _lift_mbconv(m: nn.Module, spec: LiftSpec, path: str) -> nn.Module:
    return LiftedMBConvBlock(m, spec)


class LiftedSqueezeExcite(nn.Module):
    """timm's efficientnet ``SqueezeExcite`` in 3D (children ``conv_reduce``, ``act1``, ``conv_expand``, ``gate``)."""

    def __init__(self, old: nn.Module, spec: LiftSpec) -> None:
        super().__init__()
        self._pool_dims = pool_dims(spec)
        _adopt(self, old)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        s = x.mean(self._pool_dims, keepdim=True)
        s = self.conv_expand(self.act1(self.conv_reduce(s)))
        return x * self.gate(s)


@register("timm.models._efficientnet_blocks.SqueezeExcite")
def _lift_timm_se(m: nn.Module, spec: LiftSpec, path: str) -> nn.Module:
    return LiftedSqueezeExcite(m, spec)


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


class LiftedMobileOneSE(nn.Module):
    """MobileOne's ``SEBlock`` in 3D (children ``reduce``, ``expand``)."""

    def __init__(self, old: nn.Module, spec: LiftSpec) -> None:
        super().__init__()
        self._pool_dims = pool_dims(spec)
        _adopt(self, old)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        s = torch.relu(self.reduce(x.mean(self._pool_dims, keepdim=True)))
        return x * torch.sigmoid(self.expand(s))


@register("segmentation_models_pytorch.encoders.mobileone.SEBlock")
def _lift_mobileone_se(m: nn.Module, spec: LiftSpec, path: str) -> nn.Module:
    return LiftedMobileOneSE(m, spec)


class LiftedSEModule(nn.Module):
    """timm's ``SEModule`` (RegNetY, ...) in 3D (children ``fc1``, ``bn``, ``act``, ``fc2``, ``gate``)."""

    def __init__(self, old: nn.Module, spec: LiftSpec) -> None:
        super().__init__()
        self._pool_dims = pool_dims(spec)
        self.add_maxpool = getattr(old, "add_maxpool", False)
        _adopt(self, old)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        s = x.mean(self._pool_dims, keepdim=True)
        if self.add_maxpool:
            s = 0.5 * s + 0.5 * x.amax(self._pool_dims, keepdim=True)
        s = self.fc2(self.act(self.bn(self.fc1(s))))
        return x * self.gate(s)


@register("timm.layers.squeeze_excite.SEModule")
def _lift_timm_semodule(m: nn.Module, spec: LiftSpec, path: str) -> nn.Module:
    return LiftedSEModule(m, spec)


class LiftedSplitAttn(nn.Module):
    """timm's ``SplitAttn`` (ResNeSt split attention) in 3D."""

    def __init__(self, old: nn.Module, spec: LiftSpec) -> None:
        super().__init__()
        self._pool_dims = pool_dims(spec)
        self.radix = old.radix
        _adopt(self, old)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.act0(self.drop(self.bn0(self.conv(x))))
        b, rc = x.shape[:2]
        spatial = x.shape[2:]
        if self.radix > 1:
            x = x.reshape(b, self.radix, rc // self.radix, *spatial)
            gap = x.sum(dim=1)
        else:
            gap = x
        gap = self.act1(self.bn1(self.fc1(gap.mean(self._pool_dims, keepdim=True))))
        attn = self.rsoftmax(self.fc2(gap))  # (B, C) for every view of the pooled map
        if self.radix > 1:
            keep = gap.shape[2:]  # (1, 1, 1), or (1, 1, Z) per slice
            attn = attn.reshape(b, self.radix, rc // self.radix, *keep)
            return (x * attn).sum(dim=1).contiguous()
        return (x * attn.reshape(b, -1, *gap.shape[2:])).contiguous()


@register("timm.layers.split_attn.SplitAttn")
def _lift_split_attn(m: nn.Module, spec: LiftSpec, path: str) -> nn.Module:
    return LiftedSplitAttn(m, spec)


class LiftedSelectiveKernelAttn(nn.Module):
    """timm's ``SelectiveKernelAttn`` (SKNet) in 3D: input ``(B, paths, C, X, Y, Z)``."""

    def __init__(self, old: nn.Module, spec: LiftSpec) -> None:
        super().__init__()
        self.num_paths = old.num_paths
        self._pool_dims = pool_dims(spec)  # of the path sum (B, C, X, Y, Z)
        _adopt(self, old)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.shape[1] != self.num_paths:
            raise ValueError(f"expected {self.num_paths} stacked paths, got {x.shape[1]}")
        s = x.sum(1).mean(self._pool_dims, keepdim=True)
        s = self.fc_select(self.act(self.bn(self.fc_reduce(s))))
        b, c = s.shape[:2]
        s = s.view(b, self.num_paths, c // self.num_paths, *s.shape[2:])
        return torch.softmax(s, dim=1)


@register("timm.layers.selective_kernel.SelectiveKernelAttn")
def _lift_sk_attn(m: nn.Module, spec: LiftSpec, path: str) -> nn.Module:
    return LiftedSelectiveKernelAttn(m, spec)
