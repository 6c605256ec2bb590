"""Screen a detection dataset's difficulty in-process, before spending `gandlf_run` time on it.

Trains one classification row (default GaNDLF's own 3D `resnet18`, built by `GANDLF.models.get_model` from the
same config `benchmarks.compare` writes) on a `benchmarks.data` dataset's detection split with a plain loop:
whole volumes, z-score per volume (GaNDLF's `normalize`), Adam at a constant learning rate, cross-entropy on the
logits, batch norm in training mode. After every epoch it prints the training loss, the validation loss and the
test AUC with its bootstrap interval. This is a screen, not the benchmark: `gandlf_run` adds its triangle
learning-rate schedule and its own data pipeline, and keeps the checkpoint of the best validation loss; confirm a
choice with ``python -m benchmarks.compare --sections detection --detection-rows resnet18``.

Usage::

    python -m benchmarks.data /tmp/d --lesion-radius-mm 12 20 --lesion-contrast 0.5 0.8
    python -m benchmarks.sizing --data /tmp/d --epochs 12 --threads 1 --json /tmp/d_resnet18.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks import data as bdata
from benchmarks import stats
from benchmarks.runner import read_csv, read_image, row_by_name


def load_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(volumes `(N, 1, X, Y, Z)` z-scored per volume, labels `(N,)`) of a detection CSV."""
    rows = read_csv(path)
    volumes = []
    for row in rows:
        image = read_image(row["Channel_0"]).astype(np.float32)
        volumes.append((image - image.mean()) / max(float(image.std()), 1e-6))
    return np.stack(volumes)[:, None], np.array([int(float(r["ValueToPredict"])) for r in rows])


def screen(data_dir: Path, row_name: str, epochs: int, batch: int, lr: float, seed: int = 0,
           norm_type: str | None = None) -> list[dict]:
    """Trains `row_name` on the detection split; returns one record per epoch (losses, test AUC and interval).

    `norm_type` overrides GaNDLF's `model.norm_type` (batch) for GaNDLF's own architectures.
    """
    import torch
    from GANDLF.models import get_model

    from benchmarks.throughput import gandlf_parameters

    csvs = bdata.task_csvs(data_dir, "detection")
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (load_split(csvs[s]) for s in bdata.SPLITS)
    torch.manual_seed(seed)
    shape = "x".join(str(s) for s in x_train.shape[2:])
    parameters = gandlf_parameters(row_by_name(row_name), shape, batch)
    if norm_type:
        parameters["model"]["norm_type"] = norm_type
    model = get_model(parameters)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    history = []

    def predict(x: np.ndarray) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return torch.cat([model(torch.from_numpy(x[i:i + batch])) for i in range(0, len(x), batch)])

    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        order = rng.permutation(len(x_train))
        order = order[: len(order) - len(order) % batch]
        losses = []
        for i in range(0, len(order), batch):
            index = order[i:i + batch]
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x_train[index])),
                                                     torch.from_numpy(y_train[index]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        val_logits = predict(x_val)
        val_loss = float(torch.nn.functional.cross_entropy(val_logits, torch.from_numpy(y_val)))
        val_accuracy = float((val_logits.argmax(1).numpy() == y_val).mean())
        scores = torch.softmax(predict(x_test), dim=1)[:, 1].numpy()
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
                  "val_accuracy": val_accuracy, "val_mean_p1": float(torch.softmax(val_logits, 1)[:, 1].mean()),
                  "test_auc": stats.auc(scores, y_test), "test_auc_ci": stats.auc_interval(scores, y_test),
                  "seconds": time.perf_counter() - start}
        history.append(record)
        print(f"epoch {epoch}: train loss {record['train_loss']:.3f}, validation loss {val_loss:.3f} (accuracy "
              f"{val_accuracy:.2f}, mean p(lesion) {record['val_mean_p1']:.2f}), test AUC "
              f"{record['test_auc']:.3f} ({record['test_auc_ci'][0]:.3f}-{record['test_auc_ci'][1]:.3f}), "
              f"{record['seconds']:.0f} s", flush=True)
    return history


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a benchmarks.data dataset")
    parser.add_argument("--row", default="resnet18", help="classification row (resnet18)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--norm-type", default=None, help="override model.norm_type (GaNDLF architectures)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the per-epoch history here")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    history = screen(Path(args.data), args.row, args.epochs, args.batch, args.lr, norm_type=args.norm_type)
    if args.json:
        meta = json.loads((Path(args.data) / "dataset.json").read_text())
        Path(args.json).write_text(json.dumps({"data": meta, "args": vars(args), "history": history}, indent=1))


if __name__ == "__main__":
    main()
