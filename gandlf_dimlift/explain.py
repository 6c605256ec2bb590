"""`gandlf-dimlift explain`: which slices drove a trained slice attention model's prediction, per subject.

The tool does what `gandlf_run` inference does up to the forward pass: it reads the GaNDLF config, parses the data
CSV with GaNDLF's own parser, builds the dataset with GaNDLF's `ImagesFromDataFrame` (the config's preprocessing,
no augmentation), builds the model with `GANDLF.models.get_model` and loads `<architecture>_best.pth.tar` (else
`_latest`) from the model directory tensors-only (`gandlf_dimlift.weights.load_tensors_file`: unlike GaNDLF's
`load_model`, nothing in the file can run code). Every input is checked before anything is written. Then, per
subject, it runs the model once on the whole preprocessed volume (the slice pooling does not depend on the number
of slices, so every slice gets a weight even when training used smaller patches) and writes:

- `slice_weights.csv`: subject, view, slice_index, weight, prediction (one row per slice and view);
- `<subject>_slice_weights.png`: per view, the weight curve beside the top-weighted slices;
- `<subject>_slice_weights.nii.gz`: a volume in the input image's geometry where each voxel holds the weight of
  its slice (for `slice_axis: all` the sum of its three slices' weights, plus one file per view
  `<subject>_slice_weights_<view>.nii.gz`).

Geometry: the weights live on the grid of the preprocessed image, whose affine GaNDLF/TorchIO keep up to date
through resizing, resampling, cropping and padding. When that grid differs from the input image's, the weight
volume is resampled onto the input's grid with nearest-neighbour interpolation (physical coordinates, identity
transform; voxels outside the preprocessed field of view get 0). Otherwise the array is written as is with the
input's origin, spacing and direction.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gandlf_dimlift.models.slice_views import KEY, VIEWS

logger = logging.getLogger(__name__)


class ExplainError(RuntimeError):
    """The explanation cannot be made from the given config, model directory or data."""


def _register_plugin() -> None:
    import gandlf_dimlift

    register = getattr(gandlf_dimlift, "register", None)
    if callable(register):
        register()


def _checkpoint_path(model_dir: Path, architecture: str) -> Path:
    from GANDLF.utils import BEST_MODEL_PATH_END, LATEST_MODEL_PATH_END

    candidates = [model_dir / f"{architecture}{end}" for end in (BEST_MODEL_PATH_END, LATEST_MODEL_PATH_END)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ExplainError(
        f"No trained model in {model_dir}: looked for {[c.name for c in candidates]}. Give the `-m` directory that "
        "`gandlf_run` trained into (for nested cross-validation, one fold's directory)."
    )


def _weights_volume(weights: dict[str, np.ndarray], shape: tuple[int, int, int], view: str | None) -> np.ndarray:
    """A `(X, Y, Z)` array where each voxel holds its slice's weight in `view`, or the sum over views if None."""
    volume = np.zeros(shape, dtype=np.float32)
    for name, values in weights.items():
        if view is not None and name != view:
            continue
        axis = VIEWS.index(name)
        expand = [None, None, None]
        expand[axis] = slice(None)
        volume += values.astype(np.float32)[tuple(expand)]
    return volume


def _same_grid(a: Any, b: Any) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)
    )


