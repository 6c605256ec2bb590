"""Tests of the lifting core (gandlf_dimlift.lift): exactness per mode, strictness, round trips."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from gandlf_dimlift.lift import AXES, MODES, LiftError, adapt_input_channels, lift

smp = pytest.importorskip("segmentation_models_pytorch")


def _encoder(name: str) -> nn.Module:
    torch.manual_seed(0)
    enc = smp.encoders.get_encoder(name, in_channels=3, depth=5, weights=None)
    # non-trivial running statistics, so eval-mode equivalence also checks that they were kept
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return enc.eval()


# (encoder, feature levels checked, slices): for this many slices the two central slices of these
# levels lie outside the reach of the zero padding at both ends of the slice axis
@pytest.mark.parametrize(("name", "levels", "depth"), [("resnet18", 3, 64), ("efficientnet-b0", 3, 64)])
def test_inflate_constant_volume_matches_2d(name: str, levels: int, depth: int) -> None:
    enc = _encoder(name)
    lifted = lift(enc, "inflate")
    x2 = torch.randn(1, 3, 32, 32)
    x3 = x2[..., None].expand(-1, -1, -1, -1, depth).contiguous()
    with torch.no_grad():
        f2, f3 = enc(x2), lifted(x3)
    assert len(f2) == len(f3)
    for level in range(levels):
        a, b = f2[level], f3[level]
        assert b.shape[:4] == a.shape
        n = b.shape[-1]
        interior = b[..., n // 2 - 1 : n // 2 + 1]
        err = (interior - a[..., None]).abs().max().item()
        assert err < 1e-4, f"{name} level {level}: max error {err}"


def _per_slice(module2d: nn.Module, x3: torch.Tensor, axis: int = 4):
    """Run a 2D module on every slice of ``x3`` along ``axis`` and stack the outputs along it."""
    outs = [module2d(x3.select(axis, i)) for i in range(x3.shape[axis])]
    if isinstance(outs[0], (list, tuple)):
        return [torch.stack([o[j] for o in outs], dim=axis) for j in range(len(outs[0]))]
    return torch.stack(outs, dim=axis)


def _conv_stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        nn.Conv2d(8, 12, (1, 5), padding=(0, 2), bias=False),
        nn.Conv2d(12, 6, 3, padding=2, dilation=2, padding_mode="reflect"),
    ).eval()


@pytest.mark.parametrize(("axis", "dim"), [("z", 4), ("x", 2), ("y", 3)])
def test_2p5d_conv_stack_equals_slice_by_slice(axis: str, dim: int) -> None:
    net = _conv_stack()
    lifted = lift(net, "2.5d", axis)
    x = torch.randn(2, 3, 10, 12, 7)
    with torch.no_grad():
        assert torch.allclose(lifted(x), _per_slice(net, x, dim), atol=1e-5)


_SLOW_2P5D = [
    "timm-resnest14d", "timm-skresnext50_32x4d", "timm-regnety_002", "timm-res2net50_26w_4s",
    "timm-efficientnet-b0", "timm-tf_efficientnet_lite0", "timm-mobilenetv3_small_100", "timm-gernet_s",
    "mobileone_s4", "dpn68", "densenet121", "vgg11_bn", "se_resnext50_32x4d", "xception", "mobilenet_v2",
    "inceptionv4",
]


@pytest.mark.parametrize(
    "name",
    ["resnet18", "efficientnet-b0", "timm-skresnet18"] + [pytest.param(n, marks=pytest.mark.slow) for n in _SLOW_2P5D],
)
def test_2p5d_encoder_equals_slice_by_slice(name: str) -> None:
    # in 2.5d nothing pools or resamples along the slice axis (pools are (k, k, 1), squeeze-excitation
    # and split attention pool each slice), so the whole encoder is the 2D encoder applied to every
    # slice: this checks every lifted replacement block of these families
    enc = _encoder(name)
    size = 96 if name.startswith("inception") else 32
    lifted = lift(enc, "2.5d", probe_size=(size, size, 2))
    x = torch.randn(1, 3, size, size, 2)
    with torch.no_grad():
        for a, b in zip(lifted(x), _per_slice(enc, x), strict=True):
            assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize(
    "arch",
    ["Unet", "FPN", "DeepLabV3Plus", "PSPNet", "MAnet", "Linknet"]
    + [pytest.param(a, marks=pytest.mark.slow) for a in ("UnetPlusPlus", "DeepLabV3", "PAN")],
)
def test_2p5d_smp_model_equals_slice_by_slice(arch: str) -> None:
    torch.manual_seed(0)
    model = getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, encoder_depth=5, classes=2).eval()
    size = 128 if arch == "PAN" else 32  # PAN's pyramid attention pools its stride-16 map three times more
    lifted = lift(model, "2.5d", probe_size=(size, size, 2))
    x = torch.randn(1, 3, size, size, 2)
    with torch.no_grad():
        assert torch.allclose(lifted(x), _per_slice(model, x), atol=1e-4)


@pytest.mark.parametrize(
    ("k", "stride", "padding", "dilation", "groups", "cin", "cout"),
    [
        (3, 1, 1, 1, 1, 4, 7),
        (3, 2, 1, 1, 1, 4, 6),
        (5, 1, 2, 1, 6, 6, 6),  # depthwise
        (3, 1, 2, 2, 4, 8, 16),  # grouped and dilated: view splits fall inside conv groups
        (1, 1, 0, 1, 1, 5, 4),
        ((1, 5), 1, (0, 2), 1, 1, 3, 6),  # Inception's factorised kernels: stride 1, size-keeping padding
        ((3, 1), 1, (1, 0), 1, 2, 4, 4),
    ],
)
def test_acs_groups_match_orthogonal_slices(k, stride, padding, dilation, groups, cin, cout) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups).eval()
    lifted = lift(conv, "acs")
    x = torch.randn(2, cin, 9, 10, 11)
    with torch.no_grad():
        out = lifted(x)
        lo = 0
        for view, n in enumerate(lifted.acs_kernel_split):
            part = nn.Conv2d(cin, n, k, stride, padding, dilation, groups=1)
            # the 2D conv restricted to this view's output channels (dense weight over the groups)
            dense = torch.zeros(cout, cin, *conv.kernel_size)
            cpg, ipg = cout // groups, cin // groups
            for o in range(cout):
                g = o // cpg
                dense[o, g * ipg : (g + 1) * ipg] = conv.weight[o]
            part.weight.copy_(dense[lo : lo + n])
            part.bias.copy_(conv.bias[lo : lo + n])
            dim = 2 + view  # the thin axis of this view: slices along it, strided like the conv
            slices = x.index_select(dim, torch.arange(0, x.shape[dim], stride))
            expected = _per_slice(part, slices, dim)
            assert torch.allclose(out[:, lo : lo + n], expected, atol=1e-5), view
            lo += n


def test_mean_and_soft_mix_the_three_views() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).eval()
    x = torch.randn(1, 4, 6, 7, 8)
    views = []
    for dim in (2, 3, 4):
        c = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        c.weight = conv.weight
        views.append(_per_slice(c, x, dim))
    expected = sum(views) / 3 + conv.bias.view(1, -1, 1, 1, 1)
    mean, soft = lift(conv, "mean"), lift(conv, "soft")
    with torch.no_grad():
        assert torch.allclose(mean(x), expected, atol=1e-5)
        # soft starts from equal mixing weights (softmax of zeros), i.e. as mean
        assert torch.equal(soft.soft_w_core, torch.zeros(6, 3))
        assert torch.allclose(soft(x), expected, atol=1e-5)


@pytest.mark.parametrize(("k", "s", "p"), [(2, 2, 0), (4, 2, 1), (3, 1, 1)])
def test_inflate_transposed_conv_constant_volume(k: int, s: int, p: int) -> None:
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(4, 3, k, s, p)
    lifted = lift(up, "inflate")
    x2 = torch.randn(1, 4, 5, 6)
    x3 = x2[..., None].expand(-1, -1, -1, -1, 8)
    with torch.no_grad():
        out = lifted(x3)
    n = out.shape[-1]
    assert torch.allclose(out[..., 2 : n - 2], up(x2)[..., None].expand(-1, -1, -1, -1, n - 4), atol=1e-5)


@pytest.mark.parametrize(("k", "s", "p", "op"), [(2, 2, 0, 0), (4, 2, 1, 0), (3, 2, 1, 1), (3, 1, 1, 0)])
def test_acs_transposed_conv(k: int, s: int, p: int, op: int) -> None:
    # each view: the 2D transposed kernel in its plane, nearest-neighbour along its thin axis; so a
    # volume constant along a view's thin axis gets the 2D response there, and shapes match Conv3d's
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(4, 6, k, s, p, op)
    x2 = torch.randn(1, 4, 5, 6)
    with torch.no_grad():
        ref = up(x2)
        for mode in ("acs", "soft", "mean"):
            lifted = lift(up, mode)
            assert lifted(torch.randn(1, 4, 5, 6, 7)).shape == nn.ConvTranspose3d(4, 6, k, s, p, op)(
                torch.randn(1, 4, 5, 6, 7)
            ).shape
        lifted = lift(up, "acs")
        out = lifted(x2[..., None].expand(-1, -1, -1, -1, 3))
        z = sum(lifted.acs_kernel_split[:2])  # the channels of the view thin along Z
        assert torch.allclose(out[:, z:], ref[:, z:, :, :, None].expand_as(out[:, z:]), atol=1e-5)


@pytest.mark.parametrize("mode", ["inflate", "inflate_center"])
def test_inflate_kernels(mode: str) -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1)
    w = lift(conv, mode, "z").weight
    assert w.shape == (3, 2, 3, 3, 3)
    if mode == "inflate":
        assert torch.allclose(w.sum(-1), conv.weight)
    else:
        assert torch.equal(w[..., 1], conv.weight) and not w[..., 0].any() and not w[..., 2].any()
    assert lift(conv, mode, "x").weight.shape == (3, 2, 3, 3, 3)
    # a factorised kernel stays factorised along the new axis
    assert lift(nn.Conv2d(2, 3, (1, 7), padding=(0, 3)), mode).weight.shape == (3, 2, 1, 7, 1)


def test_tf_same_padding_any_size() -> None:
    enc = _encoder("efficientnet-b0")
    lifted = lift(enc, "inflate")
    with torch.no_grad():
        feats = lifted(torch.randn(1, 3, 33, 40, 17))
    assert tuple(feats[1].shape[2:]) == (17, 20, 9)
    assert tuple(feats[-1].shape[2:]) == (2, 2, 1)
    dw = lifted._blocks[1]._depthwise_conv
    assert isinstance(dw, nn.Conv3d) and dw.groups == dw.in_channels == dw.out_channels


class _Tiny(nn.Module):
    """A 2D net with one of most table entries, for the per-mode contract tests."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(3, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.body = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.InstanceNorm2d(6, affine=True))
        self.drop = nn.Dropout2d(0.1)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1)
        up = nn.ConvTranspose2d(6, 6, 2, 2) if transposed else nn.Upsample(scale_factor=2, mode="bilinear")
        self.up = up
        self.head = nn.Sequential(nn.GroupNorm(2, 6), nn.Conv2d(6, 2, 1))
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(6, 2, 1))

    def forward(self, x):
        x = self.avg(self.drop(self.body(self.pool(self.stem(x)))))
        return self.head(self.up(x)).mean(1) + 0 * self.gap(x).sum()


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_forward_backward_state_dict(mode: str) -> None:
    net = _Tiny(transposed=mode != "inflate_center")
    lifted = lift(net, mode).train()
    x = torch.randn(2, 3, 16, 16, 16)
    out = lifted(x)
    assert out.shape == ((2, 8, 8, 8) if mode != "2.5d" else (2, 8, 8, 16))
    out.square().mean().backward()
    missing = [n for n, p in lifted.named_parameters() if p.grad is None]
    assert not missing, missing
    buf = io.BytesIO()
    torch.save(lifted.state_dict(), buf)
    buf.seek(0)
    again = lift(_Tiny(transposed=mode != "inflate_center"), mode)
    again.load_state_dict(torch.load(buf))
    lifted.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(lifted(x), again(x))


