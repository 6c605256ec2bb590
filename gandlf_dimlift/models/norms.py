"""Normalisation layers against GaNDLF's batches: one sample per batch, and an epoch's last batch of one.

A batch norm in training mode needs more than one value per channel, and an instance norm more than one voxel.
GaNDLF's data loader does not drop the last batch of an epoch, so whenever the number of training patches is not a
multiple of `batch_size` a batch of one sample arrives; at a deep bottleneck (1 x 1 x 1 at /32 of a 32^3 patch)
torch then fails in the middle of an epoch. Two rules make that predictable:

- `check_single_sample_batches` (at build time): with `batch_size: 1` every batch holds one sample, so a batch
  norm that sees one value per channel could never normalise: the config is refused, naming the layer and the
  smallest patch that works. An instance norm that sees one voxel is refused whatever the batch size.
- `tolerate_single_sample_batches`: with a larger batch size, an occasional batch of one sample normalises such a
  layer with its running statistics (as in evaluation) and leaves them unchanged.
- `check_input_reaches_the_head` (at build time): a classifier or regressor whose features end in batch norms with
  no nonlinearity after them (EfficientNet's blocks end so: a linear bottleneck, summed with its input) and are
  then averaged over space gets, from a batch of one sample in training, the norms' biases whatever the input: a
  constant output that cannot learn. With `batch_size: 1` such a config is refused; with 2, whose two samples then
  reach the head as the biases plus and minus the same features, it is warned about. Both name the fix: max
  pooling (DX-Net's default) over deepest features of more than one voxel.

`BatchRenorm` (`BatchRenorm2d`, `BatchRenorm3d`, their timm norm-and-activation twins, `renormalize_batch_norms`)
trains with the running statistics that evaluation uses, for encoders whose training batches hold too few volumes to
stand for all of them: slice attention's, and every plugin encoder that starts from random weights
(`renormalize_a_random_start`, called by the builder), whose first training batch sets the running statistics.
"""

from __future__ import annotations

import copy
import logging
import math
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

from gandlf_dimlift.lift.convert import register
from gandlf_dimlift.lift.layers import keep_activation, lift_batchnorm
from gandlf_dimlift.lift.ops import BatchNormAct3d
from gandlf_dimlift.options import ConfigError

logger = logging.getLogger(__name__)

_BATCH_NORMS = nn.modules.batchnorm._BatchNorm
_INSTANCE_NORMS = nn.modules.instancenorm._InstanceNorm


def _values_per_channel(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[1], 1) if x.dim() >= 2 else x.numel()


def _use_running_statistics(module: nn.Module, args: tuple) -> None:
    if module.training and module.track_running_stats and args and _values_per_channel(args[0]) <= 1:
        module.training = False
        module._dimlift_single_sample = True


