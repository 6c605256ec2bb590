"""OpenFL: a real federation on loopback trains a plugin architecture; plan example; plugin version check.

The federation test uses OpenFL's own tooling as its quick start describes (`fx workspace create`, `fx plan
initialize`, `fx workspace certify`, aggregator and collaborator certificates, `fx aggregator start`, two
`fx collaborator start` processes) with `sample_configs/openfl_plan.yaml`, each collaborator on its own shard
of a tiny synthetic dataset. It needs `openfl==1.9` installed next to GaNDLF 0.1.5 (the `openfl` extra).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gandlf_dimlift.openfl import (
    PLAN_SETTING,
    PluginVersionError,
    check_plugin_version,
    federated_average,
    installed_version,
)
from gandlf_dimlift.synthetic import write_dataset

REPO = Path(__file__).resolve().parents[1]
PLAN = REPO / "sample_configs" / "openfl_plan.yaml"
BIN = Path(sys.executable).parent
COLLABORATORS = ("one", "two")


def gandlf_config() -> dict:
    return yaml.safe_load(PLAN.read_text())["task_runner"]["settings"]["gandlf_config"]


def build_model(config: dict):
    """Builds the plan's architecture through GaNDLF's own config parser and model factory."""
    from GANDLF.config_manager import ConfigManager
    from GANDLF.models import get_model

    return get_model(ConfigManager(dict(config)))


# --- without OpenFL -------------------------------------------------------------------------------------


def test_version_check_accepts_exact_and_specifier_and_names_the_mismatch():
    assert check_plugin_version("0.1.0", installed="0.1.0") == "0.1.0"
    assert check_plugin_version("==0.1.*", installed="0.1.3") == "0.1.3"
    assert check_plugin_version("", installed="9.9") == "9.9"  # the plan pins nothing
    with pytest.raises(PluginVersionError) as error:
        check_plugin_version("0.1.0", who="collaborator two", installed="0.2.0")
    message = str(error.value)
    assert "collaborator two" in message and "0.2.0" in message and "==0.1.0" in message
    assert "gandlf-dimlift" in message and PLAN_SETTING in message
    with pytest.raises(PluginVersionError, match="neither a version"):
        check_plugin_version("not a version!", installed="0.1.0")


def test_version_check_names_the_missing_package(tmp_path):
    """In an interpreter where gandlf-dimlift is not installed (its sources importable, no metadata) the check
    says the package is missing and names the participant."""
    shutil.copytree(REPO / "gandlf_dimlift", tmp_path / "gandlf_dimlift", ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import gandlf_dimlift.openfl as o\n"
        "o.check_plugin_version('0.1.0', who='collaborator one')\n"
    )
    result = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert "collaborator one: gandlf-dimlift is not installed" in result.stderr


def test_federated_average_weights_floats_and_keeps_counters():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(5)}
    average = federated_average([a, b], weights=[3, 1])
    assert torch.allclose(average["w"], torch.tensor([1.0, 3.0]))
    assert average["n"].item() == 3 and average["w"].dtype == torch.float32
    with pytest.raises(ValueError, match="different keys"):
        federated_average([a, {"v": torch.zeros(2), "n": torch.tensor(1)}])


def test_sample_plan_has_what_openfl_and_the_runner_read_and_its_gandlf_config_builds():
    plan = yaml.safe_load(PLAN.read_text())
    for section in ("aggregator", "collaborator", "data_loader", "task_runner", "network", "assigner", "tasks"):
        assert section in plan, section
    runner = plan["task_runner"]
    assert runner["template"] == "gandlf_dimlift.openfl.DimliftTaskRunner"
    assert plan["data_loader"]["template"] == "gandlf_dimlift.openfl.DimliftDataLoader"
    assert runner["settings"][PLAN_SETTING] == installed_version()  # keep the example in step with releases
    assert {"train", "aggregated_model_validation", "locally_tuned_model_validation"} <= set(plan["tasks"])
    assert plan["aggregator"]["settings"]["rounds_to_train"] == 2
    config = runner["settings"]["gandlf_config"]
    assert config["model"]["architecture"].startswith("dimlift_")
    model = build_model(config)
    out = model(torch.zeros(1, 1, *config["patch_size"]))
    assert out.shape == (1, 2, *config["patch_size"])


# --- a real OpenFL federation ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def fx_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GANDLF_DIMLIFT_DISABLE"}
    env.update(
        CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PATH=f"{BIN}{os.pathsep}{env['PATH']}"
    )
    env.update(extra)
    return env


def fx(workspace: Path, *args: str, env: dict | None = None, timeout: int = 300) -> str:
    result = subprocess.run(
        [str(BIN / "fx"), *args], cwd=workspace, env=env or fx_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        pytest.fail(f"fx {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-5000:]}")
    return result.stdout


def require_openfl() -> None:
    """The federation tests need OpenFL: fail (not skip) with the install command when it is absent."""
    if not (BIN / "fx").exists():
        pytest.fail(
            f"OpenFL's `fx` is not installed next to {sys.executable}; install the extra: pip install -e '.[openfl]'"
        )


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> dict:
    """Runs a two-round federation (aggregator + two collaborators, separate processes) once per module."""
    require_openfl()
    root = tmp_path_factory.mktemp("openfl")
    workspace = root / "workspace"
    fx(root, "workspace", "create", "--prefix", str(workspace), "--template", "gandlf_seg_test")
    shutil.rmtree(workspace / "src", ignore_errors=True)  # the template's data loader: the plan uses ours

    # Each collaborator's shard: one training and one validation subject, different seeds.
    for seed, name in enumerate(COLLABORATORS):
        shard = workspace / "data" / name
        csv = write_dataset(shard / "images", "segmentation", n_subjects=2, seed=seed + 10)
        header, first, second = csv.read_text().splitlines()
        (shard / "train.csv").write_text(f"{header}\n{first}\n")
        (shard / "valid.csv").write_text(f"{header}\n{second}\n")

    plan = yaml.safe_load(PLAN.read_text())
    plan["network"]["settings"]["agg_port"] = free_port()
    plan["task_runner"]["settings"]["gandlf_config"]["output_dir"] = str(root / "gandlf_output")
    (workspace / "plan" / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    (workspace / "plan" / "cols.yaml").write_text("collaborators:\n")
    (workspace / "plan" / "data.yaml").write_text("# collaborator_name,data_directory_path\n")

    for name in COLLABORATORS:
        fx(workspace, "collaborator", "create", "-n", name, "-d", f"data/{name}", "--silent")
    fx(workspace, "plan", "initialize", "-a", "localhost")
    fx(workspace, "workspace", "certify")
    fx(workspace, "aggregator", "generate-cert-request", "--fqdn", "localhost")
    fx(workspace, "aggregator", "certify", "--fqdn", "localhost", "--silent")
    for name in COLLABORATORS:
        fx(workspace, "collaborator", "generate-cert-request", "-n", name, "--silent")
        fx(workspace, "collaborator", "certify", "-n", name, "--silent")

    logs = {role: open(root / f"{role}.log", "w") for role in ("aggregator", *COLLABORATORS)}
    processes = {"aggregator": subprocess.Popen(
        [str(BIN / "fx"), "aggregator", "start"], cwd=workspace, env=fx_env(), stdout=logs["aggregator"],
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)}
    for name in COLLABORATORS:
        processes[name] = subprocess.Popen(
            [str(BIN / "fx"), "collaborator", "start", "-n", name], cwd=workspace, env=fx_env(),
            stdout=logs[name], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    start, codes = time.monotonic(), {}
    try:
        for role, process in processes.items():
            codes[role] = process.wait(timeout=max(1, 900 - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        for handle in logs.values():
            handle.close()
    text = {role: (root / f"{role}.log").read_text() for role in processes}
    if codes != {role: 0 for role in processes}:
        pytest.fail(f"federation did not finish cleanly (exit codes {codes}):\n"
                    + "\n".join(f"--- {role}\n{log[-4000:]}" for role, log in text.items()))
    return {"root": root, "workspace": workspace, "logs": text, "seconds": time.monotonic() - start}


@pytest.mark.slow
def test_federation_of_two_collaborators_trains_the_plugin_architecture(federation):
    workspace, logs = federation["workspace"], federation["logs"]
    for name in COLLABORATORS:
        assert logs[name].count("Starting Training") == 2, f"collaborator {name} did not train in both rounds"
    completed = {}
    for round_number, names in re.findall(r"Round (\d+): Collaborators that have completed all tasks: \[([^\]]*)\]",
                                          logs["aggregator"]):
        completed[int(round_number)] = {n.strip(" '") for n in names.split(",")}
    assert completed == {0: set(COLLABORATORS), 1: set(COLLABORATORS)}, completed

    # OpenFL's own export turns the aggregated protobuf into the runner's native checkpoint.
    fx(workspace, "model", "save", "-i", "save/dimlift_last.pbuf", "-o", "save/aggregated.pth")
    aggregated = torch.load(workspace / "save" / "aggregated.pth", map_location="cpu", weights_only=True)
    state = aggregated["model_state_dict"]

    model = build_model(gandlf_config())
    assert type(model).__module__.startswith("gandlf_dimlift.")
    model.load_state_dict(state, strict=True)  # the aggregated file loads into the architecture
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 1, 32, 32, 32))
    assert out.shape == (1, 2, 32, 32, 32) and torch.isfinite(out).all()

    from openfl.pipelines import NoCompressionPipeline
    from openfl.protocols import utils

    initial, _ = utils.deconstruct_model_proto(utils.load_proto(workspace / "save" / "dimlift_init.pbuf"),
                                               NoCompressionPipeline())
    changed = [k for k, v in initial.items() if not torch.equal(torch.as_tensor(v), state[k].cpu())]
    assert changed, "the aggregated model equals the initial one: no training reached the aggregator"


@pytest.mark.slow
def test_collaborator_with_another_plugin_version_is_stopped_and_named(federation, tmp_path):
    """A collaborator whose installed gandlf-dimlift differs from the plan's version is refused by name."""
    # A real second installation of the plugin with another version, found first on sys.path.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                                 "benchmarks", "tests", "docs"))
    init = source / "gandlf_dimlift" / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{installed_version()}"', '__version__ = "0.0.1"'))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q",
                    "-w", str(tmp_path / "wheel")], check=True, timeout=300, capture_output=True)
    target = tmp_path / "other"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    *map(str, (tmp_path / "wheel").glob("*.whl"))], check=True, timeout=300, capture_output=True)

    result = subprocess.run(
        [str(BIN / "fx"), "collaborator", "start", "-n", "two"], cwd=federation["workspace"],
        env=fx_env(PYTHONPATH=str(target)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=300, stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    output = " ".join(result.stdout.split())
    assert "PluginVersionError" in output
    assert "data path data/two" in output and "gandlf-dimlift 0.0.1 is installed" in output
    assert f"requires =={installed_version()}" in output
