"""The lifting modes, each declared once: its properties here, its operator beside it.

A mode is one :class:`LiftMode` entry of :data:`REGISTRY`; everything else in :mod:`gandlf_dimlift.lift` (the
layer converters, the ACS operators, resampling, the check pass) reads these properties and never a mode's name.
Adding a mode means one entry below plus its operator:

* an *ACS-family* mode keeps every 2D kernel and convolves it in the three orthogonal planes ("views"); its
  operator is ``view_weights``: the weight of each view per output channel, an ``(out, 3)`` tensor (the output is
  the weighted sum of the three views, plus the bias);
* a *dense* mode turns every 2D kernel into one 3D kernel; its operator is ``fill``, which extends the 2D kernel
  along the new axis (or ``None``: the 3D layer keeps its fresh initialisation, no weight transfer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

ViewWeights = Callable[[nn.Module], torch.Tensor]
KernelFill = Callable[[torch.Tensor, int, int, float], torch.Tensor]


@dataclass(frozen=True)
class LiftMode:
    """One lifting mode.

    Attributes:
        name: The name users pass (``lift(..., mode=name)``, GaNDLF's ``converter_type``).
        summary: One line for documentation and error messages.
        view_weights: ACS family: ``(module) -> (out, 3)`` weights of the views per output channel; ``None`` for a
            dense mode.
        split_channels: ACS family: the view weights are one-hot, so each view convolves only its own channel
            group (same FLOPs as 2D) instead of every channel.
        learned_mix: ACS family: the layer holds learned mixing logits ``soft_w_core`` of shape ``(out, 3)``.
        fill: Dense family: ``(kernel, dim, extent, taps) -> kernel`` extends a 2D kernel (already unsqueezed at
            ``dim``) to ``extent`` taps along the new axis; ``taps`` is how many of them reach one output (``extent``
            for a conv, ``extent / stride`` for a transposed conv). ``None``: no weight transfer.
        per_slice: Nothing mixes or resamples along the new axis (the lifted model is the 2D model per slice).
        strided_transpose: Dense family: a transposed conv strided along the new axis can be lifted.
    """

    name: str
    summary: str
    view_weights: ViewWeights | None = None
    split_channels: bool = False
    learned_mix: bool = False
    fill: KernelFill | None = None
    per_slice: bool = False
    strided_transpose: bool = True

    @property
    def acs_family(self) -> bool:
        """Whether the mode keeps 2D kernels and combines three orthogonal views."""
        return self.view_weights is not None


# ---- operators of the ACS family: the weight of each view per output channel


def split_sizes(channels: int) -> tuple[int, int, int]:
    """Output channels per view when the channels are split in three groups (balanced like ``acsconv``)."""
    base, rest = divmod(channels, 3)
    return tuple(base + (1 if i < rest else 0) for i in range(3))  # type: ignore[return-value]


def channel_groups(module: nn.Module) -> torch.Tensor:
    """``acs``: each output channel belongs to one view (``module.acs_kernel_split`` channels each)."""
    views = torch.repeat_interleave(torch.arange(3), torch.tensor(module.acs_kernel_split))
    return nn.functional.one_hot(views, 3).to(module.weight)


def equal_views(module: nn.Module) -> torch.Tensor:
    """``mean``: every output channel averages the three views."""
    return torch.full((module.out_channels, 3), 1 / 3, dtype=module.weight.dtype, device=module.weight.device)


def learned_views(module: nn.Module) -> torch.Tensor:
    """``soft``: every output channel mixes the three views by the softmax of its logits ``soft_w_core``."""
    return module.soft_w_core.softmax(-1)


# ---- operators of the dense family: a 2D kernel extended along the new axis


def repeat_kernel(w: torch.Tensor, dim: int, extent: int, taps: float) -> torch.Tensor:
    """I3D inflation: the kernel repeated ``extent`` times, divided by the taps that reach one output."""
    return w.repeat_interleave(extent, dim=dim) / taps if extent > 1 else w.clone()


def centre_kernel(w: torch.Tensor, dim: int, extent: int, taps: float) -> torch.Tensor:
    """The kernel in the middle plane along the new axis, zeros elsewhere."""
    out = torch.zeros_like(w).repeat_interleave(extent, dim=dim)
    out.narrow(dim, (extent - 1) // 2, 1).copy_(w)
    return out


#: Every mode, in the order documentation lists them.
REGISTRY: dict[str, LiftMode] = {
    m.name: m
    for m in (
        LiftMode("acs", "output channels in three groups, convolved as (1,k,k), (k,1,k), (k,k,1): 2D parameters "
                 "and FLOPs", view_weights=channel_groups, split_channels=True),
        LiftMode("soft", "every channel in all three views, mixed by learned softmax weights (starting equal)",
                 view_weights=learned_views, learned_mix=True),
        LiftMode("mean", "every channel in all three views, averaged", view_weights=equal_views),
        LiftMode("inflate", "I3D: every k x k kernel repeated k times along the new axis, divided by k",
                 fill=repeat_kernel),
        LiftMode("inflate_center", "the 2D kernel in the middle plane along the new axis, zeros elsewhere",
                 fill=centre_kernel, strided_transpose=False),
        LiftMode("2.5d", "kernels (k, k, 1): the 2D model applied to every slice", fill=repeat_kernel,
                 per_slice=True),
        LiftMode("conv3d", "the same architecture with 3D kernels and no weight transfer"),
    )
}

MODES: tuple[str, ...] = tuple(REGISTRY)


def modes_where(test: Callable[[LiftMode], bool]) -> tuple[str, ...]:
    """Names of the modes for which ``test`` holds (for "modes that could work" in error messages)."""
    return tuple(name for name, mode in REGISTRY.items() if test(mode))
