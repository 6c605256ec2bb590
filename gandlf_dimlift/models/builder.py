"""The one build path of every plugin architecture (the timm habit: models never load weights themselves).

GaNDLF calls `global_models_dict[key](parameters=params)`; for a plugin key that is an `Architecture`, whose call
runs `build`:

1. read GaNDLF's contract (`ModelSpec`: channels against the CSV, classes, final layer, patch) and validate the
   declared `model:` options;
2. build the network in its 2D form (the twin that is lifted for `dimension: 3`, or the model itself when the
   family does not lift) with the weights of a tag such as `imagenet`;
3. remove the modules whose parameters never get a gradient (smp keeps every encoder stage whatever the depth;
   DistributedDataParallel and the optimiser should not see them);
4. load a 2D weights file, lift to 3D, load a 3D weights file (`weights.transfer`, one loader for every format);
   from random weights instead, the encoder's batch norms train with their running statistics
   (`norms.renormalize_a_random_start`);
5. start a segmentation output that no file gave at the training labels' class shares (`label_prior`);
6. refuse a batch size that leaves a batch norm one value per channel, or a classifier's head a constant input,
   and let an epoch's last batch of one sample through (GaNDLF does not drop it);
7. say what the model was initialised from, on GaNDLF's console and in its log.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gandlf_dimlift import messages, weights
from gandlf_dimlift.models.common import ModelSpec
from gandlf_dimlift.models.label_prior import start_at_label_prior
from gandlf_dimlift.models.norms import (
    RANDOM_START_MOMENTUM,
    check_input_reaches_the_head,
    check_single_sample_batches,
    renormalize_a_random_start,
    tolerate_single_sample_batches,
)
from gandlf_dimlift.options import GANDLF_MODEL_KEYS, PROBLEM_TYPES, ConfigError, Example, Option

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    """A plugin architecture: what the `gandlf.models` entry point of a `dimlift_*` key refers to.

    GaNDLF builds models as `global_models_dict[key](parameters=params)`, so an instance is itself the builder.

    Attributes:
        key: Architecture key as written in the config.
        summary: One line for `gandlf-dimlift list`.
        make: `make(spec, options, weight_tag) -> nn.Module`: the network for `spec` (2D when the architecture
            lifts, see `lift`) with the weight tag's weights, or random weights for None.
        options: The declared `model:` options.
        dimensions: Supported `model.dimension` values.
        problem_types: Supported GaNDLF problem types.
        examples: Small configurations for the generic test.
        lift: `lift(model_2d, spec, options) -> model_3d` (with `gandlf_dimlift.lift.lift`, the mode in
            `options["converter_type"]`; in place is fine: the builder does not use `model_2d` again); None for a
            network built in its own dimension. A lifted network has a `dimension` attribute that its forward checks.
        parts: `parts(model) -> weights.Parts`: the encoder, the rest and the output layer, for weights files.
        check: `check(spec, options)`: architecture-specific config checks, before anything is built.
        probe_shape: `probe_shape(spec) -> shape` of an input of the network `make` returns, used to find the
            parameters that never get a gradient; `(1, channels, *patch_size)` when None.
        smaller_bottleneck: How to make the deepest features larger, for the message that refuses a batch norm
            with one value per channel (e.g. "a smaller model.encoder_depth").
        random_start_momentum: The momentum of the running statistics of an encoder with random weights, which
            trains them renormalised from its first batch's (`norms.renormalize_a_random_start`).
    """

    key: str
    summary: str
    make: Callable[..., nn.Module]
    options: tuple[Option, ...] = ()
    dimensions: tuple[int, ...] = (2, 3)
    problem_types: tuple[str, ...] = PROBLEM_TYPES
    examples: tuple[Example, ...] = ()
    lift: Callable[..., nn.Module] | None = None
    parts: Callable[[nn.Module], weights.Parts] | None = None
    check: Callable[..., None] | None = None
    probe_shape: Callable[[ModelSpec], tuple[int, ...]] | None = None
    smaller_bottleneck: str | None = None
    random_start_momentum: float = RANDOM_START_MOMENTUM

    def resolve(self, model_section: Mapping[str, Any], dimension: int, problem_type: str) -> dict[str, Any]:
        """Validates a `model:` section against the declared options and returns every option's value.

        Raises:
            ConfigError: A key close to a declared option (a typo), a bad value, or an option that has no effect
                in this model dimension.
        """
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
            logger.warning("model.%s is neither a GaNDLF key nor an option of %s; it is ignored.", key, self.key)
        for name, option in declared.items():
            if name not in model_section:
                continue
            if dimension not in option.dimensions:
                where = " or ".join(f"{d}D" for d in option.dimensions)
                raise ConfigError(
                    f"model.{name} has no effect with model.dimension: {dimension} ({self.key} uses it in {where} "
                    f"only); remove it, or set model.dimension: {option.dimensions[0]}."
                )
            if problem_type not in option.problem_types:
                logger.warning("model.%s has no effect on %s with %s (it is used for %s); it is ignored.",
                               name, problem_type, self.key, " and ".join(option.problem_types))
        return {
            name: option.validate(model_section[name], self.key) if name in model_section else option.default
            for name, option in declared.items()
        }

    def __call__(self, parameters: dict) -> nn.Module:
        return build(self, parameters)


def build(architecture: Architecture, parameters: dict[str, Any]) -> nn.Module:
    """Builds `architecture` from GaNDLF's parameters dictionary (see the module docstring for the steps)."""
    messages.enable()
    spec = ModelSpec.from_parameters(parameters)
    key = architecture.key
    if spec.dimension not in architecture.dimensions:
        raise ConfigError(f"{key} supports model.dimension in {list(architecture.dimensions)}, not {spec.dimension}.")
    if spec.problem_type not in architecture.problem_types:
        raise ConfigError(
            f"{key} supports {list(architecture.problem_types)} problems, not {spec.problem_type}; "
            "GaNDLF infers the problem type from the CSV (a ValueToPredict column) and final_layer."
        )
    options = architecture.resolve(parameters["model"], spec.dimension, spec.problem_type)
    if architecture.check is not None:
        architecture.check(spec, options)
    source = weights.Source.parse(options.get("pretrained"), f"model.pretrained of {key}")
    if source.dimension == 3 and spec.dimension == 2:
        raise ConfigError(
            f"model.pretrained = {str(source.file.path)!r} is a 3D checkpoint; a 2D model cannot load it: it holds "
            f"3D weights ({source.describe()}), and {key} is a 2D model. Dimensional transfer goes from 2D to 3D: "
            "a 2D run's checkpoint into a 3D model, not the reverse."
        )
    lifts = spec.dimension == 3 and architecture.lift is not None
    make_spec = spec.planar() if lifts else spec
    model = architecture.make(make_spec, options, source.tag)
    probe = architecture.probe_shape(make_spec) if architecture.probe_shape else (
        1, make_spec.in_channels, *make_spec.patch_size)
    removed = remove_unused_modules(model, probe)
    if removed:
        logger.debug("%s: removed modules that never get a gradient: %s", key, removed)
    transferred = None
    accepts = next((o.help for o in architecture.options if o.name == "pretrained"), "")
    if source.dimension == 2:
        transferred = weights.transfer(model, source, architecture.parts(model), key, accepts)
    if lifts:
        model.dimension = 3  # the lifted copy's forward (and the lift's check pass) take (B, C, X, Y, Z)
        model = architecture.lift(model, spec, options)
    parts = architecture.parts(model) if architecture.parts else None
    if source.dimension == 3:
        transferred = weights.transfer(model, source, parts, key, accepts)
    if source.tag is None and source.file is None and parts is not None:
        renormalize_a_random_start(model.get_submodule(parts.encoder), key, architecture.random_start_momentum)
    if spec.problem_type == "segmentation" and parts is not None and not weights.loaded_output_layer(transferred):
        start_at_label_prior(model, parts.head, spec, parameters, key)
    # GaNDLF accepts only batch and instance for these architectures; an encoder keeps its pretrained norms
    instance_norms = any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in model.modules())
    if spec.norm_type == "instance" and not instance_norms:
        logger.warning("%s: model.norm_type: instance has no layer to apply to in this %s model (an encoder keeps "
                       "the batch norms its weights were trained with); it is ignored.", key, spec.problem_type)
    tolerate_single_sample_batches(model)
    check_single_sample_batches(model, spec, parameters.get("batch_size"), key, architecture.smaller_bottleneck)
    check_input_reaches_the_head(model, spec, parameters.get("batch_size"), key)
    logger.info("%s: %s", key, describe_initialisation(spec, options, source, transferred, lifts))
    return model


