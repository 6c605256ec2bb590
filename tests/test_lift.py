"""Tests of the lifting core (gandlf_dimlift.lift): exactness per mode, strictness, round trips."""

from __future__ import annotations

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
