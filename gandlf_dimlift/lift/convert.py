"""The module-tree walker: every module is converted, kept, or rejected by an explicit table.

Three tables decide, by *exact* type (a subclass of a 2D layer is never swapped silently):

* :data:`~.layers.TORCH_TABLE`: torch 2D layers and their 3D forms;
* :data:`NAMED_TABLE`: third-party modules known to do 2D work in their ``forward`` (TensorFlow-"same"
  convs, squeeze-excitation blocks pooling with ``x.mean((2, 3))``, smp decoder blocks calling
  ``F.interpolate`` with 2D sizes...), keyed by ``"module.QualName"`` so smp / timm /
  efficientnet-pytorch are never imported here; each maps to a converter building a lifted
  replacement that keeps the children (so the state dict keys do not change);
* :data:`~.layers.TORCH_AGNOSTIC`: torch modules that work unchanged on 5D tensors.

Other torch modules raise :class:`LiftError`. Other third-party modules are treated as containers:
their children are lifted, a module holding a 4D parameter itself is rejected, and their ``forward``
is verified by the probe (:mod:`.probe`), which rejects 2D-only functional calls on 5D tensors.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .errors import LiftError, type_name
from .layers import TORCH_3D, TORCH_AGNOSTIC, TORCH_CHANNEL_WISE, TORCH_TABLE
from .spec import LiftSpec

Converter = Callable[[nn.Module, LiftSpec, str], nn.Module]

#: Third-party module types with a lifted replacement, keyed by ``module.QualName``.
NAMED_TABLE: dict[str, Converter] = {}

_TOKENS = (
    "vision transformer: reshapes feature maps to token sequences and back with 2D sizes "
    "(B, C, H, W)"
)
#: Third-party module types that cannot be lifted, with the reason and the modes that could work.
NAMED_REJECT: dict[str, tuple[str, tuple[str, ...]]] = {
    "segmentation_models_pytorch.encoders.mix_transformer.MixVisionTransformerEncoder": (_TOKENS, ()),
    "segmentation_models_pytorch.decoders.segformer.decoder.SegformerDecoder": (
        "the Segformer decoder reshapes 2D token maps (B, C, H, W); not lifted", ()
    ),
    "segmentation_models_pytorch.decoders.upernet.decoder.UPerNetDecoder": (
        "the UPerNet decoder resamples with 2D sizes throughout; not lifted (use FPN or PSPNet)", ()
    ),
}


def adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Move ``old``'s children, parameters and buffers onto ``new`` under the same names; keep the training flag."""
    for name, child in old.named_children():
        setattr(new, name, child)
    for name, param in old.named_parameters(recurse=False):
        new.register_parameter(name, param)
    for name, buf in old.named_buffers(recurse=False):
        new.register_buffer(name, buf, persistent=name not in old._non_persistent_buffers_set)
    new.train(old.training)
    return new


class Lifted(nn.Module):
    """Base of the lifted replacements of third-party blocks: adopts the 2D block's children (same state-dict
    keys), copies the plain attributes its ``forward`` reads, and keeps the lift spec.

    Args:
        old: The 2D block.
        spec: The lift spec at the block's path.
        attributes: Names of ``old``'s attributes to copy (a missing one is copied as ``None``).
    """

    def __init__(self, old: nn.Module, spec: LiftSpec, attributes: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.spec = spec
        for name in attributes:
            setattr(self, name, getattr(old, name, None))
        adopt(self, old)

    @property
    def pool_dims(self) -> tuple[int, ...]:
        """Tensor dims a global pool reduces: all spatial ones, or the in-plane ones in ``2.5d``."""
        if self.spec.per_slice:
            return tuple(2 + d for d in self.spec.plane_dims)
        return (2, 3, 4)


def replacement(cls: type[Lifted], *attributes: str) -> Converter:
    """A converter that builds ``cls(old, spec, attributes)``."""

    def conv(m: nn.Module, spec: LiftSpec, path: str) -> nn.Module:
        return cls(m, spec, attributes)

    return conv


def register(*names: str) -> Callable[[Converter], Converter]:
    """Register a converter for third-party module types given by ``module.QualName``."""

    def deco(fn: Converter) -> Converter:
        for name in names:
            NAMED_TABLE[name] = fn
        return fn

    return deco


_2D_BASES = tuple(TORCH_TABLE) + (nn.LocalResponseNorm, nn.LPPool2d, nn.FractionalMaxPool2d, nn.PixelShuffle)


def convert(module: nn.Module, spec: LiftSpec, path: str = "") -> nn.Module:
    """Lift ``module`` and its children in place where possible; return the lifted module.

    Args:
        module: The module to lift.
        spec: Mode and axis.
        path: Dotted path of ``module`` in the root, for error messages.

    Returns:
        The lifted module (the same object, or a replacement).

    Raises:
        LiftError: For a module the tables reject.
    """
    spec = spec.at(path)
    t = type(module)
    name = type_name(module)
    if t in TORCH_TABLE:
        new = TORCH_TABLE[t](module, spec, path)
        new.train(module.training)  # a fresh module would otherwise start in training mode
        return new
    if name in NAMED_REJECT:
        why, modes = NAMED_REJECT[name]
        raise LiftError(why, path=path, module_type=name, modes=modes)
    if name in NAMED_TABLE:
        module = NAMED_TABLE[name](module, spec, path)
    elif t in TORCH_CHANNEL_WISE:
        if module.dim not in (1, None):  # type: ignore[attr-defined]
            raise LiftError(
                f"{t.__name__}(dim={module.dim}) acts on a spatial axis of a 2D map",  # type: ignore[attr-defined]
                path=path, module_type=name,
            )
        return module
    elif t in TORCH_AGNOSTIC or t in TORCH_3D:
        pass
    elif t.__module__.startswith("torch."):
        raise LiftError("no 3D counterpart is known for this torch module", path=path, module_type=name, modes=())
    elif isinstance(module, _2D_BASES):
        raise LiftError(
            "subclass of a 2D torch layer with behaviour the lift table does not know; add it to "
            "gandlf_dimlift.lift.convert.NAMED_TABLE",
            path=path, module_type=name, modes=(),
        )
    else:
        own = [n for n, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
               if p is not None and p.dim() == 4]
        if own:
            raise LiftError(
                f"holds 2D (4D-shaped) tensors {own} that no table entry knows how to lift",
                path=path, module_type=name, modes=(),
            )
    for child_name, child in list(module.named_children()):
        child_path = f"{path}.{child_name}" if path else child_name
        new_child = convert(child, spec, child_path)
        if new_child is not child:
            setattr(module, child_name, new_child)
    return module