def weights_image(volume: np.ndarray, preprocessed_affine: np.ndarray, input_path: str) -> Any:
    """The weight volume as a SimpleITK image on the grid of the input image file.

    Args:
        volume: `(X, Y, Z)` weights on the preprocessed image's grid (TorchIO's axis order).
        preprocessed_affine: The preprocessed image's 4x4 RAS affine (TorchIO).
        input_path: The input image file whose geometry the result takes.
    """
    import SimpleITK as sitk
    import torch
    import torchio

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(input_path))
    reader.ReadImageInformation()
    reference = sitk.Image(reader.GetSize(), sitk.sitkFloat32)
    reference.SetOrigin(reader.GetOrigin())
    reference.SetSpacing(reader.GetSpacing())
    reference.SetDirection(reader.GetDirection())
    image = torchio.ScalarImage(tensor=torch.from_numpy(volume)[None], affine=preprocessed_affine).as_sitk()
    image = sitk.Cast(image, sitk.sitkFloat32)
    if image.GetDimension() != reference.GetDimension():
        raise ExplainError(f"{input_path} is {reference.GetDimension()}D; the slice attention explanation is 3D only.")
    if _same_grid(image, reference):
        image.CopyInformation(reference)
        return image
    logger.info("Resampling the slice weights of %s from the preprocessed grid to the input grid.", input_path)
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)


def plot_subject(
    path: Path,
    subject: str,
    image: np.ndarray,
    weights: dict[str, np.ndarray],
    prediction: str,
    top_k: int = 3,
) -> None:
    """Writes a PNG: per view, the slice weight curve beside the `top_k` highest-weighted slices.

    Args:
        path: PNG file to write.
        subject: Subject ID for the title.
        image: `(X, Y, Z)` first channel of the preprocessed image.
        weights: Per view, the weight of each slice.
        prediction: Text of the model's prediction.
        top_k: Slices shown per view.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(weights)
    figure, axes = plt.subplots(
        rows, 1 + top_k, figsize=(3.2 * (1 + top_k) + 1.5, 3.0 * rows), squeeze=False,
        gridspec_kw={"width_ratios": [1.8] + [1] * top_k},
    )
    low, high = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    for row, (view, values) in enumerate(weights.items()):
        axis = VIEWS.index(view)
        curve = axes[row, 0]
        curve.plot(np.arange(len(values)), values, color="tab:red", lw=1.5)
        curve.axhline(1.0 / len(values), color="grey", ls="--", lw=1, label="uniform")
        curve.set_xlabel(f"slice index along {view}")
        curve.set_ylabel("weight")
        curve.set_title(f"view {view}: slice weights")
        curve.legend(loc="upper right", fontsize=7)
        order = np.argsort(values)[::-1][:top_k]
        for column in range(top_k):
            panel = axes[row, 1 + column]
            panel.axis("off")
            if column >= len(order):
                continue
            index = int(order[column])
            curve.axvline(index, color="tab:blue", lw=0.8, alpha=0.6)
            plane = np.take(image, index, axis=axis)
            panel.imshow(plane.T, cmap="gray", origin="lower", vmin=low, vmax=high)
            panel.set_title(f"{view}={index}  w={values[index]:.3f}", fontsize=9)
    figure.suptitle(f"{subject}: prediction {prediction}")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _config_error_text(error: Exception) -> str:
    """GaNDLF's config errors, short: pydantic's per-field messages, or the cause inside its assertion text."""
    errors = getattr(error, "errors", None)
    if callable(errors):
        try:
            return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors()[:5])
        except Exception:  # noqa: BLE001 - fall back to the text
            pass
    text = str(error)
    if "Exception: " in text:
        text = text.split("Exception: ", 1)[1]
    return " ".join(text.split("Traceback")[0].split()).rstrip(",")[:500]


def _read_config(config_path: Path) -> dict:
    from GANDLF.config_manager import ConfigManager

    logging.disable(logging.ERROR)  # GaNDLF logs each config error before raising it: the message below has them
    try:
        parameters = ConfigManager(str(config_path))
    except Exception as error:  # noqa: BLE001 - GaNDLF raises assertions and pydantic errors alike
        raise ExplainError(f"GaNDLF cannot read the config {config_path}: {_config_error_text(error)}") from None
    finally:
        logging.disable(logging.NOTSET)
    architecture = str(parameters["model"]["architecture"]).lower()
    if architecture != KEY:
        raise ExplainError(
            f"{config_path} trains model.architecture = {architecture!r}; explain reads slice weights, which only "
            f"{KEY} has."
        )
    if int(parameters["model"].get("dimension", 3)) != 3:
        raise ExplainError(f"{config_path} has model.dimension = {parameters['model']['dimension']}; "
                           f"{KEY} is 3D only.")
    return parameters


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint, loaded tensors-only; a file that is no GaNDLF checkpoint is an ExplainError."""
    from gandlf_dimlift.weights import load_tensors_file

    checkpoint = load_tensors_file(path)
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        raise ExplainError(f"{path} is not a GaNDLF checkpoint (no model_state_dict); give the -m folder that "
                           "gandlf_run trained into.")
    return checkpoint


