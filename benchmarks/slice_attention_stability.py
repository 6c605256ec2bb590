"""Why slice attention's validation flips at batch 1: the running statistics or the weights?

Issue 12's setting (12 subjects of 32^3, class 1 has a ball in slices 12-20 of the last axis, first half for
validation, batch 1, Adam 5e-4, 5 epochs) trained in process on the model GaNDLF's `get_model` builds from the row's
config (`benchmarks.slice_attention_learning.row_config`). After every training step the logit gap (class 1 minus
class 0) of all 12 subjects is taken in evaluation mode, as GaNDLF validates. A step that moves some subject's gap
by more than ``--swing`` logits is a *swing*; it is then attributed by re-running the evaluation with the step's new
batch-norm buffers (running statistics) and the old weights: if that alone moves the gap by more than half the
swing, the running-statistics update caused it. The last epoch's validation loss says how far a steady row
commits to its answers (chance: ln 2 = 0.69), and the first epoch whose training predictions (each made before its
step, as GaNDLF's training accuracy is) were all right says how fast it starts (`-`: not within the epochs). The
`resnet18` row is GaNDLF's own 3D resnet18 under the same config, for comparison.

`--train-positives K` puts K class-1 subjects among the 6 training subjects (3, the default, is the first-half
split). `gandlf_run` given one CSV draws its own split: GaNDLF 0.1.5 shuffles the table (unseeded) and, unless
`nested_training: {proportional: true}` (its `stratified` key alone is overridden by `proportional`'s default), does
not stratify, so 1 or 2 of 6 training subjects are positive in 28 % of the draws (hypergeometric).

Example (the committed SLICE_ATTENTION_STABILITY.md)::

    python -m benchmarks.slice_attention_stability --seeds 8 --rows dimlift_slice_attention resnet18 \
        --train-positives 3 2 1 --out benchmarks/SLICE_ATTENTION_STABILITY.md
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from benchmarks.slice_attention_learning import Setting, row_config
from benchmarks.throughput import config_to_parameters
from gandlf_dimlift.models.slice_attention import ARCHITECTURE
from gandlf_dimlift.synthetic import write_dataset

SUBJECTS, SIZE, BAND = 12, 32, (12, 20)


def load_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The sweep test's subjects (`write_dataset`), z-scored per image as GaNDLF's `normalize` does."""
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = write_dataset(tmp, "classification", SUBJECTS, (SIZE,) * 3, seed=seed, signal_slices=BAND)
        with open(csv_path) as handle:
            rows = list(csv.DictReader(handle))
        images = [sitk.GetArrayFromImage(sitk.ReadImage(row["Channel_0"])).T.astype(np.float32) for row in rows]
    volumes = torch.stack([torch.from_numpy((im - im.mean()) / im.std())[None] for im in images])
    return volumes, torch.tensor([int(row["ValueToPredict"]) for row in rows])


def build(row: str, final_layer: str) -> torch.nn.Module:
    """The row's model as `gandlf_run` builds it: GaNDLF's `get_model` on the validated config of the row."""
    from GANDLF.models import get_model

    architecture = f"{row}/attention" if row == ARCHITECTURE.key else row
    config = row_config(architecture, Setting(final_layer=final_layer))
    return get_model(config_to_parameters(config, "classification"))


