"""Slice attention classifier: a 2D encoder embeds every slice, a pooling weighs the slices, a linear head predicts.

After Ziller et al., "Interpretable 2D Vision Models for 3D Medical Images". All slices of all volumes of a batch
go through the 2D encoder as one batch (or in chunks of `slice_chunk_size`), each slice's last feature map is
averaged to one feature vector, and the pooling (by default multi-head attention whose query is the mean slice
feature) returns the volume feature and one weight per slice. The weights of the last forward are kept in
`last_slice_weights` (per view, `(B, n_slices)`) for the explanation tools; `forward` returns one tensor.

GaNDLF's 3D layout is `(B, C, X, Y, Z)`: `slice_axis: z` (the default) takes the slices along the last axis;
`all` takes the slices of the three views and pools them as one sequence under one softmax.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gandlf_dimlift import weights
from gandlf_dimlift.lift import adapt_input_channels
from gandlf_dimlift.lift.ops import channels_last
from gandlf_dimlift.models import common
from gandlf_dimlift.models.builder import Architecture
from gandlf_dimlift.models.norms import renorm_checkpoint_contexts, renormalize_batch_norms
from gandlf_dimlift.models.slice_pooling import POOLINGS, SlicePositionEncoding, make_pooling
from gandlf_dimlift.models.slice_views import KEY, SLICE_AXES, VIEWS
from gandlf_dimlift.options import ConfigError, Example, Option

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLED_NORM_KEY = "pooled_feature_normalized"  # a checkpoint without this buffer predates the normalisation
POOLED_SCALE_KEY = "pooled_feature_scale"  # a checkpoint without this buffer predates the scale (it had 1)
# The layer-normalised pooled feature is scaled to a root mean square of HEAD_SPEED / features. Adam moves each
# weight of the (zero-initialised) head by about lr per step, so a logit moves by at most about lr * HEAD_SPEED *
# E|z| ~ lr * 80 per step whatever the encoder's width; at the unit scale (512 features) it moved about 5 times as
# fast, and at batch_size 1 the validation loss jumped (docs/slice_attention.md, "Stability at batch_size 1").
HEAD_SPEED = 100.0
# A random encoder's running statistics start at its first training batch's and then move at this momentum
# (`norms.renormalize_a_random_start`). From 0 and 1 at torch's 0.1 (its features' variance is far below 1, so its
# first epochs were hardly normalised) it learned later than GaNDLF's resnet18 at batch_size 1; from the first batch's
# at 0.1 it started as soon but swung more (docs/slice_attention.md, "Starts at batch_size: 1").
RANDOM_START_MOMENTUM = 0.03


def _at_least(minimum: int, what: str):
    def check(value: Any) -> str | None:
        if value is None:
            return None
        return None if value >= minimum else f"{what} must be at least {minimum}."

    return check


def _chunk_check(value: Any) -> str | None:
    if value is None or value >= 1:
        return None
    return "the encoder needs at least 1 slice per chunk; give a positive number of slices, or null for all at once."


class GreyToRGB(nn.Module):
    """The fixed 1x1 convolution with unit weights that repeats a grey slice into the encoder's 3 channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, *x.shape[2:])


