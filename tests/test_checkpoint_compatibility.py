"""Checkpoints written by the code before the one-builder restructuring still load, with the same outputs.

The previous code is taken from git (`PREVIOUS`, the main branch before it), imported in a subprocess in place of
the current package, and writes a checkpoint of each case; the current code builds the same config, loads the
state dict as GaNDLF does (strictly) and must give the same outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import gandlf_env

ROOT = Path(__file__).resolve().parents[1]
PREVIOUS = "7efbd70"  # main before models/builder.py: each family loaded weights and removed stages itself

CASES = {
    "smp-seg3d-acs": ("dimlift_smp", "segmentation", [32, 32, 32], {"encoder_depth": 3}),
    "smp-cls2d": ("dimlift_smp", "classification", [32, 32], {"encoder_depth": 3}),
    "smp-reg3d-inflate": ("dimlift_smp", "regression", [32, 32, 32], {"encoder_depth": 3, "converter_type": "inflate"}),
    "omnianet-seg2d": ("dimlift_omnianet", "segmentation", [64, 64], {}),
    "dxnet-cls3d": ("dimlift_dxnet", "classification", [32, 32, 32], {}),
    "slice-attention-cls3d": ("dimlift_slice_attention", "classification", [32, 32, 32], {"encoder_depth": 3}),
}


def parameters(case: str) -> dict:
    key, problem_type, patch, options = CASES[case]
    model = {"architecture": key, "dimension": len(patch), "num_channels": 1, "class_list": [0, 1],
             "final_layer": "none" if problem_type == "regression" else "softmax", "norm_type": "batch",
             "pretrained": False, **options}
    if problem_type == "regression":
        model["num_classes"] = 1
    return {"model": model, "patch_size": patch, "problem_type": problem_type, "batch_size": 2}


WRITER = """
import json, sys, torch
from GANDLF.models import get_model
import gandlf_dimlift
assert gandlf_dimlift.__file__.startswith(sys.argv[1]), gandlf_dimlift.__file__
cases = json.loads(sys.argv[2])
for name, parameters in cases.items():
    torch.manual_seed(0)
    model = get_model(parameters).eval()
    x = torch.randn(1, 1, *parameters["patch_size"])
    with torch.no_grad():
        y = model(x)
    torch.save({"model_state_dict": model.state_dict(), "input": x, "output": y}, f"{sys.argv[3]}/{name}.pth.tar")
"""


@pytest.mark.slow
def test_checkpoints_of_the_previous_code_load_with_the_same_outputs(tmp_path):
    archive = tmp_path / "previous.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), PREVIOUS, "gandlf_dimlift"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "previous", filter="data")
    previous = tmp_path / "previous"
    cases = {name: parameters(name) for name in CASES}
    subprocess.run([sys.executable, "-c", WRITER, str(previous), json.dumps(cases), str(tmp_path)], check=True,
                   env=gandlf_env(PYTHONPATH=str(previous)), timeout=900, capture_output=True)
    from GANDLF.models import get_model

    for name, case in cases.items():
        saved = torch.load(tmp_path / f"{name}.pth.tar", weights_only=True)
        torch.manual_seed(1)
        model = get_model(case).eval()
        model.load_state_dict(saved["model_state_dict"])  # strict, as GaNDLF loads checkpoints
        with torch.no_grad():
            output = model(saved["input"])
        torch.testing.assert_close(output, saved["output"], rtol=1e-4, atol=1e-5, msg=name)
