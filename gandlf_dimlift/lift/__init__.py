"""Lift 2D torch models to 3D: ``lift(module, mode, axis)`` (framework-agnostic, needs only torch).

Modes (:data:`MODES`):

* ``acs``: output channels in three groups convolved as ``(1,k,k)``, ``(k,1,k)``, ``(k,k,1)``;
  same parameters and FLOPs as the 2D model.
* ``soft`` / ``mean``: every channel sees all three views, mixed by learned softmax weights (initialised
  equal, i.e. starting as ``mean``) or averaged. 3x the compute.
* ``inflate``: I3D, every ``k x k`` kernel repeated ``k`` times along the new axis and divided by ``k``;
  ``inflate_center``: the kernel in the middle plane, zeros elsewhere.
* ``2.5d``: kernels ``(k, k, 1)`` along the slice axis; nothing mixes or resamples along it (pools, SE
  and upsampling act per slice), so the lifted model is the 2D model applied to every slice.
* ``conv3d``: GaNDLF's meaning: the same architecture with cubic 3D kernels and no weight transfer.

Layout: ``(B, C, X, Y, Z)``; ``axis`` (``"z"``, the last dim, by default) is the new axis for
``inflate``/``inflate_center``/``2.5d``/``conv3d``; ACS modes use all three axes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from .channels import adapt_input_channels
from .errors import LiftError
from .ops import check_5d
from .spec import AXES, MODES, LiftSpec, check_mode_axis

__all__ = ["AXES", "MODES", "LiftError", "adapt_input_channels", "lift"]


class InputGuard:
    """Forward pre-hook of a lifted root: reject inputs that are not ``(B, C, X, Y, Z)`` with a clear message."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, args: tuple) -> None:  # noqa: D102
        if args and hasattr(args[0], "dim"):
            check_5d(args[0], self.name)


def _load_tables() -> None:
    # importing registers the third-party replacements in convert.NAMED_TABLE
    from . import blocks, decoders  # noqa: F401


def lift(
    module: nn.Module,
    mode: str = "acs",
    axis: str = "z",
    *,
    inplace: bool = False,
    check: bool = True,
    probe_size: int | Sequence[int] | None = None,
) -> nn.Module:
    """Turn a 2D model (with its weights) into a 3D model taking ``(B, C, X, Y, Z)``.

    Args:
        module: The 2D model.
        mode: One of :data:`MODES`.
        axis: The new axis, one of :data:`AXES` (``"z"``: the slice axis, the last dim).
        inplace: Convert ``module`` itself instead of a deep copy.
        check: Run the check pass (:func:`gandlf_dimlift.lift.probe.probe`): one small 3D forward that
            rejects 2D-only functional calls left in a ``forward``.
        probe_size: Spatial size of that probe (an int or three ints); 32, then 64 and 128 if the model
            rejects the size, by default.

    Returns:
        The lifted module: a plain ``nn.Module`` whose weights were transferred by shape.

    Raises:
        ValueError: Unknown ``mode`` or ``axis`` (the message lists the valid ones).
        LiftError: A module that cannot be lifted in this mode (the message names its path, its type
            and the modes that could work).
    """
    mode, axis = check_mode_axis(mode, axis)
    if not isinstance(module, nn.Module):
        raise TypeError(f"lift() expects a torch.nn.Module, got {type(module).__name__}")
    _load_tables()
    from .convert import convert
    from .probe import probe

    spec = LiftSpec(mode, axis)
    root = module if inplace else copy.deepcopy(module)
    root = convert(root, spec)
    root.register_forward_pre_hook(InputGuard(f"{type(root).__name__} (lifted with mode={mode!r})"))
    if check:
        probe(root, spec, probe_size)
    return root