def _restore_training(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    if getattr(module, "_dimlift_single_sample", False):
        module.training = True
        module._dimlift_single_sample = False


def tolerate_single_sample_batches(model: nn.Module) -> None:
    """Lets every batch norm of `model` take a batch with one value per channel (see the module docstring)."""
    for module in model.modules():
        if isinstance(module, _BATCH_NORMS) and not getattr(module, "_dimlift_tolerant", False):
            module.register_forward_pre_hook(_use_running_statistics)
            module.register_forward_hook(_restore_training)
            module._dimlift_tolerant = True


def _norm_inputs(model: nn.Module, shape: tuple[int, ...]) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(name, module, input shape) of every batch and instance norm in a forward of a zero tensor of `shape`."""
    seen: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    names = {module: name for name, module in model.named_modules()}

    def record(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            seen.append((names.get(module, type(module).__name__), module, tuple(args[0].shape)))

    norms = [m for m in model.modules() if isinstance(m, (_BATCH_NORMS, _INSTANCE_NORMS))]
    hooks = [m.register_forward_pre_hook(record) for m in norms]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(shape))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    return seen


def check_single_sample_batches(model: nn.Module, spec, batch_size: int | None, architecture: str,
                                smaller_bottleneck: str | None = None) -> None:
    """Refuses a config whose training batches would leave a norm layer nothing to normalise.

    Raises:
        ConfigError: Naming the layer, what it sees, and the smallest patch (or other change) that works.
    """
    norms = [m for m in model.modules() if isinstance(m, (_BATCH_NORMS, _INSTANCE_NORMS))]
    single_batches = batch_size == 1 and any(isinstance(m, _BATCH_NORMS) for m in norms)
    if not norms or not (single_batches or any(isinstance(m, _INSTANCE_NORMS) for m in norms)):
        return
    for name, module, shape in _norm_inputs(model, (1, spec.in_channels, *spec.patch_size)):
        voxels = math.prod(shape[2:])
        # of one sample: its first axis is 1, or its slices for a 2D network run on every slice
        values = shape[0] * voxels
        if isinstance(module, _INSTANCE_NORMS) and voxels <= 1:
            problem, fix = "an instance norm", "whatever the batch size"
        elif isinstance(module, _BATCH_NORMS) and single_batches and values <= 1:
            problem, fix = "a batch norm", "with batch_size: 1 (every batch one sample)"
        else:
            continue
        larger = list(spec.patch_size)
        axis = max(range(len(larger)), key=lambda i: larger[i])
        larger[axis] *= 2
        other = f", or {smaller_bottleneck}" if smaller_bottleneck else ""
        batch = ", or batch_size >= 2" if "batch" in problem else ""
        raise ConfigError(
            f"{architecture} cannot train with patch_size {list(spec.patch_size)}: {problem} ({name}) sees an input "
            f"of {'x'.join(map(str, shape[2:])) or 'no'} voxels, one value per channel {fix}, and torch cannot "
            f"normalise that in training. Use a patch twice as large along one axis (e.g. {larger}){other}{batch}."
        )


def _head_inputs(model: nn.Module, shape: tuple[int, ...]) -> list[torch.Tensor] | None:
    """The inputs of the last linear layer (the head) for two different random probes of `shape`, or None without a
    linear layer; the head's weights may start at zero, so its output would not tell. They run through a copy whose
    batch norms are in training mode and every other module in evaluation mode (no dropout, no stochastic depth),
    so the model's own running statistics stay untouched."""
    probe_model = copy.deepcopy(model).eval()
    seen: list[torch.Tensor] = []
    for module in probe_model.modules():
        if isinstance(module, _BATCH_NORMS):
            module.train()
        elif isinstance(module, nn.Linear):
            module.register_forward_pre_hook(lambda linear, args: seen.append(args[0].detach().float()))
    generator = torch.Generator().manual_seed(0)
    inputs = []
    with torch.no_grad():
        for scale, shift in ((1.0, 0.0), (3.0, 1.0)):
            seen.clear()
            probe_model(scale * torch.randn(shape, generator=generator) + shift)
            inputs.append(seen[-1] if seen else None)
    return None if inputs[0] is None else inputs


#: The fix both messages name: a maximum over space is not fixed by the norms' biases; over one voxel it is the
#: average (docs/dxnet.md measures both poolings).
POOLING_FIX = ("Use model.pooling: max over deepest features of more than one voxel (a smaller model.encoder_depth "
               "or a larger patch).")


def check_input_reaches_the_head(model: nn.Module, spec, batch_size: int | None, architecture: str) -> None:
    """Refuses `batch_size: 1` for a classifier or regressor whose head, in training, gets the same input whatever
    the model's input, and warns at `batch_size: 2` when the head's two inputs of a batch always sum to the same
    (see the module docstring): measured on two different probes.

    Raises:
        ConfigError: Naming why, and the batch size that works.
    """
    if batch_size not in (1, 2) or spec.problem_type == "segmentation":
        return
    if not any(isinstance(m, _BATCH_NORMS) for m in model.modules()):
        return
    inputs = _head_inputs(model, (batch_size, spec.in_channels, *spec.patch_size))
    if inputs is None or not torch.allclose(inputs[0].sum(0), inputs[1].sum(0), rtol=1e-4, atol=1e-5):
        return
    why = "its features end in batch norms with no nonlinearity after them, so in training"
    if batch_size == 2:
        logger.warning(
            "%s: with batch_size: 2 this %s model tells the two samples of a training batch apart only relative to "
            "each other: %s the head gets those norms' biases plus and minus the same features (two different input "
            "pairs gave head inputs of the same sum). %s",
            architecture, spec.problem_type, why, POOLING_FIX)
        return
    raise ConfigError(
        f"{architecture} cannot learn {spec.problem_type} with batch_size: 1: {why} a batch of one sample reaches "
        f"the head as those norms' biases whatever the input (tried with patch_size {list(spec.patch_size)}: two "
        f"different inputs gave the head the same features). {POOLING_FIX} Or use batch_size >= 2 (at 2 the two "
        "samples are told apart only relative to each other)."
    )


# ---------------------------------------------------------------------------------------------------------------
# Batch renormalisation: training with the running statistics that evaluation uses.


#: Values per channel a first batch needs to start a random start's running statistics: a variance of fewer (a deep
#: stage of a small patch at batch 1 or 2) is too noisy to start from. From 2 values, a running standard deviation
#: near 0 made the DDP test's examples overflow to NaN after one SGD step. The learning check's first batches hold
#: at least 8 (Omnia-Net's 2 x 2 bottleneck at batch 2).
FIRST_BATCH_MIN_VALUES = 8


class BatchRenorm:
    """Batch normalisation that trains with the running statistics it evaluates with (batch renormalisation).

    Ioffe, "Batch Renormalization" (2017), with unbounded corrections: the forward pass normalises with the
    running mean and variance in training as in evaluation, while the gradient is batch normalisation's (it flows
    through the batch statistics). Small batches need it: plain batch normalisation standardises every channel over
    the batch in training (over one volume's slices for a slice encoder; over a pair of volumes at batch_size 2)
    but over the running statistics in evaluation, and a model trained that way predicts differently in
    validation. Mixed into torch's batch norm classes (`BatchRenorm2d`, `BatchRenorm3d`): parameters and buffers
    are theirs, so pretrained weights and checkpoints load unchanged, and the evaluation output is identical.
    """

    # While a checkpointed forward runs: (statistics per module, whether this is the recomputation).
    replay: tuple[dict[nn.Module, tuple[torch.Tensor, torch.Tensor]], bool] | None = None
    # A random start's running statistics (0 and 1) are nothing like its features': the first training batch's
    # statistics replace them, so that step normalises as batch normalisation does (`renormalize_a_random_start`;
    # from FIRST_BATCH_MIN_VALUES values per channel on).
    start_from_first_batch: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.training or not self.track_running_stats:
            return super().forward(x)
        self._check_input_dim(x)
        recomputing = self.replay is not None and self.replay[1]
        count = x.numel() // x.shape[1]
        if recomputing:  # the backward pass recomputes a checkpointed forward: same statistics, no second update
            running_mean, running_var = self.replay[0][self]
        else:
            if self.start_from_first_batch and not self.num_batches_tracked and count >= FIRST_BATCH_MIN_VALUES:
                with torch.no_grad():
                    var, mean = torch.var_mean(x, dim=(0, *range(2, x.dim())), unbiased=True)
                    self.running_mean.copy_(mean)
                    self.running_var.copy_(var)
            running_mean, running_var = self.running_mean.clone(), self.running_var.clone()
            if self.replay is not None:
                self.replay[0][self] = (running_mean, running_var)
        running_std = torch.sqrt(running_var + self.eps)
        if count < 2:  # one value per channel: no batch statistics, so the running ones alone
            per_channel = (-1,) + (1,) * (x.dim() - 2)
            normalized = (x - running_mean.view(per_channel)) / running_std.view(per_channel)
            return normalized * self.weight.view(per_channel) + self.bias.view(per_channel)
        with torch.no_grad():
            var, mean = torch.var_mean(x, dim=(0, *range(2, x.dim())), unbiased=False)
            # (x - mean) / std * r + d with r = std / running_std and d = (mean - running_mean) / running_std held
            # constant: forward value (x - running_mean) / running_std, gradient through the batch statistics.
            r = torch.sqrt(var + self.eps) / running_std
            d = (mean - running_mean) / running_std
            if not recomputing:
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * count / (count - 1)).to(self.running_var.dtype), momentum)
        # torch's fused batch norm in training mode (one kernel forward and backward, where the expression above
        # spelt out costs several passes over the activations) with the corrections folded into its affine terms
        return F.batch_norm(x, None, None, self.weight * r, self.bias + self.weight * d, True, 0.0, self.eps)


