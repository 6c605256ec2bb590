"""The bad day: every `gandlf-dimlift` failure is one readable message and a non-zero exit, also when torch, numpy or
GaNDLF are broken; `--debug` (or GANDLF_DIMLIFT_DEBUG=1) shows the traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, gandlf_env

CLI = str(BIN / "gandlf-dimlift")


def cli(*arguments: str, shadow: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """Runs the CLI; `shadow` goes first on PYTHONPATH (a package there replaces the installed one)."""
    if shadow is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shadow), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([CLI, *arguments], capture_output=True, text=True, env=gandlf_env(**env), timeout=600,
                          stdin=subprocess.DEVNULL)


def broken_package(tmp_path: Path, name: str) -> Path:
    """A folder holding a package `name` whose import raises, as a broken installation does."""
    (tmp_path / "shadow" / name).mkdir(parents=True)
    (tmp_path / "shadow" / name / "__init__.py").write_text(f"raise ImportError('simulated broken {name}')\n")
    return tmp_path / "shadow"


def one_error(result: subprocess.CompletedProcess, command: str) -> str:
    """Asserts the run failed with exactly one error line and no traceback; returns the line."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gandlf-dimlift {command}: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("package,label", [("torch", "torch"), ("numpy", "numpy"), ("GANDLF", "GaNDLF")])
def test_doctor_names_a_broken_package(package, label, tmp_path):
    result = cli("doctor", shadow=broken_package(tmp_path, package))
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith(f"{label} "))
    assert line.split()[1] == "BROKEN" and f"simulated broken {package}" in line, result.stdout
    assert "--force-reinstall" in line
    assert f"status: BROKEN ({label}" in result.stdout


def test_list_with_a_broken_torch_is_one_line_per_cause(tmp_path):
    result = cli("list", shadow=broken_package(tmp_path, "torch"))
    assert result.returncode == 1 and result.stderr == "", result.stderr
    failed = [line for line in result.stdout.splitlines() if "FAILED TO LOAD" in line]
    assert len(failed) == 1 and "ImportError: simulated broken torch" in failed[0]
    assert "dimlift_smp" in failed[0] and "dimlift_slice_attention" in failed[0]
    assert "gandlf-dimlift doctor" in result.stdout


def test_explain_with_a_broken_torch_is_one_line(tmp_path):
    config, data = tmp_path / "config.yaml", tmp_path / "data.csv"
    config.write_text("model: {}\n")
    data.write_text("SubjectID,Channel_0\n")
    (tmp_path / "model").mkdir()
    line = one_error(cli("explain", "-c", str(config), "-m", str(tmp_path / "model"), "-i", str(data), "-o",
                         str(tmp_path / "out"), shadow=broken_package(tmp_path, "torch")), "explain")
    assert "cannot import torch" in line and "gandlf-dimlift doctor" in line
    assert not (tmp_path / "out").exists()


def _explain_arguments(tmp_path: Path, **override: Path) -> list[str]:
    paths = {"c": tmp_path / "config.yaml", "m": tmp_path / "model", "i": tmp_path / "data.csv", "o": tmp_path / "out"}
    paths.update(override)
    return ["explain", *[x for key, path in paths.items() for x in (f"-{key}", str(path))]]


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("config-missing", r"The config .*nope\.yaml \(-c\) does not exist; give a file\."),
        ("csv-is-folder", r"The data CSV .*model \(-i\) is a folder; give a file\."),
        ("model-missing", r"The model directory .*nowhere \(-m\) does not exist; give the folder gandlf_run trained"),
        ("output-is-file", r"The output path .*config\.yaml \(-o\) is a file; give a folder"),
        ("output-under-file", r"The output folder .*config\.yaml/out \(-o\) cannot be created: .*yaml is a file"),
    ],
)
def test_explain_bad_paths_are_one_line_and_write_nothing(case, fragment, tmp_path):
    import re

    (tmp_path / "model").mkdir()
    (tmp_path / "config.yaml").write_text("model: {}\n")
    (tmp_path / "data.csv").write_text("SubjectID,Channel_0\n")
    override = {
        "config-missing": {"c": tmp_path / "nope.yaml"},
        "csv-is-folder": {"i": tmp_path / "model"},
        "model-missing": {"m": tmp_path / "nowhere"},
        "output-is-file": {"o": tmp_path / "config.yaml"},
        "output-under-file": {"o": tmp_path / "config.yaml" / "out"},
    }[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    line = one_error(cli(*_explain_arguments(tmp_path, **override)), "explain")
    assert re.search(fragment, line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("how", ["flag", "variable"])
def test_debug_shows_the_traceback(how, tmp_path):
    arguments = _explain_arguments(tmp_path, c=tmp_path / "nope.yaml")
    (tmp_path / "model").mkdir()
    result = cli(*(["--debug", *arguments] if how == "flag" else arguments),
                 **({"GANDLF_DIMLIFT_DEBUG": "1"} if how == "variable" else {}))
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "ExplainError: The config" in result.stderr


@pytest.mark.parametrize(
    "arguments,fragment",
    [
        (["--architecture", "dimlift_slice_atention"], "has no demo; choose one of .* Did you mean "
                                                       "'dimlift_slice_attention'\\?"),
        (["--transfer"], "--transfer is the 2D -> 3D transfer of DX-Net: use it with --architecture dimlift_dxnet"),
        (["--epochs", "0"], "--epochs 0: train at least one epoch"),
        ([], "is not empty; give a new folder"),
    ],
)
def test_demo_refuses_bad_arguments_before_writing(arguments, fragment, tmp_path):
    import re

    folder = tmp_path / "demo"
    folder.mkdir()
    if not arguments:
        (folder / "mine.txt").write_text("the user's file")
    line = one_error(cli("demo", str(folder), *arguments), "demo")
    assert re.search(fragment, line), line
    assert sorted(p.name for p in folder.iterdir()) == ([] if arguments else ["mine.txt"])


def test_argument_errors_keep_argparse_usage_and_exit_2():
    result = cli("slices", "-i", "x.csv", "-o", "out", "--axis", "k")
    assert result.returncode == 2 and "invalid choice: 'k'" in result.stderr and "Traceback" not in result.stderr
