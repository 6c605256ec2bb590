"""Every shipped sample config trains for one epoch with the real `gandlf_run`, as shipped: only `pretrained` (no
model hub here), the data paths and the number of epochs differ. The data fit each config: its dimension, patch
size, channels and task, and enough subjects for its nested_training split."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import run_gandlf

from gandlf_dimlift.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "sample_configs").glob("*.yaml") if not p.name.startswith("openfl"))


def _task(config: dict) -> str:
    if config["model"].get("final_layer", "").lower() in ("none", "regression"):
        return "regression"
    return "classification" if config["loss_function"] == "cel" else "segmentation"


def _train(path: Path, work: Path, pretrained) -> Path:
    config = yaml.safe_load(path.read_text())
    config["model"]["pretrained"] = pretrained
    config["num_epochs"] = config["patience"] = 1
    dimension = config["model"]["dimension"]
    shape = config["patch_size"][:dimension]
    # -5 folds need 5 subjects each: 10 for testing -5 and validation -5, 5 for a single validation split
    subjects = 10 if config["nested_training"]["testing"] != 1 else 5
    csv = write_dataset(work / "data", _task(config), n_subjects=subjects, shape=shape)
    model_dir = work / "model"
    run_gandlf(yaml.safe_load(yaml.safe_dump(config)), csv, model_dir, timeout=1800)
    checkpoints = list(model_dir.rglob(f"{config['model']['architecture']}_best.pth.tar"))
    assert checkpoints, f"{path.name} wrote no checkpoint"
    return checkpoints[0]


STANDALONE = [p.name for p in CONFIGS if not p.name.startswith("transfer_")]
TRANSFER = ("transfer_step1_omnianet_2d.yaml", "transfer_step2_dxnet_3d.yaml")


def test_every_sample_config_is_trained_by_a_test():
    assert {p.name for p in CONFIGS} - set(STANDALONE) == set(TRANSFER)


@pytest.mark.slow
@pytest.mark.parametrize("name", STANDALONE)
def test_sample_config_trains_one_epoch_as_shipped(name, tmp_path):
    _train(ROOT / "sample_configs" / name, tmp_path, pretrained=False)


@pytest.mark.slow
def test_transfer_walk_through_trains_as_shipped(tmp_path):
    step1 = _train(ROOT / "sample_configs" / TRANSFER[0], tmp_path / "step1", pretrained=False)
    _train(ROOT / "sample_configs" / TRANSFER[1], tmp_path / "step2", pretrained=str(step1))
