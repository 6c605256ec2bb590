"""Weight files are read without running code: tensors-only torch loading with an allow-list, for `pretrained:`
files, their `parameters.pkl` sidecar and `gandlf-dimlift explain`'s checkpoint."""

from __future__ import annotations

import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import BIN, gandlf_env

from gandlf_dimlift.models.builder import Architecture
from gandlf_dimlift.registry import load_entries
from gandlf_dimlift.synthetic import make_config, write_config, write_dataset
from gandlf_dimlift.weights import WeightsError, load_tensors_file, read_parameters_file, read_weights_file


class Payload:
    """Unpickling this opens (so creates) `marker` for writing: the proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _example_parameters(key: str, pretrained: str) -> dict:
    """GaNDLF parameters for the architecture's first declared example, with `pretrained` set."""
    builder = next(e.builder for e in load_entries() if e.key == key)
    assert isinstance(builder, Architecture)
    example = builder.examples[0]
    model = {"architecture": key, "dimension": example.dimension, "num_channels": example.in_channels,
             "class_list": list(range(example.n_outputs)), "norm_type": "batch", "amp": False, "base_filters": 32,
             "final_layer": "none" if example.problem_type == "regression" else "softmax",
             **example.options, "pretrained": pretrained}
    if example.problem_type == "regression":
        model["num_classes"] = example.n_outputs
    return {"model": model, "patch_size": list(example.patch_size), "problem_type": example.problem_type,
            "batch_size": 2}


@pytest.mark.parametrize("key", ["dimlift_smp", "dimlift_omnianet", "dimlift_dxnet", "dimlift_slice_attention"])
def test_a_pretrained_file_with_a_payload_is_refused_at_model_build_and_does_not_run(key, tmp_path):
    from GANDLF.models import get_model

    marker = tmp_path / "payload_ran"
    weights = tmp_path / "weights.pth"
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}, "extra": Payload(marker)}, weights)
    with pytest.raises(WeightsError) as caught:
        get_model(_example_parameters(key, str(weights)))
    message = str(caught.value)
    assert str(weights) in message and "it names io.open, which is not on the allow-list" in message
    assert "could run code" in message
    assert not marker.exists(), "the payload ran"


def test_a_parameters_pkl_with_a_payload_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "payload_ran"
    run = tmp_path / "run"
    run.mkdir()
    checkpoint = run / "dimlift_smp_best.pth.tar"
    torch.save({"model_state_dict": {"w": torch.zeros(2)}}, checkpoint)  # no parameters: the sidecar is read
    (run / "parameters.pkl").write_bytes(pickle.dumps({"model": Payload(marker)}))
    with pytest.raises(WeightsError, match=r"parameters\.pkl was not loaded: .*it names io\.open, which is not on "):
        read_weights_file(checkpoint)
    assert not marker.exists(), "the payload ran"


def test_a_checkpoint_written_by_gandlfs_save_model_reads_tensors_only(tmp_path):
    """GaNDLF stores its run parameters in the checkpoint, the subjects' tables included (pandas DataFrames of
    the training and validation CSV, as a real gandlf_run writes them): the allow-list covers them."""
    from GANDLF.config_manager import ConfigManager
    from GANDLF.models import get_model
    from GANDLF.utils import parseTrainingCSV
    from GANDLF.utils.modelio import save_model

    data = write_dataset(tmp_path / "data", "classification", n_subjects=2, shape=(8, 8, 8))
    config = make_config("dimlift_smp", "classification", patch_size=(32, 32, 32),
                         model_options={"pretrained": False, "encoder_depth": 3})
    parameters = ConfigManager(str(write_config(config, tmp_path / "config.yaml")))
    parameters["training_data"], headers = parseTrainingCSV(str(data), train=True)
    parameters["validation_data"] = parameters["training_data"].copy()
    parameters["headers"] = headers
    parameters["problem_type"] = "classification"
    parameters["model"]["num_classes"] = 2
    model = get_model(parameters)
    path = tmp_path / "run" / "dimlift_smp_best.pth.tar"
    path.parent.mkdir()
    optimizer = torch.optim.Adam(model.parameters())
    save_model({"epoch": 1, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                "loss": 0.5}, model, parameters, str(path), onnx_export=False)

    content = load_tensors_file(path)
    assert content["parameters"]["training_data"].equals(parameters["training_data"])
    source = read_weights_file(path)
    assert (source.architecture, source.dimension) == ("dimlift_smp", 3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in source.state_dict.items())


def test_gandlfs_parameters_pkl_reads_with_the_allow_list(tmp_path):
    import numpy as np
    import pandas as pd

    parameters = {"model": {"architecture": "dimlift_dxnet", "dimension": 2}, "patch_size": [32, 32, 1],
                  "weights": np.array([0.25, 0.75]), "scale": np.float64(2.0),
                  "table": pd.DataFrame({"SubjectID": ["a", "b"], "Channel_0": ["x.nii.gz", "y.nii.gz"]})}
    (tmp_path / "parameters.pkl").write_bytes(pickle.dumps(parameters))
    read = read_parameters_file(tmp_path / "parameters.pkl")
    assert read["model"] == parameters["model"] and read["scale"] == 2.0
    assert np.array_equal(read["weights"], parameters["weights"]) and read["table"].equals(parameters["table"])


@pytest.mark.parametrize("content", [b"not a torch file at all", b"PK\x03\x04 truncated zip"])
def test_a_corrupt_weights_file_is_named_as_corrupt(content, tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=rf"Could not read {path}: not a torch weights file or corrupt"):
        read_weights_file(path)


@pytest.mark.slow  # a fresh interpreter importing GaNDLF (about 10 s)
def test_explain_refuses_a_checkpoint_with_a_payload_before_writing_anything(tmp_path):
    data = write_dataset(tmp_path / "data", "classification", n_subjects=2, shape=(16, 16, 16))
    config = write_config(make_config("dimlift_slice_attention", "classification", patch_size=(16, 16, 16),
                                      model_options={"pretrained": False}), tmp_path / "config.yaml")
    marker = tmp_path / "payload_ran"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    checkpoint = model_dir / "dimlift_slice_attention_best.pth.tar"
    torch.save({"model_state_dict": {}, "parameters": Payload(marker)}, checkpoint)
    output = tmp_path / "explained"
    result = subprocess.run(
        [str(BIN / "gandlf-dimlift"), "explain", "-c", str(config), "-m", str(model_dir), "-i", str(data),
         "-o", str(output)], capture_output=True, text=True, env=gandlf_env(), timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("gandlf-dimlift explain: error:")]
    assert len(errors) == 1 and str(checkpoint) in errors[0] and "not on the allow-list" in errors[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not marker.exists(), "the payload ran"
    assert not output.exists(), "explain created its output folder before checking its inputs"
