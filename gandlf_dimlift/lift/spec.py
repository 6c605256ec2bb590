"""Axes and the geometry that maps a 2D layer's arguments onto a 3D layer.

GaNDLF's 3D tensors are ``(B, C, X, Y, Z)``. A 2D model sees ``(B, C, H, W)``. Lifting along an axis
(the "new" axis, ``z`` by default: the slice axis) maps ``H`` and ``W`` onto the two other spatial
dimensions, in order: for ``axis="z"`` ``H -> X`` and ``W -> Y``; for ``axis="y"`` ``H -> X``,
``W -> Z``; for ``axis="x"`` ``H -> Y``, ``W -> Z``.

Along the new axis every layer gets the value its two in-plane dimensions agree on (kernel, stride,
padding, dilation: a 3x3 stride-2 conv becomes 3x3x3 stride 2). When they disagree (a factorised
``1x7`` kernel, ``padding=(0, 3)``) the layer gets extent 1, stride 1, padding 0 along the new axis, so
a factorised kernel stays factorised. In ``2.5d`` mode the new axis always gets extent 1, stride 1 and
padding 0, so the lifted model is the 2D model applied to every slice. Inside the module paths given to
``lift(..., keep_axis_resolution=...)`` nothing strides or resamples along the new axis (thick slices).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .errors import LiftError
from .modes import REGISTRY, LiftMode

AXES: tuple[str, ...] = ("x", "y", "z")
#: Padding along the new axis (``lift(..., axis_padding=)``): as the 2D layer pads, or the border slices repeated.
AXIS_PADDINGS: tuple[str, ...] = ("zeros", "replicate")


def check_mode_axis(mode: Any, axis: Any) -> tuple[LiftMode, str]:
    """Validate ``mode`` and ``axis``.

    Args:
        mode: A name in :data:`~.modes.REGISTRY`.
        axis: One of :data:`AXES`.

    Returns:
        The mode's declaration and the validated axis.

    Raises:
        ValueError: When either is unknown; the message lists the valid values.
    """
    if mode not in REGISTRY:
        raise ValueError(f"unknown lift mode {mode!r}; valid modes are {', '.join(map(repr, REGISTRY))}")
    if axis not in AXES:
        raise ValueError(
            f"unknown lift axis {axis!r}; valid axes are {', '.join(map(repr, AXES))} "
            "(GaNDLF layout (B, C, X, Y, Z): 'z' is the last dimension, the slice axis)"
        )
    return REGISTRY[mode], axis


@dataclass(frozen=True)
class LiftSpec:
    """How one lift maps 2D layers to 3D layers.

    Attributes:
        mode: The lift mode's declaration.
        axis: The new axis, one of :data:`AXES`.
        keep_prefixes: Module paths (dotted prefixes) inside which nothing strides or resamples along the new axis.
        axis_padding: Padding of convolutions along the new axis, one of :data:`AXIS_PADDINGS`.
        keep_axis: Whether the module being converted lies inside one of ``keep_prefixes`` (see :meth:`at`).
    """

    mode: LiftMode
    axis: str
    keep_prefixes: tuple[str, ...] = ()
    axis_padding: str = "zeros"
    keep_axis: bool = False

    def at(self, path: str) -> LiftSpec:
        """The spec for the module at ``path``: ``keep_axis`` set inside a kept prefix (``""`` keeps the root)."""
        if self.keep_axis or not any(p == "" or path == p or path.startswith(p + ".") for p in self.keep_prefixes):
            return self
        return replace(self, keep_axis=True)

    @property
    def new_dim(self) -> int:
        """Index of the new axis among the three spatial dimensions (0, 1 or 2)."""
        return AXES.index(self.axis)

    @property
    def plane_dims(self) -> tuple[int, int]:
        """Spatial indices (0..2) that the 2D ``H`` and ``W`` map to."""
        return tuple(d for d in range(3) if d != self.new_dim)  # type: ignore[return-value]

    @property
    def per_slice(self) -> bool:
        """Whether nothing may mix or resample along the new axis (``2.5d``)."""
        return self.mode.per_slice

    @property
    def fixed_axis(self) -> bool:
        """Whether nothing may stride or resample along the new axis (per slice, or inside a kept prefix)."""
        return self.mode.per_slice or self.keep_axis

    def triple(self, pair: Any, new: Any) -> tuple:
        """Place a 2D pair and a value for the new axis into a spatial triple.

        Args:
            pair: An int or a 2-sequence ``(h, w)``.
            new: The value for the new axis.

        Returns:
            A 3-tuple ordered ``(X, Y, Z)``.
        """
        h, w = as_pair(pair)
        out = [None, None, None]
        out[self.plane_dims[0]] = h
        out[self.plane_dims[1]] = w
        out[self.new_dim] = new
        return tuple(out)

    def lift_geometry(
        self, kernel: Any, stride: Any = 1, padding: Any = 0, dilation: Any = 1, *, pool: bool = False
    ) -> tuple[tuple, tuple, Any, tuple]:
        """Kernel, stride, padding and dilation triples for a lifted conv or pool.

        Inside a kept prefix (:attr:`keep_axis`) the new axis gets stride 1; a pool strided along it gets extent 1
        there (it does not pool along the axis). Transposed convs are adjusted by their converter.

        Args:
            kernel: 2D kernel size.
            stride: 2D stride.
            padding: 2D padding (ints, or the strings ``"same"`` / ``"valid"``, passed through).
            dilation: 2D dilation.
            pool: Whether the layer is a pool.

        Returns:
            ``(kernel, stride, padding, dilation)`` as triples (padding stays a string if given as one).
        """
        k, s, d = as_pair(kernel), as_pair(stride), as_pair(dilation)
        p = padding if isinstance(padding, str) else as_pair(padding)
        agree = k[0] == k[1] and s[0] == s[1] and d[0] == d[1] and (isinstance(p, str) or p[0] == p[1])
        if self.per_slice or not agree:
            nk, ns, np_, nd = 1, 1, 0, 1
            if not self.per_slice and s[0] == s[1]:
                ns = s[0]
        else:
            nk, ns, np_, nd = k[0], s[0], (None if isinstance(p, str) else p[0]), d[0]
        if self.keep_axis and ns != 1:
            nk, ns, np_, nd = (1, 1, 0, 1) if pool else (nk, 1, np_, nd)
        padding3 = p if isinstance(p, str) else self.triple(p, np_)
        return self.triple(k, nk), self.triple(s, ns), padding3, self.triple(d, nd)


def as_pair(value: Any) -> tuple:
    """Return ``value`` as a 2-tuple (an int is repeated)."""
    if isinstance(value, (int, float)) or value is None:
        return (value, value)
    value = tuple(value)
    if len(value) == 1:
        return (value[0], value[0])
    if len(value) != 2:
        raise LiftError(f"expected a 2D (pair) argument, got {value!r}")
    return value
