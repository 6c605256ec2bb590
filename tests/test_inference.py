"""Inference outside training: a plugin model trained once, then used by fresh processes three ways.

1. `gandlf_run -t False` (GaNDLF's legacy CLI), 2. `gandlf run --infer` (the new-style CLI), 3. Python:
`import gandlf_dimlift`, then GaNDLF's own `GANDLF.models.get_model` and `GANDLF.utils.modelio.load_model` on
the run's `parameters.pkl` and `<arch>_best.pth.tar`. All three must give the same masks, so each proves that
the trained weights (not a fresh initialisation) were loaded.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import BIN, gandlf_env, inference_outputs, run_gandlf

from gandlf_dimlift.synthetic import make_config, write_config, write_dataset

SMALL = {"encoder_name": "resnet18", "encoder_depth": 3, "pretrained": False}
SUBJECTS = [f"subject_{i:03d}" for i in range(4)]
MARGIN = 1e-3  # probability margin above which GaNDLF's argmax and the Python model's must agree

PYTHON_INFERENCE = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np
    import SimpleITK as sitk
    import torch

    import gandlf_dimlift  # with the startup hook this alone registers; register() is the explicit path
    gandlf_dimlift.register()
    from GANDLF.models import get_model
    from GANDLF.utils.modelio import load_model
    from gandlf_dimlift.weights import read_parameters_file  # parameters.pkl without running code from it

    model_dir, data_dir, out_dir = map(Path, sys.argv[1:4])
    parameters = read_parameters_file(model_dir / "parameters.pkl")
    model = get_model(parameters)
    state = load_model(str(model_dir / "dimlift_smp_best.pth.tar"), device=torch.device("cpu"))
    model.load_state_dict(state["model_state_dict"], strict=True)
    model.eval()
    print("built", type(model).__module__, type(model).__name__)
    for image in sorted(data_dir.glob("subject_*_image.nii.gz")):
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).T  # numpy (z, y, x) -> GaNDLF (x, y, z)
        x = torch.from_numpy(np.ascontiguousarray(array)).float()
        if "normalize" in (parameters.get("data_preprocessing") or {}):
            x = (x - x.mean()) / x.std()  # GaNDLF's `normalize` (torchio's ZNormalization), whatever its value
        with torch.no_grad():
            probabilities = model(x[None, None])
        np.save(out_dir / (image.name.split("_image")[0] + ".npy"), probabilities[0].numpy())
    """
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One small dimlift_smp segmentation model trained by `gandlf_run` (once for the module)."""
    root = tmp_path_factory.mktemp("inference")
    csv = write_dataset(root / "data", "segmentation", n_subjects=4)
    config = write_config(make_config("dimlift_smp", "segmentation", model_options=SMALL), root / "config.yaml")
    model_dir = root / "model"
    run_gandlf(config, csv, model_dir)
    assert (model_dir / "dimlift_smp_best.pth.tar").is_file() and (model_dir / "parameters.pkl").is_file()
    return {"root": root, "csv": csv, "config": config, "model_dir": model_dir}


def masks_written_by_gandlf(model_dir: Path) -> dict[str, np.ndarray]:
    """GaNDLF 0.1.5 writes each subject's mask under `<model_dir>/output_inference/<subject>/`."""
    masks = [p for p in inference_outputs(model_dir) if p.name.endswith(".nii.gz")]
    return {p.parent.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))).T for p in masks}


def fresh_inference_output(model_dir: Path) -> None:
    shutil.rmtree(model_dir / "output_inference", ignore_errors=True)


def python_probabilities(trained: dict, out_dir: Path, **env: str) -> tuple[dict[str, np.ndarray], str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-c", PYTHON_INFERENCE, str(trained["model_dir"]), str(trained["root"] / "data"),
         str(out_dir)],
        env=gandlf_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
        cwd=out_dir,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    return {p.stem: np.load(p) for p in sorted(out_dir.glob("*.npy"))}, result.stdout


def assert_masks_match(masks: dict[str, np.ndarray], probabilities: dict[str, np.ndarray]) -> None:
    """GaNDLF's masks equal the argmax of the Python model's probabilities wherever the decision is not a tie.

    After one epoch many voxels sit near 0.5, where the order of floating-point sums (another conv algorithm,
    GaNDLF's patch aggregation) can flip the argmax; voxels with a margin of at least `MARGIN` must agree.
    """
    assert sorted(masks) == sorted(probabilities) == SUBJECTS
    for subject in SUBJECTS:
        mask, p = masks[subject], probabilities[subject]
        assert mask.shape == p.shape[1:] == (32, 32, 32)
        ordered = np.sort(p, axis=0)
        decided = ordered[-1] - ordered[-2] >= MARGIN
        assert decided.mean() > 0.5, f"{subject}: the model decides only {decided.mean():.3f} of voxels"
        disagree = int((mask != p.argmax(0))[decided].sum())
        assert disagree == 0, f"{subject}: {disagree} decided voxels differ between GaNDLF and the checkpoint"


@pytest.mark.slow
def test_legacy_gandlf_run_infers_in_a_fresh_process(trained, tmp_path):
    fresh_inference_output(trained["model_dir"])
    run_gandlf(trained["config"], trained["csv"], trained["model_dir"], train=False, output_dir=tmp_path / "out")
    masks = masks_written_by_gandlf(trained["model_dir"])
    assert sorted(masks) == SUBJECTS
    for mask in masks.values():
        assert mask.shape == (32, 32, 32) and set(np.unique(mask)) <= {0, 1}
    reference, _ = python_probabilities(trained, tmp_path / "python")
    assert_masks_match(masks, reference)


@pytest.mark.slow
def test_new_style_gandlf_cli_run_infers(trained, tmp_path):
    fresh_inference_output(trained["model_dir"])
    result = subprocess.run(
        [str(BIN / "gandlf"), "run", "-c", str(trained["config"]), "-i", str(trained["csv"]),
         "-m", str(trained["model_dir"]), "--infer", "-o", str(tmp_path / "out")],
        env=gandlf_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    masks = masks_written_by_gandlf(trained["model_dir"])
    reference, _ = python_probabilities(trained, tmp_path / "python")
    assert_masks_match(masks, reference)


@pytest.mark.slow
def test_checkpoint_loads_from_python_with_gandlf_model_functions(trained, tmp_path):
    """With the hook (default) and with it disabled (explicit `gandlf_dimlift.register()`), same predictions."""
    with_hook, output = python_probabilities(trained, tmp_path / "hook")
    assert "built gandlf_dimlift.models" in output
    without_hook, output = python_probabilities(trained, tmp_path / "explicit", GANDLF_DIMLIFT_DISABLE="1")
    assert "built gandlf_dimlift.models" in output
    assert sorted(with_hook) == sorted(without_hook) == SUBJECTS
    for subject in SUBJECTS:
        assert np.allclose(with_hook[subject], without_hook[subject], atol=1e-6)
        assert np.allclose(with_hook[subject].sum(0), 1.0, atol=1e-5)  # softmax applied by the model
