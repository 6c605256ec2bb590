"""Adapting the first convolution to the input channel count (shared by every family)."""

from __future__ import annotations

import torch
from torch import nn

from .ops import ACSConv3d


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.conv._ConvNd, ACSConv3d)) and not getattr(m, "transposed", False)


def adapt_input_channels(module: nn.Module, in_channels: int) -> nn.Module:
    """Adapt the first convolution of ``module`` (2D or 3D, lifted or not) to ``in_channels`` inputs.

    The convention of smp and timm: one channel gets the sum of the existing (RGB) kernels; ``N``
    channels get the existing kernels repeated cyclically over the new channels and scaled by
    ``C_old / N`` (``3 / N`` for RGB), so a grey image replicated on all channels gives the response
    of the original model. The layer is changed in place.

    Args:
        module: The model (or encoder); changed in place.
        in_channels: The new input channel count.

    Returns:
        ``module``.

    Raises:
        ValueError: When ``in_channels`` is not positive, or the model has no convolution, or the first
            one is grouped.
    """
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    conv = next((m for m in module.modules() if _is_conv(m)), None)
    if conv is None:
        raise ValueError(f"{type(module).__name__} has no convolution whose input channels could be adapted")
    old = conv.in_channels
    if old == in_channels:
        return module
    if conv.groups != 1:
        raise ValueError(f"the first convolution is grouped (groups={conv.groups}); cannot adapt its input channels")
    w = conv.weight.detach()
    if in_channels == 1:
        new = w.sum(1, keepdim=True)
    else:
        idx = torch.arange(in_channels, device=w.device) % old
        new = w.index_select(1, idx) * (old / in_channels)
    conv.weight = nn.Parameter(new.contiguous(), requires_grad=conv.weight.requires_grad)
    conv.in_channels = in_channels
    if isinstance(getattr(module, "_in_channels", None), int):
        module._in_channels = in_channels
    return module
