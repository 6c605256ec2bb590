"""Stand-ins for GaNDLF 0.1.5's own test flows (`testing/test_full.py` in GaNDLF's source tree).

GaNDLF's tests train every built-in architecture for one epoch with `TrainingManager`, on sample data it downloads
into `testing/data/{2d_rad_segmentation,3d_rad_segmentation}/<subject>/` and with its `testing/config_*.yaml`.
That data is not in the wheel, so `write_gandlf_test_data` writes tiny stand-ins in the same layout (PNG RGB
images with 0/255 masks in 2D, NIfTI images with 0/1 masks in 3D), and the CSVs are built by GaNDLF's own
`writeTrainingCSV`, with `ValueToPredict` columns added as GaNDLF's `prerequisites_constructTrainingCSV` does.
The configs below restate GaNDLF's test configs (norm_type, batch size, losses, metrics, nested training) as dicts.
"""

from __future__ import annotations

import copy
import csv
import random
from pathlib import Path
from typing import Any

import numpy as np

N_SUBJECTS = 10  # GaNDLF's 3D sample data has ten subjects; its nested_training -5 / -5 needs at least ten
PATCH = {2: [128, 128, 1], 3: [32, 32, 32]}  # GaNDLF's `patch_size` of its 2D and 3D flows


def _ball(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    centre = [rng.uniform(0.35 * s, 0.65 * s) for s in shape]
    radius = rng.uniform(0.15, 0.3) * min(shape)
    return np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))) <= radius


def write_gandlf_test_data(root: Path, seed: int = 0) -> dict[str, Path]:
    """Writes `root/{2d,3d}_rad_segmentation/<001..010>/` and GaNDLF's training CSVs; returns them by name."""
    import SimpleITK as sitk
    from GANDLF.utils import writeTrainingCSV

    rng = np.random.default_rng(seed)
    for index in range(1, N_SUBJECTS + 1):
        folder = root / "3d_rad_segmentation" / f"{index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        mask = _ball(rng, (32, 32, 32))
        image = rng.normal(0, 0.3, mask.shape).astype(np.float32) + 2.0 * mask
        for array, name in ((image, "image.nii.gz"), (mask.astype(np.uint8), "mask.nii.gz")):
            sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(array.T)), str(folder / name))
        folder = root / "2d_rad_segmentation" / f"{index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        mask = _ball(rng, (128, 128))
        rgb = np.clip(rng.normal(60, 20, (128, 128, 3)) + 120 * mask[..., None], 0, 255).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(folder / "image.png"))
        sitk.WriteImage(sitk.GetImageFromArray((255 * mask).astype(np.uint8)), str(folder / "mask.png"))
    csvs = {}
    random.seed(seed)
    for dimension, channel, label in ((2, "image.png", "mask.png"), (3, "image", "mask")):
        name = f"{dimension}d_rad"
        segmentation = root / f"train_{name}_segmentation.csv"
        writeTrainingCSV(str(root / f"{name}_segmentation"), channel, label, str(segmentation), False)
        csvs[f"{name}_segmentation"] = segmentation
        rows = list(csv.reader(segmentation.open()))
        for task, value in (("regression", lambda: str(random.uniform(0, 1))),
                            ("classification", lambda: str(random.randint(0, 2)))):
            path = root / f"train_{name}_{task}.csv"
            with path.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(rows[0] + ["ValueToPredict"])
                writer.writerows(row + [value()] for row in rows[1:])
            csvs[f"{name}_{task}"] = path
    return csvs


_COMMON: dict[str, Any] = {
    "version": {"minimum": "0.1.5", "maximum": "0.1.5"},
    "modality": "rad",
    "num_epochs": 1,
    "patience": 1,
    "batch_size": 1,
    "learning_rate": 0.001,
    "scheduler": "triangle",
    "optimizer": "adam",
    "nested_training": {"testing": -5, "validation": -5},
    "data_augmentation": {},
    "data_postprocessing": {},
    "data_preprocessing": {"normalize": None},
    "q_max_length": 1,
    "q_samples_per_volume": 1,
    "q_num_workers": 0,
    "q_verbose": False,
    "parallel_compute_command": "",
    "patch_sampler": "uniform",
    "in_memory": False,
    "save_output": False,
    "verbose": False,
}

CONFIGS: dict[str, dict[str, Any]] = {
    # testing/config_segmentation.yaml
    "segmentation": {
        **_COMMON,
        "model": {"dimension": 2, "base_filters": 32, "architecture": "resunet", "final_layer": "sigmoid",
                  "norm_type": "instance", "class_list": [0, 255], "amp": False},
        "metrics": ["dice"],
        "loss_function": "dc",
        "weighted_loss": True,
        "inference_mechanism": {"grid_aggregator_overlap": "average", "patch_overlap": 0},
    },
    # testing/config_classification.yaml
    "classification": {
        **_COMMON,
        "model": {"dimension": 2, "base_filters": 32, "architecture": "resnet18", "final_layer": "softmax",
                  "norm_type": "batch", "class_list": [0, 1, 2], "amp": False},
        "metrics": ["classification_accuracy", "accuracy"],
        "loss_function": "cel",
        "weighted_loss": True,
        "scaling_factor": 1,
    },
    # testing/config_regression.yaml
    "regression": {
        **_COMMON,
        "model": {"dimension": 2, "base_filters": 32, "architecture": "resnet18", "final_layer": "None",
                  "norm_type": "batch", "class_list": [0, 255], "amp": False},
        "metrics": ["mse"],
        "loss_function": "mse",
        "weighted_loss": False,
        "scaling_factor": 1,
    },
}


def gandlf_parameters(task: str, csv_path: Path, dimension: int, config_dir: Path) -> tuple[Any, dict]:
    """GaNDLF's parameter preparation of its flows: ConfigManager on the test config, the CSV's headers, the
    flow's patch size, `num_channels` (3 for the 2D RGB PNGs, the channel columns in 3D) and no ONNX export."""
    import yaml
    from GANDLF.config_manager import ConfigManager
    from GANDLF.utils import parseTrainingCSV, populate_header_in_parameters

    config = copy.deepcopy(CONFIGS[task])
    config["model"]["dimension"] = dimension
    config["patch_size"] = PATCH[dimension]
    path = config_dir / f"config_{task}_{dimension}d.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    parameters = ConfigManager(str(path), version_check_flag=False)
    data, parameters["headers"] = parseTrainingCSV(str(csv_path))
    parameters["modality"] = "rad"
    parameters["patch_size"] = PATCH[dimension]
    parameters["model"]["dimension"] = dimension
    parameters["model"]["num_channels"] = 3 if dimension == 2 else len(parameters["headers"]["channelHeaders"])
    parameters["model"]["onnx_export"] = False
    parameters["model"]["print_summary"] = False
    if task == "regression":
        parameters["model"]["class_list"] = parameters["headers"]["predictionHeaders"]
    parameters = populate_header_in_parameters(parameters, parameters["headers"])
    return data, parameters
