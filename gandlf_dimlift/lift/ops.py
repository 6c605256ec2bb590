"""3D operators that replace 2D layers.

``acsconv`` ships ``ACSConv`` / ``SoftACSConv`` (used by GaNDLF). :class:`ACSConv3d` replaces them
rather than wrapping them, because their forward is not correct for every layer a 2D model holds:

* ``acsconv.operators.functional.acs_conv_f`` accepts only ``groups == 1`` or depthwise convs (ResNeXt,
  RegNet, ResNeSt, SKNet use other groupings);
* the kernel must be square (``_pair_same`` asserts);
* ``padding_mode`` is ignored (always zeros) and asymmetric / TensorFlow "same" padding cannot be
  expressed;
* the shortcut that feeds the unpadded input to the thin axis when ``2 * out == in`` gives the wrong
  length for valid (``padding=0``) convs on some sizes (e.g. ``k=3, p=0, s=1`` on a length-4 axis),
  so ``torch.cat`` fails;
* ``SoftACSConv`` starts its mixing weights from ``torch.rand`` (random view mixing).

The definition kept here is the one ``acsconv`` implements in the common case (odd kernel, symmetric
"same" padding), stated for every case: a view's conv is a 3D conv whose cubic footprint is zero
outside the centre plane across the view's thin axis. So along the thin axis the conv reads the
input at the centre tap only, with the padding/stride of the cubic footprint; every view then has the
same output shape as a cubic conv would. ``benchmarks/lift_ops.py`` checks equality with ``acsconv``
on the layers it supports.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def check_5d(x: torch.Tensor, who: str) -> None:
    """Raise a clear error unless ``x`` is a batched 3D tensor ``(B, C, X, Y, Z)``.

    Args:
        x: The input.
        who: Name of the layer or model, for the message.

    Raises:
        ValueError: When ``x`` is not 5D.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"{who} is a lifted (3D) model: it expects a 5D input (B, C, X, Y, Z), got {shape}. "
            "Add the batch/channel dimensions (e.g. x[None, None]) or lift along another axis."
        )


