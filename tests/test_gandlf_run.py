"""The unmodified `gandlf_run` trains and infers with a plugin architecture, and rejects bad configs early."""

from __future__ import annotations

import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import gandlf_env, inference_outputs, run_gandlf

from gandlf_dimlift.synthetic import make_config, write_dataset

SMALL = {"encoder_name": "resnet18", "encoder_depth": 3, "pretrained": False}


@pytest.mark.slow
def test_segmentation_with_a_non_unet_decoder_trains_and_infers(tmp_path):
    csv = write_dataset(tmp_path / "data", "segmentation", n_subjects=4)
    config = make_config("dimlift_smp", "segmentation",
                         model_options={**SMALL, "decoder_name": "fpn", "decoder_channels": 16})
    model_dir = tmp_path / "model"
    run_gandlf(config, csv, model_dir)
    assert (model_dir / "dimlift_smp_best.pth.tar").is_file()
    run_gandlf(config, csv, model_dir, train=False, output_dir=tmp_path / "out")
    masks = [p for p in inference_outputs(model_dir) if p.name.endswith(".nii.gz")]
    assert sorted(p.parent.name for p in masks) == [f"subject_{i:03d}" for i in range(4)]
    reference = sitk.ReadImage(str(tmp_path / "data" / "subject_000_image.nii.gz"))
    mask = sitk.ReadImage(str(next(p for p in masks if p.parent.name == "subject_000")))
    assert mask.GetSize() == reference.GetSize()


@pytest.mark.slow
def test_classification_with_logits_trains_and_infers(tmp_path):
    csv = write_dataset(tmp_path / "data", "classification", n_subjects=4)
    config = make_config("dimlift_smp", "classification", model_options={**SMALL, "final_layer": "logits"})
    model_dir = tmp_path / "model"
    run_gandlf(config, csv, model_dir)
    assert (model_dir / "dimlift_smp_best.pth.tar").is_file()
    run_gandlf(config, csv, model_dir, train=False, output_dir=tmp_path / "out")
    outputs = inference_outputs(model_dir, tmp_path / "out")
    predictions = [p for p in outputs if p.name == "final_preds_and_avg_probs.csv"]
    assert predictions, "GaNDLF wrote no predictions CSV"
    table = pd.read_csv(predictions[0])
    assert sorted(table["SubjectID"]) == [f"subject_{i:03d}" for i in range(4)]


def test_config_is_rejected_when_the_hook_is_disabled(tmp_path):
    csv = write_dataset(tmp_path / "data", "classification", n_subjects=2)
    config = make_config("dimlift_smp", "classification", model_options=SMALL)
    result = run_gandlf(config, csv, tmp_path / "model", env=gandlf_env(GANDLF_DIMLIFT_DISABLE="1"), check=False)
    assert result.returncode != 0
    assert "architecture" in result.stdout and "dimlift_smp" in result.stdout
    assert not (tmp_path / "model" / "dimlift_smp_best.pth.tar").exists()


@pytest.mark.parametrize(
    "options,message",
    [
        ({"encoder_nme": "resnet34"},
         "model.encoder_nme is not an option of dimlift_smp; did you mean model.encoder_name?"),
        ({"converter_type": "acss"}, "is not allowed; choose one of ['acs', 'soft', 'mean', 'inflate'"),
    ],
)
def test_misspelt_option_and_bad_value_stop_before_training(tmp_path, options, message):
    csv = write_dataset(tmp_path / "data", "classification", n_subjects=2)
    config = make_config("dimlift_smp", "classification", model_options={**SMALL, **options})
    result = run_gandlf(config, csv, tmp_path / "model", check=False)
    assert result.returncode != 0
    assert message in result.stdout, result.stdout[-3000:]
    assert "Epoch 0" not in result.stdout
    assert not list((tmp_path / "model").glob("*.pth.tar"))
