"""Declared `model:` options of every architecture, and their validation.

Each architecture declares its options once (name, type, default, allowed values, help). The same declaration
validates a GaNDLF `model:` section when the model is built and is printed by `gandlf-dimlift list`.
GaNDLF passes unknown `model:` keys through silently, so a typo such as `encoder_nme` would otherwise train a
different model than the user wrote: a key close to a declared option is an error, any other unknown key a warning.
"""

from __future__ import annotations

import difflib
import warnings
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


class ConfigError(ValueError):
    """A `model:` option is misspelt or has a value the architecture cannot use."""


class ConfigWarning(UserWarning):
    """An unknown `model:` key that GaNDLF would silently ignore."""


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
    """

    name: str
    default: Any
    help: str
    types: tuple[type, ...] = ()
    choices: tuple[Any, ...] = ()
    check: Callable[[Any], str | None] | None = None

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


@dataclass(frozen=True)
class Architecture:
    """A plugin architecture: what the `gandlf.models` entry point of a `dimlift_*` key refers to.

    GaNDLF builds models as `global_models_dict[key](parameters=params)`, so an instance is itself the builder.

    Attributes:
        key: Architecture key as written in the config.
        summary: One line for `gandlf-dimlift list`.
        make: `make(spec, options) -> nn.Module`, given the parsed GaNDLF contract and the validated options.
        options: The declared `model:` options.
        dimensions: Supported `model.dimension` values.
        problem_types: Supported GaNDLF problem types.
        examples: Small configurations for the generic test.
    """

    key: str
    summary: str
    make: Callable[..., Any]
    options: tuple[Option, ...] = ()
    dimensions: tuple[int, ...] = (2, 3)
    problem_types: tuple[str, ...] = PROBLEM_TYPES
    examples: tuple[Example, ...] = ()

    def resolve(self, model_section: Mapping[str, Any]) -> dict[str, Any]:
        """Validates a `model:` section against the declared options and returns every option's value."""
        declared = {o.name: o for o in self.options}
        for key in model_section:
            if key in declared or key in GANDLF_MODEL_KEYS:
                continue
            near = difflib.get_close_matches(key, list(declared), n=1, cutoff=0.75)
            if near:
                raise ConfigError(
                    f"model.{key} is not an option of {self.key}; did you mean model.{near[0]}? "
                    f"Options of {self.key}: {sorted(declared)}."
                )
            warnings.warn(
                f"model.{key} is neither a GaNDLF key nor an option of {self.key}; it is ignored.",
                ConfigWarning,
                stacklevel=3,
            )
        return {
            name: option.validate(model_section[name], self.key) if name in model_section else option.default
            for name, option in declared.items()
        }

    def __call__(self, parameters: dict) -> Any:
        from gandlf_dimlift.models.common import ModelSpec

        spec = ModelSpec.from_parameters(parameters)
        if spec.dimension not in self.dimensions:
            raise ConfigError(
                f"{self.key} supports model.dimension in {list(self.dimensions)}, not {spec.dimension}."
            )
        if spec.problem_type not in self.problem_types:
            raise ConfigError(
                f"{self.key} supports {list(self.problem_types)} problems, not {spec.problem_type}; "
                "GaNDLF infers the problem type from the CSV (a ValueToPredict column) and final_layer."
            )
        return self.make(spec, self.resolve(parameters["model"]))