def tf_same_pads(length: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding for one dimension: output length ``ceil(length / stride)``.

    Args:
        length: Input length.
        kernel: Kernel extent.
        stride: Stride.
        dilation: Dilation.

    Returns:
        ``(left, right)``; the extra element, if any, goes to the right.
    """
    out = math.ceil(length / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - length, 0)
    return total // 2, total - total // 2


def pad_or_crop(x: torch.Tensor, pads: Sequence[tuple[int, int]], padding_mode: str = "zeros") -> torch.Tensor:
    """Pad (positive) or crop (negative) the three spatial dimensions of a 5D tensor.

    Args:
        x: ``(B, C, X, Y, Z)`` tensor.
        pads: ``((xl, xr), (yl, yr), (zl, zr))``.
        padding_mode: ``zeros``, ``reflect``, ``replicate`` or ``circular``.

    Returns:
        The padded / cropped tensor.
    """
    for i, (left, right) in enumerate(pads):
        if left < 0 or right < 0:
            dim = 2 + i
            start = max(-left, 0)
            stop = x.shape[dim] - max(-right, 0)
            if stop <= start:
                raise ValueError(f"input of spatial size {tuple(x.shape[2:])} is too small for this layer")
            x = x.narrow(dim, start, stop - start)
    flat: list[int] = []
    for left, right in reversed(list(pads)):
        flat += [max(left, 0), max(right, 0)]
    if any(flat):
        x = F.pad(x, flat, mode=_PAD_MODES[padding_mode])
    return x


class SameConv3d(nn.Conv3d):
    """``nn.Conv3d`` with TensorFlow "SAME" padding computed from the input size at every call.

    The 3D twin of ``Conv2dStaticSamePadding`` / ``Conv2dDynamicSamePadding`` (efficientnet-pytorch)
    and timm's ``Conv2dSame``: their padding is computed for a 2D image size, so it must be recomputed
    per axis for any 3D size.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        geometry = zip(x.shape[2:], self.kernel_size, self.stride, self.dilation, strict=True)
        pads = [tf_same_pads(n, k, s, d) for n, k, s, d in geometry]
        return F.conv3d(pad_or_crop(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def mix_views(module: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Combines the per-view outputs of an ACS-family layer and adds its bias.

    `acs`: the views are the three channel groups, concatenated; `mean`: the three full views averaged; `soft`:
    mixed per channel by the softmax of `module.soft_w_core`.
    """
    if module.mode == "acs":
        out = torch.cat(views, 1) if len(views) > 1 else views[0]
    elif module.mode == "mean":
        out = (views[0] + views[1] + views[2]) / 3
    else:
        w = module.soft_w_core.softmax(-1).t().reshape(3, 1, -1, 1, 1, 1)
        out = views[0] * w[0] + views[1] * w[1] + views[2] * w[2]
    if module.bias is not None:
        out = out + module.bias.view(1, -1, 1, 1, 1)
    return out

class ACSConv3d(nn.Module):
    """ACS convolution (``acs``), soft ACS (``soft``) and mean ACS (``mean``) over a 2D kernel.

    The 2D weight ``(out, in / groups, kh, kw)`` is kept as is (same parameters as the 2D layer).
    ``acs`` splits the output channels in three groups convolved as ``(1, kh, kw)``, ``(kh, 1, kw)``
    and ``(kh, kw, 1)`` (thin along X, Y, Z; ``kh`` on the first remaining axis); ``soft`` and ``mean``
    convolve every output channel in all three views and mix them with learned softmax weights
    (``soft_w_core``, shape ``(out, 3)``) or equally.

    ``soft_w_core`` is initialised to zeros, so the softmax starts at 1/3 per view: a freshly lifted
    ``soft`` layer equals ``mean`` and learning starts from the transferred weights, not from a random
    mix (``acsconv.SoftACSConv`` draws them with ``torch.rand``).

    Any grouping is supported: each view's channel range is computed as at most three convs (the
    partial group at each end and the whole groups in between). A non-square kernel (Inception's
    ``1x7``) is supported when its stride is 1 and its padding keeps the size ("same"), so every view
    gives the same output shape; along the thin axis it reads one plane.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel extent, an int or ``(kh, kw)``.
        stride: Stride (same on every axis).
        padding: Padding per side (an int or ``(ph, pw)``), ``"same"``, ``"valid"``, or ``"tf_same"``
            (TensorFlow SAME, computed from the input size).
        dilation: Dilation, an int or ``(dh, dw)``.
        groups: Conv groups.
        bias: Whether to add a bias.
        padding_mode: ``zeros``, ``reflect``, ``replicate`` or ``circular``.
        mode: ``acs``, ``soft`` or ``mean``.
        acs_kernel_split: Output channels per view for ``acs``; balanced like ``acsconv`` by default.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        mode: str = "acs",
        acs_kernel_split: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("acs", "soft", "mean"):
            raise ValueError(f"ACSConv3d mode must be 'acs', 'soft' or 'mean', got {mode!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} are not divisible by groups={groups}")
        if padding_mode not in _PAD_MODES:
            raise ValueError(f"padding_mode must be one of {sorted(_PAD_MODES)}, got {padding_mode!r}")
        kernel, dil = _pair(kernel_size), _pair(dilation)
        pad = padding if isinstance(padding, str) else _pair(padding)
        self.isotropic = kernel[0] == kernel[1] and dil[0] == dil[1] and (isinstance(pad, str) or pad[0] == pad[1])
        if not self.isotropic:
            keeps_size = pad == "same" or (pad == "tf_same" and stride == 1) or (
                not isinstance(pad, str) and all(2 * p == d * (k - 1) for k, p, d in zip(kernel, pad, dil, strict=True))
            )
            if stride != 1 or not keeps_size:
                raise ValueError(
                    f"a non-square ACS kernel {kernel} needs stride 1 and size-keeping padding, got stride {stride}, "
                    f"padding {padding}"
                )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation, self.groups = kernel, stride, dil, groups
        self.padding, self.padding_mode, self.mode = pad, padding_mode, mode
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *kernel))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        if mode == "soft":
            self.soft_w_core = nn.Parameter(torch.zeros(out_channels, 3))
        if acs_kernel_split is None:
            base, rest = divmod(out_channels, 3)
            acs_kernel_split = tuple(base + (1 if i < rest else 0) for i in range(3))
        if sum(acs_kernel_split) != out_channels:
            raise ValueError(f"acs_kernel_split {acs_kernel_split} does not sum to {out_channels}")
        self.acs_kernel_split = tuple(acs_kernel_split)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like ``nn.Conv2d``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _pads(self, length: int, i: int) -> tuple[int, int]:
        """Padding of an axis of ``length`` that carries the 2D kernel's dim ``i``."""
        k, d = self.kernel_size[i], self.dilation[i]
        if self.padding == "tf_same":
            return tf_same_pads(length, k, self.stride, d)
        if self.padding == "same":
            total = d * (k - 1)
            return total // 2, total - total // 2
        if self.padding == "valid":
            return 0, 0
        return self.padding[i], self.padding[i]

    def _view(self, x: torch.Tensor, view: int) -> torch.Tensor:
        plane = [a for a in range(3) if a != view]
        view_pads: list[tuple[int, int]] = [(0, 0)] * 3
        dilation = [1, 1, 1]
        for i, axis in enumerate(plane):
            view_pads[axis] = self._pads(x.shape[2 + axis], i)
            dilation[axis] = self.dilation[i]
        if self.isotropic:
            # the thin axis reads the centre tap of the cubic footprint, with that footprint's padding
            k, d = self.kernel_size[0], self.dilation[0]
            centre = (k - 1) // 2
            left, right = self._pads(x.shape[2 + view], 0)
            view_pads[view] = (left - centre * d, right - (k - 1 - centre) * d)
        native = self.padding_mode == "zeros" and all(lo == hi and lo >= 0 for lo, hi in view_pads)
        conv_padding = tuple(lo for lo, _ in view_pads) if native else 0
        split = self.acs_kernel_split
        lo = sum(split[:view]) if self.mode == "acs" else 0
        hi = lo + split[view] if self.mode == "acs" else self.out_channels
        outs = []
        for o_lo, o_hi, i_lo, i_hi, groups in _group_pieces(lo, hi, self.out_channels, self.in_channels, self.groups):
            xin = x if (i_lo == 0 and i_hi == x.shape[1]) else x[:, i_lo:i_hi]
            if not native:
                xin = pad_or_crop(xin, view_pads, self.padding_mode)
            weight = self.weight[o_lo:o_hi].unsqueeze(2 + view)
            outs.append(F.conv3d(xin, weight, None, self.stride, conv_padding, tuple(dilation), groups))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        check_5d(x, type(self).__name__)
        if self.mode == "acs":
            views = [self._view(x, v) for v in range(3) if self.acs_kernel_split[v]]
        else:
            views = [self._view(x, v) for v in range(3)]
        return mix_views(self, views)

    def extra_repr(self) -> str:  # noqa: D102
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding!r}, mode={self.mode!r}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.mode == "acs":
            s += f", acs_kernel_split={self.acs_kernel_split}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


