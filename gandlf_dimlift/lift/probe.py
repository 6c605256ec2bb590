"""The check pass: a tiny 3D forward that rejects 2D work a module walk cannot see.

A module walk cannot see functional calls inside a ``forward`` (``F.adaptive_avg_pool2d``,
``x.mean((2, 3))``, ``F.pad`` with four values, ``F.interpolate(mode="bilinear")``...). Some of them
fail on a 5D tensor deep inside torch, others (a ``mean((2, 3))``, a four-value ``F.pad``) silently
return a wrong result. After conversion, :func:`probe` runs one forward on a small random
``(1, C, X, Y, Z)`` tensor, in eval mode and without gradients, under a
``torch.overrides.TorchFunctionMode`` that raises :class:`LiftError` at the first 2D-only call on a 5D
tensor, naming the module that made it. Any other failure during the probe is reported the same way.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import LiftError, type_name
from .spec import LiftSpec

log = logging.getLogger(__name__)

_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "nanmean", "nansum", "norm"}
_SIZE_ERRORS = re.compile(
    r"too small|smaller than|greater than actual input|more than 1 value|non-positive|negative|"
    r"input image|padding size should be less|size should be|larger than|exceeds|Given input size",
    re.IGNORECASE,
)


class _Stack:
    """Module paths entered and not yet left during the probe (innermost last)."""

    def __init__(self) -> None:
        self.paths: list[tuple[str, str]] = []

    def where(self) -> tuple[str, str]:
        return self.paths[-1] if self.paths else ("", "")


class TwoDCallGuard(TorchFunctionMode):
    """Raise :class:`LiftError` when a 2D-only torch call receives a 5D tensor.

    Args:
        spec: The lift spec (``2.5d`` also rejects resampling along the slice axis).
        stack: Where the current module path is tracked.
    """

    def __init__(self, spec: LiftSpec, stack: _Stack) -> None:
        super().__init__()
        self.spec = spec
        self.stack = stack

    def _fail(self, what: str) -> None:
        path, tname = self.stack.where()
        raise LiftError(
            f"2D-only operation on a 5D tensor in forward: {what}. Add a lifted replacement for this "
            "module type to gandlf_dimlift.lift (NAMED_TABLE) or lift a different module",
            path=path, module_type=tname,
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        first = args[0] if args else kwargs.get("input")
        if isinstance(first, torch.Tensor) and first.dim() == 5:
            name = getattr(func, "__name__", "")
            if "2d" in name or name in ("upsample_bilinear",):
                self._fail(f"{name}(...)")
            elif name in ("interpolate", "upsample"):
                self._check_interpolate(args, kwargs)
            elif name == "pad":
                pad = args[1] if len(args) > 1 else kwargs.get("pad")
                if pad is not None and len(pad) < 6 and any(pad):
                    self._fail(f"F.pad with {len(pad)} values (pads only the last {len(pad) // 2} axes)")
            elif name in _REDUCTIONS:
                self._check_reduction(name, args, kwargs)
        return func(*args, **kwargs)

    def _check_interpolate(self, args: tuple, kwargs: dict) -> None:
        names = ("input", "size", "scale_factor", "mode", "align_corners")
        bound = dict(zip(names, args, strict=False))
        bound.update(kwargs)
        mode = bound.get("mode", "nearest")
        if mode in ("bilinear", "bicubic", "linear"):
            self._fail(f"F.interpolate(mode={mode!r})")
        for key in ("size", "scale_factor"):
            val = bound.get(key)
            if isinstance(val, (tuple, list)) and len(val) != 3:
                self._fail(f"F.interpolate({key}={tuple(val)}) with {len(val)} values")
        scale = bound.get("scale_factor")
        if self.spec.per_slice and isinstance(scale, (int, float)) and scale != 1:
            self._fail(f"F.interpolate(scale_factor={scale}) also resamples the slice axis in 2.5d")

    def _check_reduction(self, name: str, args: tuple, kwargs: dict) -> None:
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        if dims is None or isinstance(dims, torch.Tensor):
            return
        if isinstance(dims, int):
            dims = (dims,)
        try:
            spatial = {d % 5 for d in dims} & {2, 3, 4}
        except TypeError:
            return
        allowed = [{2, 3, 4}]
        if self.spec.per_slice:
            allowed.append({2 + d for d in self.spec.plane_dims})
        if spatial and spatial not in allowed:
            self._fail(f"{name} over dims {tuple(dims)} (a 2D reduction over two spatial axes of three)")


def first_conv_channels(module: nn.Module) -> int | None:
    """Input channels of the first convolution in ``module`` (registration order), if any."""
    for m in module.modules():
        if hasattr(m, "in_channels") and isinstance(getattr(m, "weight", None), torch.Tensor):
            return int(m.in_channels)
    return None


def _single_tensor_input(module: nn.Module) -> bool:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return True
    required = [
        p for p in sig.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(required) == 1


def probe(
    module: nn.Module, spec: LiftSpec, size: int | Sequence[int] | None = None, channels: int | None = None
) -> bool:
    """Run the check pass on a lifted module.

    Args:
        module: The lifted module.
        spec: The spec it was lifted with.
        size: Spatial size of the probe (an int for a cube, or three ints); by default 32 per axis,
            retried at 64 and 128 when the model rejects the size itself. In ``2.5d`` an int size
            gives two slices along the slice axis.
        channels: Input channels; by default those of the first convolution.

    Returns:
        ``True`` when the probe ran, ``False`` when the module cannot be probed on its own (its forward
        takes more than one tensor, or it has no convolution to read the channel count from).

    Raises:
        LiftError: For a 2D-only call on a 5D tensor, or any failure of the forward, naming the module.
    """
    channels = channels or first_conv_channels(module)
    if channels is None or not _single_tensor_input(module):
        log.info("lift check skipped for %s: cannot build a probe input", type_name(module))
        return False
    if size is None:
        sizes: list[tuple[int, ...]] = [(n, n, n) for n in (32, 64, 128)]
    else:
        sizes = [tuple(size) if isinstance(size, Sequence) else (size,) * 3]
    if spec.per_slice and (size is None or not isinstance(size, Sequence)):
        # in 2.5d nothing acts along the slice axis: two slices are enough
        sizes = [tuple(2 if d == spec.new_dim else n for d, n in enumerate(s)) for s in sizes]
    ref = next(iter(module.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    for i, shape in enumerate(sizes):
        x = torch.randn(1, channels, *shape, device=device, dtype=dtype)
        try:
            _run(module, spec, x)
            return True
        except LiftError:
            raise
        except _ProbeFailure as fail:
            last = i == len(sizes) - 1
            if not last and _SIZE_ERRORS.search(str(fail.error)):
                log.debug("probe at %s too small: %s", shape, fail.error)
                continue
            raise LiftError(
                f"the 3D probe forward on {tuple(x.shape)} failed: {type(fail.error).__name__}: {fail.error}",
                path=fail.path, module_type=fail.type_name,
            ) from fail.error
    return True  # pragma: no cover


class _ProbeFailure(Exception):
    def __init__(self, error: BaseException, path: str, tname: str) -> None:
        super().__init__(str(error))
        self.error, self.path, self.type_name = error, path, tname


def _run(module: nn.Module, spec: LiftSpec, x: torch.Tensor) -> None:
    stack = _Stack()
    handles = []
    flags = {m: m.training for m in module.modules()}

    def enter(path: str, tname: str):
        def hook(mod, args):
            stack.paths.append((path, tname))

        return hook

    def leave(mod, args, out):
        if stack.paths:
            stack.paths.pop()

    for path, m in module.named_modules():
        handles.append(m.register_forward_pre_hook(enter(path, type_name(m))))
        handles.append(m.register_forward_hook(leave))
    module.eval()
    try:
        with torch.no_grad(), TwoDCallGuard(spec, stack):
            module(x)
    except LiftError:
        raise
    except Exception as err:  # noqa: BLE001 - every failure is reported with the module path
        path, tname = stack.where()
        raise _ProbeFailure(err, path, tname) from err
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