def describe_initialisation(spec: ModelSpec, options: Mapping[str, Any], source: weights.Source,
                            transferred: str | None, lifted: bool) -> str:
    """One line: what the weights were initialised from and how they reached this model."""
    text = f"{spec.dimension}D {spec.problem_type} model, "
    if source.file is not None:
        text += f"initialised from {source.describe()}: {transferred} loaded"
    elif source.tag is not None:
        text += f"encoder initialised from its '{source.tag}' weights"
    else:
        text += "random initialisation (pretrained: false)"
    if lifted:
        lifted_by = f"lifted 2D -> 3D by {options['converter_type']}"
        text += f" into the 3D model ({lifted_by})" if source.dimension == 3 else f", {lifted_by}"
    return text + "."


def remove_unused_modules(model: nn.Module, probe_shape: tuple[int, ...]) -> list[str]:
    """Replaces by identities the submodules whose parameters get no gradient from a probe; returns their names.

    smp builds every stage of an encoder whatever its depth (a depth-3 ResNet keeps layer3 and layer4), and
    EfficientNet encoders keep their classifier's head convolution: parameters that never get a gradient waste
    memory and break DistributedDataParallel (`find_unused_parameters=False`, GaNDLF's setting). The probe runs in
    eval mode (batch statistics of a one-sample probe are meaningless) with gradients on, whatever the caller's
    grad mode (the model may be built inside `torch.no_grad()`). Module lists stay (encoders index and slice them,
    e.g. EfficientNet's `_blocks[:n]`): their unused children are replaced.
    """
    training = model.training
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(probe_shape, generator=generator)
    try:
        with torch.enable_grad():
            output = model.eval()(probe)
            output.float().sum().backward()
        removed: list[str] = []
        for name, module in list(model.named_modules()):
            if not name or any(name.startswith(r + ".") for r in removed):
                continue
            parameters = list(module.parameters())
            container = isinstance(module, (nn.ModuleList, nn.ModuleDict))
            if parameters and not container and all(p.grad is None for p in parameters):
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
                removed.append(name)
        return removed
    finally:
        model.zero_grad(set_to_none=True)
        model.train(training)