def _add_data(parameters: dict, csv_path: Path, checkpoint: dict) -> dict:
    import tempfile

    from GANDLF.utils import parseTestingCSV, populate_header_in_parameters

    # GaNDLF writes its subject-ID mapping files next to the data it parses: keep them out of the output folder.
    with tempfile.TemporaryDirectory() as scratch:
        try:
            _, data, headers = parseTestingCSV(str(csv_path), scratch)
        except Exception as error:  # noqa: BLE001 - pandas and GaNDLF's assertions
            raise ExplainError(f"GaNDLF cannot read the data CSV {csv_path}: {type(error).__name__}: {error}") from None
    if not headers["channelHeaders"] or headers["subjectIDHeader"] is None:
        raise ExplainError(
            f"{csv_path} needs a subject ID column and at least one image column (names containing 'Channel', "
            f"'Image' or 'Modality'); its columns are {list(data.columns)}."
        )
    for column in headers["channelHeaders"]:
        for subject, image in zip(data.iloc[:, headers["subjectIDHeader"]], data.iloc[:, column], strict=True):
            _check_volume(csv_path, subject, str(image), str(data.columns[column]))
    parameters = populate_header_in_parameters(parameters, headers)
    # The CSV of an explanation need not have ValueToPredict columns; the problem and the number of outputs are
    # those the model was trained for.
    trained = checkpoint.get("parameters") or {}
    if trained.get("problem_type") in ("classification", "regression"):
        parameters["problem_type"] = trained["problem_type"]
        for key in ("num_classes", "class_list"):
            if key in trained.get("model", {}):
                parameters["model"][key] = trained["model"][key]
    if parameters["problem_type"] not in ("classification", "regression"):
        raise ExplainError(
            f"The problem type is {parameters['problem_type']!r}; {KEY} classifies or regresses. "
            "Give a CSV with ValueToPredict columns or a model directory whose checkpoint records its parameters."
        )
    parameters["data_frame"] = data
    return parameters


def _check_volume(csv_path: Path, subject: Any, image: str, column: str) -> None:
    """Raises ExplainError unless `image` is a readable 3D image."""
    import SimpleITK as sitk

    where = f"{csv_path}: subject {subject}'s image {image} (column {column})"
    if not Path(image).is_file():
        raise ExplainError(f"{where} does not exist.")
    reader = sitk.ImageFileReader()
    reader.SetFileName(image)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise ExplainError(f"{where} is not an image SimpleITK can read.") from None
    size = reader.GetSize()
    if len(size) != 3 or min(size) < 2:
        raise ExplainError(f"{where} is {list(size)} voxels; {KEY} explains 3D volumes.")


def _check_paths(config_path: Path, model_dir: Path, csv_path: Path, output_dir: Path) -> None:
    for path, what, flag in ((config_path, "config", "-c"), (csv_path, "data CSV", "-i")):
        if not path.is_file():
            raise ExplainError(f"The {what} {path} ({flag}) {'is a folder' if path.is_dir() else 'does not exist'}; "
                               "give a file.")
    if not model_dir.is_dir():
        state = "is a file" if model_dir.exists() else "does not exist"
        raise ExplainError(f"The model directory {model_dir} (-m) {state}; give the folder gandlf_run trained into.")
    existing = next((p for p in (output_dir, *output_dir.parents) if p.exists()), None)
    if output_dir.exists() and not output_dir.is_dir():
        raise ExplainError(f"The output path {output_dir} (-o) is a file; give a folder (it is created if needed).")
    if existing is not None and not existing.is_dir():
        raise ExplainError(f"The output folder {output_dir} (-o) cannot be created: {existing} is a file.")
    if existing is not None and not os.access(existing, os.W_OK):
        raise ExplainError(f"The output folder {output_dir} (-o) cannot be written: {existing} is not writable.")


