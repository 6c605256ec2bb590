"""OpenFL support: a GaNDLF task runner and data loader that check the plugin before building a model.

OpenFL 1.9 ships `openfl.federated.task.runner_gandlf.GaNDLFTaskRunner`, which builds the model through
GaNDLF's legacy compute path (`GANDLF.compute.generic.create_pytorch_objects`). That path imports
`GANDLF.models`, so the startup hook registers the `dimlift_*` architectures in every aggregator and
collaborator process where gandlf-dimlift is installed. What OpenFL cannot see is *which* plugin version a
collaborator runs: two versions may build different modules under the same key, and the aggregated weights
would then mean different things on different sites.

`DimliftTaskRunner` is `GaNDLFTaskRunner` with one more plan setting, `gandlf_dimlift_version` (an exact
version such as `0.1.0`, or a PEP 440 specifier such as `==0.1.*`). Before anything is built it compares the
installed gandlf-dimlift with that setting and stops the process with an error that names the collaborator
(its data path), the installed and the required versions. Because the setting is part of the plan, it is
also part of the plan hash that OpenFL puts into the federation UUID: a collaborator started from an edited
plan is refused by the aggregator too.

`DimliftDataLoader` is OpenFL's `GaNDLFDataLoaderWrapper` with a `feature_shape` setting (OpenFL's base class
only derives it from a loaded training set, which `fx plan initialize` does not have).

OpenFL is optional: this module imports without it, and the two classes are created on first access.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

logger = logging.getLogger(__name__)

DISTRIBUTION = "gandlf-dimlift"
PLAN_SETTING = "gandlf_dimlift_version"


class PluginVersionError(RuntimeError):
    """The installed gandlf-dimlift does not match the version the federation's plan requires."""