@functools.lru_cache(maxsize=4096)
def _group_pieces(lo: int, hi: int, out_ch: int, in_ch: int, groups: int) -> list[tuple[int, int, int, int, int]]:
    """Split output channels ``[lo, hi)`` of a grouped conv into convs that torch can run.

    Returns:
        ``(out_lo, out_hi, in_lo, in_hi, groups)`` per piece: partial groups become dense convs on
        their group's input channels, runs of whole groups one grouped conv.
    """
    cpg, ipg = out_ch // groups, in_ch // groups
    pieces = []
    o = lo
    while o < hi:
        g = o // cpg
        group_end = (g + 1) * cpg
        if o % cpg or hi < group_end:
            end = min(hi, group_end)
            pieces.append((o, end, g * ipg, (g + 1) * ipg, 1))
            o = end
        else:
            n = (hi - o) // cpg
            pieces.append((o, o + n * cpg, g * ipg, (g + n) * ipg, n))
            o += n * cpg
    return pieces


class BatchNormAct3d(nn.BatchNorm3d):
    """3D twin of timm's ``BatchNormAct2d``: batch norm, then its ``drop`` and ``act`` children.

    timm's class asserts a 4D input, so it is replaced; the state dict keys are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = super().forward(x)
        drop = getattr(self, "drop", None)
        act = getattr(self, "act", None)
        if drop is not None:
            x = drop(x)
        if act is not None:
            x = act(x)
        return x


def _fold_slices(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    moved = x.movedim(dim, 1)
    shape = moved.shape
    return moved.reshape(shape[0] * shape[1], *shape[2:]), tuple(shape)


def _unfold_slices(y: torch.Tensor, shape: tuple[int, ...], dim: int) -> torch.Tensor:
    return y.reshape(shape[0], shape[1], *y.shape[1:]).movedim(1, dim)


class SliceGroupNorm(nn.GroupNorm):
    """``GroupNorm`` with statistics per slice along ``slice_dim`` (``2.5d``: the 2D norm on every slice).

    Args:
        num_groups: As ``nn.GroupNorm``.
        num_channels: As ``nn.GroupNorm``.
        eps: As ``nn.GroupNorm``.
        affine: As ``nn.GroupNorm``.
        slice_dim: Tensor dim of the slice axis (2, 3 or 4).
    """

    def __init__(
        self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, slice_dim: int = 4
    ) -> None:
        super().__init__(num_groups, num_channels, eps, affine)
        self.slice_dim = slice_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        folded, shape = _fold_slices(x, self.slice_dim)
        return _unfold_slices(super().forward(folded), shape, self.slice_dim)


class SliceInstanceNorm(nn.InstanceNorm2d):
    """``InstanceNorm2d`` applied to every slice along ``slice_dim`` (``2.5d``)."""

    def __init__(self, *args: object, slice_dim: int = 4, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.slice_dim = slice_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        folded, shape = _fold_slices(x, self.slice_dim)
        return _unfold_slices(super().forward(folded), shape, self.slice_dim)


class AvgPool3dAnySize(nn.AvgPool3d):
    """``nn.AvgPool3d`` that also accepts inputs smaller than the kernel when padding makes up for it.

    torch's 3D average pool checks the unpadded input against the kernel (``avg_pool2d`` checks the
    padded one), so a lifted 2D model would fail on sizes its 2D twin accepts. Then the padding is
    applied explicitly; ``count_include_pad=False`` divides by the pooled mask of real voxels.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        k, p = _triple(self.kernel_size), _triple(self.padding)
        if all(n >= kk for n, kk in zip(x.shape[2:], k, strict=True)) or not any(p):
            return super().forward(x)
        pads = [(q, q) for q in p]
        args = (k, self.stride, 0, self.ceil_mode, True)
        if self.count_include_pad or self.divisor_override:
            return F.avg_pool3d(pad_or_crop(x, pads), *args, self.divisor_override)
        ones = torch.ones_like(x[:1, :1])
        return F.avg_pool3d(pad_or_crop(x, pads), *args) / F.avg_pool3d(pad_or_crop(ones, pads), *args)


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    return (value,) * 3 if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


