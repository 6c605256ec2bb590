"""Converters for single torch 2D layers (the explicit type table's leaves)."""

from __future__ import annotations

import torch
from torch import nn

from .errors import LiftError, type_name
from .modes import modes_where
from .ops import (
    ACSConv3d,
    ACSConvTranspose3d,
    AvgPool3dAnySize,
    BatchNormAct3d,
    LiftedConv3d,
    SliceGroupNorm,
    SliceInstanceNorm,
)
from .resize import Interpolate3d
from .spec import LiftSpec, as_pair


def dense_modes() -> tuple[str, ...]:
    """Modes whose convolutions are dense 3D kernels (any stride, any kernel shape)."""
    return modes_where(lambda m: not m.acs_family)


def transpose_modes() -> tuple[str, ...]:
    """Dense modes that lift a transposed conv strided along the new axis."""
    return modes_where(lambda m: not m.acs_family and m.strided_transpose)


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    """Move ``new`` to ``old``'s device and floating dtype; keep ``requires_grad`` flags by name."""
    ref = next((t for t in list(old.parameters()) + list(old.buffers()) if t.is_floating_point()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    flags = {n: p.requires_grad for n, p in old.named_parameters()}
    for n, p in new.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    new.train(old.training)
    return new


def expand_kernel(w: torch.Tensor, spec: LiftSpec, extent: int, transposed_stride: int | None = None) -> torch.Tensor:
    """Turn a 2D kernel ``(A, B, kh, kw)`` into a 3D one with ``extent`` taps along the new axis (the mode's ``fill``).

    Args:
        w: The 2D kernel.
        spec: The lift spec (its mode has a ``fill``).
        extent: Kernel extent along the new axis.
        transposed_stride: Stride along the new axis for transposed convs, else ``None``.

    Returns:
        The 3D kernel.
    """
    dim = 2 + spec.new_dim
    taps = extent / transposed_stride if transposed_stride else extent
    return spec.mode.fill(w.detach().unsqueeze(dim), dim, extent, taps)


def _keeps_size(kernel: int, padding: int | str, dilation: int, tf_same: bool) -> bool:
    """Whether a stride-1 conv of this geometry keeps the length of an axis."""
    if tf_same or padding == "same":
        return True
    if padding == "valid":
        return kernel == 1
    return 2 * padding == dilation * (kernel - 1)


def _check_kept(spec: LiftSpec, m: nn.Module, path: str, k: int, s: int, p: int | str, d: int, tf_same: bool) -> None:
    """Inside a kept prefix, a conv strided along the new axis must keep the axis' length at stride 1."""
    if spec.keep_axis and s != 1 and not _keeps_size(k, p, d, tf_same):
        raise LiftError(
            f"cannot keep the resolution along axis {spec.axis!r}: at stride 1 a kernel of {k} with padding {p!r} "
            "changes the length (keep_axis_resolution needs odd kernels with size-keeping padding there)",
            path=path, module_type=type_name(m),
        )


def lift_conv(m: nn.Conv2d, spec: LiftSpec, path: str, tf_same: bool = False) -> nn.Module:
    """Lift a ``Conv2d`` (or a TensorFlow-"same" conv when ``tf_same``)."""
    k, s, d = as_pair(m.kernel_size), as_pair(m.stride), as_pair(m.dilation)
    p = m.padding if isinstance(m.padding, str) else as_pair(m.padding)
    if tf_same:
        p = (0, 0)
    bias = m.bias is not None
    replicate = spec.new_dim if spec.axis_padding == "replicate" else None
    if spec.mode.acs_family:
        if s[0] != s[1]:
            raise LiftError(
                f"ACS needs the same stride on both axes, got {s}", path=path, module_type=type_name(m),
                modes=dense_modes(),
            )
        _check_kept(spec, m, path, k[0], s[0], p if isinstance(p, str) else p[0], d[0], tf_same)
        strides = spec.triple(s, 1 if spec.keep_axis else s[0])
        try:
            new = ACSConv3d(
                m.in_channels, m.out_channels, k, strides, "tf_same" if tf_same else p, d, m.groups, bias,
                m.padding_mode, spec.mode.name, replicate_dim=replicate,
            )
        except ValueError as err:
            raise LiftError(str(err), path=path, module_type=type_name(m), modes=dense_modes()) from None
        with torch.no_grad():
            new.weight.copy_(m.weight)
            if bias:
                new.bias.copy_(m.bias)
        return _like(new, m)
    k3, s3, p3, d3 = spec.lift_geometry(k, s, p, d)
    kn, pn = k3[spec.new_dim], p3 if isinstance(p3, str) else p3[spec.new_dim]
    _check_kept(spec, m, path, kn, s[0] if s[0] == s[1] else 1, pn, d3[spec.new_dim], tf_same)
    if isinstance(p3, str) and p3 == "same" and any(x != 1 for x in s3):
        raise LiftError("padding='same' with stride > 1 has no 3D counterpart", path=path, module_type=type_name(m))
    if replicate is not None and (kn == 1 or p3 == "valid" or (not tf_same and pn == 0)):
        replicate = None  # nothing to pad along the new axis
    if replicate is not None and isinstance(p3, str):
        raise LiftError(f"axis_padding='replicate' needs integer padding, got padding={p3!r}", path=path,
                        module_type=type_name(m))
    new = _construct(
        LiftedConv3d, spec, m.in_channels, m.out_channels, k3, s3, 0 if tf_same else p3, d3, m.groups, bias,
        "zeros" if tf_same else m.padding_mode, tf_same=tf_same, replicate_dim=replicate,
    )
    if spec.mode.fill is not None:
        with torch.no_grad():
            new.weight.copy_(expand_kernel(m.weight, spec, kn))
            if bias:
                new.bias.copy_(m.bias)
    return _like(new, m)


def _construct(cls: type[nn.Module], spec: LiftSpec, *args: object, **kwargs: object) -> nn.Module:
    """``cls(*args, **kwargs)``, without the random initialisation when the mode fills every weight from the 2D
    layer (the larger 3D kernels would be initialised only to be overwritten)."""
    if spec.mode.fill is None:
        return cls(*args, **kwargs)
    return torch.nn.utils.skip_init(cls, *args, **kwargs)


def lift_conv_transpose(m: nn.ConvTranspose2d, spec: LiftSpec, path: str) -> nn.Module:
    """Lift a ``ConvTranspose2d`` (ACS modes: :class:`ACSConvTranspose3d`).

    Inside a kept prefix a transposed conv whose kernel equals its stride along the new axis (one tap per output
    plane) gets kernel 1 and stride 1 there: that one plane is the 2D kernel (the inflated kernel's repeated plane
    times the taps it was divided by).
    """
    if spec.mode.acs_family:
        k, s, p, op, d = (as_pair(v) for v in (m.kernel_size, m.stride, m.padding, m.output_padding, m.dilation))
        if m.groups != 1 or any(a != b for a, b in (k, s, p, op, d)) or m.padding_mode != "zeros":
            raise LiftError(
                "ACS transposed convs need groups=1, zero padding and equal kernel/stride/padding/dilation on both "
                f"axes, got groups={m.groups}, kernel {k}, stride {s}, padding {p}, output_padding {op}, dilation {d}",
                path=path, module_type=type_name(m), modes=transpose_modes(),
            )
        if spec.keep_axis and s[0] != 1:
            raise LiftError(
                f"an ACS transposed conv cannot keep the resolution along axis {spec.axis!r}: its views carry the 2D "
                "kernel along that axis", path=path, module_type=type_name(m), modes=transpose_modes(),
            )
        new = ACSConvTranspose3d(
            m.in_channels, m.out_channels, k[0], s[0], p[0], op[0], d[0], m.bias is not None, spec.mode.name
        )
        with torch.no_grad():
            new.weight.copy_(m.weight)
            if m.bias is not None:
                new.bias.copy_(m.bias)
        return _like(new, m)
    k3, s3, p3, d3 = spec.lift_geometry(m.kernel_size, m.stride, m.padding, m.dilation)
    op = as_pair(m.output_padding)
    new_op = 0 if (spec.per_slice or op[0] != op[1] or k3[spec.new_dim] == 1) else op[0]
    if spec.keep_axis and as_pair(m.stride)[0] != 1 and k3[spec.new_dim] != 1:
        s2 = as_pair(m.stride)[0]
        if k3[spec.new_dim] != s2 or p3[spec.new_dim] or new_op:
            raise LiftError(
                f"cannot keep the resolution along axis {spec.axis!r}: only a transposed conv whose kernel equals its "
                f"stride (and no padding) can, got kernel {k3[spec.new_dim]}, stride {s2}, padding "
                f"{p3[spec.new_dim]}", path=path, module_type=type_name(m),
            )
        k3, p3 = spec.triple(m.kernel_size, 1), spec.triple(m.padding, 0)
    op3 = spec.triple(op, new_op)
    sn, kn = s3[spec.new_dim], k3[spec.new_dim]
    if not spec.mode.strided_transpose and sn > 1:
        raise LiftError(
            f"{spec.mode.name} on a transposed conv with stride {sn} along the new axis leaves "
            f"{sn - 1} of every {sn} output planes without input",
            path=path, module_type=type_name(m), modes=transpose_modes(),
        )
    bias = m.bias is not None
    new = _construct(nn.ConvTranspose3d, spec, m.in_channels, m.out_channels, k3, s3, p3, op3, m.groups, bias, d3,
                     m.padding_mode)
    if spec.mode.fill is not None:
        with torch.no_grad():
            new.weight.copy_(expand_kernel(m.weight, spec, kn, transposed_stride=sn))
            if bias:
                new.bias.copy_(m.bias)
    return _like(new, m)


def lift_batchnorm(m: nn.BatchNorm2d, spec: LiftSpec, path: str,
                   cls: type[nn.BatchNorm3d] | None = None) -> nn.Module:
    """BatchNorm2d -> BatchNorm3d (timm's BatchNormAct2d -> :class:`BatchNormAct3d`; a registered subclass -> its
    `cls`), statistics kept."""
    if cls is None:
        cls = BatchNormAct3d if type(m) is not nn.BatchNorm2d else nn.BatchNorm3d
    new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    keep_activation(new, m)
    new.load_state_dict(m.state_dict())
    return _like(new, m)


def keep_activation(new: nn.Module, old: nn.Module) -> None:
    """A norm that replaces timm's norm-and-activation layer keeps its `drop` and `act` children."""
    if hasattr(old, "act"):
        new.drop, new.act = old.drop, old.act


def lift_instancenorm(m: nn.InstanceNorm2d, spec: LiftSpec, path: str) -> nn.Module:
    """InstanceNorm2d -> InstanceNorm3d (per slice in 2.5d), affine parameters and running statistics kept."""
    if spec.per_slice:
        new = SliceInstanceNorm(
            m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, slice_dim=2 + spec.new_dim
        )
    else:
        new = nn.InstanceNorm3d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    new.load_state_dict(m.state_dict())
    return _like(new, m)


def lift_groupnorm(m: nn.GroupNorm, spec: LiftSpec, path: str) -> nn.Module:
    """GroupNorm works on any shape; in 2.5d its statistics are taken per slice, as the 2D model does."""
    if not spec.per_slice:
        return m
    new = SliceGroupNorm(m.num_groups, m.num_channels, m.eps, m.affine, slice_dim=2 + spec.new_dim)
    new.load_state_dict(m.state_dict())
    return _like(new, m)


def lift_maxpool(m: nn.MaxPool2d, spec: LiftSpec, path: str) -> nn.Module:
    """MaxPool2d -> MaxPool3d (2.5d: extent 1 along the slice axis)."""
    k3, s3, p3, d3 = spec.lift_geometry(
        m.kernel_size, m.stride if m.stride else m.kernel_size, m.padding, m.dilation, pool=True
    )
    return nn.MaxPool3d(k3, s3, p3, d3, m.return_indices, m.ceil_mode)


def lift_avgpool(m: nn.AvgPool2d, spec: LiftSpec, path: str) -> nn.Module:
    """AvgPool2d -> AvgPool3d (a divisor override is scaled by the new extent)."""
    k3, s3, p3, _ = spec.lift_geometry(m.kernel_size, m.stride if m.stride else m.kernel_size, m.padding, pool=True)
    div = m.divisor_override
    if div:
        div = div * k3[spec.new_dim]
    return AvgPool3dAnySize(k3, s3, p3, m.ceil_mode, m.count_include_pad, div)


def _adaptive_size(size: object, spec: LiftSpec) -> tuple:
    h, w = as_pair(size)
    new = None if (spec.per_slice or h != w) else h
    return spec.triple((h, w), new)


def lift_adaptive_avgpool(m: nn.AdaptiveAvgPool2d, spec: LiftSpec, path: str) -> nn.Module:
    """AdaptiveAvgPool2d -> AdaptiveAvgPool3d (2.5d keeps the slice axis)."""
    return nn.AdaptiveAvgPool3d(_adaptive_size(m.output_size, spec))


def lift_adaptive_maxpool(m: nn.AdaptiveMaxPool2d, spec: LiftSpec, path: str) -> nn.Module:
    """AdaptiveMaxPool2d -> AdaptiveMaxPool3d (2.5d keeps the slice axis)."""
    return nn.AdaptiveMaxPool3d(_adaptive_size(m.output_size, spec), m.return_indices)


def lift_upsample(m: nn.Upsample, spec: LiftSpec, path: str) -> nn.Module:
    """Upsample / UpsamplingNearest2d / UpsamplingBilinear2d -> :class:`Interpolate3d`."""
    try:
        return Interpolate3d.from_2d(spec, m.size, m.scale_factor, m.mode, m.align_corners)
    except ValueError as err:
        raise LiftError(str(err), path=path, module_type=type_name(m)) from None


_PADS_3D = {
    nn.ZeroPad2d: nn.ZeroPad3d,
    nn.ConstantPad2d: nn.ConstantPad3d,
    nn.ReflectionPad2d: nn.ReflectionPad3d,
    nn.ReplicationPad2d: nn.ReplicationPad3d,
    nn.CircularPad2d: nn.CircularPad3d,
}


def lift_pad(m: nn.Module, spec: LiftSpec, path: str) -> nn.Module:
    """Padding modules: the new axis gets the padding both in-plane axes agree on (none in 2.5d)."""
    left, right, top, bottom = m.padding
    per_dim = [None, None, None]
    per_dim[spec.plane_dims[0]] = (top, bottom)
    per_dim[spec.plane_dims[1]] = (left, right)
    per_dim[spec.new_dim] = (0, 0) if (spec.per_slice or (left, right) != (top, bottom)) else (left, right)
    flat = tuple(v for pair in reversed(per_dim) for v in pair)
    cls = _PADS_3D[type(m)]
    return cls(flat, m.value) if cls is nn.ConstantPad3d else cls(flat)


def lift_dropout2d(m: nn.Dropout2d, spec: LiftSpec, path: str) -> nn.Module:
    """Dropout2d (whole channels) -> Dropout3d."""
    return nn.Dropout3d(m.p, m.inplace)


#: Exact torch types converted to a 3D layer.
TORCH_TABLE = {
    nn.Conv2d: lift_conv,
    nn.ConvTranspose2d: lift_conv_transpose,
    nn.BatchNorm2d: lift_batchnorm,
    nn.InstanceNorm2d: lift_instancenorm,
    nn.GroupNorm: lift_groupnorm,
    nn.MaxPool2d: lift_maxpool,
    nn.AvgPool2d: lift_avgpool,
    nn.AdaptiveAvgPool2d: lift_adaptive_avgpool,
    nn.AdaptiveMaxPool2d: lift_adaptive_maxpool,
    nn.Upsample: lift_upsample,
    nn.UpsamplingNearest2d: lift_upsample,
    nn.UpsamplingBilinear2d: lift_upsample,
    nn.Dropout2d: lift_dropout2d,
    **{t: lift_pad for t in _PADS_3D},
}

#: torch types that work unchanged on 5D tensors (elementwise, channel-wise or containers).
TORCH_AGNOSTIC = frozenset(
    {
        nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity,
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
        nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Softsign,
        nn.Tanhshrink, nn.Threshold, nn.LogSigmoid,
        nn.Dropout, nn.AlphaDropout, nn.Linear, nn.Flatten,
    }
)

#: Softmax-like modules are agnostic only when they act on the channel axis.
TORCH_CHANNEL_WISE = frozenset({nn.Softmax, nn.LogSoftmax, nn.Softmin})

#: Already-3D torch types (left alone when met).
TORCH_3D = frozenset(
    {
        nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.InstanceNorm3d, nn.MaxPool3d, nn.AvgPool3d,
        nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.Dropout3d, nn.ZeroPad3d, nn.ConstantPad3d,
        nn.ReflectionPad3d, nn.ReplicationPad3d, nn.CircularPad3d, SliceGroupNorm, SliceInstanceNorm,
        AvgPool3dAnySize, LiftedConv3d,
    }
)