class BatchRenorm2d(BatchRenorm, nn.BatchNorm2d):
    """`BatchRenorm` of `nn.BatchNorm2d`."""


class BatchRenorm3d(BatchRenorm, nn.BatchNorm3d):
    """`BatchRenorm` of `nn.BatchNorm3d`."""


class _ThenAct:
    """timm's norm-and-activation layers: the norm, then their `drop` and `act` children."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.act(self.drop(super().forward(x)))


class BatchRenormAct2d(_ThenAct, BatchRenorm2d):
    """`BatchRenorm` of timm's `BatchNormAct2d` (smp's timm-efficientnet-* and tu-* encoders)."""


class BatchRenormAct3d(_ThenAct, BatchRenorm3d):
    """`BatchRenorm` of `lift.ops.BatchNormAct3d`, the lifted `BatchNormAct2d`."""


_RENORMS = {nn.BatchNorm2d: BatchRenorm2d, nn.BatchNorm3d: BatchRenorm3d, BatchNormAct2d: BatchRenormAct2d,
            BatchNormAct3d: BatchRenormAct3d}
_LIFTED_RENORMS = {BatchRenorm2d: BatchRenorm3d, BatchRenormAct2d: BatchRenormAct3d}


@register(*(f"{renorm.__module__}.{renorm.__qualname__}" for renorm in _LIFTED_RENORMS))
def _lift_batch_renorm(m: BatchRenorm2d, spec, path: str) -> nn.Module:
    """`lift`'s table entry: a renormalised 2D model lifts to a renormalised 3D one."""
    lifted = lift_batchnorm(m, spec, path, cls=_LIFTED_RENORMS[type(m)])
    lifted.start_from_first_batch = m.start_from_first_batch
    return lifted


