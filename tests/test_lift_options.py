"""lift() options that act along the new axis (keep_axis_resolution, axis_padding) and the mode declaration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gandlf_dimlift.lift import MODES, REGISTRY, LiftError, LiftMode, lift
from gandlf_dimlift.lift.modes import repeat_kernel

AXIS_DIM = {"x": 2, "y": 3, "z": 4}


def _plane(x3: torch.Tensor, axis: str) -> torch.Tensor:
    """The first slice across ``axis`` of a volume, as a 2D batch."""
    return x3.select(AXIS_DIM[axis], 0)


def _constant_along(x2: torch.Tensor, axis: str, n: int) -> torch.Tensor:
    """A volume whose slices across ``axis`` all equal the 2D image ``x2``."""
    dim = AXIS_DIM[axis]
    return x2.unsqueeze(dim).expand(*x2.shape[:dim], n, *x2.shape[dim:]).contiguous()


class _Thick(nn.Module):
    """Stem at full resolution, a down stage, a transposed-conv up stage; the stem's stride is kept in tests."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(2, 6, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 2, 2)
        self.head = nn.Sequential(nn.ConvTranspose2d(6, 4, 2, 2), nn.Upsample(scale_factor=2), nn.Conv2d(4, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(self.down(self.stem(x))))


@pytest.mark.parametrize("axis", ["x", "y"])
def test_keep_axis_resolution_along_another_axis(axis: str) -> None:
    net = _Thick().eval()
    lifted = lift(net, "inflate", axis, keep_axis_resolution=["stem", "head"], axis_padding="replicate").eval()
    dim = AXIS_DIM[axis]
    x2 = torch.randn(1, 2, 16, 16)
    x3 = _constant_along(x2, axis, 8)
    with torch.no_grad():
        stem = lifted.stem(x3)
        out = lifted(x3)
        ref = net(x2)
    # the kept stem does not stride or pool along the axis; the in-plane axes shrink by 4
    assert stem.shape[dim] == 8 and [stem.shape[d] for d in (2, 3, 4) if d != dim] == [4, 4]
    # down strides the axis (8 -> 4), up restores it (not kept), the kept head keeps it
    assert out.shape[dim] == 8
    # replicate padding: a volume constant along the axis gives the 2D network on every slice
    torch.testing.assert_close(out, _constant_along(ref, axis, 8), rtol=1e-5, atol=1e-5)
    # the kept transposed conv has kernel 1 and stride 1 along the axis, and holds the 2D kernel
    up3 = lifted.head[0]
    assert up3.kernel_size[dim - 2] == 1 and up3.stride[dim - 2] == 1
    torch.testing.assert_close(up3.weight.squeeze(dim), net.head[0].weight)
    assert list(lifted.state_dict()) == list(net.state_dict())


@pytest.mark.parametrize("mode", ["inflate", "inflate_center", "conv3d", "acs", "soft"])
@pytest.mark.parametrize("axis", ["y", "z"])
def test_replicate_padding_is_a_zero_padded_conv_on_replicated_borders(mode: str, axis: str) -> None:
    # along the axis, replicate padding == pad the input by repeating its border slices, then convolve unpadded
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    rep = lift(conv, mode, axis, axis_padding="replicate").eval()
    zero = lift(conv, mode, axis).eval()
    zero.load_state_dict(rep.state_dict())
    dim = AXIS_DIM[axis]
    x = torch.randn(2, 3, 7, 6, 5)
    pads = [0] * 6
    pads[2 * (4 - dim) : 2 * (4 - dim) + 2] = [1, 1]
    with torch.no_grad():
        expected = zero(F.pad(x, pads, mode="replicate")).narrow(dim, 1, x.shape[dim])
        torch.testing.assert_close(rep(x), expected, rtol=1e-5, atol=1e-5)


def test_replicate_padding_includes_tensorflow_same_convs() -> None:
    timm = pytest.importorskip("timm")
    same = timm.layers.create_conv2d(3, 4, 3, stride=2, padding="same")
    assert type(same).__name__ == "Conv2dSame"
    lifted = lift(nn.Sequential(same), "inflate", "x", axis_padding="replicate")
    x2 = torch.randn(1, 3, 9, 10)
    with torch.no_grad():
        out = lifted(_constant_along(x2, "x", 9))
        torch.testing.assert_close(out, _constant_along(same(x2), "x", 5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["acs", "mean"])
def test_acs_keeps_the_axis_resolution(mode: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
    kept = lift(nn.Sequential(conv), mode, "y", keep_axis_resolution=[""])
    assert kept[0].stride == (2, 1, 2)
    x = torch.randn(1, 3, 8, 8, 8)
    with torch.no_grad():
        assert kept(x).shape == (1, 6, 4, 8, 4)
        # along the kept axis the stride-1 conv reads every slice the strided one read every other of
        strided = lift(conv, mode, "y")
        strided.load_state_dict(kept[0].state_dict())
        torch.testing.assert_close(kept(x)[:, :, :, ::2], strided(x), rtol=1e-5, atol=1e-5)


def test_keep_axis_resolution_errors_name_the_module() -> None:
    with pytest.raises(ValueError, match=r"keep_axis_resolution names no module at \['stme'\].*'stem'"):
        lift(_Thick(), "inflate", keep_axis_resolution=["stme"])
    even = nn.Sequential(nn.Conv2d(3, 4, 2, stride=2))
    with pytest.raises(LiftError, match=r"module '0' .*cannot keep the resolution along axis 'z'.*kernel of 2"):
        lift(even, "inflate", keep_axis_resolution=["0"])
    up = nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1))
    with pytest.raises(LiftError, match=r"module '0' .*only a transposed conv whose kernel equals its stride"):
        lift(up, "inflate", "x", keep_axis_resolution=["0"])
    with pytest.raises(ValueError, match=r"unknown axis_padding 'reflect'; valid values are 'zeros', 'replicate'"):
        lift(nn.Conv2d(1, 1, 1), "inflate", axis_padding="reflect")


def test_keep_prefix_matches_whole_path_components() -> None:
    net = nn.Sequential(*[nn.Conv2d(2, 2, 3, stride=2, padding=1) for _ in range(11)])
    lifted = lift(net, "inflate", keep_axis_resolution=["1"], check=False)
    assert lifted[1].stride == (2, 2, 1) and lifted[10].stride == (2, 2, 2)


# ---- the mode declaration ---------------------------------------------------------------------


def test_every_mode_is_declared_once() -> None:
    assert MODES == tuple(REGISTRY) == ("acs", "soft", "mean", "inflate", "inflate_center", "2.5d", "conv3d")
    for name, mode in REGISTRY.items():
        assert mode.name == name and mode.summary
        assert mode.acs_family != (mode.fill is not None or name == "conv3d"), name


def _first_plane(w: torch.Tensor, dim: int, extent: int, taps: float) -> torch.Tensor:
    out = torch.zeros_like(w).repeat_interleave(extent, dim=dim)
    out.narrow(dim, 0, 1).copy_(w)
    return out


def _slice_view_only(module: nn.Module) -> torch.Tensor:
    weights = torch.zeros(module.out_channels, 3, dtype=module.weight.dtype)
    weights[:, 2] = 1
    return weights


def test_a_new_mode_is_one_entry_plus_its_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    # a dense mode: its operator fills the new axis
    monkeypatch.setitem(REGISTRY, "inflate_first", LiftMode("inflate_first", "kernel in the first plane",
                                                            fill=_first_plane))
    w = lift(conv, "inflate_first").weight
    assert torch.equal(w[..., 0], conv.weight) and not w[..., 1:].any()
    # an ACS-family mode: its operator weighs the three views; only the view thin along Z is the 2.5d conv
    monkeypatch.setitem(REGISTRY, "z_view", LiftMode("z_view", "the view thin along Z", view_weights=_slice_view_only))
    x = torch.randn(1, 3, 5, 6, 7)
    with torch.no_grad():
        torch.testing.assert_close(lift(conv, "z_view")(x), lift(conv, "2.5d")(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="valid modes are 'acs'.*'z_view'"):
        lift(conv, "bogus")
    assert repeat_kernel(conv.weight[..., None], 4, 1, 1).shape == (4, 3, 3, 3, 1)