class ImageNetNormalize(nn.Module):
    """Maps intensities to ImageNet's per-channel mean and standard deviation (3-channel slices)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_encoder(name: str, weight_tag: str | None, depth: int) -> nn.Module:
    """A 3-channel 2D smp encoder with the weights of `weight_tag` (or random for None)."""
    return weights.smp_encoder(name, in_channels=3, depth=depth, weights=weight_tag)


class SliceAttentionClassifier(nn.Module):
    """A 2D encoder over every slice, slice pooling with explicit weights, and a linear classification head.

    Args:
        spec: GaNDLF's model contract (3D, classification or regression).
        encoder_name: An smp encoder name.
        weight_tag: The encoder's weight tag (e.g. 'imagenet'), or None for random weights. Weights files are
            loaded by the builder (`gandlf_dimlift.models.builder`).
        encoder_depth: smp encoder depth; the deepest feature map is pooled per slice.
        slice_axis: x, y, z, or all.
        pooling: attention, gated, mean or max.
        heads: Attention heads of `attention` pooling.
        attention_hidden: Hidden size of `gated` pooling.
        position_encoding: Add a learned encoding of each slice's relative position (and view).
        slice_chunk_size: Slices per encoder call, or None for all slices of the batch at once.
        checkpointing: Recompute the encoder's activations in the backward pass (training memory).
        freeze_encoder_steps: Training steps during which the encoder gets no gradient.
        imagenet_normalize: Map 3-channel slices to ImageNet's mean and standard deviation.
        dropout: Dropout before the linear head.
    """

    def __init__(
        self,
        spec: common.ModelSpec,
        encoder_name: str = "resnet18",
        weight_tag: str | None = None,
        encoder_depth: int = 5,
        slice_axis: str = "z",
        pooling: str = "attention",
        heads: int = 8,
        attention_hidden: int = 128,
        position_encoding: bool = False,
        slice_chunk_size: int | None = 64,
        checkpointing: bool = False,
        freeze_encoder_steps: int = 0,
        imagenet_normalize: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if slice_axis not in SLICE_AXES:
            raise ConfigError(f"model.slice_axis = {slice_axis!r}; choose one of {list(SLICE_AXES)}.")
        if pooling not in POOLINGS:
            raise ConfigError(f"model.pooling = {pooling!r}; choose one of {list(POOLINGS)}.")
        if slice_chunk_size is not None and slice_chunk_size < 1:
            raise ConfigError(
                f"model.slice_chunk_size = {slice_chunk_size}: {_chunk_check(slice_chunk_size)}"
            )
        if imagenet_normalize and spec.in_channels not in (1, 3):
            raise ConfigError(
                f"model.imagenet_normalize needs 1 or 3 input channels, not {spec.in_channels}; "
                "set imagenet_normalize: false and normalise in GaNDLF's data_preprocessing."
            )
        self.spec = spec
        self.slice_axis = slice_axis
        self.views = VIEWS if slice_axis == "all" else (slice_axis,)
        self.slice_chunk_size = slice_chunk_size
        self.checkpointing = checkpointing
        self.freeze_encoder_steps = int(freeze_encoder_steps)
        # Training steps seen, as a buffer: saved in checkpoints and broadcast by DDP like any buffer.
        self.register_buffer("encoder_steps_done", torch.zeros((), dtype=torch.long))

        self.to_rgb = GreyToRGB() if spec.in_channels == 1 else nn.Identity()
        self.normalize = ImageNetNormalize() if imagenet_normalize else nn.Identity()
        encoder = build_encoder(encoder_name, weight_tag, encoder_depth)
        self.encoder = encoder if spec.in_channels in (1, 3) else adapt_input_channels(encoder, spec.in_channels)
        # Renormalised whatever the weights (at batch_size 1 a training batch is one volume's slices); a random start
        # is started by the builder from its first batch's statistics, at RANDOM_START_MOMENTUM
        renormalize_batch_norms(self.encoder)
        self.features = int(self.encoder.out_channels[-1])
        self.position = SlicePositionEncoding(self.features) if position_encoding else None
        self.pooling = make_pooling(pooling, self.features, heads=heads, hidden=attention_hidden)
        # The head sees the pooled feature layer-normalised (without parameters of its own) at a fixed scale and
        # starts at zero: the logits then move at the same pace per Adam step whatever the encoder's feature scale
        # and width (HEAD_SPEED), so a softmax final layer does not saturate (GaNDLF's cel loss soft-maxes again)
        # before the model has learned, and one batch-1 step does not swing the logits.
        self.register_buffer(POOLED_NORM_KEY, torch.ones((), dtype=torch.bool))
        self.register_buffer(POOLED_SCALE_KEY, torch.tensor(HEAD_SPEED / self.features))
        self.register_load_state_dict_pre_hook(_mark_checkpoints_without_pooled_norm)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.features, spec.n_outputs)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.final = common.FinalLayer(spec.final_layer, spec.sigmoid_input_multiplier)
        self.last_slice_weights: dict[str, torch.Tensor] = {}

    # --- slices ---------------------------------------------------------------------------------------------

    @staticmethod
    def slices(x: torch.Tensor, view: str) -> torch.Tensor:
        """The 2D slices `(B * n, C, h, w)` of volumes `(B, C, X, Y, Z)` along `view`, volume-major."""
        axis = 2 + VIEWS.index(view)
        moved = x.movedim(axis, 1)
        return moved.reshape(moved.shape[0] * moved.shape[1], *moved.shape[2:])

    def _encode_chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        # large slices run faster through the 2D encoder in channels-last (oneDNN; see channels_last)
        chunk = channels_last(self.normalize(self.to_rgb(chunk)))
        return self.encoder(chunk)[-1].mean(dim=(2, 3))

    def encode(self, slices: torch.Tensor) -> torch.Tensor:
        """Slice features `(n, F)` of 2D slices `(n, C, h, w)`, in chunks of `slice_chunk_size`."""
        # read the counter only when freezing is on: `bool(tensor)` synchronises with the GPU
        frozen = self.training and self.freeze_encoder_steps > 0 and self.encoder_frozen
        if frozen and torch.distributed.is_available() and torch.distributed.is_initialized() and (
                torch.distributed.get_world_size() > 1):
            raise RuntimeError(
                "freeze_encoder_steps > 0 leaves the encoder out of the backward pass, which GaNDLF's DDP strategy "
                "(find_unused_parameters=False) cannot handle; set model.freeze_encoder_steps: 0 for multi-GPU runs."
            )
        recompute = self.checkpointing and self.training and torch.is_grad_enabled() and not frozen
        chunks = slices.split(self.slice_chunk_size) if self.slice_chunk_size else (slices,)
        outputs = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            for chunk in chunks:
                if recompute:
                    outputs.append(checkpoint(self._encode_chunk, chunk, use_reentrant=False,
                                              context_fn=partial(renorm_checkpoint_contexts, self.encoder)))
                else:
                    outputs.append(self._encode_chunk(chunk))
        return torch.cat(outputs, dim=0)

    # --- forward --------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        common.check_input(x, 3, KEY)
        if x.shape[1] != self.spec.in_channels:
            raise ValueError(
                f"{KEY} was built for {self.spec.in_channels} input channels (model.num_channels) but got "
                f"{x.shape[1]} in input of shape {tuple(x.shape)}."
            )
        batch = x.shape[0]
        tokens, runs = [], []
        for view in self.views:
            n_slices = x.shape[2 + VIEWS.index(view)]
            features = self.encode(self.slices(x, view))
            tokens.append(features.view(batch, n_slices, self.features))
            runs.append((VIEWS.index(view), n_slices))
        sequence = torch.cat(tokens, dim=1)
        if self.position is not None:
            sequence = self.position(sequence, runs)
        pooled, slice_weights = self.pooling(sequence)
        normalized = nn.functional.layer_norm(pooled, pooled.shape[-1:]) * getattr(self, POOLED_SCALE_KEY)
        pooled = torch.where(getattr(self, POOLED_NORM_KEY), normalized, pooled)  # no host synchronisation
        if self.training and torch.is_grad_enabled():
            self.encoder_steps_done += 1  # in place on the device: no synchronisation
        detached = slice_weights.detach()
        self.last_slice_weights = dict(zip(self.views, detached.split([n for _, n in runs], dim=1), strict=True))
        return self.final(self.head(self.dropout(pooled)))

    @property
    def encoder_frozen(self) -> bool:
        """Whether the next training step leaves the encoder without gradient."""
        return bool(self.encoder_steps_done < self.freeze_encoder_steps)


def make(spec: common.ModelSpec, options: dict[str, Any], weight_tag: str | None) -> SliceAttentionClassifier:
    """Builds the model from GaNDLF's contract and the validated `model:` options."""
    options = {k: v for k, v in options.items() if k != "pretrained"}
    return SliceAttentionClassifier(spec, weight_tag=weight_tag, **options)