@contextmanager
def _replaying(modules: list[BatchRenorm], saved: dict, recomputing: bool):
    for module in modules:
        module.replay = (saved, recomputing)
    try:
        yield
    finally:
        for module in modules:
            del module.replay  # back to the class default: forward leaves no Python state behind (DDP)


def renorm_checkpoint_contexts(module: nn.Module) -> tuple[Any, Any]:
    """The `context_fn` result for `torch.utils.checkpoint` of a call into `module`: the recomputation in the
    backward pass uses the running statistics of the original forward and does not update them again."""
    modules = [m for m in module.modules() if isinstance(m, BatchRenorm)]
    saved: dict = {}
    return _replaying(modules, saved, False), _replaying(modules, saved, True)


def renormalize_batch_norms(module: nn.Module, momentum: float | None = None,
                            start_from_first_batch: bool = False) -> int:
    """Replaces every `nn.BatchNorm2d` and `nn.BatchNorm3d` (and timm's `BatchNormAct2d`, `BatchNormAct3d`) inside
    `module` by its `BatchRenorm` with the same state (and `momentum`, `start_from_first_batch` when given);
    returns how many."""
    replaced = 0
    for name, child in list(module.named_children()):
        renorm_class = _RENORMS.get(type(child))
        if renorm_class is not None:
            renorm = renorm_class(
                child.num_features, child.eps, child.momentum if momentum is None else momentum, child.affine,
                child.track_running_stats, device=child.weight.device if child.affine else None,
            )
            keep_activation(renorm, child)
            renorm.load_state_dict(child.state_dict())
            renorm.start_from_first_batch = start_from_first_batch
            renorm.train(child.training)
            setattr(module, name, renorm)
            replaced += 1
        else:
            replaced += renormalize_batch_norms(child, momentum, start_from_first_batch)
    return replaced


#: The running statistics' momentum of a renormalised random start: torch's default (smp's efficientnet-* encoders
#: keep TensorFlow's 0.01, which after the learning check's 36 steps has moved them 30% of the way from their initial
#: 0 and 1; renormalised with statistics that far off, DX-Net's classifier did not learn: train accuracy 0.52).
RANDOM_START_MOMENTUM = 0.1


def renormalize_a_random_start(encoder: nn.Module, architecture: str, momentum: float = RANDOM_START_MOMENTUM) -> None:
    """From random weights (`pretrained: false`) an encoder's batch norms train with their running statistics
    (`BatchRenorm`) at `momentum` (torch's by default), and the run says so. At GaNDLF's small batch sizes plain
    batch norms normalise by the batch's one or two volumes in training but by the running statistics in evaluation.
    In the learning check (batch 2, 8 gandlf_run trainings each, docs/conformance.md): DX-Net's classifier, whose
    EfficientNet renormalises at every stage with no residual path across stages, reached train accuracy 0.97 but
    validation accuracy 0.56; renormalised, 0.97 and 0.91. smp's resnet18 classifier went from train accuracy
    0.97 to 1.00. The first training batch sets the running statistics (0 and 1 are nothing like a random
    encoder's features): from 0 and 1, DX-Net's classifier rose slowly and ended at 0.95 (docs/dxnet.md). Weights
    from a tag or a file keep plain batch norms with their trained statistics, as the papers fine-tune them. An
    encoder that its model renormalised already, whatever its weights (slice attention's), gets the same start."""
    renormalized = renormalize_batch_norms(encoder, momentum=momentum, start_from_first_batch=True)
    for module in encoder.modules():
        if isinstance(module, BatchRenorm) and not module.start_from_first_batch:
            module.start_from_first_batch, module.momentum = True, momentum
            renormalized += 1
    if renormalized:
        logger.info("%s: random start: the encoder's %d batch norms train with their running statistics (batch "
                    "renormalisation, momentum %s).", architecture, renormalized, momentum)