def test_lifted_batchnorm_keeps_running_stats() -> None:
    bn = nn.BatchNorm2d(4)
    bn.running_mean.uniform_()
    bn.num_batches_tracked += 7
    lifted = lift(nn.Sequential(nn.Conv2d(3, 4, 1), bn), "acs")
    assert isinstance(lifted[1], nn.BatchNorm3d)
    assert torch.equal(lifted[1].running_mean, bn.running_mean) and lifted[1].num_batches_tracked == 7


def test_a_renormalised_batchnorm_lifts_to_a_renormalised_one() -> None:
    from timm.layers.norm_act import BatchNormAct2d

    from gandlf_dimlift.models.norms import BatchRenorm3d, BatchRenormAct3d, renormalize_batch_norms

    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), BatchNormAct2d(4, act_layer=nn.SiLU))
    for norm in (net[1], net[3]):
        norm.running_var.uniform_(0.5, 2.0)
    variances = [norm.running_var.clone() for norm in (net[1], net[3])]
    assert renormalize_batch_norms(net, momentum=0.3) == 2
    lifted = lift(net, "acs")
    assert [type(lifted[1]), type(lifted[3])] == [BatchRenorm3d, BatchRenormAct3d]
    assert lifted[1].momentum == lifted[3].momentum == 0.3 and isinstance(lifted[3].act, nn.SiLU)
    assert torch.equal(lifted[1].running_var, variances[0]) and torch.equal(lifted[3].running_var, variances[1])
    x = torch.randn(2, 4, 3, 5, 6)
    with torch.no_grad():  # evaluation: the norm, then the activation, at the running statistics
        expected = nn.functional.silu((x - lifted[3].running_mean.view(-1, 1, 1, 1)) / (
            variances[1].view(-1, 1, 1, 1) + lifted[3].eps).sqrt())
        assert torch.allclose(lifted[3].eval()(x), expected, atol=1e-5)