def installed_version() -> str | None:
    """The installed gandlf-dimlift version, or None when the distribution is not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def check_plugin_version(required: str | None, who: str = "this process", installed: str | None = None) -> str:
    """Checks the installed gandlf-dimlift against a plan's requirement.

    Args:
        required: An exact version (`0.1.0`) or a PEP 440 specifier (`==0.1.*`, `>=0.1,<0.2`). None or an
            empty string means the plan pins nothing and any installed version is accepted.
        who: Names the participant in the error message (collaborator name or data path, host).
        installed: The version to check; defaults to the installed distribution's.

    Returns:
        The installed version.

    Raises:
        PluginVersionError: gandlf-dimlift is not installed, or its version does not satisfy `required`.
    """
    installed = installed if installed is not None else installed_version()
    if installed is None:
        raise PluginVersionError(
            f"{who}: {DISTRIBUTION} is not installed, but the plan requires {DISTRIBUTION} {required!r}. "
            f"Install it in this environment: pip install '{DISTRIBUTION}=={required}'."
        )
    if not required:
        return installed
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    text = str(required).strip()
    try:
        specifier = SpecifierSet(text if text[0] in "=<>!~" else f"=={text}")
    except InvalidSpecifier as error:
        raise PluginVersionError(
            f"Plan setting {PLAN_SETTING} = {required!r} is neither a version (e.g. '0.1.0') nor a PEP 440 "
            f"specifier (e.g. '==0.1.*'): {error}. Fix the task_runner settings of the plan."
        ) from error
    try:
        satisfied = Version(installed) in specifier
    except InvalidVersion:
        satisfied = False
    if not satisfied:
        raise PluginVersionError(
            f"{who}: {DISTRIBUTION} {installed} is installed, but the plan's task_runner setting "
            f"{PLAN_SETTING} requires {specifier}. Every aggregator and collaborator must run the same plugin "
            f"version: install it with pip install '{DISTRIBUTION}{specifier}' (or change the plan for the "
            f"whole federation)."
        )
    return installed


def federated_average(
    state_dicts: Sequence[Mapping[str, Any]], weights: Sequence[float] | None = None
) -> dict[str, Any]:
    """Weighted average of model state dicts with identical keys (OpenFL's default aggregation, FedAvg).

    Floating-point tensors are averaged; integer tensors (BatchNorm's `num_batches_tracked`) take the first
    state dict's value, as OpenFL's weighted average would round them anyway.

    Args:
        state_dicts: Two or more state dicts of the same architecture.
        weights: Relative weights (e.g. each collaborator's number of training samples); equal by default.

    Raises:
        ValueError: Fewer than one state dict, mismatched keys or shapes, or a weight count that differs.
    """
    import torch

    if not state_dicts:
        raise ValueError("federated_average needs at least one state dict; got none.")
    weights = [1.0] * len(state_dicts) if weights is None else [float(w) for w in weights]
    if len(weights) != len(state_dicts) or sum(weights) <= 0:
        raise ValueError(
            f"federated_average got {len(state_dicts)} state dicts and weights {weights}; give one positive "
            "weight per state dict."
        )
    keys = list(state_dicts[0])
    for index, state in enumerate(state_dicts[1:], start=1):
        if list(state) != keys:
            missing, extra = set(keys) - set(state), set(state) - set(keys)
            raise ValueError(
                f"State dict {index} has different keys from state dict 0 (missing {sorted(missing)[:5]}, extra "
                f"{sorted(extra)[:5]}): the collaborators did not build the same architecture."
            )
    total = sum(weights)
    average = {}
    for key in keys:
        tensors = [torch.as_tensor(state[key]) for state in state_dicts]
        if any(t.shape != tensors[0].shape for t in tensors):
            raise ValueError(f"Tensor {key!r} has shapes {[tuple(t.shape) for t in tensors]} across state dicts.")
        if tensors[0].is_floating_point():
            weighted = (w / total * t.double() for w, t in zip(weights, tensors, strict=True))
            average[key] = sum(weighted).to(tensors[0].dtype)
        else:
            average[key] = tensors[0].clone()
    return average


def _participant(data_loader: Any) -> str:
    """Names the participant for error messages: the collaborator's data path (OpenFL keys it by name) and host."""
    path = getattr(data_loader, "data_path", None) or getattr(data_loader, "train_csv", None)
    where = f"data path {path}" if path else "no data (plan initialisation)"
    return f"participant on host {socket.gethostname()} with {where}"


def _make_classes() -> dict[str, type]:
    try:
        from openfl.federated.data.loader_gandlf import GaNDLFDataLoaderWrapper
        from openfl.federated.task.runner_gandlf import GaNDLFTaskRunner
    except ImportError as error:
        raise ImportError(
            f"gandlf_dimlift.openfl needs OpenFL's GaNDLF runner ({error}). Install OpenFL next to GaNDLF 0.1.5: "
            "pip install 'openfl==1.9' (see docs/deploy.md for the protobuf/onnx pins it brings)."
        ) from error

    class DimliftDataLoader(GaNDLFDataLoaderWrapper):
        """OpenFL's GaNDLF data loader with the feature shape given in the plan.

        Args:
            data_path: The collaborator's folder holding `train.csv` and `valid.csv` (None while
                `fx plan initialize` builds the initial model).
            feature_shape: The patch size (as in the GaNDLF config).
        """

        def __init__(self, data_path: str | None = None, feature_shape: Sequence[int] = (32, 32, 32), **kwargs):
            super().__init__(data_path=data_path, **kwargs)
            self.data_path = data_path
            self.feature_shape = list(feature_shape)

        def get_feature_shape(self):
            return self.feature_shape

    class DimliftTaskRunner(GaNDLFTaskRunner):
        """OpenFL's GaNDLF task runner that first checks the installed gandlf-dimlift against the plan.

        Args:
            gandlf_config: The GaNDLF configuration (a dict or a YAML path), as for `GaNDLFTaskRunner`.
            device: Compute device.
            gandlf_dimlift_version: The version (or PEP 440 specifier) every participant must run.
            **kwargs: Passed to `GaNDLFTaskRunner` (OpenFL gives `data_loader` here).
        """

        def __init__(self, gandlf_config=None, device: str | None = None, gandlf_dimlift_version: str = "",
                     **kwargs):
            version = check_plugin_version(gandlf_dimlift_version, who=_participant(kwargs.get("data_loader")))
            logger.info("gandlf-dimlift %s satisfies the plan's %s %r", version, PLAN_SETTING,
                        gandlf_dimlift_version)
            self.gandlf_dimlift_version = version
            # OpenFL's Collaborator sets this; a default lets the runner also be driven directly.
            self.opt_treatment = "RESET"
            if isinstance(gandlf_config, dict) and not gandlf_config.get("problem_type"):
                # GaNDLF derives it from CSV headers, which `fx plan initialize` does not read.
                from GANDLF.utils import find_problem_type_from_parameters

                gandlf_config = {**gandlf_config, "problem_type": find_problem_type_from_parameters(gandlf_config)}
            super().__init__(gandlf_config=gandlf_config, device=device, **kwargs)

    return {"DimliftDataLoader": DimliftDataLoader, "DimliftTaskRunner": DimliftTaskRunner}


_classes: dict[str, type] = {}


def __getattr__(name: str):
    if name in ("DimliftDataLoader", "DimliftTaskRunner"):
        if not _classes:
            _classes.update(_make_classes())
        return _classes[name]
    raise AttributeError(f"module 'gandlf_dimlift.openfl' has no attribute {name!r}")
