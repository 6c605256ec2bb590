"""End to end: `gandlf_run` trains and infers with dimlift_slice_attention, `gandlf-dimlift explain` explains."""

from __future__ import annotations

import csv
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import BIN, gandlf_env, inference_outputs, run_gandlf

from gandlf_dimlift.synthetic import make_config, write_config, write_dataset

KEY = "dimlift_slice_attention"
SAMPLE_CONFIGS = Path(__file__).resolve().parent.parent / "sample_configs"
# A geometry far from the identity: the explanation volumes must come back in it exactly.
SPACING = (0.8, 0.9, 1.5)
ORIGIN = (12.0, -7.5, 3.25)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _regeometrise(csv_path: Path) -> list[dict[str, str]]:
    """Gives every image of a dataset SPACING, ORIGIN and DIRECTION; returns the CSV rows."""
    import SimpleITK as sitk

    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        image = sitk.ReadImage(row["Channel_0"])
        image.SetSpacing(SPACING)
        image.SetOrigin(ORIGIN)
        image.SetDirection(DIRECTION)
        sitk.WriteImage(image, row["Channel_0"])
    return rows


def _add_label_images(csv_path: Path) -> None:
    """Rewrites the Label column as all-ones masks in each image's (re-geometrised) grid: GaNDLF 0.1.5 samples
    regression patches through a label map, which must share the image's geometry."""
    import SimpleITK as sitk

    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        image = sitk.ReadImage(row["Channel_0"])
        label = sitk.Cast(image * 0 + 1, sitk.sitkUInt8)
        row["Label"] = row["Channel_0"].replace("_image.nii.gz", "_label.nii.gz")
        sitk.WriteImage(label, row["Label"])
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _explain(config: Path, model_dir: Path, data: Path, output: Path) -> subprocess.CompletedProcess:
    command = [str(BIN / "gandlf-dimlift"), "explain", "-c", str(config), "-m", str(model_dir), "-i", str(data),
               "-o", str(output)]
    result = subprocess.run(command, env=gandlf_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-6000:]
    # It says what it wrote where, and leaves nothing of GaNDLF's (its subject-ID mapping CSV) in the folder.
    assert f"wrote into {output}:" in result.stdout and "slice_weights.csv" in result.stdout
    assert not (output / "updated_test_mapping.csv").exists()
    return result


def _read_weights(path: Path) -> dict[tuple[str, str], list[tuple[int, float, str]]]:
    table = defaultdict(list)
    with open(path) as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["subject", "view", "slice_index", "weight", "prediction"]
        for row in reader:
            table[row["subject"], row["view"]].append((int(row["slice_index"]), float(row["weight"]),
                                                       row["prediction"]))
    return table


def _check_geometry(path: Path, reference: str) -> np.ndarray:
    """Asserts the NIfTI at `path` has the reference image's grid; returns its array in (X, Y, Z) order."""
    import SimpleITK as sitk

    image, source = sitk.ReadImage(str(path)), sitk.ReadImage(reference)
    assert image.GetSize() == source.GetSize()
    assert np.allclose(image.GetSpacing(), source.GetSpacing(), atol=1e-6)
    assert np.allclose(image.GetOrigin(), source.GetOrigin(), atol=1e-6)
    assert np.allclose(image.GetDirection(), source.GetDirection(), atol=1e-6)
    return sitk.GetArrayFromImage(image).T