def test_lift_does_not_touch_the_2d_model() -> None:
    net = _conv_stack()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lift(net, "inflate")
    assert isinstance(net[0], nn.Conv2d)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(lift(net, "inflate", inplace=True)[0], nn.Conv3d)


# ---- bad input ---------------------------------------------------------------------------------


def test_unknown_mode_and_axis_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid modes are 'acs', 'soft'.*'conv3d'"):
        lift(nn.Conv2d(1, 1, 1), "bogus")
    with pytest.raises(ValueError, match="valid axes are 'x', 'y', 'z'"):
        lift(nn.Conv2d(1, 1, 1), "acs", axis="d")
    assert AXES == ("x", "y", "z")


class _MyConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class _FunctionalSE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return x * self.fc(x.mean((2, 3), keepdim=True)).sigmoid()


class _FunctionalPool(nn.Module):
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 1)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (nn.PixelShuffle(2), r"'1' of type torch.nn.modules.pixelshuffle.PixelShuffle: no 3D counterpart"),
        (_MyConv(4, 4, 1), r"'1' of type .*_MyConv: subclass of a 2D torch layer"),
        (_FunctionalSE(), r"'1' of type .*_FunctionalSE: 2D-only operation .* mean over dims \(2, 3\)"),
        (_FunctionalPool(), r"'1' of type .*_FunctionalPool: 2D-only operation .*adaptive_avg_pool2d"),
    ],
)
def test_unsupported_module_is_named(bad: nn.Module, match: str) -> None:
    with pytest.raises(LiftError, match=match):
        lift(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bad), "inflate")


