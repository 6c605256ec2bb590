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
    env.update(CUDA_VISIBLE_DEVICES="", PIP_DISABLE_PIP_VERSION_CHECK="1", HOME=str(tmp_path))
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


# --------------------------------------------------------------------------------------------------------------
# docker/build_and_check.py: the real build with an image builder. CI has no builder and no time for images, so
# these tests run its dry mode (input checks, builder detection, the plan) and the parts of its logic that need
# no image; docs/deploy.md has the output of a real run.

SCRIPT = REPO / "docker" / "build_and_check.py"


def build_script(*arguments: str, path: str | None = None, env: dict[str, str] | None = None):
    environment = {**os.environ, **(env or {})}
    if path is not None:
        environment["PATH"] = path
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300, env=environment, cwd=REPO)


def stub_tools(folder: Path, **scripts: str) -> str:
    """A folder of executables named after the keys (shell scripts); returns it as a PATH holding only it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return str(folder)


@pytest.fixture(scope="module")
def script_module():
    """docker/build_and_check.py imported as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_and_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_build_script_dry_run_checks_inputs_and_prints_the_plan(tmp_path):
    result = build_script("--dry-run", "--work", str(tmp_path / "work"))
    assert result.returncode == 0, result.stdout
    out = result.stdout
    assert "[1/2] inputs: gandlf-dimlift 0.1.0 for GaNDLF 0.1.5" in out
    assert "image to build:  localhost/gandlf-dimlift-deploy/gandlf-dimlift:0.1.0" in out
    assert "localhost/gandlf-dimlift-deploy/gandlf-standin:0.1.5" in out
    # Detection reports Docker's state whatever this machine has, and names the builder or says there is none.
    assert re.search(r"\n    docker: (not installed|client at .*no daemon answers|.* -> using docker)", out), out
    assert re.search(r"RESULT: dry run OK: .* with (docker|buildah|no builder \(none usable here\))", out), out
    # A dry run builds nothing: the work folder holds at most the containers.conf written for buildah.
    assert {p.name for p in (tmp_path / "work").iterdir()} <= {"containers.conf"}


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--gandlf-version", "0.1.4"], "--gandlf-version 0.1.4: gandlf-dimlift 0.1.0 requires gandlf==0.1.5"),
        (["--tag", "My Image!"], "--tag 'My Image!' is not an image name"),
        (["--torch-index", "cpu"], "--torch-index 'cpu': give auto, pypi or a wheel index URL"),
        (["--ca-bundle", "/nonexistent/ca.pem"], "--ca-bundle /nonexistent/ca.pem: no such file"),
        (["--work", str(REPO / "build" / "deploy")], "is inside the repository"),
    ],
    ids=["other-gandlf", "bad-tag", "bad-index", "missing-ca", "work-in-repo"],
)
def test_build_script_rejects_bad_inputs_at_the_inputs_step(tmp_path, arguments, expected):
    work = [] if "--work" in arguments else ["--work", str(tmp_path / "work")]
    result = build_script("--dry-run", *work, *arguments)
    assert result.returncode == 1, result.stdout
    assert "[1/2] inputs: FAILED" in result.stdout
    assert "RESULT: FAILED" in result.stdout and "step 'inputs' failed: " in result.stdout
    assert expected in result.stdout
    assert "Traceback" not in result.stdout


def test_build_script_rejects_a_host_python_without_the_plugin_or_gandlf(tmp_path):
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    result = build_script("--dry-run", "--work", str(tmp_path / "work"), "--python", str(venv / "bin" / "python"))
    assert result.returncode == 1
    assert f"{venv / 'bin' / 'python'} has GaNDLF None, not 0.1.5" in result.stdout
    assert "Pass --python with an environment that has gandlf==0.1.5" in result.stdout


def test_builder_detection_uses_docker_only_when_its_daemon_answers(tmp_path):
    no_daemon = "echo 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock.' >&2; exit 1"
    buildah = "echo 'buildah version 1.28.2 (image-spec 1.1.0-rc2, runtime-spec 1.0.2-dev)'"
    path = stub_tools(tmp_path / "bin1", docker=no_daemon, buildah=buildah)
    result = build_script("--dry-run", "--work", str(tmp_path / "work"), path=path)
    assert result.returncode == 0, result.stdout
    assert "docker: client at" in result.stdout and "but no daemon answers (Cannot connect" in result.stdout
    assert "buildah: 1.28.2 at" in result.stdout and "-> using buildah" in result.stdout
    assert "CONTAINERS_CONF=" in result.stdout
    assert (tmp_path / "work" / "containers.conf").read_text().count("cgroups = \"disabled\"") == 1

    path = stub_tools(tmp_path / "bin2", docker="echo 28.2.2", buildah=buildah)
    result = build_script("--dry-run", "--work", str(tmp_path / "work"), path=path)
    assert "docker: 28.2.2 at" in result.stdout and "-> using docker" in result.stdout
    assert "buildah:" not in result.stdout  # the first usable builder wins

    path = stub_tools(tmp_path / "bin3", docker=no_daemon, buildah=buildah)
    result = build_script("--dry-run", "--work", str(tmp_path / "work"), "--builder", "docker", path=path)
    assert "a real run needs docker" in result.stdout


