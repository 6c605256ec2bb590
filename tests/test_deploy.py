"""The deployment layer (docker/Dockerfile) without a Docker engine: its steps run as a script.

There is no Docker engine here. The test reads docker/Dockerfile, and runs its ARG, ENV, COPY and RUN steps
after `FROM` with `/bin/sh -c`, exactly as written, against a scratch "image": a virtual environment that holds
GaNDLF and its stack (links to this environment's packages) but not gandlf-dimlift. Build arguments are
overridden only to point at that environment (PYTHON) and a scratch folder (DIMLIFT_DIR); the build context is
a folder with docker/ and a freshly built wheel in dist/, as the documented command sequence makes it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
PLUGIN_FILES = ("gandlf_dimlift", "__editable__", "gandlf_dimlift_hook.pth")


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """The instructions after the last FROM as (keyword, argument), continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, argument = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            steps = []  # a later stage starts over
        steps.append((keyword, argument.strip()))
    return [s for s in steps if s[0] != "FROM"]


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def run_dockerfile(context: Path, build_args: dict[str, str], env: dict[str, str], skip=lambda step: False):
    """Runs the Dockerfile's steps like `docker build` would after FROM; returns (exit status, output, steps run).

    Stops at the first failing RUN, like a build. ARG values (defaults overridden by `build_args`) and ENV values
    are in the environment of every RUN, as in Docker.
    """
    variables, outputs, ran = {}, [], []
    for keyword, argument in parse_dockerfile(DOCKERFILE):
        if skip(argument):
            continue
        if keyword == "ARG":
            name, _, default = argument.partition("=")
            variables[name] = build_args.get(name, default)
        elif keyword == "ENV":
            name, _, value = argument.partition("=")
            variables[name] = expand(value, variables)
        elif keyword == "COPY":
            *sources, destination = expand(argument, variables).split()
            destination = Path(destination)
            destination.mkdir(parents=True, exist_ok=True)
            for source in sources:
                source = context / source
                if source.is_dir():
                    shutil.copytree(source, destination, dirs_exist_ok=True)
                else:
                    shutil.copy2(source, destination)
        elif keyword == "RUN":
            result = subprocess.run(["/bin/sh", "-c", argument], env={**env, **variables}, cwd=context,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
            outputs.append(result.stdout)
            ran.append(argument)
            if result.returncode != 0:
                return result.returncode, "\n".join(outputs), ran
        elif keyword not in ("LABEL", "WORKDIR", "ENTRYPOINT", "CMD", "USER"):
            raise AssertionError(f"test harness does not know Dockerfile instruction {keyword}")
    return 0, "\n".join(outputs), ran


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """gandlf-dimlift built as a wheel from a copy of the sources (the documented `pip wheel` step)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                                 "tests", "benchmarks", "docs", ".ci"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q",
                    "-w", str(root / "dist")], check=True, timeout=600, capture_output=True)
    (built,) = (root / "dist").glob("gandlf_dimlift-*.whl")
    assert "gandlf_dimlift_hook.pth" in zipfile.ZipFile(built).namelist()
    return built


def scratch_environment(root: Path) -> Path:
    """A venv that sees GaNDLF and everything else of this environment, but not gandlf-dimlift; returns its python."""
    venv = root / "image"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    ours = Path(sysconfig.get_path("purelib"))
    for entry in ours.iterdir():
        if not entry.name.startswith(PLUGIN_FILES) and not (site / entry.name).exists():
            (site / entry.name).symlink_to(entry)
    return python


@pytest.fixture
def build(tmp_path, wheel):
    """A build context (docker/ and dist/ with the wheel), a scratch image environment, and a runner."""
    context = tmp_path / "context"
    shutil.copytree(REPO / "docker", context / "docker")
    (context / "dist").mkdir()
    shutil.copy2(wheel, context / "dist")
    python = scratch_environment(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("GANDLF_DIMLIFT_DISABLE", "PYTHONPATH")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2", PIP_DISABLE_PIP_VERSION_CHECK="1", HOME=str(tmp_path))
    args = {"PYTHON": str(python), "DIMLIFT_DIR": str(tmp_path / "opt" / "gandlf-dimlift")}

    def run(extra_args=None, extra_env=None, skip=lambda step: False):
        return run_dockerfile(context, {**args, **(extra_args or {})}, {**env, **(extra_env or {})}, skip)

    run.python = python
    run.env = env
    return run


def test_scratch_image_has_gandlf_but_not_the_plugin(build):
    result = subprocess.run([str(build.python), "-c", "import GANDLF, importlib.util as u; "
                             "print(u.find_spec('gandlf_dimlift') is None)"],
                            env=build.env, cwd=build.python.parent, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("True"), result.stderr[-2000:]


@pytest.mark.slow
def test_dockerfile_steps_install_the_wheel_and_the_check_passes(build):
    status, output, ran = build()
    assert status == 0, output[-4000:]
    assert len(ran) == 2  # install, check
    assert "gandlf-dimlift layer check OK: gandlf-dimlift 0.1.0 on GaNDLF 0.1.5" in output
    for key in ("dimlift_smp", "dimlift_dxnet", "dimlift_omnianet", "dimlift_slice_attention"):
        assert key in output
    # The wheel went into the image environment, hook included.
    installed = subprocess.run([str(build.python), "-c", "import gandlf_dimlift, sys; "
                                "print(gandlf_dimlift.__file__, 'gandlf_dimlift' in sys.modules)"],
                               env=build.env, cwd=build.python.parent, capture_output=True, text=True, timeout=300)
    assert str(build.python.parents[1]) in installed.stdout, installed.stdout + installed.stderr


def test_build_without_the_plugin_fails_at_the_check_naming_the_package(build):
    """An image whose layer does not install the plugin does not get through its own build."""
    status, output, ran = build(skip=lambda step: "pip install" in step)
    assert status == 1
    assert len(ran) == 1 and "check_registration.py" in ran[0]
    assert "gandlf-dimlift layer check FAILED: gandlf-dimlift is not installed in" in output
    assert "pip install --no-deps" in output  # says the fix


def test_check_fails_when_the_image_sets_the_opt_out_variable(build):
    status, output, _ = build(extra_env={"GANDLF_DIMLIFT_DISABLE": "1"})
    assert status == 1
    assert "GANDLF_DIMLIFT_DISABLE='1' is set in the image environment" in output


def test_check_fails_when_the_hook_was_not_installed_into_site_packages(build, tmp_path, wheel):
    """`pip install --target` puts the code and metadata on the path but the startup hook is never processed."""
    target = tmp_path / "target"
    subprocess.run([str(build.python), "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True, env=build.env, timeout=300, capture_output=True)
    status, output, _ = build(extra_env={"PYTHONPATH": str(target)}, skip=lambda step: "pip install" in step)
    assert status == 1
    assert "startup hook gandlf_dimlift_hook.pth did not run" in output