class ACSConvTranspose3d(nn.Module):
    """Transposed ACS convolution (``acs``, ``soft``, ``mean``) over a 2D transposed kernel.

    A view applies the 2D transposed kernel in its plane; along its thin axis each input plane is
    repeated ``stride`` times (nearest-neighbour upsampling), since a one-plane kernel strided along that
    axis would leave ``stride - 1`` of every ``stride`` output planes empty. The output shape is that of
    a cubic transposed conv (cropped or zero-padded at the far end of the thin axis where they differ),
    so the views concatenate (``acs``) or mix (``soft`` / ``mean``) like :class:`ACSConv3d`. A volume
    constant along a view's thin axis gets the 2D response on every plane. ``acsconv`` has no
    transposed operator.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Square kernel extent.
        stride: Stride (every axis).
        padding: Padding (every axis).
        output_padding: Output padding (every axis).
        dilation: Dilation (every axis).
        bias: Whether to add a bias.
        mode: ``acs``, ``soft`` or ``mean``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        output_padding: int = 0,
        dilation: int = 1,
        bias: bool = True,
        mode: str = "acs",
    ) -> None:
        super().__init__()
        if mode not in ("acs", "soft", "mean"):
            raise ValueError(f"ACSConvTranspose3d mode must be 'acs', 'soft' or 'mean', got {mode!r}")
        self.in_channels, self.out_channels, self.mode = in_channels, out_channels, mode
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.output_padding, self.dilation = output_padding, dilation
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        if mode == "soft":
            self.soft_w_core = nn.Parameter(torch.zeros(out_channels, 3))
        base, rest = divmod(out_channels, 3)
        self.acs_kernel_split = tuple(base + (1 if i < rest else 0) for i in range(3))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def _view(self, x: torch.Tensor, view: int, lo: int, hi: int) -> torch.Tensor:
        k, s, p, op, d = self.kernel_size, self.stride, self.padding, self.output_padding, self.dilation
        weight = self.weight[:, lo:hi].unsqueeze(2 + view)
        if s > 1:
            weight = weight.expand(*weight.shape[: 2 + view], s, *weight.shape[3 + view :])
        strides = (s, s, s)
        pads = [p, p, p]
        pads[view] = 0
        dil = [d, d, d]
        dil[view] = 1
        out_pad = [op, op, op]
        out_pad[view] = 0
        y = F.conv_transpose3d(x, weight, None, strides, tuple(pads), tuple(out_pad), 1, tuple(dil))
        n = x.shape[2 + view]
        target = (n - 1) * s - 2 * p + d * (k - 1) + op + 1
        have = y.shape[2 + view]
        if have != target:
            pads6 = [(0, 0)] * 3
            pads6[view] = (0, target - have)
            y = pad_or_crop(y, pads6)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        check_5d(x, type(self).__name__)
        if self.mode == "acs":
            bounds = [0, *itertools.accumulate(self.acs_kernel_split)]
            views = [self._view(x, v, bounds[v], bounds[v + 1]) for v in range(3) if self.acs_kernel_split[v]]
        else:
            views = [self._view(x, v, 0, self.out_channels) for v in range(3)]
        return mix_views(self, views)

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, output_padding={self.output_padding}, mode={self.mode!r}"
        )