def parts(model: SliceAttentionClassifier) -> weights.Parts:
    body = ("pooling",) + (("position",) if model.position is not None else ())
    return weights.Parts(encoder="encoder", body=body, head=("head",),
                         hint="the same encoder_name, encoder_depth, pooling and num_channels")


def _mark_checkpoints_without_pooled_norm(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Loads a checkpoint written before the pooled-feature normalisation, or before its scale, as it was trained.
    Only whole checkpoints, with head and encoder: `weights.transfer` loads the head of a file that does not fit
    whole on its own, to initialise the current model, whose normalisation and scale stay."""
    whole = prefix + "head.weight" in state_dict and any(k.startswith(prefix + "encoder.") for k in state_dict)
    if not whole:
        return
    if prefix + POOLED_NORM_KEY not in state_dict:
        logger.warning(
            "%s: this checkpoint predates the layer normalisation of the pooled slice feature; it is loaded as it "
            "was trained (without it). Retrain to get the normalisation.", KEY,
        )
        state_dict[prefix + POOLED_NORM_KEY] = torch.zeros((), dtype=torch.bool)
    if prefix + POOLED_SCALE_KEY not in state_dict:
        if state_dict[prefix + POOLED_NORM_KEY]:
            logger.warning(
                "%s: this checkpoint predates the scale of the pooled slice feature; it is loaded as it was trained "
                "(at unit scale). Retrain to get the steadier scale.", KEY,
            )
        state_dict[prefix + POOLED_SCALE_KEY] = torch.ones(())


SMALL = {"pretrained": False, "encoder_depth": 3}  # the examples: random weights, a small encoder
ARCHITECTURE = Architecture(
    key=KEY,
    summary="2D encoder on every slice, attention over slices (weights kept for explanations), linear head.",
    make=make,
    parts=parts,
    probe_shape=lambda spec: (1, spec.in_channels, 32, 32, 32),
    options=(
        Option("encoder_name", "resnet18", "2D smp encoder applied to every slice.", check=weights.check_encoder_name),
        Option(
            "pretrained",
            "imagenet",
            "false, a weight tag of the encoder (e.g. imagenet), or a weights file of the 2D encoder.",
            types=(bool, str),
            check=weights.check_pretrained,
        ),
        Option("encoder_depth", 5, "smp encoder depth; its deepest features are pooled per slice.", choices=(3, 4, 5)),
        Option("slice_axis", "z", "Slice axis of (B, C, X, Y, Z), or all three views in one sequence.",
               choices=SLICE_AXES),
        Option("pooling", "attention", "Slice pooling: mean-query multi-head attention, Ilse gated attention, "
               "mean or max.", choices=POOLINGS),
        Option("heads", 8, "Heads of attention pooling (weights are averaged over heads).",
               check=_at_least(1, "heads")),
        Option("attention_hidden", 128, "Hidden size of gated pooling.", check=_at_least(1, "attention_hidden")),
        Option("position_encoding", False, "Add a learned encoding of each slice's relative position and view."),
        Option(
            "slice_chunk_size",
            64,
            "Slices per encoder call (bounds memory); null runs all slices of a batch at once.",
            types=(int, type(None)),
            check=_chunk_check,
        ),
        Option("checkpointing", False, "Recompute encoder activations in the backward pass (less training memory)."),
        Option(
            "freeze_encoder_steps",
            0,
            "Training steps (forward passes in training mode with gradients) during which the encoder is frozen.",
            check=_at_least(0, "freeze_encoder_steps"),
        ),
        Option("imagenet_normalize", False, "Normalise 1- or 3-channel slices with ImageNet's mean and std."),
        Option("dropout", 0.0, "Dropout before the linear head.", check=lambda v: None if 0 <= v < 1 else
               "dropout must be in [0, 1)."),
    ),
    dimensions=(3,),
    problem_types=("classification", "regression"),
    random_start_momentum=RANDOM_START_MOMENTUM,
    examples=(
        Example("classification", 3, {**SMALL, "pooling": "attention", "slice_chunk_size": 16}),
        Example("regression", 3, {**SMALL, "pooling": "gated", "slice_axis": "all",
                                  "position_encoding": True}, n_outputs=1),
        Example("classification", 3, {**SMALL, "pooling": "max", "slice_axis": "x"}),
        Example("classification", 3, {**SMALL, "pooling": "mean", "slice_axis": "y",
                                      "checkpointing": True}, in_channels=2),
    ),
)