def test_docker_builds_take_no_ca_bundle(tmp_path):
    """docker build cannot mount a file: a bundle from the environment is left out, one asked for is an error."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not read in a dry run\n")
    path = stub_tools(tmp_path / "bin", docker="echo 28.2.2")
    from_env = build_script("--dry-run", "--work", str(tmp_path / "work"), path=path, env={"PIP_CERT": str(bundle)})
    assert from_env.returncode == 0, from_env.stdout
    assert f"pip CA bundle {bundle} (from the environment) not used: docker build cannot mount it" in from_env.stdout
    given = build_script("--dry-run", "--work", str(tmp_path / "work"), "--ca-bundle", str(bundle), path=path)
    assert given.returncode == 1
    assert "step 'builder' failed: --ca-bundle needs buildah" in given.stdout


def test_build_script_without_a_builder_stops_at_the_builder_step(tmp_path):
    """A real (not dry) run on a machine with neither builder stops at its second step, naming it and the fix."""
    path = stub_tools(tmp_path / "bin")  # neither docker nor buildah
    result = build_script("--work", str(tmp_path / "work"), path=path)
    assert result.returncode == 1
    assert "docker: not installed" in result.stdout and "buildah: not installed" in result.stdout
    assert "[2/14] builder: FAILED" in result.stdout
    assert "RESULT: FAILED: image localhost/gandlf-dimlift-deploy/gandlf-dimlift:0.1.0: step 'builder' failed: " \
           "no usable image builder: install Docker with a running daemon, or buildah" in result.stdout
    assert not (tmp_path / "work" / "context").exists()


def write_predictions(path: Path, rows: list[tuple[str, str, float]]) -> Path:
    """A table as GaNDLF 0.1.5's inference writes it: SubjectID, PredictedClass, one column per class."""
    path.write_text("SubjectID,PredictedClass,0,1\n" + "".join(f"{s},{c},{1 - p},{p}\n" for s, c, p in rows))
    return path


def test_prediction_comparison_reports_agreement_and_catches_differences(tmp_path, script_module):
    host = write_predictions(tmp_path / "host.csv", [("a", "1", 0.5070630), ("b", "0", 0.4221440)])
    same = write_predictions(tmp_path / "same.csv", [("b", "0", 0.4221441), ("a", "1", 0.5070630)])
    summary = script_module.compare_predictions(host, same)
    assert summary.startswith("2/2 predicted classes equal; max |p_image - p_host| = 1.0e-07 over 2 subjects x 2")

    other_class = write_predictions(tmp_path / "class.csv", [("a", "0", 0.4999), ("b", "0", 0.4221440)])
    with pytest.raises(script_module.StepFailed, match=r"1/2 predicted classes equal"):
        script_module.compare_predictions(host, other_class)
    drift = write_predictions(tmp_path / "drift.csv", [("a", "1", 0.5071), ("b", "0", 0.4221440)])
    with pytest.raises(script_module.StepFailed, match=r"max \|p_image - p_host\| = 3.7e-05"):
        script_module.compare_predictions(host, drift)
    missing = write_predictions(tmp_path / "missing.csv", [("a", "1", 0.5070630)])
    with pytest.raises(script_module.StepFailed, match=r"subjects differ"):
        script_module.compare_predictions(host, missing)


def test_standin_dockerfile_matches_what_the_script_builds(script_module):
    """The script builds the `python` stage for a base without GaNDLF and pins the GaNDLF the plugin requires."""
    text = (REPO / "docker" / "gandlf-standin.Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+) AS (\w+)$", text, re.M) == [("${OS_IMAGE}", "python"), ("python", "gandlf")]
    default = re.search(r"^ARG GANDLF_VERSION=(\S+)$", text, re.M).group(1)
    assert default == script_module.required_gandlf_version() == "0.1.5"