@contextlib.contextmanager
def _gandlf_quiet() -> Iterator[None]:
    """Sends GaNDLF's console chatter (import banners, the defaults it fills in, pandas deprecation warnings) to the
    debug log, so the console shows the progress and what was written."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                logger.debug("GaNDLF: %s", line)


def _prepare(config_path: Path, model_dir: Path, csv_path: Path, output_dir: Path, device: str) -> tuple:
    """Reads and checks the config, the checkpoint (tensors-only) and the CSV, and builds the model with the
    checkpoint's weights; writes nothing. Returns (parameters, data frame, model, checkpoint file)."""
    from GANDLF.models import get_model

    from gandlf_dimlift.models.slice_attention import SliceAttentionClassifier
    from gandlf_dimlift.weights import WeightsError, load_matching

    _register_plugin()
    parameters = _read_config(config_path)
    checkpoint_file = _checkpoint_path(model_dir, KEY)
    checkpoint = _read_checkpoint(checkpoint_file)
    parameters = _add_data(parameters, csv_path, checkpoint)
    parameters["output_dir"] = str(output_dir)
    parameters["device"] = device
    data = parameters.pop("data_frame")
    model = get_model(parameters)
    if not isinstance(model, SliceAttentionClassifier):
        raise ExplainError(f"GaNDLF built a {type(model).__name__}, not a slice attention model.")
    try:
        load_matching(model, checkpoint["model_state_dict"], str(checkpoint_file))
    except WeightsError as error:
        raise ExplainError(f"{error} Give the config the model was trained with ({config_path} builds another "
                           "model).") from None
    model.to(device).eval()
    logger.info("Loaded %s", checkpoint_file)
    return parameters, data, model, checkpoint_file


@dataclass(frozen=True)
class Explanation:
    """What `explain` wrote.

    Attributes:
        checkpoint: The checkpoint that was explained.
        table: `slice_weights.csv`.
        pictures: One PNG per subject.
        volumes: The weight volumes (NIfTI), per subject one, plus one per view for `slice_axis: all`.
        subjects: Number of subjects explained.
    """

    checkpoint: Path
    table: Path
    pictures: list[Path]
    volumes: list[Path]
    subjects: int


