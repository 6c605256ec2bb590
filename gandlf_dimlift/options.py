"""Declared `model:` options of every architecture, and their validation.

Each architecture declares its options once (name, type, default, allowed values, help). The same declaration
validates a GaNDLF `model:` section when the model is built and is printed by `gandlf-dimlift list`.
GaNDLF passes unknown `model:` keys through silently, so a typo such as `encoder_nme` would otherwise train a
different model than the user wrote: a key close to a declared option is an error, any other unknown key a warning.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

PROBLEM_TYPES = ("segmentation", "classification", "regression")

# Keys GaNDLF 0.1.5 itself reads or writes under `model:` (its ModelConfig fields, their aliases, and keys its
# parameter processing and model code add). They are never reported as unknown.
GANDLF_MODEL_KEYS = frozenset(
    {
        "dimension", "architecture", "final_layer", "norm_type", "base_filters", "class_list", "num_channels",
        "n_channels", "channels", "model_channels", "type", "data_type", "save_at_every_epoch", "amp",
        "ignore_label_validation", "print_summary", "num_classes", "onnx_export", "sigmoid_input_multiplier",
        "depth", "batch_norm",
    }
)


logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A `model:` option is misspelt or has a value the architecture cannot use."""


@dataclass(frozen=True)
class Option:
    """One `model:` key of an architecture.

    Attributes:
        name: The key under `model:`.
        default: Value used when the key is absent.
        help: One line for `gandlf-dimlift list`.
        types: Accepted Python types; inferred from the default when empty.
        choices: Allowed values, or empty for any value of the accepted types.
        check: Optional extra validation; returns an error message, or None when the value is fine.
        dimensions: The model dimensions in which the option has an effect; setting it in another is an error.
        problem_types: The problem types in which the option has an effect; setting it in another is a warning
            (a config moved between tasks keeps keys that no longer matter).
    """

    name: str
    default: Any
    help: str
    types: tuple[type, ...] = ()
    choices: tuple[Any, ...] = ()
    check: Callable[[Any], str | None] | None = None
    dimensions: tuple[int, ...] = (2, 3)
    problem_types: tuple[str, ...] = PROBLEM_TYPES

    def accepted_types(self) -> tuple[type, ...]:
        if self.types:
            return self.types
        if self.default is None:
            return (object,)
        return (type(self.default),)

    def validate(self, value: Any, architecture: str) -> Any:
        """Returns the value to use, or raises ConfigError saying what is allowed."""
        where = f"model.{self.name} = {value!r} (architecture {architecture})"
        if isinstance(value, str) and self.choices and all(isinstance(c, str) for c in self.choices):
            value = value.lower()
        types = self.accepted_types()
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, list) and tuple in types:
            value = tuple(value)
        bad_bool = isinstance(value, bool) and bool not in types and object not in types
        if bad_bool or not isinstance(value, types):
            names = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{where}: expected {names}, got {type(value).__name__}.")
        if self.choices and value not in self.choices:
            near = difflib.get_close_matches(str(value), [str(c) for c in self.choices], n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{where} is not allowed; choose one of {list(self.choices)}.{hint}")
        if self.check is not None:
            message = self.check(value)
            if message:
                raise ConfigError(f"{where}: {message}")
        return value

    def describe(self) -> str:
        allowed = f" [{', '.join(map(str, self.choices))}]" if self.choices else ""
        return f"{self.name} (default {self.default!r}){allowed}: {self.help}"


@dataclass(frozen=True)
class Example:
    """A small configuration that the generic architecture test builds and trains one step."""

    problem_type: str
    dimension: int
    options: Mapping[str, Any] = field(default_factory=dict)
    patch_size: tuple[int, ...] = (32, 32, 32)
    in_channels: int = 1
    n_outputs: int = 2
