"""`gandlf-dimlift list / doctor / demo`, and every sample config validates in GaNDLF and builds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import gandlf_env

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "gandlf-dimlift")
GANDLF_CONFIGS = sorted(p for p in (REPO / "sample_configs").glob("*.yaml") if not p.name.startswith("openfl"))


def cli(*arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *arguments], capture_output=True, text=True, env=gandlf_env(), timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_list_prints_every_architecture_with_its_options():
    result = cli("list")
    assert result.returncode == 0, result.stderr
    for key in ("dimlift_smp", "dimlift_dxnet", "dimlift_omnianet", "dimlift_slice_attention"):
        assert f"{key}  (from gandlf-dimlift)" in result.stdout
    assert "converter_type (default 'acs') [acs, soft, mean, inflate, inflate_center, 2.5d, conv3d]" in result.stdout


def test_doctor_reports_a_working_installation():
    result = cli("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    for label in ("GaNDLF", "torch", "startup hook file", "registration", "weights cache", "model hub"):
        assert label in result.stdout
    assert "dimlift_smp" in result.stdout and "status: ok" in result.stdout


def test_doctor_fails_when_registration_is_broken(tmp_path):
    # A plugin whose module cannot be imported makes registration report a failure: doctor must say BROKEN.
    info = tmp_path / "broken_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[gandlf.models]\nbroken_arch = no_such_module:build\n")
    result = subprocess.run([CLI, "doctor"], capture_output=True, text=True, timeout=600,
                            env=gandlf_env(PYTHONPATH=str(tmp_path)))
    assert result.returncode == 1
    assert "plugin broken_arch" in result.stdout and "broken-plugin" in result.stdout
    assert "status: BROKEN" in result.stdout


@pytest.mark.slow
def test_demo_trains_and_infers(tmp_path):
    result = cli("demo", str(tmp_path / "demo"), timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "demo" / "model" / "dimlift_smp_best.pth.tar").is_file()
    masks = list((tmp_path / "demo" / "model" / "output_inference").rglob("*.nii.gz"))
    assert len(masks) == 6
    assert "predictions:  6 masks under" in result.stdout


@pytest.mark.parametrize("path", GANDLF_CONFIGS, ids=lambda p: p.name)
def test_sample_config_validates_and_builds(path):
    from GANDLF.config_manager import ConfigManager
    from GANDLF.models import get_model

    parameters = ConfigManager(str(path))
    parameters["model"]["pretrained"] = False  # no model hub here; the weights paths are the user's
    parameters["model"].setdefault("num_classes", len(parameters["model"]["class_list"]) or 1)
    parameters["problem_type"] = "regression" if "regression" in path.name else (
        "classification" if "classification" in path.name else "segmentation")
    assert get_model(parameters) is not None