def explain(
    config_path: str | os.PathLike,
    model_dir: str | os.PathLike,
    csv_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    device: str = "cpu",
    top_k: int = 3,
) -> Explanation:
    """Writes slice weights (CSV), pictures (PNG) and weight volumes (NIfTI) for every subject of a CSV.

    Every input is checked (config, checkpoint, CSV, image files, the model's fit) before the output folder is
    created or anything is written.

    Args:
        config_path: The GaNDLF YAML the model was trained with.
        model_dir: The `gandlf_run` model directory holding `dimlift_slice_attention_best.pth.tar`.
        csv_path: A GaNDLF data CSV (subject ID and image columns; ValueToPredict columns are optional).
        output_dir: Where the outputs go (created if needed).
        device: torch device for the forward passes.
        top_k: Top-weighted slices shown per view in the pictures.

    Raises:
        ExplainError: A bad input, naming it and the fix.
        gandlf_dimlift.weights.WeightsError: The checkpoint cannot be read tensors-only.
    """
    config_path, model_dir, csv_path = Path(config_path), Path(model_dir), Path(csv_path)
    output_dir = Path(output_dir)
    _check_paths(config_path, model_dir, csv_path, output_dir)
    if top_k < 1:
        raise ExplainError(f"--top-k {top_k}: show at least one slice per view.")

    import SimpleITK as sitk
    import torch
    import torchio
    from tqdm import tqdm

    from gandlf_dimlift.slices import safe_file_name

    with _gandlf_quiet():
        parameters, data, model, checkpoint_file = _prepare(config_path, model_dir, csv_path, output_dir, device)
        subject_ids = [str(s) for s in data.iloc[:, parameters["headers"]["subjectIDHeader"]]]
        first_channel = data.iloc[:, parameters["headers"]["channelHeaders"][0]]
        input_paths = {subject: str(path) for subject, path in zip(subject_ids, first_channel, strict=True)}
        channel_keys = [str(c) for c in parameters["headers"]["channelHeaders"]]
        from GANDLF.data import ImagesFromDataFrame

        output_dir.mkdir(parents=True, exist_ok=True)
        dataset = ImagesFromDataFrame(data.copy(), parameters, train=False, loader_type="explain")
    class_list = [str(c) for c in parameters["model"].get("class_list") or []]
    is_classification = parameters["problem_type"] == "classification"
    scaling = float(parameters.get("scaling_factor", 1.0) or 1.0)

    csv_file = output_dir / "slice_weights.csv"
    pictures, volumes = [], []
    with open(csv_file, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject", "view", "slice_index", "weight", "prediction"])
        for subject in tqdm(dataset, desc="Explaining subjects", unit="subject"):
            subject_id = str(subject["subject_id"])
            image = torch.cat([subject[key][torchio.DATA] for key in channel_keys], dim=0).float()
            if image.dim() != 4 or image.shape[-1] == 1:
                raise ExplainError(
                    f"Subject {subject_id} is a 2D image {tuple(image.shape[1:])}; {KEY} needs 3D volumes."
                )
            with torch.no_grad():
                output = model(image[None].to(device))[0].cpu()
            if is_classification and class_list:
                prediction = class_list[int(output.argmax())]
            else:
                prediction = f"{output.max().item() / scaling:.6g}"
            weights = {view: w[0].cpu().numpy() for view, w in model.last_slice_weights.items()}
            for view, values in weights.items():
                for index, weight in enumerate(values):
                    writer.writerow([subject_id, view, index, f"{weight:.6g}", prediction])

            name = safe_file_name(subject_id)
            array = image[0].numpy()
            pictures.append(output_dir / f"{name}_slice_weights.png")
            plot_subject(pictures[-1], subject_id, array, weights, prediction, top_k)
            affine = subject[channel_keys[0]].affine
            shape = tuple(array.shape)
            views = [None] + (list(weights) if len(weights) > 1 else [])
            for view in views:
                volumes.append(output_dir / f"{name}_slice_weights{'' if view is None else '_' + view}.nii.gz")
                volume = weights_image(_weights_volume(weights, shape, view), affine, input_paths[subject_id])
                sitk.WriteImage(volume, str(volumes[-1]))
    return Explanation(checkpoint_file, csv_file, pictures, volumes, len(pictures))


def describe(result: Explanation) -> str:
    """What `explain` wrote and where, for the console."""
    folder = result.table.parent
    lines = [
        f"Explained {result.subjects} subject(s) with {result.checkpoint}; wrote into {folder}:",
        f"  slice weights:  {result.table.name} (subject, view, slice_index, weight, prediction)",
        f"  pictures:       {len(result.pictures)} PNG, <subject>_slice_weights.png (weight curve, top slices)",
        f"  weight volumes: {len(result.volumes)} NIfTI, <subject>_slice_weights*.nii.gz in the input image's "
        "geometry (open over the image in ITK-SNAP or 3D Slicer)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m gandlf_dimlift.explain ...`: the same as `gandlf-dimlift explain ...`."""
    from gandlf_dimlift.cli import main as cli_main

    return cli_main(["explain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
