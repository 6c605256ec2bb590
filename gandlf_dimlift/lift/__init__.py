"""Lift 2D torch models to 3D: ``lift(module, mode, axis)`` (framework-agnostic, needs only torch).

Modes (:data:`MODES`; each is declared once, in :mod:`.modes`: its properties and its operator):

* ``acs``: output channels in three groups convolved as ``(1,k,k)``, ``(k,1,k)``, ``(k,k,1)``;
  same parameters and FLOPs as the 2D model (:class:`~.ops.ACSConv3d`; any grouping, Inception's
  factorised kernels when they keep the size; transposed convs: :class:`~.ops.ACSConvTranspose3d`).
* ``soft`` / ``mean``: every channel sees all three views, mixed by learned softmax weights or
  averaged; 3x the compute. ``soft`` starts from zero logits, i.e. equal weights: it starts as ``mean``.
* ``inflate``: I3D, every ``k x k`` kernel repeated ``k`` times along the new axis and divided by ``k``
  (transposed convs by ``k / stride``, the taps that reach one output), so a volume constant along the
  axis gives the 2D response away from the borders; ``inflate_center``: the kernel in the middle plane,
  zeros elsewhere (rejected for transposed convs strided along the axis: half the planes would be empty).
* ``2.5d``: kernels ``(k, k, 1)``; nothing mixes or resamples along the slice axis: pools are
  ``(k, k, 1)``, squeeze-excitation and group/instance norms work per slice, upsampling is
  ``(s, s, 1)``. The lifted model *is* the 2D model applied to every slice (tested to 1e-4 on 19
  encoder families and six smp decoders). Consequently a global pool keeps the slice axis, and a head
  that flattens after it is rejected (smp's ``ClassificationHead`` is lifted to a global 3D pool).
* ``conv3d``: GaNDLF's meaning: the same architecture with 3D kernels and no weight transfer.

Along the new axis a layer gets the kernel/stride/padding its two in-plane axes agree on, else extent
1 (see :mod:`.spec`). Layout: ``(B, C, X, Y, Z)``; ``axis`` (``"z"``, the last dim, by default) is the new
axis for ``inflate``/``inflate_center``/``2.5d``/``conv3d``; the ACS modes use all three axes. Two options act
along ``axis`` in every mode: ``keep_axis_resolution`` (module paths that do not stride or resample along it:
thick slices) and ``axis_padding="replicate"`` (convolutions repeat the border slices along it).

Strictness. The module tree is walked with explicit tables keyed by exact type (:mod:`.convert`): torch
2D layers get their 3D form; third-party blocks that do 2D work in ``forward`` (TensorFlow-"same"
convs, squeeze-excitation, split attention, smp decoder blocks calling ``F.interpolate``) get a lifted
replacement that keeps their children and state-dict keys (:mod:`.blocks`, :mod:`.decoders`); other
torch modules, subclasses of 2D layers and modules owning 4D tensors raise :class:`LiftError`. Since
functional calls inside a ``forward`` cannot be seen by a walk, :func:`lift` then runs a check pass
(:mod:`.probe`): one small 3D forward in eval mode under a ``TorchFunctionMode`` that rejects 2D-only
calls on 5D tensors (``*2d`` functions, 2D interpolation, four-value ``F.pad``, reductions over two of
three spatial axes) and reports any failure as a :class:`LiftError` naming the module path and type.
The probe costs one forward at 32^3 (retried at 64 and 128 when the model rejects the size; two slices
in ``2.5d``); ``check=False`` skips it, ``probe_size`` sets it.
"""

from __future__ import annotations

import copy
import difflib
import sys
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import blocks, decoders  # noqa: F401 - importing registers the third-party replacements
from .channels import adapt_input_channels
from .convert import convert
from .errors import LiftError
from .modes import MODES, REGISTRY, LiftMode
from .ops import check_5d
from .probe import probe
from .spec import AXES, AXIS_PADDINGS, LiftSpec, check_mode_axis

__all__ = ["AXES", "AXIS_PADDINGS", "MODES", "REGISTRY", "LiftError", "LiftMode", "adapt_input_channels", "lift"]