def test_error_lists_modes_that_could_work() -> None:
    square = r"'0' of type .*Conv2d: a non-square ACS kernel .* Modes that could work: inflate, inflate_center, 2.5d"
    with pytest.raises(LiftError, match=square):
        lift(nn.Sequential(nn.Conv2d(3, 4, (1, 3))), "soft")
    with pytest.raises(LiftError, match=r"ACS transposed convs need groups=1.*Modes that could work: inflate, 2.5d"):
        lift(nn.ConvTranspose2d(4, 4, 2, 2, groups=2), "acs")


def test_functional_2d_se_is_fine_per_slice() -> None:
    # x.mean((2, 3)) pools each slice: exactly right in 2.5d along z, so the check lets it through
    lift(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _FunctionalSE()), "2.5d")


def test_2p5d_keeps_the_slice_axis_through_global_pools() -> None:
    # per-slice semantics: a flattening head after a global pool sees one vector per slice
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(LiftError, match=r"'3' of type torch.nn.modules.linear.Linear: the 3D probe forward"):
        lift(net, "2.5d")
    assert lift(net, "inflate")(torch.randn(2, 3, 8, 8, 8)).shape == (2, 2)


def test_wrong_input_dims_give_a_clear_message() -> None:
    lifted = lift(_encoder("resnet18"), "acs")
    with pytest.raises(ValueError, match=r"expects a 5D input \(B, C, X, Y, Z\), got \(1, 3, 32, 32\)"):
        lifted(torch.randn(1, 3, 32, 32))


