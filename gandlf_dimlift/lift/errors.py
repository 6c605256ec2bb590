"""The error raised when a module cannot be lifted."""

from __future__ import annotations

from collections.abc import Iterable


class LiftError(TypeError):
    """A 2D module (or a 2D-only operation inside one) cannot be lifted in the requested mode.

    Attributes:
        path: Dotted path of the offending module inside the lifted model (``""`` for the root).
        module_type: Qualified type name of the offending module.
        modes: Lift modes that could work for it (empty when none does, ``None`` when unknown).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        module_type: str | None = None,
        modes: Iterable[str] | None = None,
    ) -> None:
        self.path = path
        self.module_type = module_type
        self.modes = tuple(modes) if modes is not None else None
        parts = []
        if path is not None:
            parts.append(f"module {path or '<root>'!r}")
        if module_type is not None:
            parts.append(f"of type {module_type}")
        prefix = (" ".join(parts) + ": ") if parts else ""
        message = message.rstrip(".") + "."
        if self.modes:
            message += f" Modes that could work: {', '.join(self.modes)}."
        elif self.modes is not None:
            message += " No lift mode supports it."
        super().__init__(prefix + message)


def type_name(obj: object) -> str:
    """Qualified name ``module.QualName`` of ``obj``'s type (or of ``obj`` if it is a type)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"
