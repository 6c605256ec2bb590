"""Tiny synthetic datasets and GaNDLF configs: for the `demo` command and the tests.

A subject is a noisy volume (or 2D image) with a bright ball. Segmentation labels the ball; classification
labels whether the ball is there; regression predicts its radius (with an all-ones Label image, which GaNDLF 0.1.5
needs to sample regression patches). `signal_slices` confines the ball's signal
to a band of slices along the last axis (GaNDLF's slice axis), to test where slice attention looks.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("segmentation", "classification", "regression")


def _subject(rng: np.random.Generator, shape: Sequence[int], positive: bool, radius: float, signal_slices):
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    centre = [rng.uniform(s * 0.35, s * 0.65) for s in shape]
    if signal_slices is not None:
        centre[-1] = (signal_slices[0] + signal_slices[1] - 1) / 2
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    mask = (distance <= radius) & positive
    if signal_slices is not None:
        band = np.zeros(shape, dtype=bool)
        band[..., signal_slices[0] : signal_slices[1]] = True
        mask &= band
    image = rng.normal(0.0, 0.3, size=shape).astype(np.float32) + 2.0 * mask
    return image, mask.astype(np.uint8)


def _write(array: np.ndarray, path: Path, spacing: float = 1.0) -> None:
    import SimpleITK as sitk

    # SimpleITK orders axes (x, y, z) while numpy arrays from GetArrayFromImage are (z, y, x): transpose so the
    # array's last axis is the image's last (slice) axis, as GaNDLF reads it.
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    image.SetSpacing([spacing] * array.ndim)
    sitk.WriteImage(image, str(path))


def write_dataset(
    directory: str | Path,
    task: str,
    n_subjects: int = 4,
    shape: Sequence[int] = (32, 32, 32),
    seed: int = 0,
    signal_slices: tuple[int, int] | None = None,
) -> Path:
    """Writes `n_subjects` NIfTI images (labels too, for segmentation) and a GaNDLF CSV; returns the CSV path.

    Args:
        directory: Output folder (created).
        task: segmentation, classification or regression.
        n_subjects: Number of subjects; classes alternate so every class is present.
        shape: Spatial shape; two entries write 2D images.
        seed: Random seed.
        signal_slices: Optional [start, stop) band of the last axis that alone carries the signal.
    """
    if task not in TASKS:
        raise ValueError(f"task = {task!r}; choose one of {list(TASKS)}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(n_subjects):
        subject = f"subject_{index:03d}"
        positive = task != "classification" or index % 2 == 1
        radius = float(rng.uniform(0.15, 0.3) * min(shape))
        image, mask = _subject(rng, shape, positive, radius, signal_slices)
        image_path = directory / f"{subject}_image.nii.gz"
        _write(image, image_path)
        row = {"SubjectID": subject, "Channel_0": str(image_path)}
        if task != "classification":
            # Regression gets an all-ones Label: GaNDLF 0.1.5 samples its patches through a label map.
            label_path = directory / f"{subject}_label.nii.gz"
            _write(mask if task == "segmentation" else np.ones_like(mask), label_path)
            row["Label"] = str(label_path)
        if task == "classification":
            row["ValueToPredict"] = str(int(positive))
        elif task == "regression":
            row["ValueToPredict"] = f"{radius / min(shape):.4f}"
        rows.append(row)
    csv_path = directory / f"{task}.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def make_config(
    architecture: str,
    task: str,
    patch_size: Sequence[int] = (32, 32, 32),
    dimension: int = 3,
    num_epochs: int = 1,
    model_options: dict[str, Any] | None = None,
    batch_size: int = 1,
    learning_rate: float = 1e-3,
) -> dict[str, Any]:
    """Returns a GaNDLF 0.1.5 config (as a dict) for `task`, valid as written.

    Args:
        architecture: The `model.architecture` key.
        task: segmentation, classification or regression (datasets from `write_dataset`).
        patch_size: Spatial patch size (two entries for 2D).
        dimension: 2 or 3.
        num_epochs: Training epochs.
        model_options: Extra keys merged into `model:` (the architecture's options, or overrides).
        batch_size: Batch size (GaNDLF regression wants 1).
        learning_rate: Learning rate.
    """
    if task not in TASKS:
        raise ValueError(f"task = {task!r}; choose one of {list(TASKS)}.")
    final_layer = {"segmentation": "softmax", "classification": "softmax", "regression": "none"}[task]
    model = {
        "dimension": dimension,
        "architecture": architecture,
        "final_layer": final_layer,
        "norm_type": "batch",
        "class_list": [0, 1],
        "num_channels": 1,
        "amp": False,
        "onnx_export": False,
        "print_summary": False,
    }
    model.update(model_options or {})
    return {
        "version": {"minimum": "0.1.5", "maximum": "0.1.5"},
        "model": model,
        "modality": "rad",
        "loss_function": {"segmentation": "dc", "classification": "cel", "regression": "mse"}[task],
        "metrics": {"segmentation": ["dice"], "classification": ["accuracy"], "regression": ["mse"]}[task],
        "patch_size": list(patch_size),
        "batch_size": batch_size,
        "num_epochs": num_epochs,
        "patience": num_epochs,
        "learning_rate": learning_rate,
        "optimizer": "adam",
        "scheduler": "triangle",
        "nested_training": {"testing": 1, "validation": -2},
        "q_max_length": 2,
        "q_samples_per_volume": 1,
        "q_num_workers": 0,
        "q_verbose": False,
        "parallel_compute_command": "",
        # z-score normalisation (GaNDLF applies a present key whatever its value). It also casts to float32:
        # with no preprocessing at all, GaNDLF 0.1.5 feeds these float32 NIfTI files to the model as float64.
        "data_preprocessing": {"normalize": None},
        "data_augmentation": {},
        # GaNDLF 0.1.5 validates classification/regression subjects without a Label column on its segmentation
        # path, whose saving step then crashes: save validation outputs for segmentation only.
        "save_output": task == "segmentation",
        "verbose": False,
    }


def write_config(config: dict[str, Any], path: str | Path) -> Path:
    """Writes a config dict as YAML; returns the path."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