def evaluate(model: torch.nn.Module, volumes: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(volumes)
    model.train()
    return out


def split(labels: torch.Tensor, train_positives: int) -> tuple[list[int], list[int]]:
    """Training and validation subjects: the last `train_positives` of class 1 and the last of class 0 that make
    half of the subjects train, the rest validate (3 positives: the second half trains, as in the committed table)."""
    half = SUBJECTS // 2
    if not 1 <= train_positives < half:
        raise ValueError(f"--train-positives {train_positives}: choose 1 to {half - 1} (of {half} training subjects).")
    positives = [i for i in range(SUBJECTS) if labels[i] == 1]
    negatives = [i for i in range(SUBJECTS) if labels[i] == 0]
    train = sorted(positives[len(positives) - train_positives:] + negatives[len(negatives) - (half - train_positives):])
    return train, [i for i in range(SUBJECTS) if i not in train]


def train_one(row: str, seed: int, final_layer: str, volumes: torch.Tensor, labels: torch.Tensor, epochs: int,
              swing: float, train_positives: int = 3) -> dict[str, float]:
    """Trains one model; counts the swings and what caused them."""
    torch.manual_seed(seed)
    model = build(row, final_layer).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    train, validation = split(labels, train_positives)
    train_x, train_y, val_y = volumes[train], labels[train], labels[validation]
    buffers = {name for name, _ in model.named_buffers()}
    out = evaluate(model, volumes)
    gap = out[:, 1] - out[:, 0]
    counts = {"swings": 0, "by_statistics": 0, "by_weights": 0}
    val_losses, first_perfect_epoch = [], None
    for epoch in range(1, epochs + 1):
        correct = 0
        for i in torch.randperm(len(train)).tolist():
            before = copy.deepcopy(model.state_dict())
            prediction = model(train_x[i:i + 1])
            correct += int(prediction.argmax(1).item() == train_y[i].item())
            loss = F.cross_entropy(prediction, train_y[i:i + 1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            out = evaluate(model, volumes)
            new_gap = out[:, 1] - out[:, 0]
            moved = (new_gap - gap).abs().max().item()
            if moved > swing:
                after = copy.deepcopy(model.state_dict())
                model.load_state_dict({k: after[k] if k in buffers else before[k] for k in after})
                stats_only = evaluate(model, volumes)
                model.load_state_dict(after)
                by_stats = ((stats_only[:, 1] - stats_only[:, 0]) - gap).abs().max().item() > moved / 2
                counts["swings"] += 1
                counts["by_statistics" if by_stats else "by_weights"] += 1
            gap = new_gap
        if first_perfect_epoch is None and correct == len(train):
            first_perfect_epoch = epoch
        val_losses.append(F.cross_entropy(out[validation], val_y).item())
    return {
        **counts,
        "first_perfect_epoch": first_perfect_epoch,
        "val_accuracy": (out[validation].argmax(1) == val_y).float().mean().item(),
        "largest_val_loss_rise": max((b - a for a, b in zip(val_losses, val_losses[1:], strict=False)), default=0.0),
        "final_val_loss": val_losses[-1],
    }


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--rows", nargs="+", default=[ARCHITECTURE.key], choices=[ARCHITECTURE.key, "resnet18"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--final-layers", nargs="+", default=["logits", "softmax"], choices=["logits", "softmax"])
    parser.add_argument("--swing", type=float, default=1.0, help="logits a subject's gap must move in one step")
    parser.add_argument("--train-positives", type=int, nargs="+", default=[3],
                        help="class-1 subjects among the 6 training subjects (3: the first-half split)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    volumes, labels = load_data()
    lines = [
        f"Command: `python -m benchmarks.slice_attention_stability {' '.join(argv or sys.argv[1:])}`", "",
        "| row | final layer | training positives | seed | swings | by running statistics | by weights "
        "| final val accuracy | largest val loss rise | final val loss | first epoch at train accuracy 1.00 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for positives in args.train_positives:
        split(labels, positives)  # a bad count fails before any training
    for positives, row, final_layer, seed in itertools.product(args.train_positives, args.rows, args.final_layers,
                                                               range(args.seeds)):
        r = train_one(row, seed, final_layer, volumes, labels, args.epochs, args.swing, positives)
        lines.append(f"| {row} | {final_layer} | {positives} | {seed} | {r['swings']} | {r['by_statistics']} "
                     f"| {r['by_weights']} | {r['val_accuracy']:.2f} | {r['largest_val_loss_rise']:+.2f} "
                     f"| {r['final_val_loss']:.2f} | {r['first_perfect_epoch'] or '-'} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(table)
    return table


if __name__ == "__main__":
    main()