def input_layout(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook of a lifted root: tensors leave in the layout the input came in (as torch's own convolutions
    do), whatever layout the lifted layers computed in (see :class:`~.ops.LiftedConv3d`): the standard layout for
    a standard input, as GaNDLF gives; ``channels_last_3d`` for such an input, which then costs no conversion."""
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    keep_last = x is not None and x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last_3d)
    layout = torch.channels_last_3d if keep_last else torch.contiguous_format

    def leave(o: Any) -> Any:
        if not isinstance(o, torch.Tensor):
            return o
        return o.contiguous(memory_format=layout if o.dim() == 5 else torch.contiguous_format)

    if type(output) in (list, tuple):
        return type(output)(leave(o) for o in output)
    return leave(output)


class InputGuard:
    """Forward pre-hook of a lifted root: reject inputs that are not ``(B, C, X, Y, Z)`` with a clear message."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, args: tuple) -> None:  # noqa: D102
        if args and hasattr(args[0], "dim"):
            check_5d(args[0], self.name)


def lift(
    module: nn.Module,
    mode: str = "acs",
    axis: str = "z",
    *,
    keep_axis_resolution: Sequence[str] = (),
    axis_padding: str = "zeros",
    inplace: bool = False,
    check: bool = True,
    probe_size: int | Sequence[int] | None = None,
) -> nn.Module:
    """Turn a 2D model (with its weights) into a 3D model taking ``(B, C, X, Y, Z)``.

    Args:
        module: The 2D model.
        mode: One of :data:`MODES`.
        axis: The new axis, one of :data:`AXES` (``"z"``: the slice axis, the last dim).
        keep_axis_resolution: Module paths (dotted prefixes, ``""`` for the whole model) inside which nothing
            strides or resamples along ``axis`` (thick slices): convs get stride 1 there (their padding must keep
            the size), pools strided along it do not pool along it, transposed convs whose kernel equals their
            stride get kernel and stride 1 there (that plane is the 2D kernel), upsampling keeps the axis.
        axis_padding: ``"zeros"`` (as the 2D layers pad) or ``"replicate"``: convolutions pad along ``axis`` by
            repeating the border slices (in-plane padding unchanged, TensorFlow-"same" convs included); with
            ``inflate`` a volume constant along the axis then gives the 2D response on every slice.
        inplace: Convert ``module`` itself instead of a deep copy.
        check: Run the check pass (:func:`gandlf_dimlift.lift.probe.probe`): one small 3D forward that
            rejects 2D-only functional calls left in a ``forward``.
        probe_size: Spatial size of that probe (an int or three ints); 32, then 64 and 128 if the model
            rejects the size, by default.

    Returns:
        The lifted module: a plain ``nn.Module`` whose weights were transferred by shape.

    Raises:
        ValueError: Unknown ``mode``, ``axis`` or ``axis_padding``, or a path in ``keep_axis_resolution`` that
            names no module (the message lists the valid ones).
        LiftError: A module that cannot be lifted in this mode (the message names its path, its type
            and the modes that could work).
    """
    declared, axis = check_mode_axis(mode, axis)
    if not isinstance(module, nn.Module):
        raise TypeError(f"lift() expects a torch.nn.Module, got {type(module).__name__}")
    if axis_padding not in AXIS_PADDINGS:
        valid = ", ".join(map(repr, AXIS_PADDINGS))
        raise ValueError(f"unknown axis_padding {axis_padding!r}; valid values are {valid}")
    keep = (keep_axis_resolution,) if isinstance(keep_axis_resolution, str) else tuple(keep_axis_resolution)
    paths = {name for name, _ in module.named_modules()}
    unknown = [p for p in keep if p not in paths]
    if unknown:
        near = difflib.get_close_matches(unknown[0], sorted(paths), n=3)
        raise ValueError(
            f"keep_axis_resolution names no module at {unknown}; give module paths of the 2D model "
            f"(model.named_modules()){f', e.g. {near}' if near else ''}"
        )
    spec = LiftSpec(declared, axis, keep, axis_padding)
    root = module if inplace else copy.deepcopy(module)
    root = convert(root, spec)
    root.register_forward_pre_hook(InputGuard(f"{type(root).__name__} (lifted with mode={mode!r})"))
    root.register_forward_hook(input_layout)
    if check:
        probe(root, spec, probe_size)
    return root


class _CallableModule(types.ModuleType):
    """Lets ``gandlf_dimlift.lift(model, ...)`` work once this subpackage is imported.

    Importing ``gandlf_dimlift.lift`` sets the package attribute ``lift`` to this module, which would
    shadow a top-level re-export of the function; calling the module calls :func:`lift`.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module:
        return lift(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
