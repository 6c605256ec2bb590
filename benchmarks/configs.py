"""GaNDLF 0.1.5 configs of the benchmark rows, shared by `benchmarks.compare` and `benchmarks.throughput`.

This module imports neither of them, so they can both import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.throughput import Row

# GaNDLF's `cel` is torch's CrossEntropyLoss on the model output, so `final_layer: softmax` applies softmax twice;
# GaNDLF applies softmax itself to the probabilities it writes at inference.
CLASSIFICATION_FINAL_LAYERS = ("logits", "softmax")


def make_config(
    row: Row,
    patch_size: Sequence[int],
    batch_size: int = 2,
    num_epochs: int = 1,
    learning_rate: float = 1e-3,
    samples_per_volume: int = 1,
    final_layer: str = "logits",
) -> dict[str, Any]:
    """A GaNDLF config for `row` (built on `gandlf_dimlift.synthetic.make_config`).

    Segmentation rows get 3 classes (background, grey, white matter) and the Dice loss; classification rows 2
    classes, GaNDLF's `cel` loss and `final_layer` (logits or softmax). Segmentation sets
    `ignore_label_validation: 0`, so GaNDLF's logged Dice is the mean of grey and white matter (GaNDLF only uses
    that key in its metrics). Preprocessing is GaNDLF's z-score (the synthetic config's).

    Args:
        row: The architecture and its `model:` options.
        patch_size: Patch size (two entries for 2D rows).
        batch_size: Batch size.
        num_epochs: Training epochs; `patience` is set above it, so every epoch runs.
        learning_rate: Adam learning rate (GaNDLF's default `triangle` scheduler cycles it).
        samples_per_volume: Patches drawn per volume and epoch.
        final_layer: Classification rows' final layer: logits or softmax.
    """
    from gandlf_dimlift.synthetic import make_config as base_config

    if final_layer not in CLASSIFICATION_FINAL_LAYERS:
        raise ValueError(f"final_layer = {final_layer!r}; choose one of {list(CLASSIFICATION_FINAL_LAYERS)}.")
    task = row.task
    model = {"class_list": [0, 1, 2] if task == "segmentation" else [0, 1], **row.model}
    config = base_config(
        row.architecture,
        task,
        patch_size=tuple(patch_size),
        dimension=row.dimension,
        num_epochs=num_epochs,
        model_options=model,
        batch_size=batch_size,
        learning_rate=learning_rate,
    )
    config["q_samples_per_volume"] = samples_per_volume
    config["q_max_length"] = max(samples_per_volume * 2, batch_size)
    config["patience"] = num_epochs + 1
    if task == "segmentation":
        # GaNDLF's train/val Dice then average grey and white matter only (the loss is unchanged)
        config["model"].setdefault("ignore_label_validation", 0)
    if task == "classification":
        config["metrics"] = ["accuracy", "auroc"]
        config["model"]["final_layer"] = final_layer
    return config
