"""Slice attention learns under the config a GaNDLF user already has, side by side with GaNDLF's own resnet18.

Issue 12: with GaNDLF's classification config (`final_layer: softmax` with `loss_function: cel`, i.e. softmax
twice), the slice attention classifier stayed at one constant prediction (train loss 0.8133, accuracy 0.5) while
GaNDLF's 3D resnet18 learned the same data; with `logits` it learned but its validation loss jumped by several
units from one epoch to the next. Here both run through the real `gandlf_run` on the same tiny data and config
(only `model.architecture` and the plugin's options differ), and the slice attention model must reach at least
resnet18's training accuracy (GaNDLF's logs_training.csv).

The data: half of the subjects have a bright ball confined to a band of slices along the last axis (GaNDLF's
slice axis). Both models get the same split, the first half for validation (3 subjects of each class on either
side), as a training and a validation CSV: given one CSV, GaNDLF 0.1.5 shuffles it and splits it without
stratifying, and with 1 or 2 positives among the 6 training subjects (28 % of its draws) the validation loss of
either model can jump (`benchmarks/SLICE_ATTENTION_STABILITY.md`, "training positives").
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import run_gandlf

from benchmarks.slice_attention_learning import write_data
from gandlf_dimlift.synthetic import make_config

SUBJECTS = 12  # 6 train, 6 validation
SIZE = 32  # 32^3 volumes
BAND = (12, 20)
EPOCHS = 5
LEARNING_RATE = 5e-4  # the Adam learning rate
PLUGIN_OPTIONS = {"encoder_name": "resnet18", "pretrained": False, "pooling": "attention"}


def training_log(model_dir: Path) -> dict[str, list[float]]:
    """Per-epoch columns of GaNDLF's logs_training.csv / logs_validation.csv that the checks read."""
    columns: dict[str, list[float]] = {}
    for name, keys in (("logs_training.csv", ("train_loss", "train_accuracy")),
                       ("logs_validation.csv", ("val_loss", "val_accuracy"))):
        with open(model_dir / name) as handle:
            for row in csv.DictReader(handle):
                for key in keys:
                    columns.setdefault(key, []).append(float(row[key]))
    return columns


def train(architecture: str, final_layer: str, csv_path: str, model_dir: Path, options: dict) -> dict:
    config = make_config(architecture, "classification", num_epochs=EPOCHS, learning_rate=LEARNING_RATE,
                         model_options={"final_layer": final_layer, **options})
    run_gandlf(config, csv_path, model_dir)
    return training_log(model_dir)


# Was KNOWN TO FAIL sometimes: the collapse to one constant output is gone (train accuracy reaches 1.0 under both
# final layers), since the head's input is scaled (2026-12-05) the validation loss jumps far less often, and since the
# random encoder's running statistics start at its first batch's (momentum 0.03) it starts about as soon as resnet18.
# On this fixed first-half split the test passed 4 runs of 4 (8 of 8 cases); before that start 6 runs of 8, the
# failures being slow starts (slice attention's best train accuracy 0.83, and 0.5 in a softmax run that stayed at
# chance) against resnet18's 1.0. Not run by CI; docs/slice_attention.md has the figures, and `python -m
# benchmarks.slice_attention_stability` shows jumps and starts per split.
@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize("final_layer", ["softmax", "logits"])
def test_slice_attention_learns_at_least_as_well_as_gandlf_resnet18(workdir: Path, final_layer: str) -> None:
    csvs = write_data(workdir / "data", SUBJECTS, SIZE, BAND, seed=0)  # the benchmark's first-half split
    csv_path = f"{csvs['train']},{csvs['validation']}"  # gandlf_run's pre-split form: training,validation
    reference = train("resnet18", final_layer, csv_path, workdir / "resnet18", {})
    plugin = train("dimlift_slice_attention", final_layer, csv_path, workdir / "slice_attention", PLUGIN_OPTIONS)
    summary = f"resnet18 {reference}\nslice attention {plugin}"
    assert max(reference["train_accuracy"]) >= 0.8, f"the data set is too hard for the reference:\n{summary}"
    # the collapse: one constant prediction, accuracy 0.5 and loss 0.8133 (= mean of 0.3133 and 1.3133) under softmax
    assert max(plugin["train_accuracy"]) >= max(reference["train_accuracy"]), summary
    assert plugin["train_accuracy"][-1] >= reference["train_accuracy"][-1] - 1 / (SUBJECTS // 2), summary
    # validation follows training: no jump of the validation loss from one epoch to the next (before: 0.04 -> 3.07)
    jumps = [b - a for a, b in zip(plugin["val_loss"], plugin["val_loss"][1:], strict=False)]
    assert max(jumps) < 0.5, summary
