"""One benchmark row through the real `gandlf_run`: config, training, inference on the test split, scores.

Per row: ``gandlf_run -c config.yaml -i train.csv,validation.csv -t True -m MODEL -rt True`` in a watched
subprocess (killed above a memory limit or past a timeout), then ``gandlf_run ... -i test.csv -t False -o OUT``,
then the per-subject test scores: Dice per class from the masks GaNDLF writes to ``MODEL/output_inference``
(segmentation), or class-1 probabilities from GaNDLF's ``final_preds_and_avg_probs.csv`` (classification). A row's
record keeps the per-subject values, so intervals and paired gains can be computed from it later.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import stats
from benchmarks.configs import make_config
from benchmarks.throughput import ROWS, Row

LOGGER = logging.getLogger("benchmarks.runner")
ROOT = Path(__file__).resolve().parent.parent
TISSUES = ("background", "grey matter", "white matter")

# Rows the comparison needs beyond the throughput table's
EXTRA_ROWS: tuple[Row, ...] = (
    Row("dimlift_slice_attention/max", "dimlift_slice_attention", "classification",
        {"encoder_name": "resnet18", "pooling": "max", "pretrained": False}, "resnet18 per slice, max pooling"),
    Row("dimlift_smp/cls-inflate", "dimlift_smp", "classification",
        {"encoder_name": "resnet18", "converter_type": "inflate", "pretrained": False},
        "smp resnet18 classifier, inflate"),
    Row("dimlift_smp/cls-2d", "dimlift_smp", "classification",
        {"encoder_name": "resnet18", "pretrained": False}, "2D smp resnet18 slice classifier (pretraining source)",
        dimension=2),
)


def row_by_name(name: str) -> Row:
    """The row called `name` (throughput's rows and this module's extras)."""
    for row in (*ROWS, *EXTRA_ROWS):
        if row.name == name:
            return row
    raise SystemExit(f"unknown row {name!r}; rows are {[r.name for r in (*ROWS, *EXTRA_ROWS)]}")


@dataclass
class Settings:
    """The budget of every row of a task.

    Attributes:
        epochs: Training epochs of the segmentation rows.
        batch: Batch size (every task).
        learning_rate: Adam learning rate of the segmentation rows.
        detection_epochs: Training epochs of the detection rows (default: `epochs`).
        detection_learning_rate: Learning rate of the detection rows (default: `learning_rate`).
        pretrain_epochs: Epochs of the 2D pretraining networks (default: the epochs of the 3D task they feed).
        final_layer: Final layer of the classification rows: logits or softmax (both with GaNDLF's cel loss).
        patch: Cubic segmentation patch; None takes the whole volume.
        segmentation_subjects: Train the segmentation rows on this many of the training subjects (None: all).
        samples_per_volume: Segmentation patches per volume and epoch (detection always takes 1 whole volume).
        timeout: Seconds allowed per gandlf_run call.
        max_memory_gib: A gandlf_run process tree above this much RAM is killed and its row reports it.
    """

    epochs: int = 6
    batch: int = 4
    learning_rate: float = 1e-3
    detection_epochs: int | None = 16
    detection_learning_rate: float | None = 1e-4
    pretrain_epochs: int | None = 5
    final_layer: str = "logits"
    patch: int | None = None
    segmentation_subjects: int | None = 96
    samples_per_volume: int = 1
    timeout: int = 3600
    max_memory_gib: float = 8.0

    def budget(self, task: str) -> tuple[int, float]:
        """(epochs, learning rate) of the rows of `task`: segmentation, detection or their 2D `slices-` sources."""
        epochs, lr = self.epochs, self.learning_rate
        if task.endswith("detection"):
            epochs = self.detection_epochs or epochs
            lr = self.detection_learning_rate if self.detection_learning_rate is not None else lr
        if task.startswith("slices-") and self.pretrain_epochs:
            epochs = self.pretrain_epochs
        return epochs, lr


# ------------------------------------------------------------------------------------------------ subprocesses


@dataclass
class Call:
    """A finished subprocess: exit status, wall time, peak RSS (MiB) and the log file."""

    returncode: int
    wall_s: float
    peak_mib: float
    log: Path

    def tail(self, lines: int = 3) -> str:
        text = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        useful = [t for t in text if t.strip() and "it/s" not in t and "Warning" not in t]
        killed = [t for t in useful if t.startswith("KILLED")]
        if killed:
            return killed[-1]
        return " / ".join(t.strip() for t in useful[-lines:])[:500]


def pss_mib(pid: int) -> float:
    """Proportional set size (MiB) of a process: shared pages count once over the processes sharing them.

    Plain RSS would count a forked child (GaNDLF forks `git` when it saves a checkpoint) as a second copy of its
    parent. Falls back to RSS where /proc/<pid>/smaps_rollup is missing.
    """
    from benchmarks.throughput import process_rss_mib

    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return process_rss_mib(pid)


def tree_rss_mib(pid: int, proportional: bool = True) -> float:
    """Memory (MiB) of a process and all its descendants (0 when gone): PSS, or the cheaper RSS (an upper bound)."""
    from benchmarks.throughput import process_rss_mib

    measure = pss_mib if proportional else process_rss_mib
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        total += measure(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    stack.extend(int(c) for c in handle.read().split())
        except OSError:
            continue
    return total


def run_process(command: list[str], log: Path, timeout: int, max_memory_gib: float = 1e9) -> Call:
    """Runs `command` with output to `log`; returns its exit status, wall time and peak RSS (its own and children's).

    The peak RSS comes from `os.wait4` on this very child, so rows measured in sequence do not mix. A process tree
    above `max_memory_gib` or past `timeout` seconds is killed (exit status -9, the reason in the log).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    start = time.perf_counter()
    with open(log, "w") as handle:
        handle.write("$ " + shlex.join(command) + "\n")
        handle.flush()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=str(log.parent))
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            reason = ""
            if time.perf_counter() > deadline:
                reason = f"KILLED after the timeout of {timeout} s"
            # RSS is cheap and bounds PSS from above; PSS (reading smaps, costly) only decides near the limit
            elif (tree_rss_mib(process.pid, proportional=False) > max_memory_gib * 1024
                  and tree_rss_mib(process.pid) > max_memory_gib * 1024):
                reason = f"KILLED above --max-memory-gib {max_memory_gib} GiB"
            if reason:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                handle.write(f"\n{reason}\n")
                break
            time.sleep(1.0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return Call(process.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024.0, log)


def gandlf_run() -> str:
    """The `gandlf_run` console script of this interpreter's environment."""
    candidate = Path(sys.executable).parent / "gandlf_run"
    return str(candidate) if candidate.exists() else "gandlf_run"


def training_minutes(log: Path) -> float | None:
    """GaNDLF's own 'Total time taken for training' (minutes) from a training log."""
    match = re.findall(r"Total time taken for training\s*:\s*([0-9.eE+-]+)\s*mins", log.read_text(errors="replace"))
    return float(match[-1]) if match else None


def read_log_csv(path: Path) -> dict[str, list[float]]:
    """Columns of a GaNDLF logs_*.csv as float lists (non-numeric cells become NaN)."""
    if not path.exists():
        return {}
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    out: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = float("nan")
            out.setdefault(key, []).append(number)
    return out


def count_parameters(model_dir: Path) -> int | None:
    """Parameters of the model GaNDLF builds from the run's saved parameters.pkl (None when that fails)."""
    try:
        from GANDLF.models import get_model

        import gandlf_dimlift  # noqa: F401
        from benchmarks.throughput import register_plugins

        register_plugins()
        from gandlf_dimlift.weights import read_parameters_file

        parameters = read_parameters_file(model_dir / "parameters.pkl")
        return sum(p.numel() for p in get_model(parameters).parameters())
    except Exception as error:  # noqa: BLE001 - the table shows a dash
        LOGGER.warning("parameter count of %s failed: %s", model_dir, error)
        return None


# ------------------------------------------------------------------------------------------------ scores


def dice(prediction: np.ndarray, truth: np.ndarray, label: int) -> float:
    """Dice of one label; 1.0 when it is absent from both."""
    p, t = prediction == label, truth == label
    denominator = p.sum() + t.sum()
    return 1.0 if denominator == 0 else float(2.0 * (p & t).sum() / denominator)


def read_image(path: str | Path) -> np.ndarray:
    """A NIfTI image as an (X, Y, Z) array, the layout GaNDLF and TorchIO use."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).T


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def segmentation_scores(model_dir: Path, test_csv: Path) -> dict[str, Any]:
    """Per-class Dice of GaNDLF's inference masks against the test labels: per subject, mean and its interval."""
    subjects, per_class, missing = [], [], []
    for row in read_csv(test_csv):
        sid = row["SubjectID"]
        found = sorted((model_dir / "output_inference" / sid).glob(f"{sid}_seg*"))
        if not found:
            missing.append(sid)
            continue
        prediction = read_image(found[0])
        truth = read_image(row["Label"])
        if prediction.shape != truth.shape:
            raise ValueError(f"{sid}: prediction shape {prediction.shape} != label shape {truth.shape}")
        subjects.append(sid)
        per_class.append([dice(prediction, truth, c) for c in range(len(TISSUES))])
    if missing:
        raise FileNotFoundError(f"GaNDLF wrote no inference mask for {missing} in {model_dir / 'output_inference'}")
    per_subject_fg = [float(np.mean(d[1:])) for d in per_class]
    return {"dice": [float(s) for s in np.mean(per_class, axis=0)], "dice_fg": float(np.mean(per_subject_fg)),
            "dice_fg_ci": stats.mean_interval(per_subject_fg), "subjects": subjects, "subject_dice_fg": per_subject_fg,
            "n_test": len(subjects)}


def detection_scores(output_dir: Path, test_csv: Path) -> dict[str, Any]:
    """AUC (with its interval) and accuracy of GaNDLF's test predictions (final_preds_and_avg_probs.csv).

    Two classes: the AUC of class 1's probability; more: the macro mean of one-vs-rest AUCs (no interval).
    """
    truth = {r["SubjectID"]: int(float(r["ValueToPredict"])) for r in read_csv(test_csv)}
    path = output_dir / "final_preds_and_avg_probs.csv"
    if not path.exists():
        raise FileNotFoundError(f"GaNDLF wrote no {path.name} in {output_dir}")
    predictions = sorted(read_csv(path), key=lambda p: p["SubjectID"])
    classes = [key for key in predictions[0] if key not in ("SubjectID", "PredictedClass")] if predictions else []
    labels = [truth[p["SubjectID"]] for p in predictions]
    predicted = [int(float(p["PredictedClass"])) for p in predictions]
    accuracy = float(np.mean([a == b for a, b in zip(predicted, labels, strict=True)]))
    out: dict[str, Any] = {"accuracy": accuracy, "n_test": len(labels), "n_positive": int(sum(y == 1 for y in labels))}
    if len(classes) <= 2:
        scores = [float(p["1"]) for p in predictions]
        out.update(auc=stats.auc(scores, labels), subjects=[p["SubjectID"] for p in predictions], scores=scores,
                   labels=labels)
        if out["auc"] is not None:
            out["auc_ci"] = stats.auc_interval(scores, labels)
    else:
        per_class = [stats.auc([float(p[c]) for p in predictions], [int(y == int(c)) for y in labels])
                     for c in classes]
        present = [a for a in per_class if a is not None]
        out["auc"] = float(np.mean(present)) if present else None
    return out


def validation_metric(record: dict[str, Any]) -> tuple[str, bool]:
    """(GaNDLF's validation log column, whether higher is better) of a row.

    Segmentation: Dice (grey/white-matter mean). Classification: the loss, because GaNDLF 0.1.5 logs its
    `auroc` metric as empty or 0.0 (and keeps its best checkpoint by validation loss anyway).
    """
    if record.get("config", {}).get("loss_function") == "dc":
        return "val_dice", True
    return "val_loss", False


def validation_curve(record: dict[str, Any]) -> list[float]:
    """GaNDLF's validation metric per epoch of a row (`validation_metric`)."""
    return [float(v) for v in record.get("validation_log", {}).get(validation_metric(record)[0], [])]


# ------------------------------------------------------------------------------------------------ one row


def safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def train_and_test(row: Row, task: str, csvs: dict[str, Path], patch: Sequence[int], settings: Settings,
                   work: Path, reuse: bool) -> dict[str, Any]:
    """Trains and tests one row with `gandlf_run`; returns its result record (also saved as result.json).

    Args:
        row: Architecture and options; its name names the folder `work/task/<name>`.
        task: segmentation, detection, or a 2D source (`slices-...`): chooses the budget.
        csvs: train, validation and test CSVs.
        patch: Patch size (the whole volume for detection).
        settings: The budget.
        work: Work directory.
        reuse: Return the saved record of an earlier identical run (same config and CSVs) instead of training.
    """
    folder = work / task / safe(row.name)
    result_path = folder / "result.json"
    samples = settings.samples_per_volume if task == "segmentation" else 1  # whole volumes / slices: 1
    epochs, learning_rate = settings.budget(task)
    config = make_config(row, patch, settings.batch, epochs, learning_rate, samples, settings.final_layer)
    inputs = {split: str(path) for split, path in csvs.items()}
    if reuse and result_path.exists():
        previous = json.loads(result_path.read_text())
        if previous.get("config") == config and previous.get("inputs") == inputs and "error" not in previous:
            LOGGER.info("[%s] %s: reusing %s", task, row.name, result_path)
            return {**previous, "reused": True}
    from gandlf_dimlift.synthetic import write_config

    # a fresh folder: GaNDLF appends to the logs of an existing model folder and keeps its best checkpoint
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model_dir = folder / "model"
    config_path = write_config(config, folder / "config.yaml")
    record: dict[str, Any] = {"name": row.name, "architecture": row.architecture, "task": task, "note": row.note,
                              "config": config, "inputs": inputs, "epochs": epochs, "patch": list(patch),
                              "n_train": len(read_csv(csvs["train"])), "folder": str(folder)}
    LOGGER.info("[%s] %s: training %d epochs on %d subjects", task, row.name, epochs, record["n_train"])
    train = run_process([gandlf_run(), "-c", str(config_path), "-i", f"{csvs['train']},{csvs['validation']}",
                         "-t", "True", "-m", str(model_dir), "-rt", "True"], folder / "train.log", settings.timeout,
                        settings.max_memory_gib)
    record.update(train_wall_s=train.wall_s, peak_mib=train.peak_mib)
    minutes = training_minutes(train.log)
    record["epoch_s"] = (minutes * 60 if minutes is not None else train.wall_s) / epochs
    record["train_log"] = read_log_csv(model_dir / "logs_training.csv")
    record["validation_log"] = read_log_csv(model_dir / "logs_validation.csv")
    if train.returncode != 0 or not list(model_dir.glob("*_best.pth.tar")):
        record["error"] = f"training failed (exit {train.returncode}): {train.tail()}"
        result_path.write_text(json.dumps(record, indent=1))
        return record
    record["params"] = count_parameters(model_dir)
    record["checkpoint"] = str(sorted(model_dir.glob("*_best.pth.tar"))[0])
    if "test" in csvs:
        LOGGER.info("[%s] %s: testing", task, row.name)
        infer_dir = folder / "inference"
        infer = run_process([gandlf_run(), "-c", str(config_path), "-i", str(csvs["test"]), "-t", "False",
                             "-m", str(model_dir), "-o", str(infer_dir)], folder / "infer.log", settings.timeout,
                            settings.max_memory_gib)
        record["infer_wall_s"] = infer.wall_s
        try:
            if infer.returncode != 0:
                raise RuntimeError(f"inference failed (exit {infer.returncode}): {infer.tail()}")
            if row.task == "segmentation":
                record.update(segmentation_scores(model_dir, csvs["test"]))
            else:
                record.update(detection_scores(infer_dir, csvs["test"]))
        except Exception as error:  # noqa: BLE001 - shown in the table
            record["error"] = " ".join(str(error).split())[:500]
    result_path.write_text(json.dumps(record, indent=1))
    return record