# ---- first-conv adaptation ---------------------------------------------------------------------


@pytest.mark.parametrize("lifted", [False, True])
def test_adapt_input_channels(lifted: bool) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 2, 1))
    if lifted:
        net = lift(net, "acs")
    shape = (1, 1, 6, 6, 6) if lifted else (1, 1, 6, 6)
    grey = torch.randn(shape)
    with torch.no_grad():
        ref = net(grey.repeat_interleave(3, 1))
        one = adapt_input_channels(copy.deepcopy(net), 1)
        assert one[0].in_channels == 1 and torch.allclose(one(grey), ref, atol=1e-5)
        six = adapt_input_channels(net, 6)
        assert six[0].weight.shape[1] == 6 and torch.allclose(six(grey.repeat_interleave(6, 1)), ref, atol=1e-5)
        assert torch.allclose(six[0].weight[:, 3:], six[0].weight[:, :3])


def test_package_level_call() -> None:
    import gandlf_dimlift
    import gandlf_dimlift.lift  # noqa: F401 - the subpackage shadows a function re-export: it is callable

    assert isinstance(gandlf_dimlift.lift(nn.Conv2d(3, 4, 3, padding=1), mode="inflate"), nn.Conv3d)


@pytest.mark.parametrize(("arch", "mode"), [("Unet", "inflate"), ("FPN", "acs"), ("Linknet", "soft")])
def test_smp_model_lifts_whole(arch: str, mode: str) -> None:
    torch.manual_seed(0)
    model = getattr(smp, arch)(encoder_name="efficientnet-b0", encoder_weights=None, classes=2, in_channels=1)
    lifted = lift(model, mode).eval()
    with torch.no_grad():
        assert lifted(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
    with pytest.raises(ValueError, match=r"not divisible by the encoder's output stride 32 along Z; pad to \{'Z': 32"):
        lifted(torch.randn(1, 1, 32, 32, 20))


def test_lift_rejects_vision_transformers_by_name() -> None:
    with pytest.raises(LiftError, match=r"'<root>' of type .*MixVisionTransformerEncoder: vision transformer"):
        lift(smp.encoders.get_encoder("mit_b0", weights=None), "inflate")
