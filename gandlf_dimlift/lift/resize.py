"""Resampling in 3D: the lifted form of ``nn.Upsample`` and of ``F.interpolate`` calls in decoders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ops import check_5d
from .spec import LiftSpec, as_pair

_MODES_3D = {"nearest": "nearest", "nearest-exact": "nearest-exact", "bilinear": "trilinear", "area": "area"}


def mode_3d(mode: str) -> str:
    """The 3D interpolation mode for a 2D one (``bilinear`` -> ``trilinear``).

    Raises:
        ValueError: For modes without a 3D counterpart (``bicubic``).
    """
    if mode in _MODES_3D.values():
        return mode
    if mode not in _MODES_3D:
        raise ValueError(f"interpolation mode {mode!r} has no 3D counterpart; supported: {sorted(_MODES_3D)}")
    return _MODES_3D[mode]


def scale_triple(spec: LiftSpec, scale: float | Sequence[float]) -> tuple[float, float, float]:
    """Scale factors per spatial axis: the new axis follows the in-plane ones when they agree (1 in 2.5d or kept)."""
    h, w = as_pair(scale)
    new = 1.0 if (spec.fixed_axis or h != w) else h
    return tuple(float(v) for v in spec.triple((h, w), new))  # type: ignore[return-value]


def upscale(
    x: torch.Tensor, spec: LiftSpec, scale: float, mode: str, align_corners: bool | None = None
) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=scale, mode=mode)`` of a 2D decoder, done in 3D."""
    return F.interpolate(x, scale_factor=scale_triple(spec, scale), mode=mode_3d(mode), align_corners=align_corners)


def resize_to(x: torch.Tensor, size: Sequence[int], mode: str, align_corners: bool | None = None) -> torch.Tensor:
    """Resize the spatial dims of ``x`` to ``size`` (3 values) with the 3D form of ``mode``."""
    if tuple(x.shape[2:]) == tuple(size) and mode in ("nearest", "nearest-exact"):
        return x
    return F.interpolate(x, size=tuple(size), mode=mode_3d(mode), align_corners=align_corners)


class Interpolate3d(nn.Module):
    """Resample ``(B, C, X, Y, Z)`` to a size (``None`` keeps an axis) or by per-axis scale factors.

    Args:
        size: Output size per spatial axis, ``None`` to keep an axis' size; or ``None``.
        scale_factor: Scale per spatial axis; used when ``size`` is ``None``.
        mode: A 3D interpolation mode.
        align_corners: As in ``F.interpolate``.
    """

    def __init__(
        self,
        size: Sequence[int | None] | None = None,
        scale_factor: Sequence[float] | None = None,
        mode: str = "nearest",
        align_corners: bool | None = None,
    ) -> None:
        super().__init__()
        if (size is None) == (scale_factor is None):
            raise ValueError("give exactly one of size and scale_factor")
        self.size = tuple(size) if size is not None else None
        self.scale_factor = tuple(float(s) for s in scale_factor) if scale_factor is not None else None
        self.mode = mode_3d(mode)
        self.align_corners = align_corners

    @classmethod
    def from_2d(
        cls, spec: LiftSpec, size: object, scale_factor: object, mode: str, align_corners: bool | None
    ) -> Interpolate3d:
        """Build the lifted form of a 2D ``Upsample``."""
        if size is not None:
            h, w = as_pair(size)
            new = None if (spec.fixed_axis or h != w) else h
            return cls(size=spec.triple((h, w), new), mode=mode, align_corners=align_corners)
        return cls(scale_factor=scale_triple(spec, scale_factor), mode=mode, align_corners=align_corners)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        check_5d(x, type(self).__name__)
        if self.size is not None:
            size = tuple(s if s is not None else n for s, n in zip(self.size, x.shape[2:], strict=False))
            return F.interpolate(x, size=size, mode=self.mode, align_corners=self.align_corners)
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=self.align_corners)

    def extra_repr(self) -> str:  # noqa: D102
        what = f"size={self.size}" if self.size is not None else f"scale_factor={self.scale_factor}"
        return f"{what}, mode={self.mode!r}, align_corners={self.align_corners}"
