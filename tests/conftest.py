"""Shared test helpers: real `gandlf_run` subprocesses on tiny datasets written by the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gandlf_dimlift.synthetic import write_config

BIN = Path(sys.executable).parent


# pytest-xdist runs one worker per core (pyproject.toml): each worker, and the subprocesses it starts, gets its share
# of the cores' threads, since oversubscribed OpenMP threads slow everything down; at most 2, what the tests used
# in one process before.
THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


# The files that take longest (minutes of real training each), started first so that no worker runs one alone at
# the end while the others idle: xdist hands out whole files (--dist loadfile) in collection order once its own
# reordering (by number of tests, which put these last) is off.
LONGEST_FIRST = ("test_sample_configs.py", "test_openfl.py", "test_cli_and_configs.py", "test_dxnet.py")


def pytest_configure(config: pytest.Config) -> None:
    """List the slowest tests after every run (unless --durations is given), so tier times stay visible in CI."""
    if config.option.durations is None:
        config.option.durations = 15
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    torch.set_num_threads(THREADS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)  # for every subprocess a test starts


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file and among the other files is kept


def gandlf_env(**extra: str) -> dict[str, str]:
    """The environment for a GaNDLF subprocess: no GPU, few threads, no pre-existing opt-out."""
    env = {k: v for k, v in os.environ.items() if k != "GANDLF_DIMLIFT_DISABLE"}
    env.update({"CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}, **extra)  # OMP_NUM_THREADS: pytest_configure
    return env


def run_gandlf(
    config: dict | Path,
    csv: Path | str,
    model_dir: Path,
    train: bool = True,
    output_dir: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: int = 900,
) -> subprocess.CompletedProcess:
    """Runs the real `gandlf_run` (training with `train`, else inference into `output_dir`).

    Returns:
        The completed process (stdout and stderr merged in `.stdout`). With `check`, a non-zero exit fails the
        test and shows the end of GaNDLF's output.
    """
    model_dir = Path(model_dir)
    if isinstance(config, dict):
        config = write_config(config, model_dir.parent / f"{model_dir.name}_config.yaml")
    command = [str(BIN / "gandlf_run"), "-c", str(config), "-i", str(csv), "-m", str(model_dir), "-d", "cpu"]
    command += ["-t", "True", "-rt", "True"] if train else ["-t", "False", "-o", str(output_dir or model_dir)]
    result = subprocess.run(
        command, env=env or gandlf_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        pytest.fail(f"gandlf_run failed ({result.returncode}):\n{result.stdout[-6000:]}")
    return result


def inference_outputs(model_dir: Path, output_dir: Path | None = None) -> list[Path]:
    """Files GaNDLF 0.1.5's inference wrote: segmentation masks per subject (under the model folder's
    `output_inference`) and, for classification and regression, `final_preds_and_avg_probs.csv` (under `-o`)."""
    folders = [Path(model_dir) / "output_inference"] + ([Path(output_dir)] if output_dir else [])
    return sorted(p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)