@pytest.mark.slow
def test_classification_train_infer_explain(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", "classification", n_subjects=4, shape=(32, 32, 32), seed=0)
    rows = _regeometrise(data)
    config = make_config(KEY, "classification", model_options={"pretrained": False, "encoder_depth": 3,
                                                                  "slice_chunk_size": 16})
    config = write_config(config, tmp_path / "config.yaml")
    model_dir = tmp_path / "model"
    run_gandlf(config, data, model_dir, train=True)
    assert (model_dir / f"{KEY}_best.pth.tar").is_file()
    run_gandlf(config, data, model_dir, train=False, output_dir=tmp_path / "inference")
    assert inference_outputs(tmp_path / "inference") or list((tmp_path / "inference").rglob("*.csv"))

    output = tmp_path / "explained"
    result = _explain(config, model_dir, data, output)
    assert "Explaining subjects" in result.stdout  # the progress bar
    table = _read_weights(output / "slice_weights.csv")
    assert sorted(table) == sorted((row["SubjectID"], "z") for row in rows)
    for row in rows:
        entries = table[row["SubjectID"], "z"]
        assert [index for index, _, _ in entries] == list(range(32))
        weights = np.array([weight for _, weight, _ in entries])
        assert (weights >= 0).all() and abs(weights.sum() - 1) < 1e-4
        assert {prediction for _, _, prediction in entries} <= {"0", "1"}
        png = output / f"{row['SubjectID']}_slice_weights.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        volume = _check_geometry(output / f"{row['SubjectID']}_slice_weights.nii.gz", row["Channel_0"])
        # every voxel holds its z slice's weight
        assert np.allclose(volume, weights[None, None, :], atol=1e-5)


@pytest.mark.slow
def test_regression_all_views_with_resize_explained_in_input_geometry(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", "regression", n_subjects=3, shape=(32, 32, 32), seed=4)
    rows = _regeometrise(data)
    _add_label_images(data)
    config = make_config(KEY, "regression", patch_size=(32, 32, 24), model_options={"pretrained": False,
        "encoder_depth": 3, "slice_axis": "all", "pooling": "gated", "position_encoding": True})
    # GaNDLF resizes every image to 32 x 32 x 24: the explanation must be mapped back to 32 x 32 x 32
    config["data_preprocessing"] = {"normalize": None, "resize_image": [32, 32, 24]}
    config = write_config(config, tmp_path / "config.yaml")
    model_dir = tmp_path / "model"
    run_gandlf(config, data, model_dir, train=True)
    run_gandlf(config, data, model_dir, train=False, output_dir=tmp_path / "inference")

    output = tmp_path / "explained"
    _explain(config, model_dir, data, output)
    table = _read_weights(output / "slice_weights.csv")
    for row in rows:
        subject = row["SubjectID"]
        counts = {view: len(table[subject, view]) for view in "xyz"}
        assert counts == {"x": 32, "y": 32, "z": 24}  # slices of the preprocessed (resized) volume
        total = sum(weight for view in "xyz" for _, weight, _ in table[subject, view])
        assert abs(total - 1) < 1e-4  # one softmax over the three views
        predictions = {prediction for view in "xyz" for _, _, prediction in table[subject, view]}
        assert len(predictions) == 1 and np.isfinite(float(predictions.pop()))
        for view in "xyz":
            volume = _check_geometry(output / f"{subject}_slice_weights_{view}.nii.gz", row["Channel_0"])
            weights = np.array([weight for _, weight, _ in table[subject, view]])
            # nearest-neighbour mapping: each input voxel holds the weight of one preprocessed slice
            assert (np.abs(volume[..., None] - weights).min(axis=-1) < 1e-6).all()
            axis = "xyz".index(view)
            other = tuple(a for a in range(3) if a != axis)
            assert np.allclose(volume.std(axis=other), 0, atol=1e-6)  # constant over each slice
        combined = _check_geometry(output / f"{subject}_slice_weights.nii.gz", row["Channel_0"])
        parts = sum(_check_geometry(output / f"{subject}_slice_weights_{v}.nii.gz", row["Channel_0"]) for v in "xyz")
        assert np.allclose(combined, parts, atol=1e-5)
        assert (output / f"{subject}_slice_weights.png").is_file()


def test_explain_refuses_a_directory_without_a_model(tmp_path: Path) -> None:
    from gandlf_dimlift.explain import ExplainError, explain

    data = write_dataset(tmp_path / "data", "classification", n_subjects=2, shape=(16, 16, 16))
    config = write_config(make_config(KEY, "classification", patch_size=(16, 16, 16),
                                         model_options={"pretrained": False}), tmp_path / "config.yaml")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExplainError, match=r"No trained model in .*dimlift_slice_attention_best.pth.tar"):
        explain(config, tmp_path / "empty", data, tmp_path / "out")


def _inputs(tmp_path: Path, shape=(16, 16, 16)) -> tuple[Path, Path, Path]:
    """A classification CSV, a valid slice attention config and an empty model folder."""
    data = write_dataset(tmp_path / "data", "classification", n_subjects=2, shape=shape)
    options = {"pretrained": False, "encoder_depth": 3}
    config = write_config(make_config(KEY, "classification", patch_size=(16, 16, 16), model_options=options),
                          tmp_path / "config.yaml")
    (tmp_path / "model").mkdir()
    return config, data, tmp_path / "model"


def test_explain_refuses_a_corrupt_checkpoint_before_writing(tmp_path: Path) -> None:
    from gandlf_dimlift.explain import explain
    from gandlf_dimlift.weights import WeightsError

    config, data, model = _inputs(tmp_path)
    (model / f"{KEY}_best.pth.tar").write_bytes(b"PK\x03\x04 half a download")
    with pytest.raises(WeightsError, match=r"best\.pth\.tar: not a torch weights file or corrupt"):
        explain(config, model, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_explain_refuses_a_file_that_is_no_gandlf_checkpoint(tmp_path: Path) -> None:
    import torch

    from gandlf_dimlift.explain import ExplainError, explain

    config, data, model = _inputs(tmp_path)
    torch.save({"conv.weight": torch.zeros(1)}, model / f"{KEY}_best.pth.tar")
    with pytest.raises(ExplainError, match="is not a GaNDLF checkpoint \\(no model_state_dict\\)"):
        explain(config, model, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_explain_refuses_a_checkpoint_of_other_options(tmp_path: Path) -> None:
    import torch

    from gandlf_dimlift.explain import ExplainError, explain

    config, data, model = _inputs(tmp_path)
    torch.save({"model_state_dict": {"head.weight": torch.zeros(2, 7)}}, model / f"{KEY}_best.pth.tar")
    with pytest.raises(ExplainError, match=r"best\.pth\.tar do not fit this model \(\d+ missing, 1 of another "
                                           r"shape: missing \['encoder\..*Give the config the model was trained with"):
        explain(config, model, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem", ["missing-image", "2d-image", "no-image-column", "bad-config"])
def test_explain_names_a_bad_csv_or_config_before_writing(problem: str, tmp_path: Path) -> None:
    import torch

    from gandlf_dimlift.explain import ExplainError, explain

    config, data, model = _inputs(tmp_path)
    torch.save({"model_state_dict": {}}, model / f"{KEY}_best.pth.tar")
    if problem == "missing-image":
        data.write_text(data.read_text().replace("subject_001_image.nii.gz", "gone.nii.gz"))
        fragment = r"subject subject_001's image .*gone\.nii\.gz \(column Channel_0\) does not exist"
    elif problem == "2d-image":
        flat = write_dataset(tmp_path / "flat", "classification", n_subjects=2, shape=(16, 16))
        data = flat
        fragment = r"subject subject_000's image .* is \[16, 16\] voxels; dimlift_slice_attention explains 3D"
    elif problem == "no-image-column":
        data.write_text("SubjectID,ValueToPredict\na,0\n")
        fragment = r"needs a subject ID column and at least one image column .* its columns are"
    else:
        config.write_text(config.read_text().replace("learning_rate: 0.001", "learning_rate: fast"))
        fragment = r"GaNDLF cannot read the config .*config\.yaml: .*learning_rate"
    with pytest.raises(ExplainError, match=fragment):
        explain(config, model, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_explain_refuses_another_architecture(tmp_path: Path) -> None:
    from gandlf_dimlift.explain import ExplainError, explain

    data = write_dataset(tmp_path / "data", "classification", n_subjects=2, shape=(16, 16, 16))
    config = write_config(make_config("resnet18", "classification", patch_size=(16, 16, 16)), tmp_path / "c.yaml")
    (tmp_path / "model").mkdir()
    with pytest.raises(ExplainError, match="model.architecture = 'resnet18'; explain reads slice weights"):
        explain(config, tmp_path / "model", data, tmp_path / "out")


@pytest.mark.parametrize("name", ["slice_attention_classification_3d.yaml", "slice_attention_regression_3d.yaml"])
def test_sample_configs_validate_in_gandlf_and_build(name: str, tmp_path: Path) -> None:
    """GaNDLF's own config parser accepts the sample configs, and GaNDLF's get_model builds them (offline:
    pretrained weights off)."""
    import torch
    from GANDLF.config_manager import ConfigManager
    from GANDLF.models import get_model

    config = yaml.safe_load((SAMPLE_CONFIGS / name).read_text())
    config["model"]["pretrained"] = False
    parameters = ConfigManager(str(write_config(config, tmp_path / name)))
    assert parameters["model"]["architecture"] == KEY
    parameters["problem_type"] = "regression" if "regression" in name else "classification"
    if parameters["problem_type"] == "regression":
        parameters["model"]["num_classes"] = 1
    model = get_model(parameters).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 1, 32, 32, 24))
    assert y.shape == (1, 1 if "regression" in name else 2)
