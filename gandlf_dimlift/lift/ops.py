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

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .modes import REGISTRY, LiftMode, split_sizes
from .spec import as_pair

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


def pad_or_crop(
    x: torch.Tensor, pads: Sequence[tuple[int, int]], padding_mode: str | Sequence[str] = "zeros"
) -> torch.Tensor:
    """Pad (positive) or crop (negative) the three spatial dimensions of a 5D tensor.

    Args:
        x: ``(B, C, X, Y, Z)`` tensor.
        pads: ``((xl, xr), (yl, yr), (zl, zr))``.
        padding_mode: ``zeros``, ``reflect``, ``replicate`` or ``circular``; or one of them per spatial axis.

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
    modes = (padding_mode,) * 3 if isinstance(padding_mode, str) else tuple(padding_mode)
    for mode in dict.fromkeys(modes):  # one F.pad per distinct mode (they commute: each maps indices per axis)
        flat: list[int] = []
        for (left, right), axis_mode in reversed(list(zip(pads, modes, strict=True))):
            flat += [max(left, 0), max(right, 0)] if axis_mode == mode else [0, 0]
        if any(flat):
            x = F.pad(x, flat, mode=_PAD_MODES[mode])
    return x


def padding_modes(padding_mode: str, replicate_dim: int | None) -> tuple[str, str, str]:
    """Padding mode per spatial axis: ``padding_mode``, except ``replicate`` along ``replicate_dim`` (0..2)."""
    return tuple("replicate" if d == replicate_dim else padding_mode for d in range(3))  # type: ignore[return-value]


#: Output voxels per sample from which lifted 3D convolutions compute in ``channels_last_3d`` (see conv_layout).
CHANNELS_LAST_MIN_VOXELS = 16**3


def _exporting() -> bool:
    """Whether the forward is traced for ONNX (GaNDLF's optimize step): operators then take their exportable form."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def in_layout(x: torch.Tensor, layout: torch.memory_format | None) -> torch.Tensor:
    """``x`` in ``layout`` (a copy unless it already is); ``None`` keeps it as it is."""
    if layout is None or x.is_contiguous(memory_format=layout):
        return x
    return x.contiguous(memory_format=layout)


def output_voxels(shape: Sequence[int], stride: Sequence[int]) -> int:
    """Voxels per sample of a convolution's output for input ``shape`` ``(B, C, X, Y, Z)`` (``same``-size padding)."""
    return math.prod(-(-n // s) for n, s in zip(shape[2:], stride, strict=True))


def conv_layout(x: torch.Tensor, stride: Sequence[int] = (1, 1, 1)) -> torch.memory_format | None:
    """The layout a lifted 3D convolution of ``stride`` computes the 5D ``x`` in.

    oneDNN's 3D kernels on this CPU (2 threads, forward + backward, measured when the rule was chosen): in
    ``channels_last_3d`` dense convolutions at 32^3 voxels and more take 0.5-0.8x the time of the standard layout,
    depthwise ones at 16^3-64^3 output 0.3-0.8x (EfficientNet's 480 channels, 5^3 kernel, at 16^3: 0.58x; 96
    channels, 3^3, stride 2 from 64^3: 0.67x), but at 8^3 output 1.1-1.7x (672 and 1152 channels, 5^3) and at 2^3
    output 15x (672 channels, 5^3, stride 2 from 4^3). Whole train steps (batch 2), this rule against the previous
    one (32^3 input voxels, strided depthwise never): at 64^3 DX-Net's classifier 0.75x, its U-Net 0.93x, smp's U-Net
    0.94x (acs) to 0.98x (soft); at 128^3 DX-Net 0.62x (classifier) and 0.85x (U-Net); at 32^3 0.90x-1.03x. So:
    channels-last from :data:`CHANNELS_LAST_MIN_VOXELS` output voxels per sample, the standard layout
    below. ``None`` (keep) under ``operator_choice(channels_last=False)``.
    """
    if not _CHOICE["channels_last"] or _exporting():
        return None  # ONNX has no memory formats (the export fails on a layout change), and values do not depend on it
    if output_voxels(x.shape, stride) >= CHANNELS_LAST_MIN_VOXELS:
        return torch.channels_last_3d
    return torch.contiguous_format


#: Pixels per slice from which the slice encoder's 2D convolutions compute in ``channels_last`` (see channels_last).
CHANNELS_LAST_MIN_PIXELS = 80**2


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 4D stack of slices in the layout its 2D convolutions run fastest in: ``channels_last`` from
    :data:`CHANNELS_LAST_MIN_PIXELS` per slice (a copy unless it already is), as it is below, or under
    ``operator_choice(channels_last=False)``.

    smp's resnet18 encoder, forward + backward, 2 threads, channels-last against the standard layout: 0.75x time
    for 32 slices of 256^2, 0.89x for 64 of 128^2 and 96 of 96^2, 0.95x for 128 of 80^2, but 1.02-1.07x for 128 of
    64^2 (the slices of a 64^3 volume) and the same for 64 of 32^2.
    """
    use = _CHOICE["channels_last"] and not _exporting() and x.shape[-2] * x.shape[-1] >= CHANNELS_LAST_MIN_PIXELS
    return in_layout(x, torch.channels_last if use else None)


class LiftedConv3d(nn.Conv3d):
    """The dense 3D convolution of a lifted model: ``nn.Conv3d`` (same state dict) computed in ``channels_last_3d``,
    with TensorFlow "SAME" padding and/or the border slices repeated along one axis where asked.

    Layout: large outputs compute in ``channels_last_3d``, where oneDNN's 3D kernels run faster on CPU
    (:func:`conv_layout`); the output has the layout the convolution computed in. Values do not depend on it.

    With ``tf_same`` the padding is computed from the input size at every call: the 3D twin of
    ``Conv2dStaticSamePadding`` / ``Conv2dDynamicSamePadding`` (efficientnet-pytorch) and timm's ``Conv2dSame``,
    whose padding was computed for one 2D image size. Along ``replicate_dim`` (a spatial index 0..2, or ``None``)
    the border slices are repeated (``lift(..., axis_padding="replicate")``); the other axes pad with
    ``padding_mode``.

    Args:
        *args: As ``nn.Conv3d``.
        tf_same: TensorFlow "SAME" padding (the ``padding`` argument is then ignored).
        replicate_dim: Spatial axis padded by repeating its border slices.
        **kwargs: As ``nn.Conv3d``.
    """

    def __init__(
        self, *args: object, tf_same: bool = False, replicate_dim: int | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None, **kwargs: object,
    ):  # device and dtype named for torch.nn.utils.skip_init
        super().__init__(*args, device=device, dtype=dtype, **kwargs)  # type: ignore[arg-type]
        if isinstance(self.padding, str) and (tf_same or replicate_dim is not None):
            raise ValueError(f"explicit padding needs integer padding, got padding={self.padding!r}")
        self.tf_same, self.replicate_dim = tf_same, replicate_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        layout = conv_layout(x, self.stride)
        # the output too: with one input channel torch cannot tell the layouts apart and returns the standard one
        return in_layout(self._conv(in_layout(x, layout)), layout)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tf_same and self.replicate_dim is None:
            return super().forward(x)
        if self.tf_same:
            geometry = zip(x.shape[2:], self.kernel_size, self.stride, self.dilation, strict=True)
            pads = [tf_same_pads(n, k, s, d) for n, k, s, d in geometry]
        else:
            pads = [(p, p) for p in self.padding]
        modes = padding_modes(self.padding_mode, self.replicate_dim)
        if set(modes) == {"zeros"} and all(lo == hi for lo, hi in pads):
            padding = tuple(lo for lo, _ in pads)
        else:
            x, padding = pad_or_crop(x, pads, modes), (0, 0, 0)
        return F.conv3d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:  # noqa: D102
        s = super().extra_repr() + (", padding=tf_same" if self.tf_same else "")
        return s + (f", replicate_dim={self.replicate_dim}" if self.replicate_dim is not None else "")


#: Output voxels per sample from which ``soft`` / ``mean`` convolutions take the dense path (see ACSConv3d.path).
DENSE_MIN_VOXELS = 8**3
#: An ``acs`` convolution (groups 1) whose thinnest view computes fewer output channels than this takes the dense
#: path too, from DENSE_MIN_VOXELS on: oneDNN runs convolutions of a handful of output channels so slowly that a
#: cubic kernel of three times the FLOPs is faster (see ACSConv3d.path).
DENSE_BELOW_VIEW_CHANNELS = 8
_PATH_NAMES = ("views", "dense")
#: Forced operator choices: the ACS path (None: by shape) and whether lifted convs compute in channels-last.
_CHOICE: dict[str, str | bool | None] = {"path": None, "channels_last": True}


@contextlib.contextmanager
def operator_choice(path: str | None = None, channels_last: bool = True) -> Iterator[None]:
    """Within the block, lifted convolutions compute as told instead of choosing by shape.

    Args:
        path: ``"views"`` (the reference: one thin convolution per view) or ``"dense"`` for every
            :class:`ACSConv3d` with a square kernel; ``None`` chooses per call (:meth:`ACSConv3d.path`).
        channels_last: ``False`` keeps every input's layout (no ``channels_last_3d`` conversion). ``path="views"``
            with ``channels_last=False`` is the reference implementation, the operators before they were tuned.

    Raises:
        ValueError: For an unknown ``path``.
    """
    if path is not None and path not in _PATH_NAMES:
        raise ValueError(f"unknown ACS path {path!r}; valid paths are {_PATH_NAMES} or None")
    before = dict(_CHOICE)
    _CHOICE.update(path=path, channels_last=channels_last)
    try:
        yield
    finally:
        _CHOICE.update(before)


def acs_mode(name: str, who: str) -> LiftMode:
    """The declaration of an ACS-family mode, or a ValueError listing them."""
    mode = REGISTRY.get(name)
    if mode is None or not mode.acs_family:
        valid = [m.name for m in REGISTRY.values() if m.acs_family]
        raise ValueError(f"{who} mode must be one of {valid}, got {name!r}")
    return mode


class ACSLayer(nn.Module):
    """Base of the ACS-family operators: the mode, which output channels each view computes, and their mixing.

    Args:
        out_channels: Output channels.
        mode: An ACS-family mode (``acs``, ``soft``, ``mean``).
        acs_kernel_split: Output channels per view when the mode splits them; balanced like ``acsconv`` by default.
    """

    def __init__(self, out_channels: int, mode: str, acs_kernel_split: Sequence[int] | None = None) -> None:
        super().__init__()
        declared = acs_mode(mode, type(self).__name__)
        self.out_channels, self.mode = out_channels, mode
        if declared.learned_mix:
            self.soft_w_core = nn.Parameter(torch.zeros(out_channels, 3))
        split = split_sizes(out_channels) if acs_kernel_split is None else tuple(acs_kernel_split)
        if sum(split) != out_channels:
            raise ValueError(f"acs_kernel_split {split} does not sum to {out_channels}")
        self.acs_kernel_split = split

    def view_channels(self, view: int) -> tuple[int, int]:
        """Output channels ``[lo, hi)`` the view computes: its group when the mode splits them, else all."""
        if not REGISTRY[self.mode].split_channels:
            return 0, self.out_channels
        lo = sum(self.acs_kernel_split[:view])
        return lo, lo + self.acs_kernel_split[view]

    def active_views(self) -> list[int]:
        """The views that compute at least one output channel."""
        return [v for v in range(3) if self.view_channels(v)[1] > self.view_channels(v)[0]]

    def mix_views(self, views: list[torch.Tensor], add_bias: bool = True) -> torch.Tensor:
        """Combines the outputs of :meth:`active_views` and adds the bias (unless the views hold it).

        A mode that splits the channels (``acs``) gives each view's channel group: they are concatenated. Otherwise
        every view holds every channel: they are summed, weighted per channel by the mode's ``view_weights``.
        """
        mode = REGISTRY[self.mode]
        if mode.split_channels:
            out = torch.cat(views, 1) if len(views) > 1 else views[0]
        else:
            w = mode.view_weights(self).t().reshape(3, 1, -1, 1, 1, 1)
            out = views[0] * w[0] + views[1] * w[1] + views[2] * w[2]
        if self.bias is not None and add_bias:
            out = out + self.bias.view(1, -1, 1, 1, 1)
        return out


class ACSConv3d(ACSLayer):
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
        stride: Stride: one for every axis, or one per spatial axis ``(sx, sy, sz)``.
        padding: Padding per side (an int or ``(ph, pw)``), ``"same"``, ``"valid"``, or ``"tf_same"``
            (TensorFlow SAME, computed from the input size).
        dilation: Dilation, an int or ``(dh, dw)``.
        groups: Conv groups.
        bias: Whether to add a bias.
        padding_mode: ``zeros``, ``reflect``, ``replicate`` or ``circular``.
        mode: An ACS-family mode: ``acs``, ``soft`` or ``mean``.
        acs_kernel_split: Output channels per view for ``acs``; balanced like ``acsconv`` by default.
        replicate_dim: Spatial axis (0..2) padded by repeating its border slices instead of ``padding_mode``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        mode: str = "acs",
        acs_kernel_split: tuple[int, int, int] | None = None,
        replicate_dim: int | None = None,
    ) -> None:
        super().__init__(out_channels, mode, acs_kernel_split)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} are not divisible by groups={groups}")
        if padding_mode not in _PAD_MODES:
            raise ValueError(f"padding_mode must be one of {sorted(_PAD_MODES)}, got {padding_mode!r}")
        kernel, dil = as_pair(kernel_size), as_pair(dilation)
        pad = padding if isinstance(padding, str) else as_pair(padding)
        strides = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        self.isotropic = kernel[0] == kernel[1] and dil[0] == dil[1] and (isinstance(pad, str) or pad[0] == pad[1])
        if not self.isotropic:
            keeps_size = pad == "same" or (pad == "tf_same" and set(strides) == {1}) or (
                not isinstance(pad, str) and all(2 * p == d * (k - 1) for k, p, d in zip(kernel, pad, dil, strict=True))
            )
            if set(strides) != {1} or not keeps_size:
                raise ValueError(
                    f"a non-square ACS kernel {kernel} needs stride 1 and size-keeping padding, got stride {stride}, "
                    f"padding {padding}"
                )
        self.in_channels = in_channels
        self.kernel_size, self.stride, self.dilation, self.groups = kernel, strides, dil, groups
        self.padding, self.padding_mode, self.replicate_dim = pad, padding_mode, replicate_dim
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *kernel))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like ``nn.Conv2d``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _pads(self, length: int, i: int, axis: int) -> tuple[int, int]:
        """Padding of spatial ``axis`` (of ``length``) when it carries the 2D kernel's dim ``i``."""
        k, d = self.kernel_size[i], self.dilation[i]
        if self.padding == "tf_same":
            return tf_same_pads(length, k, self.stride[axis], d)
        if self.padding == "same":
            total = d * (k - 1)
            return total // 2, total - total // 2
        if self.padding == "valid":
            return 0, 0
        return self.padding[i], self.padding[i]

    def view_geometry(self, shape: Sequence[int], view: int) -> tuple[list[tuple[int, int]], tuple[int, int, int]]:
        """Padding per spatial axis and dilation of the view thin along spatial axis ``view``, for input ``shape``.

        The thin axis reads the centre tap of the cubic footprint, with that footprint's padding (negative: crop).
        """
        plane = [a for a in range(3) if a != view]
        view_pads: list[tuple[int, int]] = [(0, 0)] * 3
        dilation = [1, 1, 1]
        for i, axis in enumerate(plane):
            view_pads[axis] = self._pads(shape[2 + axis], i, axis)
            dilation[axis] = self.dilation[i]
        if self.isotropic:
            k, d = self.kernel_size[0], self.dilation[0]
            centre = (k - 1) // 2
            left, right = self._pads(shape[2 + view], 0, view)
            view_pads[view] = (left - centre * d, right - (k - 1 - centre) * d)
        return view_pads, tuple(dilation)  # type: ignore[return-value]

    def _view(self, x: torch.Tensor, view: int) -> torch.Tensor:
        view_pads, dilation = self.view_geometry(x.shape, view)
        modes = padding_modes(self.padding_mode, self.replicate_dim)
        native = set(modes) == {"zeros"} and all(lo == hi and lo >= 0 for lo, hi in view_pads)
        conv_padding = tuple(lo for lo, _ in view_pads) if native else 0
        lo, hi = self.view_channels(view)
        outs = []
        for o_lo, o_hi, i_lo, i_hi, groups in _group_pieces(lo, hi, self.out_channels, self.in_channels, self.groups):
            xin = x if (i_lo == 0 and i_hi == x.shape[1]) else x[:, i_lo:i_hi]
            if not native:
                xin = pad_or_crop(xin, view_pads, modes)
            weight = self.weight[o_lo:o_hi].unsqueeze(2 + view)
            bias = self.bias[o_lo:o_hi] if self.views_hold_bias else None
            outs.append(F.conv3d(xin, weight, bias, self.stride, conv_padding, dilation, groups))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    @property
    def views_hold_bias(self) -> bool:
        """Whether each view's convolution adds its own channels' bias (``acs``: no extra pass over the output)."""
        return self.bias is not None and REGISTRY[self.mode].split_channels

    def path(self, shape: Sequence[int]) -> str:
        """How :meth:`forward` computes an input of ``shape``: ``"views"`` or ``"dense"``.

        ``dense`` is one convolution whose cubic kernel holds the three views' planes mixed by the view weights
        (:meth:`dense_kernel`): the same FLOPs as the three views for ``soft`` / ``mean`` with ``k = 3``, one call
        instead of three and no full-size intermediates, and for a ``1 x 1`` kernel one convolution in every mode.
        ``views`` is the reference (one thin convolution per view, as ``acsconv`` computes them). Measured on CPU
        (2 threads, oneDNN; ``python -m benchmarks.lift_ops --paths``): for ``soft`` / ``mean`` dense pays from
        :data:`DENSE_MIN_VOXELS` output voxels per sample on (64 -> 128 channels at 8^3 output: 0.0065 s against
        0.0080; at 4^3 a padded cubic kernel costs more than three thin ones). For ``acs`` with ``k > 1`` dense has
        three times the FLOPs and loses (32 -> 32 at 32^3: 0.027 s against 0.022), except when each view computes
        only a few channels (16 -> 16, 5-6 per view, at 32^3 and 64^3: dense 21-26 % faster; 10-11 per view:
        views faster), below :data:`DENSE_BELOW_VIEW_CHANNELS`. :func:`operator_choice` forces one path.
        """
        forced = _CHOICE["path"]
        if not self.isotropic or _exporting():
            return "views"  # ONNX export: a convolution's kernel must be a weight, not one computed in the graph
        if forced is not None:
            return forced
        if self.kernel_size[0] == 1:
            return "dense"
        if REGISTRY[self.mode].split_channels:
            thinnest = min(c for c in self.acs_kernel_split if c)
            if self.groups != 1 or thinnest >= DENSE_BELOW_VIEW_CHANNELS:
                return "views"
        return "dense" if output_voxels(shape, self.stride) >= DENSE_MIN_VOXELS else "views"

    def dense_kernel(self) -> torch.Tensor:
        """The cubic kernel ``(out, in / groups, k, k, k)`` equal to the mixed views: each view's weighted 2D kernel
        in the centre plane across its thin axis."""
        k = self.kernel_size[0]
        centre = (k - 1) // 2
        weights = REGISTRY[self.mode].view_weights(self)
        kernel = 0
        for view in range(3):
            plane = self.weight * weights[:, view].view(-1, 1, 1, 1)
            pads = [0, 0] * 3
            pads[2 * (2 - view)] = centre  # F.pad lists the last dim first
            pads[2 * (2 - view) + 1] = k - 1 - centre
            kernel = kernel + F.pad(plane.unsqueeze(2 + view), pads)
        return kernel

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        pads = [self._pads(n, 0, axis) for axis, n in enumerate(x.shape[2:])]
        modes = padding_modes(self.padding_mode, self.replicate_dim)
        if set(modes) == {"zeros"} and all(lo == hi for lo, hi in pads):
            padding = tuple(lo for lo, _ in pads)
        else:
            x, padding = pad_or_crop(x, pads, modes), 0
        return F.conv3d(x, self.dense_kernel(), self.bias, self.stride, padding, self.dilation[0], self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        check_5d(x, type(self).__name__)
        layout = conv_layout(x, self.stride)
        x = in_layout(x, layout)
        if self.path(x.shape) == "dense":
            return in_layout(self._dense(x), layout)
        views = [self._view(x, v) for v in self.active_views()]
        return in_layout(self.mix_views(views, add_bias=not self.views_hold_bias), layout)

    def extra_repr(self) -> str:  # noqa: D102
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding!r}, mode={self.mode!r}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if REGISTRY[self.mode].split_channels:
            s += f", acs_kernel_split={self.acs_kernel_split}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.replicate_dim is not None:
            s += f", replicate_dim={self.replicate_dim}"
        return s


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


class ACSConvTranspose3d(ACSLayer):
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
        super().__init__(out_channels, mode)
        self.in_channels = in_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.output_padding, self.dilation = output_padding, dilation
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def _view(self, x: torch.Tensor, view: int) -> torch.Tensor:
        k, s, p, op, d = self.kernel_size, self.stride, self.padding, self.output_padding, self.dilation
        lo, hi = self.view_channels(view)
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
        return self.mix_views([self._view(x, v) for v in self.active_views()])

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, output_padding={self.output_padding}, mode={self.mode!r}"
        )
