"""One registry: architectures declared in the `gandlf.models` entry-point group, inserted into GaNDLF.

Any installed distribution can declare architectures in that group (`key = module:builder`, where the builder
is called as `builder(parameters=params)` and returns an `nn.Module` with GaNDLF's model contract). This
package declares its own there too. `register()` loads them all and inserts them into
`GANDLF.models.global_models_dict`; when GaNDLF's configuration module was imported first it also rebuilds the
pydantic models that froze the list of valid names, so the new keys validate.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import sys
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "gandlf.models"

# Substrings that change GaNDLF 0.1.5's behaviour when they appear in an architecture key.
FORBIDDEN_SUBSTRINGS = {
    "deep": "GaNDLF then treats the model output as a list of deep-supervision outputs",
    "sdnet": "GaNDLF then expects SDNet's tuple output",
    "vgg": "GaNDLF then relaxes its normalisation validation for VGG models",
}

logger = logging.getLogger(__name__)


class RegistrationError(ValueError):
    """An architecture key that cannot be registered."""


@dataclass(frozen=True)
class Entry:
    """A loaded entry point: the key, the builder, and the distribution that declares it."""

    key: str
    builder: Any
    distribution: str


@dataclass(frozen=True)
class Failure:
    """An entry point that could not be loaded."""

    key: str
    distribution: str
    error: str


_inserted: dict[str, Entry] = {}  # keys this module put into GaNDLF's dictionary
failures: list[Failure] = []


def check_key(key: str) -> None:
    """Raises RegistrationError when GaNDLF cannot use `key` as an architecture name."""
    if key != key.lower():
        raise RegistrationError(
            f"Architecture key {key!r} is not lowercase; GaNDLF lowercases the configured name before looking it "
            f"up, so it could never be selected. Use {key.lower()!r}."
        )
    for part, why in FORBIDDEN_SUBSTRINGS.items():
        if part in key:
            raise RegistrationError(f"Architecture key {key!r} contains {part!r}: {why}. Choose another key.")


def load_entries() -> list[Entry]:
    """Loads every `gandlf.models` entry point; one that fails is recorded in `failures` and warned about."""
    entries, seen = [], set()
    for point in entry_points(group=ENTRY_POINT_GROUP):
        distribution = point.dist.name if point.dist is not None else "<unknown distribution>"
        if (point.name, distribution) in seen:  # the same distribution found twice on sys.path
            continue
        seen.add((point.name, distribution))
        try:
            entries.append(Entry(point.name, point.load(), distribution))
        except Exception as error:  # noqa: BLE001 - one broken plugin must not stop the others
            failure = Failure(point.name, distribution, " ".join(f"{type(error).__name__}: {error}".split()))
            if failure not in failures:
                failures.append(failure)
            warnings.warn(
                f"gandlf-dimlift: architecture {point.name!r} of distribution {distribution!r} failed to load "
                f"and is skipped: {failure.error}",
                RuntimeWarning,
                stacklevel=2,
            )
    return entries


def register() -> dict[str, Entry]:
    """Inserts every `gandlf.models` entry point into GaNDLF (idempotent).

    Returns:
        The registered entries by key.

    Raises:
        RegistrationError: Listing every key that was refused (badly formed, or clashing with a GaNDLF built-in
            or another distribution's key). All other keys are registered before this is raised.
    """
    import GANDLF.models as gandlf_models

    models = gandlf_models.global_models_dict
    problems = []
    for entry in load_entries():
        try:
            check_key(entry.key)
            current = _inserted.get(entry.key)
            if current is not None and current.distribution != entry.distribution:
                raise RegistrationError(
                    f"Architecture key {entry.key!r} is declared by both {current.distribution!r} and "
                    f"{entry.distribution!r}; uninstall one of them or rename the key in one."
                )
            if current is None and entry.key in models:
                raise RegistrationError(
                    f"Architecture key {entry.key!r} of {entry.distribution!r} would replace GaNDLF's built-in "
                    f"{entry.key!r}; rename the plugin's key."
                )
        except RegistrationError as error:
            problems.append(str(error))
            continue
        models[entry.key] = entry.builder
        _inserted[entry.key] = entry
    refresh_gandlf_configuration()
    if problems:
        raise RegistrationError(" | ".join(problems))
    return dict(_inserted)


def registered() -> dict[str, Entry]:
    """The entries `register()` has inserted so far."""
    return dict(_inserted)


CONFIG_MODULE = "GANDLF.configuration.model_config"


def suggest_architecture(value: Any) -> Any:
    """Pydantic validator in front of GaNDLF's architecture Literal: a near miss gets a suggestion.

    GaNDLF validates `model.architecture` against the exact keys before lowercasing it, so `dimlift_SMP` or
    `dimlift-smp` would only get the list of ~70 names.
    """
    from GANDLF.models import global_models_dict

    if not isinstance(value, str) or value in global_models_dict:
        return value
    normal = value.strip().lower().replace("-", "_").replace(" ", "_")
    near = normal if normal in global_models_dict else next(
        iter(difflib.get_close_matches(normal, list(global_models_dict), n=1, cutoff=0.75)), None)
    if near is None:
        return value  # the Literal's own error lists every valid name
    raise ValueError(
        f"model.architecture = {value!r} is not a GaNDLF architecture; did you mean {near!r}? "
        "(`gandlf-dimlift list` shows the plugin's architectures)"
    )


def refresh_gandlf_configuration() -> None:
    """Makes GaNDLF's frozen architecture Literal include every key of `global_models_dict`, with suggestions.

    `GANDLF.configuration.model_config` builds `Literal[tuple(global_models_dict)]` once, at import. It is imported
    here when it is not yet (every GaNDLF entry point imports it next anyway), then the pydantic models whose
    schemas embed that Literal are rebuilt with `suggest_architecture` in front of it.
    """
    from typing import Annotated, Literal

    from GANDLF.models import global_models_dict
    from pydantic import BaseModel, BeforeValidator

    if CONFIG_MODULE not in sys.modules:
        try:
            importlib.import_module(CONFIG_MODULE)
        except Exception as error:  # noqa: BLE001 - GaNDLF's own import will report it
            logger.debug("Could not import %s: %s", CONFIG_MODULE, error)
            return
    module = sys.modules.get(CONFIG_MODULE)
    if module is None or not hasattr(module, "ModelConfig"):
        return  # still importing (it imported GANDLF.models): it will read the updated dictionary
    keys = tuple(global_models_dict)
    if getattr(module, "DIMLIFT_ARCHITECTURE_KEYS", None) == keys:
        return
    options = Literal[keys]
    module.ARCHITECTURE_OPTIONS = options
    module.DIMLIFT_ARCHITECTURE_KEYS = keys
    module.ModelConfig.model_fields["architecture"].annotation = Annotated[options, BeforeValidator(
        suggest_architecture)]
    module.ModelConfig.model_rebuild(force=True)
    # Every other configuration model that may embed ModelConfig, parents before children.
    models = {
        value
        for name, mod in list(sys.modules.items())
        if name.startswith("GANDLF.configuration") and mod is not None
        for value in vars(mod).values()
        if isinstance(value, type) and issubclass(value, BaseModel) and value is not module.ModelConfig
        and value.__module__.startswith("GANDLF.configuration")
    }
    for model in sorted(models, key=lambda m: len(m.__mro__)):
        model.model_rebuild(force=True)
    logger.debug("Rebuilt GaNDLF's configuration models for %d architectures", len(global_models_dict))
