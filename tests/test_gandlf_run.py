"""The unmodified `gandlf_run` trains and infers with a plugin architecture, and rejects bad configs early."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import SimpleITK as sitk
import torch
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


@pytest.mark.slow  # a fresh interpreter importing GaNDLF (about 10 s)
def test_config_is_rejected_when_the_hook_is_disabled(tmp_path):
    csv = write_dataset(tmp_path / "data", "classification", n_subjects=2)
    config = make_config("dimlift_smp", "classification", model_options=SMALL)
    result = run_gandlf(config, csv, tmp_path / "model", env=gandlf_env(GANDLF_DIMLIFT_DISABLE="1"), check=False)
    assert result.returncode != 0
    assert "architecture" in result.stdout and "dimlift_smp" in result.stdout
    assert not (tmp_path / "model" / "dimlift_smp_best.pth.tar").exists()


@pytest.mark.slow
def test_the_user_sees_the_initialisation_and_ignored_keys_on_the_console_and_in_gandlfs_log(tmp_path):
    csv = write_dataset(tmp_path / "data", "classification", n_subjects=4)
    config = make_config("dimlift_smp", "classification", model_options={**SMALL, "encoder_depht_typo_far": 1})
    result = run_gandlf(config, csv, tmp_path / "model")
    told = "dimlift_smp: 3D classification model, random initialisation (pretrained: false), lifted 2D -> 3D by acs."
    ignored = "model.encoder_depht_typo_far is neither a GaNDLF key nor an option of dimlift_smp; it is ignored."
    assert told in result.stdout and ignored in result.stdout, result.stdout[-3000:]
    log = Path(re.search(r"The logs are saved in (\S+\.log)", result.stdout).group(1))
    assert told in log.read_text() and ignored in log.read_text()


BAD = {
    "typo": ({"encoder_nme": "resnet34"}, "model.encoder_nme is not an option of dimlift_smp; did you mean "
                                          "model.encoder_name?"),
    "value": ({"converter_type": "acss"}, "is not allowed; choose one of ['acs', 'soft', 'mean', 'inflate'"),
    "channels": ({"num_channels": 3}, "model.num_channels is 3 but the data CSV has 1 channel column: set "
                                      "model.num_channels: 1"),
    "no-channels": ({"num_channels": 0}, "model.num_channels = 0: give the number of input channels"),
    "one-class": ({"class_list": [1]}, "model.class_list = [1] has 1 class; classification needs at least two"),
    "2d-option": ({"dimension": 2, "converter_type": "inflate"}, "model.converter_type has no effect with "
                                                                 "model.dimension: 2"),
    "architecture": ({"architecture": "dimlift-smp"}, "did you mean 'dimlift_smp'?"),
    "bottleneck": ({"encoder_depth": 5}, "dimlift_smp cannot train with patch_size [32, 32, 32]: a batch norm"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_configs_stop_before_training_with_the_fix_on_the_console(tmp_path, case):
    options, message = BAD[case]
    patch = (32, 32) if options.get("dimension") == 2 else (32, 32, 32)
    csv = write_dataset(tmp_path / "data", "classification", n_subjects=2, shape=patch)
    config = make_config("dimlift_smp", "classification", patch_size=patch, model_options={**SMALL, **options})
    result = run_gandlf(config, csv, tmp_path / "model", check=False)
    assert result.returncode != 0
    assert message in " ".join(result.stdout.split()), result.stdout[-3000:]
    assert "Epoch 0" not in result.stdout
    assert not list((tmp_path / "model").glob("*.pth.tar"))


@pytest.mark.slow
def test_a_classifier_whose_head_would_get_a_constant_stops_before_training_and_a_mirrored_pair_is_told(tmp_path):
    """An EfficientNet encoder's blocks end in batch norms with no nonlinearity after them: averaged over space, at
    batch_size 1 the features in training are the norms' biases, so the run is refused (GaNDLF's own flows train at
    batch 1); at batch_size 2 the two samples reach the head mirrored about them, which the run says and trains
    anyway. Each message names the fix, max pooling. Weights from a file keep such plain batch norms; from random
    weights the encoder trains with the running statistics instead, so DX-Net trains at batch_size 1 even
    averaged, and says so."""
    from GANDLF.models import get_model

    csv = write_dataset(tmp_path / "data", "classification", n_subjects=4)
    options = {"pretrained": False, "encoder_name": "efficientnet-b0", "encoder_depth": 3, "pooling": "avg"}
    model = get_model({"model": {"architecture": "dimlift_smp", "dimension": 3, "num_channels": 1, "class_list": [0, 1],
                                 "final_layer": "softmax", "norm_type": "batch", **options},
                       "patch_size": [32, 32, 32], "problem_type": "classification", "batch_size": 2})
    torch.save(model.net.encoder.state_dict(), tmp_path / "encoder.pth")
    options["pretrained"] = str(tmp_path / "encoder.pth")
    result = run_gandlf(make_config("dimlift_smp", "classification", model_options=options), csv,
                        tmp_path / "model", check=False)
    assert result.returncode != 0 and "Epoch 0" not in result.stdout
    assert "dimlift_smp cannot learn classification with batch_size: 1" in " ".join(result.stdout.split()), (
        result.stdout[-3000:])
    assert not list((tmp_path / "model").glob("*.pth.tar"))
    result = run_gandlf(make_config("dimlift_smp", "classification", model_options=options, batch_size=2), csv,
                        tmp_path / "model2")
    told = "dimlift_smp: with batch_size: 2 this classification model tells the two samples of a training batch"
    assert told in " ".join(result.stdout.split()), result.stdout[-3000:]
    log = Path(re.search(r"The logs are saved in (\S+\.log)", result.stdout).group(1))
    assert told in " ".join(log.read_text().split())
    assert "model.pooling: max over deepest features of more than one voxel" in " ".join(result.stdout.split())
    assert list((tmp_path / "model2").glob("*.pth.tar"))
    dxnet = {"pretrained": False, "encoder_depth": 3, "pooling": "avg"}
    result = run_gandlf(make_config("dimlift_dxnet", "classification", model_options=dxnet), csv,
                        tmp_path / "model3")
    assert "cannot learn" not in result.stdout and "batch_size: 2" not in result.stdout
    said = "dimlift_dxnet: random start: the encoder's 15 batch norms train with their running statistics"
    assert said in " ".join(result.stdout.split()), result.stdout[-3000:]
    assert list((tmp_path / "model3").glob("*.pth.tar"))
