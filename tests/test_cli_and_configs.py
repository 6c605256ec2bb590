"""`gandlf-dimlift list / doctor / demo`, and every sample config validates in GaNDLF and builds."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
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


def test_doctor_reports_a_working_installation_without_importing_all_of_gandlf():
    result = cli("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    labels = ("numpy", "SimpleITK", "torch", "GaNDLF", "startup hook file", "startup hook", "plugin architectures",
              "registration", "weights cache", "model hub")
    lines = {line[:22].strip(): line[22:] for line in result.stdout.splitlines()}
    assert set(labels) <= set(lines), result.stdout
    assert lines["startup hook"].split()[0] == "ok" and "armed in a fresh interpreter" in lines["startup hook"]
    assert "dimlift_smp" in lines["plugin architectures"]
    # The slow part (importing all of GaNDLF, as gandlf_run does) is left to --full, and the report says so.
    assert lines["registration"].split()[0] == "skipped" and "doctor --full" in lines["registration"]
    assert "status: ok" in result.stdout and result.stderr == ""


@pytest.mark.slow
def test_doctor_full_registers_through_gandlf_and_builds_every_demo_model():
    result = cli("doctor", "--full")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line[:22].strip(): line[22:] for line in result.stdout.splitlines()}
    assert lines["registration"].split()[0] == "ok" and "dimlift_slice_attention" in lines["registration"]
    builds = [line.split(None, 3)[2:] for line in result.stdout.splitlines() if line.startswith("model build ")]
    assert sorted(detail.split(":")[0] for mark, detail in builds) == [
        "dimlift_dxnet", "dimlift_omnianet", "dimlift_slice_attention", "dimlift_smp"]
    assert all(mark == "ok" and "M parameters" in detail for mark, detail in builds), builds


@pytest.mark.slow  # a fresh interpreter importing GaNDLF (about 10 s)
def test_doctor_fails_when_a_plugin_is_broken(tmp_path):
    # A plugin whose module cannot be imported makes the registry report a failure: doctor must say BROKEN.
    info = tmp_path / "broken_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[gandlf.models]\nbroken_arch = no_such_module:build\n")
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    result = subprocess.run([CLI, "doctor"], capture_output=True, text=True, timeout=600,
                            env=gandlf_env(PYTHONPATH=path))
    assert result.returncode == 1
    assert "broken_arch of broken-plugin fails to load: ModuleNotFoundError" in result.stdout
    assert "status: BROKEN (plugin architectures)" in result.stdout


def _demo(directory: Path, *arguments: str) -> subprocess.CompletedProcess:
    result = cli("demo", str(directory), *arguments, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "weights:      random initialisation (pretrained: false)" in result.stdout or "--transfer" in arguments
    assert "model.pretrained: imagenet" in result.stdout  # how to get real weights
    return result


@pytest.mark.slow
def test_demo_trains_and_infers(tmp_path):
    result = _demo(tmp_path / "demo")
    model = tmp_path / "demo" / "model_dimlift_smp"
    assert (model / "dimlift_smp_best.pth.tar").is_file()
    masks = list((model / "output_inference").rglob("*.nii.gz"))
    assert len(masks) == 4
    assert f"predictions:  4 masks under {model / 'output_inference'}" in result.stdout


@pytest.mark.slow
def test_demo_of_slice_attention_classifies_and_explains(tmp_path):
    result = _demo(tmp_path / "demo", "--architecture", "dimlift_slice_attention")
    explained = tmp_path / "demo" / "explained"
    assert f"explanation:  {explained / 'slice_weights.csv'}" in result.stdout
    pictures, volumes = sorted(explained.glob("*.png")), sorted(explained.glob("*.nii.gz"))
    assert len(pictures) == len(volumes) == 4
    assert f"4 PNG, e.g. {pictures[0]}" in result.stdout
    assert f"4 NIfTI weight volumes, e.g. {volumes[0]}" in result.stdout
    assert sorted(p.name for p in explained.iterdir()) == sorted(
        ["slice_weights.csv"] + [p.name for p in pictures + volumes])  # nothing else: no GaNDLF mapping file


@pytest.mark.slow
def test_demo_of_dxnet_transfers_a_2d_omnianet_run(tmp_path):
    result = _demo(tmp_path / "demo", "--architecture", "dimlift_dxnet", "--transfer")
    demo = tmp_path / "demo"
    slices = list(csv.DictReader(open(demo / "slices" / "slices_2d.csv")))
    assert len(slices) == 4 * 4 and all(Path(row["Label"]).is_file() for row in slices)
    omnianet = demo / "model_dimlift_omnianet" / "dimlift_omnianet_best.pth.tar"
    assert omnianet.is_file() and (demo / "model_dimlift_dxnet" / "dimlift_dxnet_best.pth.tar").is_file()
    config = yaml.safe_load((demo / "config_dimlift_dxnet.yaml").read_text())
    assert config["model"]["pretrained"] == str(omnianet)
    assert "DX-Net started from the trained 2D Omnia-Net checkpoint" in result.stdout
    assert len(list((demo / "model_dimlift_dxnet" / "output_inference").rglob("*.nii.gz"))) == 4


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
