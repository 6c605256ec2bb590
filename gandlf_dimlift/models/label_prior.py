"""A segmentation model's output starts at the training labels' class shares (its bias is their log-prior).

Why: DX-Net's output layer, like many decoders', reads features that end in a batch norm and an activation, so in
training their mean over the batch is pinned by the norms' own parameters. The mean logit, i.e. how much of the
volume the model calls background, then moves mainly through the output bias, and Adam moves a bias by about the
learning rate per step. Started at zero (every class equally likely), DX-Net spent GaNDLF's short runs lowering its
foreground probability over the background, which is most of a volume: in the conformance learning check (balls
filling 5% of 32^3 volumes, 4 epochs) its training Dice stayed at 0.63-0.68 against 0.90 for GaNDLF's `unet`, with
a foreground probability of 0.11 far from the balls. A bias fixed in advance (RetinaNet's 1% foreground prior, Lin
et al. 2017) fixed that, and broke the same model on the labels inverted (0.33); the training labels' own shares
are right either way (0.89 and 0.90; closing notes of issue 12). GaNDLF reads the training table before it
builds the model, so the label maps are at hand; inference builds the model without them and loads trained weights
anyway.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

#: label maps read at most (evenly spaced over the training table): the prior needs a rough estimate, not all
MAX_LABEL_MAPS = 16
#: frequency given to a class that none of the maps read shows, so that its start is unlikely, not impossible
FLOOR = 1e-3
#: final layers whose outputs the bias maps to probabilities; others (identity, tanh) keep a zero bias
PRIOR_FINAL_LAYERS = ("softmax", "logsoftmax", "sigmoid")


def training_class_shares(parameters: dict[str, Any]) -> tuple[list[float], int] | None:
    """The share of voxels in each class of `model.class_list` over the training label maps (GaNDLF's one-hot
    encoding: combined classes such as "1||2" included), and how many maps were read; None without training data
    (inference, a model built outside a training run) or when patches are sampled around labels, whose class
    shares are not the volumes'."""
    data, headers = parameters.get("training_data"), parameters.get("headers") or {}
    label = headers.get("labelHeader")
    sampler = parameters.get("patch_sampler", "uniform")
    sampler = sampler.get("type", "uniform") if isinstance(sampler, dict) else sampler
    if data is None or label is None or len(data) == 0 or sampler != "uniform":
        return None
    import SimpleITK as sitk
    from GANDLF.utils import one_hot

    class_list = parameters["model"]["class_list"]
    paths = data[data.columns[label]].tolist()
    chosen = np.unique(np.linspace(0, len(paths) - 1, MAX_LABEL_MAPS).round().astype(int))
    counts, voxels = torch.zeros(len(class_list), dtype=torch.float64), 0
    for index in chosen:
        # counted on the array SimpleITK returns, whatever its type: no copy of the volume into torch
        values, number = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(paths[index]))), return_counts=True)
        # one_hot of the distinct values only (a one-hot map of a 512^3 volume would take gigabytes); it takes
        # (B, 1, X, Y, Z)
        members = one_hot(torch.from_numpy(values.astype(np.float64)).reshape(1, 1, -1, 1, 1), class_list)
        counts += members[0, :, :, 0, 0].double() @ torch.from_numpy(number).double()
        voxels += int(number.sum())
    return [float(v) for v in (counts / max(voxels, 1)).clamp(min=FLOOR, max=1 - FLOOR)], len(chosen)


def output_layer(model: nn.Module, head_paths: tuple[str, ...], n_outputs: int) -> nn.Module | None:
    """The last module under `head_paths` with a bias of one value per output (the output convolution)."""
    found = None
    for path in head_paths:
        for module in model.get_submodule(path).modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor) and bias.shape == (n_outputs,):
                found = module
    return found


def start_at_label_prior(model: nn.Module, head_paths: tuple[str, ...], spec: Any,
                         parameters: dict[str, Any], architecture: str) -> None:
    """Sets the output bias of a segmentation `model` to the training labels' log-prior for its final layer
    (softmax: log shares; sigmoid: log-odds of each class, divided by GaNDLF's sigmoid input multiplier) and says
    so on GaNDLF's console and in its log; leaves it when there is no training table or no such layer."""
    if spec.final_layer not in PRIOR_FINAL_LAYERS:
        return
    layer = output_layer(model, head_paths, spec.n_outputs)
    found = training_class_shares(parameters) if layer is not None else None
    if found is None:
        return
    shares, maps = found
    if spec.final_layer == "sigmoid":
        bias = [math.log(p / (1 - p)) / spec.sigmoid_input_multiplier for p in shares]
    else:
        logs = [math.log(p) for p in shares]
        bias = [v - sum(logs) / len(logs) for v in logs]
    with torch.no_grad():
        layer.bias.copy_(torch.tensor(bias, dtype=layer.bias.dtype))
    named = ", ".join(f"{c}: {p:.3f}" for c, p in zip(parameters["model"]["class_list"], shares, strict=True))
    logger.info("%s: the output layer's bias starts at the class shares of %d training label map%s (%s).",
                architecture, maps, "" if maps == 1 else "s", named)
