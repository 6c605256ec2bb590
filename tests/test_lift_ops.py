"""The tuned operator paths equal the reference operators (forward and gradients), and the choice between them."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gandlf_dimlift.lift import lift
from gandlf_dimlift.lift.ops import (
    CHANNELS_LAST_MIN_VOXELS,
    DENSE_BELOW_VIEW_CHANNELS,
    DENSE_MIN_VOXELS,
    ACSConv3d,
    LiftedConv3d,
    channels_last,
    operator_choice,
    tf_same_pads,
)

CL = torch.channels_last_3d


def _assert_same(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    """Equal within 1e-5 of each tensor's scale (fp32; gradients sum over the volume)."""
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


def _run(module: nn.Module, x: torch.Tensor, **choice) -> list[torch.Tensor]:
    """Output and the gradients of input and parameters under an operator choice (a fixed, non-uniform loss)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with operator_choice(**choice):
        y = module(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in module.parameters()]


REFERENCE = {"path": "views", "channels_last": False}

# (kernel, stride, padding, dilation, groups): odd and even kernels, strides 1 and 2, groups, dilation
GEOMETRIES = [
    (3, 1, 1, 1, 1), (3, 2, 1, 1, 1), (1, 2, 0, 1, 1), (5, 1, 2, 1, 4), (3, 1, 2, 2, 1), (2, 2, 0, 1, 1),
    (3, 1, 0, 1, 1), (3, 1, "same", 1, 2), (3, 2, "tf_same", 1, 1), (4, 1, "tf_same", 1, 4),
]


@pytest.mark.parametrize("mode", ["acs", "soft", "mean"])
@pytest.mark.parametrize(("k", "stride", "padding", "dilation", "groups"), GEOMETRIES)
def test_acs_dense_path_equals_the_views(mode, k, stride, padding, dilation, groups) -> None:
    torch.manual_seed(0)
    conv = ACSConv3d(8, 12, k, stride, padding, dilation, groups, mode=mode)
    if mode == "soft":
        with torch.no_grad():
            conv.soft_w_core.normal_()  # unequal mixing, so each view's weight matters
    for shape in ((7, 8, 9), (6, 6, 6)):  # odd and even sizes
        x = torch.randn(2, 8, *shape)
        _assert_same(_run(conv, x, path="dense"), _run(conv, x, **REFERENCE))
        _assert_same(_run(conv, x), _run(conv, x, **REFERENCE))  # the chosen path, channels-last


@pytest.mark.parametrize(("padding_mode", "replicate_dim"), [("reflect", None), ("circular", 1), ("zeros", 2),
                                                              ("replicate", None)])
@pytest.mark.parametrize("mode", ["acs", "soft"])
def test_acs_dense_path_padding_modes(padding_mode: str, replicate_dim: int | None, mode: str) -> None:
    torch.manual_seed(0)
    conv = ACSConv3d(6, 6, 3, (1, 2, 1), 1, 1, 2, padding_mode=padding_mode, mode=mode, replicate_dim=replicate_dim)
    x = torch.randn(1, 6, 5, 8, 7)
    _assert_same(_run(conv, x, path="dense"), _run(conv, x, **REFERENCE))


class _PadThenConv(nn.Module):
    """Reference: pad every axis in its own mode (TensorFlow "SAME" amounts when asked), then a valid conv."""

    def __init__(self, conv: nn.Conv3d, modes: list[str], tf_same: bool) -> None:
        super().__init__()
        self.conv, self.modes, self.tf_same = conv, modes, tf_same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for d in (2, 1, 0):
            k, s = self.conv.kernel_size[d], self.conv.stride[d]
            pad = tf_same_pads(x.shape[2 + d], k, s, 1) if self.tf_same else ((k - 1) // 2, (k - 1) // 2)
            flat = [0] * 6
            flat[2 * (2 - d) : 2 * (2 - d) + 2] = pad
            x = F.pad(x, flat, mode={"zeros": "constant"}.get(self.modes[d], self.modes[d]))
        return self.conv(x)


@pytest.mark.parametrize(("groups", "stride", "padding_mode", "tf_same", "replicate_dim"), [
    (1, 1, "zeros", False, None), (1, 2, "reflect", False, None), (6, 1, "zeros", True, None),
    (6, 2, "zeros", True, None), (3, 2, "zeros", False, 2), (1, 1, "circular", False, 0), (2, 2, "zeros", True, 1),
])
def test_lifted_conv_in_channels_last_equals_the_reference(groups, stride, padding_mode, tf_same, replicate_dim):
    torch.manual_seed(0)
    conv = LiftedConv3d(6, 6, 3, stride, 0 if tf_same else 1, 1, groups, True, padding_mode, tf_same=tf_same,
                        replicate_dim=replicate_dim)
    modes = ["replicate" if d == replicate_dim else padding_mode for d in range(3)]
    reference = _PadThenConv(nn.Conv3d(6, 6, 3, stride, 0, 1, groups, True), modes, tf_same)
    reference.conv.load_state_dict(conv.state_dict())
    for shape in ((7, 8, 9), (6, 6, 6), (31, 32, 33)):  # the last computes in channels-last at strides 1 and 2
        x = torch.randn(2, 6, *shape)
        _assert_same(_run(conv, x), _run(reference, x, channels_last=False))
    assert conv(x).is_contiguous(memory_format=CL)


def test_channels_last_choice_by_output_size() -> None:
    assert CHANNELS_LAST_MIN_VOXELS == 16**3
    large = torch.randn(2, 4, 32, 32, 32)
    small = torch.randn(2, 4, 15, 16, 16)  # below CHANNELS_LAST_MIN_VOXELS: the standard layout
    assert LiftedConv3d(4, 4, 3, 1, 1)(large).is_contiguous(memory_format=CL)
    assert LiftedConv3d(4, 4, 3, 1, 1)(small.contiguous(memory_format=CL)).is_contiguous()
    assert LiftedConv3d(4, 4, 3, 2, 1, groups=4)(large).is_contiguous(memory_format=CL)  # 16^3 output
    assert LiftedConv3d(4, 4, 3, 2, 1, groups=4)(torch.randn(2, 4, 16, 32, 32)).is_contiguous()  # 8 x 16 x 16
    assert ACSConv3d(4, 6, 3, 1, 1, mode="acs")(large).is_contiguous(memory_format=CL)
    assert ACSConv3d(4, 6, 3, 2, 1, mode="acs")(large).is_contiguous(memory_format=CL)
    with operator_choice(channels_last=False):
        assert LiftedConv3d(4, 4, 3, 1, 1)(large).is_contiguous()
    slices = torch.randn(3, 3, 80, 80)
    assert channels_last(slices).is_contiguous(memory_format=torch.channels_last)
    assert channels_last(torch.randn(3, 3, 80, 79)).is_contiguous()  # below CHANNELS_LAST_MIN_PIXELS: kept
    with operator_choice(channels_last=False):
        assert channels_last(slices).is_contiguous()


def test_path_choice_on_both_branches() -> None:
    big = (2, 4) + (8, 8, 8)  # DENSE_MIN_VOXELS output voxels per sample at stride 1
    small = (2, 4) + (7, 8, 8)
    assert 8**3 == DENSE_MIN_VOXELS and DENSE_BELOW_VIEW_CHANNELS == 8
    soft = ACSConv3d(4, 6, 3, 1, 1, mode="soft")
    assert soft.path(big) == "dense" and soft.path(small) == "views"
    strided = ACSConv3d(4, 6, 3, 2, 1, mode="mean")
    assert strided.path((2, 4, 16, 16, 16)) == "dense" and strided.path((2, 4, 14, 16, 16)) == "views"
    acs = ACSConv3d(4, 24, 3, 1, 1, mode="acs")  # 8 output channels per view
    assert acs.path(big) == "views"  # a cubic kernel would triple acs's FLOPs
    thin = ACSConv3d(4, 16, 3, 1, 1, mode="acs")  # 6, 5, 5 per view: oneDNN's thin convolutions are slower
    assert thin.path(big) == "dense" and thin.path(small) == "views"
    assert ACSConv3d(4, 16, 3, 1, 1, mode="acs", groups=2).path(big) == "views"  # measured for groups 1 only
    assert ACSConv3d(4, 6, 1, 2, 0, mode="acs").path(small) == "dense"  # a 1x1 conv: every view is the same conv
    assert ACSConv3d(4, 6, (1, 3), 1, (0, 1), mode="soft").path(big) == "views"  # non-square: views only
    with operator_choice(path="views"):
        assert soft.path(big) == "views"
    with operator_choice(path="dense"):
        assert acs.path(small) == "dense"
    with pytest.raises(ValueError, match="unknown ACS path 'fast'; valid paths are"):
        with operator_choice(path="fast"):
            pass


def test_soft_mixing_weights_get_gradients_in_the_dense_path() -> None:
    # DDP (find_unused_parameters=False) needs a gradient for every parameter, on either path
    for k in (1, 3):
        conv = ACSConv3d(4, 6, k, 1, k // 2, mode="soft")
        out = conv(torch.randn(1, 4, 16, 16, 16))
        assert conv.path(out.shape) == "dense"
        out.square().sum().backward()
        assert conv.soft_w_core.grad is not None


@pytest.mark.parametrize("mode", ["acs", "soft", "inflate", "2.5d"])
def test_lifted_model_equals_the_reference_and_returns_the_input_layout(mode: str) -> None:
    # float64: a network's parameter gradients are sums over the volume with cancellation (a soft mixing weight of
    # a 1x1 conv has a zero gradient); in float32 their rounding alone exceeds any tolerance relative to them
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        nn.Conv2d(8, 8, 1), nn.Upsample(scale_factor=2), nn.Conv2d(8, 3, 3, padding=1),
    ).double()
    lifted = lift(net, mode).train()
    x = torch.randn(2, 2, 16, 16, 16, dtype=torch.float64)
    ours, ref = _run(lifted, x), _run(lifted, x, **REFERENCE)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * max(1.0, b.abs().max().item()))
    assert ours[0].is_contiguous()  # a standard input (as GaNDLF gives) leaves in the standard layout
    last = lifted(x.contiguous(memory_format=CL))
    assert last.is_contiguous(memory_format=CL) and not last.is_contiguous()
    torch.testing.assert_close(last, ours[0], rtol=1e-10, atol=1e-10 * max(1.0, ours[0].abs().max().item()))


def test_every_combination_of_choices_runs() -> None:
    conv = ACSConv3d(4, 6, 3, 1, 1, mode="mean")
    x = torch.randn(1, 4, 8, 8, 8)
    outs = []
    for path, layout in itertools.product(("views", "dense", None), (True, False)):
        with operator_choice(path=path, channels_last=layout):
            outs.append(conv(x))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


def test_lifted_convolutions_export_to_onnx_at_sizes_that_compute_in_channels_last() -> None:
    """ONNX has no memory formats: a layout change in the traced graph fails the export (GaNDLF's optimize step)."""
    import io

    model = nn.Sequential(LiftedConv3d(1, 4, 3, 1, 1), ACSConv3d(4, 4, 3, 1, 1, mode="soft"))
    x = torch.randn(1, 1, 32, 32, 32)
    buffer = io.BytesIO()
    torch.onnx.export(model.eval(), x, buffer, opset_version=11)
    assert buffer.getbuffer().nbytes > 0
