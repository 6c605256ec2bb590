"""Train GaNDLF baselines and plugin architectures on the same data and budget, with the real `gandlf_run`.

For every row (an architecture and setting from `benchmarks.throughput.ROWS`) of a task this script writes a
GaNDLF config, trains with ``gandlf_run -c config.yaml -i train.csv,validation.csv -t True -m MODEL_DIR`` in a
subprocess, infers on the test split with ``gandlf_run ... -i test.csv -t False``, and collects:

- segmentation (tissue: background / grey / white matter): Dice per class on the test split, computed from the
  masks GaNDLF writes to ``MODEL_DIR/output_inference`` against the label images;
- detection (lesion present / absent): AUC and accuracy on the test split from GaNDLF's
  ``final_preds_and_avg_probs.csv``;
- every row: epoch time (GaNDLF's reported training time / epochs, validation included), peak memory of the
  training process (its peak resident set size, ``os.wait4``), parameter count (the model GaNDLF builds from the
  saved parameters), and learning curves from GaNDLF's ``logs_training.csv`` / ``logs_validation.csv``.

Two experiments ride on the same data:

- dimensional transfer: a 2D ``dimlift_omnianet`` trained on axial slices of the segmentation train split, then a
  3D ``dimlift_dxnet`` initialised from its checkpoint, against the same 3D model from random initialisation:
  validation Dice per epoch and the first epoch reaching ``--target-dice``;
- explanation score: for ``dimlift_slice_attention`` rows on the detection task, the mean attention mass on the
  slices a lesion occupies (from ``gandlf-dimlift explain``), beside the share those slices have of the volume.

Results go to a markdown file (``--out``, default ``benchmarks/RESULTS.md``; the exact command at the top) and PNG
learning curves beside it. Every row's outputs stay in ``--work``; ``--reuse`` skips rows already finished there.

Usage::

    python -m benchmarks.compare --quick                       # < 10 min on 2 CPU cores, writes RESULTS_quick.md
    python -m benchmarks.compare --data DATA --work WORK --spacing 4 --subjects 24 --epochs 8 --patch 32
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import data as bdata
from benchmarks.throughput import ROWS, Row

LOGGER = logging.getLogger("benchmarks.compare")
ROOT = Path(__file__).resolve().parent.parent

SEGMENTATION_ROWS = ("resunet", "imagenet_unet", "dimlift_smp/acs", "dimlift_smp/inflate", "dimlift_smp/2.5d",
                     "dimlift_dxnet/b0")
DETECTION_ROWS = ("resnet18", "densenet121", "efficientnetb0", "dimlift_slice_attention/attention",
                  "dimlift_slice_attention/mean")
# --quick keeps one GaNDLF baseline and the plugin rows per task, so that it finishes in minutes
QUICK_SEGMENTATION_ROWS = ("resunet", "dimlift_dxnet/b0")
QUICK_DETECTION_ROWS = ("resnet18", "dimlift_slice_attention/attention")
TISSUES = ("background", "grey matter", "white matter")
TRANSFER_2D = next(r for r in ROWS if r.name == "dimlift_omnianet/b0-2d")
TRANSFER_FROM_2D = "dimlift_dxnet/b0-from-2d"


@dataclass
class Settings:
    """The budget every row of a task gets.

    Attributes:
        epochs: Training epochs (the same for every row of a task).
        detection_epochs: Training epochs of the detection rows (default: `epochs`).
        batch: Batch size.
        patch: Cubic segmentation patch size (detection uses the whole volume).
        samples_per_volume: Patches drawn per training volume and epoch (segmentation).
        learning_rate: Adam learning rate.
        detection_learning_rate: Adam learning rate of the detection rows (default: `learning_rate`).
        timeout: Seconds allowed per gandlf_run call.
        target_dice: Validation Dice the transfer experiment counts epochs to.
        transfer_slices_every: Keep every n-th axial slice (with brain) for the 2D transfer data.
        max_memory_gib: A gandlf_run process tree above this much RAM is killed and its row reports it.
    """

    epochs: int = 8
    batch: int = 2
    patch: int = 32
    samples_per_volume: int = 4
    learning_rate: float = 1e-3
    timeout: int = 3600
    target_dice: float = 0.6
    transfer_slices_every: int = 2
    max_memory_gib: float = 6.0
    detection_epochs: int | None = None
    detection_learning_rate: float | None = None

    def budget(self, task: str) -> tuple[int, float]:
        """(epochs, learning rate) of every row of `task` (the transfer rows have the segmentation budget)."""
        if task != "detection":
            return self.epochs, self.learning_rate
        return (self.detection_epochs or self.epochs,
                self.detection_learning_rate if self.detection_learning_rate is not None else self.learning_rate)


QUICK_SETTINGS = {"epochs": 2, "batch": 2, "patch": 32, "samples_per_volume": 1, "timeout": 600,
                  "target_dice": 0.3, "transfer_slices_every": 8}


# ------------------------------------------------------------------------------------------------ configs


def make_config(
    row: Row,
    patch_size: Sequence[int],
    batch_size: int = 2,
    num_epochs: int = 1,
    learning_rate: float = 1e-3,
    samples_per_volume: int = 1,
) -> dict[str, Any]:
    """A GaNDLF 0.1.5 config for `row` (built on `gandlf_dimlift.synthetic.make_config`).

    Segmentation rows get 3 classes (background, grey, white matter) and the Dice loss; classification rows 2
    classes and cross-entropy. Segmentation sets `ignore_label_validation: 0`, so GaNDLF's logged Dice is the mean
    of grey and white matter (GaNDLF only uses that key in its metrics). No preprocessing: the benchmark data are
    already scaled to about [0, 1].
    """
    from gandlf_dimlift.synthetic import make_config as base_config

    task = row.task
    model = {"class_list": [0, 1, 2] if task == "segmentation" else [0, 1], **row.model}
    config = base_config(
        row.architecture,
        task,
        patch_size=tuple(patch_size),
        dimension=row.dimension,
        num_epochs=num_epochs,
        model_options=model,
        batch_size=batch_size,
        learning_rate=learning_rate,
    )
    config["q_samples_per_volume"] = samples_per_volume
    config["q_max_length"] = max(samples_per_volume * 2, batch_size)
    config["patience"] = num_epochs + 1
    if task == "segmentation":
        # GaNDLF's train/val Dice then average grey and white matter only (the loss is unchanged)
        config["model"].setdefault("ignore_label_validation", 0)
    if task == "classification":
        config["metrics"] = ["accuracy", "auroc"]
        # GaNDLF's `cel` is torch's CrossEntropyLoss on the model output, so a softmax final layer applies softmax
        # twice, and once that saturates the gradient vanishes: in the first full run the slice attention row
        # collapsed to one constant prediction that way. GaNDLF applies softmax itself to the probabilities it
        # writes at inference.
        config["model"]["final_layer"] = "logits"
    return config


# ------------------------------------------------------------------------------------------------ gandlf_run


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


def tree_rss_mib(pid: int) -> float:
    """Memory (MiB, proportional set size) of a process and all its descendants (0 when gone)."""
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        total += pss_mib(current)
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
            elif tree_rss_mib(process.pid) > max_memory_gib * 1024:
                reason = f"KILLED above --max-memory-gib {max_memory_gib} GiB"
            if reason:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                handle.write(f"\n{reason}\n")
                break
            time.sleep(0.5)
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
        with open(model_dir / "parameters.pkl", "rb") as handle:
            parameters = pickle.load(handle)
        return sum(p.numel() for p in get_model(parameters).parameters())
    except Exception as error:  # noqa: BLE001 - the table shows a dash
        LOGGER.warning("parameter count of %s failed: %s", model_dir, error)
        return None


# ------------------------------------------------------------------------------------------------ metrics


def dice(prediction: np.ndarray, truth: np.ndarray, label: int) -> float:
    """Dice of one label; 1.0 when it is absent from both."""
    p, t = prediction == label, truth == label
    denominator = p.sum() + t.sum()
    return 1.0 if denominator == 0 else float(2.0 * (p & t).sum() / denominator)


def read_image(path: str | Path) -> np.ndarray:
    """A NIfTI image as an (X, Y, Z) array, the layout GaNDLF and TorchIO use."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).T


def segmentation_scores(model_dir: Path, test_csv: Path) -> dict[str, Any]:
    """Per-class Dice of GaNDLF's inference masks against the test labels (mean over subjects)."""
    per_class: list[list[float]] = []
    missing = []
    with open(test_csv) as handle:
        for row in csv.DictReader(handle):
            sid = row["SubjectID"]
            found = sorted((model_dir / "output_inference" / sid).glob(f"{sid}_seg*"))
            if not found:
                missing.append(sid)
                continue
            prediction = read_image(found[0])
            truth = read_image(row["Label"])
            if prediction.shape != truth.shape:
                raise ValueError(f"{sid}: prediction shape {prediction.shape} != label shape {truth.shape}")
            per_class.append([dice(prediction, truth, c) for c in range(len(TISSUES))])
    if missing:
        raise FileNotFoundError(f"GaNDLF wrote no inference mask for {missing} in {model_dir / 'output_inference'}")
    scores = np.mean(per_class, axis=0)
    return {"dice": [float(s) for s in scores], "dice_fg": float(np.mean(scores[1:])), "n_test": len(per_class)}


def auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None without both classes."""
    positives = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    negatives = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    if not positives or not negatives:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def detection_scores(output_dir: Path, test_csv: Path) -> dict[str, Any]:
    """AUC and accuracy of GaNDLF's test predictions (final_preds_and_avg_probs.csv).

    Two classes: the AUC of class 1's probability; more: the macro mean of one-vs-rest AUCs.
    """
    with open(test_csv) as handle:
        truth = {r["SubjectID"]: int(float(r["ValueToPredict"])) for r in csv.DictReader(handle)}
    path = output_dir / "final_preds_and_avg_probs.csv"
    if not path.exists():
        raise FileNotFoundError(f"GaNDLF wrote no {path.name} in {output_dir}")
    with open(path) as handle:
        predictions = list(csv.DictReader(handle))
    classes = [key for key in predictions[0] if key not in ("SubjectID", "PredictedClass")] if predictions else []
    labels = [truth[p["SubjectID"]] for p in predictions]
    predicted = [int(float(p["PredictedClass"])) for p in predictions]
    accuracy = float(np.mean([a == b for a, b in zip(predicted, labels, strict=True)]))
    if len(classes) <= 2:
        value = auc([float(p["1"]) for p in predictions], labels)
    else:
        per_class = [auc([float(p[c]) for p in predictions], [int(y == int(c)) for y in labels]) for c in classes]
        present = [a for a in per_class if a is not None]
        value = float(np.mean(present)) if present else None
    return {"auc": value, "accuracy": accuracy, "n_test": len(labels), "n_positive": int(sum(y == 1 for y in labels))}


def explanation_score(config: Path, model_dir: Path, test_csv: Path, data_dir: Path, out: Path,
                      timeout: int) -> dict[str, Any]:
    """Mean slice-weight mass on lesion slices (test subjects with a lesion) from `gandlf-dimlift explain`."""
    call = run_process([sys.executable, "-m", "gandlf_dimlift.explain", "-c", str(config), "-m", str(model_dir),
                        "-i", str(test_csv), "-o", str(out), "--top-k", "1"], out / "explain.log", timeout)
    weights_csv = out / "slice_weights.csv"
    if call.returncode != 0 or not weights_csv.exists():
        raise RuntimeError(f"gandlf_dimlift.explain failed (exit {call.returncode}): {call.tail()}")
    lesions = bdata.read_lesions(data_dir)
    weights: dict[str, dict[int, float]] = {}
    with open(weights_csv) as handle:
        for row in csv.DictReader(handle):
            if row.get("view", "z") != "z":
                continue
            weights.setdefault(row["subject"], {})[int(row["slice_index"])] = float(row["weight"])
    masses, shares = [], []
    for sid, per_slice in weights.items():
        info = lesions.get(sid)
        if not info or not info["lesion"] or not info["slices"]:
            continue
        total = sum(per_slice.values())
        masses.append(sum(per_slice.get(s, 0.0) for s in info["slices"]) / total)
        shares.append(len(info["slices"]) / info["n_slices"])
    if not masses:
        raise RuntimeError(f"no test subject with a lesion among {sorted(weights)}")
    return {"mass": float(np.mean(masses)), "share": float(np.mean(shares)), "n": len(masses)}


# ------------------------------------------------------------------------------------------------ one row


def row_by_name(name: str) -> Row:
    for row in ROWS:
        if row.name == name:
            return row
    raise SystemExit(f"unknown row {name!r}; rows are {[r.name for r in ROWS]}")


def safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def train_and_test(row: Row, task: str, csvs: dict[str, Path], patch: Sequence[int], settings: Settings,
                   work: Path, reuse: bool, data_dir: Path) -> dict[str, Any]:
    """Trains and tests one row with `gandlf_run`; returns its result record (also saved as result.json)."""
    folder = work / task / safe(row.name)
    result_path = folder / "result.json"
    # one sample per volume for detection (the patch is the whole volume: more would repeat it) and for the 2D
    # transfer source (one 32² patch per slice)
    samples = settings.samples_per_volume if task == "segmentation" else 1
    epochs, learning_rate = settings.budget(task)
    config = make_config(row, patch, settings.batch, epochs, learning_rate, samples)
    if reuse and result_path.exists():
        previous = json.loads(result_path.read_text())
        if previous.get("config") == config and "error" not in previous:
            LOGGER.info("[%s] %s: reusing %s", task, row.name, result_path)
            return {**previous, "reused": True}
    from gandlf_dimlift.synthetic import write_config

    # a fresh folder: GaNDLF appends to the logs of an existing model folder and keeps its best checkpoint
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model_dir = folder / "model"
    config_path = write_config(config, folder / "config.yaml")
    record: dict[str, Any] = {"name": row.name, "architecture": row.architecture, "task": task, "note": row.note,
                              "config": config, "epochs": epochs, "patch": list(patch)}
    LOGGER.info("[%s] %s: training %d epochs", task, row.name, epochs)
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
    if task == "detection" and row.architecture == "dimlift_slice_attention" and "error" not in record:
        try:
            record["explanation"] = explanation_score(config_path, model_dir, csvs["test"], data_dir,
                                                      folder / "explain", settings.timeout)
        except Exception as error:  # noqa: BLE001
            record["explanation_error"] = " ".join(str(error).split())[:500]
    result_path.write_text(json.dumps(record, indent=1))
    return record


# ------------------------------------------------------------------------------------------------ transfer


def write_slices(data_dir: Path, out: Path, every: int, batch: int) -> dict[str, Path]:
    """Axial (last-axis) slices of the segmentation train / validation subjects as 2D NIfTI and GaNDLF CSVs.

    The training slices are trimmed to a multiple of `batch`: GaNDLF keeps a last, smaller batch, and a batch of
    one fails in batch-normalised encoders whose bottleneck is 1x1.
    """
    import SimpleITK as sitk

    out.mkdir(parents=True, exist_ok=True)
    csvs = {}
    for split in ("train", "validation"):
        rows = []
        with open(data_dir / f"segmentation_{split}.csv") as handle:
            subjects = list(csv.DictReader(handle))
        for subject in subjects:
            image, label = read_image(subject["Channel_0"]), read_image(subject["Label"])
            brain = [z for z in range(label.shape[2]) if (label[..., z] > 0).mean() > 0.05]
            for z in brain[::every]:
                sid = f"{subject['SubjectID']}_z{z:03d}"
                for name, array in (("image", image[..., z].astype(np.float32)), ("label", label[..., z])):
                    item = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
                    sitk.WriteImage(item, str(out / f"{sid}_{name}.nii.gz"))
                rows.append([sid, str(out / f"{sid}_image.nii.gz"), str(out / f"{sid}_label.nii.gz")])
        if split == "train":
            rows = rows[: len(rows) - len(rows) % batch]
        path = out / f"slices_{split}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["SubjectID", "Channel_0", "Label"])
            writer.writerows(rows)
        csvs[split] = path
    return csvs


def transfer_experiment(data_dir: Path, csvs: dict[str, Path], settings: Settings, work: Path, reuse: bool,
                        random_init: dict[str, Any] | None) -> dict[str, Any]:
    """2D Omnia-Net on slices, then 3D DX-Net from its checkpoint vs from random weights."""
    slice_csvs = write_slices(data_dir, work / "transfer" / "slices", settings.transfer_slices_every,
                              settings.batch)
    slice_csvs["test"] = slice_csvs["validation"]  # the 2D model is only a weight source; its test is not reported
    patch3d = (settings.patch,) * 3
    two_d = train_and_test(TRANSFER_2D, "transfer", slice_csvs, (settings.patch,) * 2, settings, work, reuse,
                           data_dir)
    out: dict[str, Any] = {"2d": two_d}
    checkpoint = next(iter(sorted((work / "transfer" / safe(TRANSFER_2D.name) / "model").glob("*_best.pth.tar"))),
                      None)
    base = row_by_name("dimlift_dxnet/b0")
    if random_init is None:
        random_init = train_and_test(base, "segmentation", csvs, patch3d, settings, work, reuse, data_dir)
    out["random"] = random_init
    if checkpoint is None:
        out["from_2d"] = {"name": TRANSFER_FROM_2D, "error": f"the 2D run left no checkpoint: {two_d.get('error')}"}
        return out
    lifted = Row(TRANSFER_FROM_2D, base.architecture, "segmentation", {**base.model, "pretrained": str(checkpoint)},
                 "DX-Net B0 initialised from the 2D Omnia-Net")
    # its config names the same checkpoint path whatever the 2D run that wrote it: reuse it only with that run
    out["from_2d"] = train_and_test(lifted, "segmentation", csvs, patch3d, settings, work,
                                    reuse and bool(two_d.get("reused")), data_dir)
    return out


def epochs_to(values: Sequence[float], target: float) -> int | None:
    """First epoch (1-based) whose value reaches `target`."""
    for index, value in enumerate(values):
        if value >= target:
            return index + 1
    return None


# ------------------------------------------------------------------------------------------------ estimate


def estimate(throughput_json: Path, settings: Settings, data: dict[str, Any], seg_rows: Sequence[str],
             det_rows: Sequence[str], transfer: bool, overhead_s: float) -> tuple[str, float]:
    """Predicted wall time of a comparison from measured train-step and inference times.

    `throughput_json` comes from ``python -m benchmarks.throughput --json FILE --sizes PATCH XxYxZ`` at this run's
    batch size: the segmentation rows at the patch size, the detection rows at the volume shape. Per row:
    epochs x (training steps x step time + validation forward passes x inference time) + the test split's
    forward passes + `overhead_s` for each of the two gandlf_run start-ups (imports, queues, checkpoints).

    Returns:
        A markdown table and the total in seconds.
    """
    measured = json.loads(Path(throughput_json).read_text())["results"]
    timing = {(r["name"], str(r["size"])): r for r in measured if "error" not in r}
    shape = data["shape"]
    n = {s: len(data["splits"][s]) for s in bdata.SPLITS}
    grid = int(np.prod([int(np.ceil(x / settings.patch)) for x in shape]))
    volume = "x".join(str(x) for x in shape)
    lines = ["| row | size | step s | infer s | steps / epoch | forward passes / epoch | estimated min |",
             "|---|---|---|---|---|---|---|"]
    total = 0.0
    epochs, detection_epochs = settings.budget("segmentation")[0], settings.budget("detection")[0]
    plan = [(name, str(settings.patch), int(np.ceil(n["train"] * settings.samples_per_volume / settings.batch)),
             n["validation"] * grid / settings.batch, n["test"] * grid / settings.batch, epochs) for name in seg_rows]
    plan += [(name, volume, int(np.ceil(n["train"] / settings.batch)), n["validation"] / settings.batch,
              n["test"] / settings.batch, detection_epochs) for name in det_rows]
    if transfer:
        seg_steps = int(np.ceil(n["train"] * settings.samples_per_volume / settings.batch))
        dxnet = ("dimlift_dxnet/b0", str(settings.patch), seg_steps, n["validation"] * grid / settings.batch,
                 n["test"] * grid / settings.batch, epochs)
        slices = n["train"] * shape[2] * 0.8 / settings.transfer_slices_every  # about 80 % of slices hold brain
        plan += [dxnet] if "dimlift_dxnet/b0" not in seg_rows else []  # the random-initialisation arm
        plan += [(TRANSFER_2D.name, str(settings.patch), int(np.ceil(slices / settings.batch)),
                  n["validation"] / n["train"] * slices / settings.batch, 0.0, epochs), dxnet]
    for name, size, steps, val_passes, test_passes, row_epochs in plan:
        key = (name, size if not size.isdigit() else str(int(size)))
        record = timing.get(key)
        if record is None:
            lines.append(f"| {name} | {size} | — | — | {steps} | {val_passes:.0f} | not measured |")
            continue
        seconds = (row_epochs * (steps * record["train_s"] + val_passes * record["infer_s"])
                   + test_passes * record["infer_s"] + 2 * overhead_s)
        total += seconds
        lines.append(f"| {name} | {size} | {record['train_s']:.2f} | {record['infer_s']:.2f} | {steps} | "
                     f"{val_passes:.0f} | {seconds / 60:.1f} |")
    lines.append(f"| **total** | | | | | | **{total / 60:.0f}** |")
    return "\n".join(lines), total


# ------------------------------------------------------------------------------------------------ report


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def plot_curves(records: list[dict[str, Any]], metric: str, path: Path, title: str) -> None:
    """Training loss and one validation metric per epoch, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for record in records:
        train, val = record.get("train_log", {}), record.get("validation_log", {})
        if train.get("train_loss"):
            axes[0].plot(range(1, len(train["train_loss"]) + 1), train["train_loss"], marker="o", label=record["name"])
        if val.get(metric):
            axes[1].plot(range(1, len(val[metric]) + 1), val[metric], marker="o", label=record["name"])
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].set(title=f"validation {metric.removeprefix('val_')}", xlabel="epoch")
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(meta: dict[str, Any], results: dict[str, Any], out: Path, quick: bool) -> str:
    """Writes the markdown report and the curves; returns the markdown."""
    stem = out.stem
    lines = [f"# Benchmark results{' (QUICK smoke run: tiny data, 2 epochs; not evidence)' if quick else ''}", "",
             f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}; {wall_time(meta, results)}; finished {meta['finished']}.", "",
             f"Data: {meta['data']['n_subjects']} subjects deformed from the MNI152 2009 template, spacing "
             f"{meta['data']['spacing']} mm, shape {meta['data']['shape']}, seed {meta['data']['seed']}; splits "
             f"train/validation/test = {meta['splits']}. Every row starts from random weights (no model hub here).",
             "",
             f"Budget per row: {meta['settings']['epochs']} epochs, batch {meta['settings']['batch']}, Adam lr "
             f"{meta['settings']['learning_rate']}; segmentation patches {meta['settings']['patch']}³ "
             f"({meta['settings']['samples_per_volume']} per volume and epoch)" + detection_budget(meta) + ".", ""]
    seg = results.get("segmentation", [])
    if seg:
        lines += ["## Tissue segmentation (test split)", "",
                  "| row | Dice bg | Dice GM | Dice WM | mean GM/WM | epoch s | peak MiB | params | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in seg:
            d = r.get("dice") or [None] * 3
            lines.append(f"| {r['name']} | {_f(d[0])} | {_f(d[1])} | {_f(d[2])} | {_f(r.get('dice_fg'))} | "
                         f"{_f(r.get('epoch_s'), 1)} | {_f(r.get('peak_mib'), 0)} | {_params(r)} | "
                         f"{_note(r)} |")
        plot_curves(seg, "val_dice", out.parent / f"{stem}_segmentation.png", "tissue segmentation")
        lines += ["", f"![segmentation curves]({stem}_segmentation.png)", ""]
    det = results.get("detection", [])
    if det:
        lines += ["## Lesion detection (test split)", "",
                  "| row | AUC | accuracy | positives / test | epoch s | peak MiB | params | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in det:
            lines.append(f"| {r['name']} | {_f(r.get('auc'))} | {_f(r.get('accuracy'))} | "
                         f"{r.get('n_positive', '—')} / {r.get('n_test', '—')} | {_f(r.get('epoch_s'), 1)} | "
                         f"{_f(r.get('peak_mib'), 0)} | {_params(r)} | {_note(r)} |")
        plot_curves(det, "val_loss", out.parent / f"{stem}_detection.png", "lesion detection")
        lines += ["", f"![detection curves]({stem}_detection.png)", ""]
        explained = [r for r in det if r["architecture"] == "dimlift_slice_attention"]
        if explained:
            lines += ["## Explanation score (slice attention, test subjects with a lesion)", "",
                      "| row | attention mass on lesion slices | share of those slices | ratio | subjects |",
                      "|---|---|---|---|---|"]
            for r in explained:
                e = r.get("explanation")
                if e:
                    lines.append(f"| {r['name']} | {_f(e['mass'])} | {_f(e['share'])} | "
                                 f"{_f(e['mass'] / e['share'], 2)} | {e['n']} |")
                else:
                    lines.append(f"| {r['name']} | — | — | — | {r.get('explanation_error') or r.get('error')} |")
            lines += ["", "A ratio above 1 means the weights concentrate on the lesion; mean pooling gives 1.", ""]
    transfer = results.get("transfer")
    if transfer:
        target = meta["settings"]["target_dice"]
        lines += ["## Dimensional transfer (validation Dice per epoch: GaNDLF's val_dice, soft Dice of GM and WM)", ""]
        runs = [transfer.get("random", {}), transfer.get("from_2d", {})]
        epochs = max((len(r.get("validation_log", {}).get("val_dice", [])) for r in runs), default=0)
        lines += ["| row | " + " | ".join(f"ep {i + 1}" for i in range(epochs)) + f" | epochs to {target} | "
                  "test mean GM/WM | note |", "|---|" + "---|" * (epochs + 3)]
        for r in runs:
            values = r.get("validation_log", {}).get("val_dice", [])
            cells = [_f(v) for v in values] + ["—"] * (epochs - len(values))
            reached = epochs_to(values, target)
            lines.append(f"| {r.get('name', '?')} | " + " | ".join(cells) +
                         f" | {reached if reached else f'not in {len(values)}'} | {_f(r.get('dice_fg'))} | "
                         f"{_note(r)} |")
        two_d = transfer.get("2d", {})
        lines += ["", f"2D source: {TRANSFER_2D.name} ({TRANSFER_2D.note}), final validation Dice "
                  f"{_f((two_d.get('validation_log', {}).get('val_dice') or [None])[-1])}, "
                  f"epoch {_f(two_d.get('epoch_s'), 1)} s{'; ' + two_d['error'] if two_d.get('error') else ''}.", ""]
        plot_curves([r for r in runs if r], "val_dice", out.parent / f"{stem}_transfer.png", "dimensional transfer")
        lines += [f"![transfer curves]({stem}_transfer.png)", ""]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def wall_time(meta: dict[str, Any], results: dict[str, Any]) -> str:
    """This invocation's wall time, and the gandlf_run time of every row (rows reused from --work included)."""
    transfer = results.get("transfer") or {}
    records = [*results.get("segmentation", []), *results.get("detection", []),
               *(transfer[k] for k in ("2d", "from_2d") if k in transfer)]
    summed = sum(r.get("train_wall_s", 0) + r.get("infer_wall_s", 0) for r in records) / 60
    reused = sum(1 for r in records if r.get("reused"))
    text = f"wall time {meta['wall_min']:.1f} min"
    if reused:
        text += f" ({reused} rows reused from an earlier invocation in the same --work)"
    return text + f"; training + testing time summed over every row {summed:.1f} min"


def detection_budget(meta: dict[str, Any]) -> str:
    """How the detection rows' budget differs from the segmentation rows' (for the report's budget line)."""
    settings = Settings(**meta["settings"])
    (epochs, lr), (det_epochs, det_lr) = settings.budget("segmentation"), settings.budget("detection")
    differ = ([f"{det_epochs} epochs"] if det_epochs != epochs else []) + ([f"lr {det_lr}"] if det_lr != lr else [])
    return ("; detection on the whole volume, " + ", ".join(differ + ["final_layer logits (GaNDLF's cel is "
            "cross-entropy on the model output)"]))


def _params(record: dict[str, Any]) -> str:
    return f"{record['params'] / 1e6:.2f} M" if record.get("params") else "—"


def _note(record: dict[str, Any]) -> str:
    text = record.get("error") or record.get("note", "")
    return str(text).replace("|", "/").replace("\n", " ")[:300]


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="dataset directory (generated when it has no dataset.json)")
    parser.add_argument("--work", default=None, help="directory for configs, model dirs and logs")
    parser.add_argument("--out", default=None, help="markdown report (benchmarks/RESULTS.md; quick: RESULTS_quick.md)")
    bdata.add_arguments(parser)
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per row (8)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (2)")
    parser.add_argument("--patch", type=int, default=None, help="cubic segmentation patch (32)")
    parser.add_argument("--samples-per-volume", type=int, default=None, help="segmentation patches per volume (4)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (1e-3)")
    parser.add_argument("--detection-epochs", type=int, default=None, help="epochs of the detection rows (--epochs)")
    parser.add_argument("--detection-lr", type=float, default=None, help="learning rate of the detection rows (--lr)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per gandlf_run call (3600)")
    parser.add_argument("--max-memory-gib", type=float, default=None,
                        help="kill a gandlf_run whose process tree exceeds this much RAM (6)")
    parser.add_argument("--target-dice", type=float, default=None, help="transfer experiment target (0.6)")
    parser.add_argument("--segmentation-rows", nargs="*", default=None,
                        help=f"rows for the segmentation task ({' '.join(SEGMENTATION_ROWS)})")
    parser.add_argument("--detection-rows", nargs="*", default=None,
                        help=f"rows for the detection task ({' '.join(DETECTION_ROWS)})")
    parser.add_argument("--no-transfer", action="store_true", help="skip the dimensional transfer experiment")
    parser.add_argument("--transfer-slices-every", type=int, default=None,
                        help="keep every n-th axial slice with brain for the 2D transfer source (2; quick 8)")
    parser.add_argument("--reuse", action="store_true", help="reuse rows already finished in --work")
    parser.add_argument("--estimate", default=None, metavar="THROUGHPUT_JSON",
                        help="only print the predicted wall time from `benchmarks.throughput --json` measurements")
    parser.add_argument("--overhead-s", type=float, default=40.0,
                        help="seconds per gandlf_run start-up assumed by --estimate (40)")
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> Settings:
    values = dict(QUICK_SETTINGS) if args.quick else {}
    for key, arg in (("epochs", "epochs"), ("batch", "batch"), ("patch", "patch"),
                     ("samples_per_volume", "samples_per_volume"), ("learning_rate", "lr"), ("timeout", "timeout"),
                     ("target_dice", "target_dice"), ("max_memory_gib", "max_memory_gib"),
                     ("transfer_slices_every", "transfer_slices_every"), ("detection_epochs", "detection_epochs"),
                     ("detection_learning_rate", "detection_lr")):
        if getattr(args, arg) is not None:
            values[key] = getattr(args, arg)
    return Settings(**values)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.time()
    settings = settings_of(args)
    work = Path(args.work or ("/tmp/dimlift_bench_quick" if args.quick else "/tmp/dimlift_bench")).resolve()
    data_dir = Path(args.data).resolve() if args.data else work / "data"
    out = Path(args.out or ROOT / "benchmarks" / ("RESULTS_quick.md" if args.quick else "RESULTS.md"))
    if not (data_dir / "dataset.json").exists():
        LOGGER.info("generating data into %s", data_dir)
        bdata.generate(data_dir, bdata.settings_from_args(args))
    meta_data = json.loads((data_dir / "dataset.json").read_text())
    wanted = asdict(bdata.settings_from_args(args))
    asked = {k: wanted[k] for k in ("n_subjects", "spacing", "seed") if getattr(args, k, None) is not None}
    differ = {k: (v, meta_data[k]) for k, v in asked.items() if meta_data[k] != v}
    if differ:
        raise SystemExit(f"{data_dir} already holds a dataset with other settings (asked, found): {differ}; "
                         "choose another --data directory or drop the data options.")
    shape = meta_data["shape"]
    if any(s < settings.patch for s in shape):
        raise SystemExit(f"--patch {settings.patch} is larger than the volume {shape}; choose --patch <= {min(shape)}")
    n_train = len(meta_data["splits"]["train"])
    counts = (("segmentation patches", n_train * settings.samples_per_volume), ("detection volumes", n_train))
    for what, count in counts:
        if count % settings.batch:
            raise SystemExit(
                f"{count} training {what} per epoch is not a multiple of --batch {settings.batch}: GaNDLF would end "
                "each epoch with a smaller batch, and a batch of one breaks batch-normalised encoders with a 1x1 "
                "bottleneck. Change --subjects, --samples-per-volume or --batch."
            )
    seg_rows = QUICK_SEGMENTATION_ROWS if args.quick else SEGMENTATION_ROWS
    det_rows = QUICK_DETECTION_ROWS if args.quick else DETECTION_ROWS
    seg_rows = seg_rows if args.segmentation_rows is None else tuple(args.segmentation_rows)
    det_rows = det_rows if args.detection_rows is None else tuple(args.detection_rows)
    if args.estimate:
        text, _ = estimate(Path(args.estimate), settings, meta_data, seg_rows, det_rows, not args.no_transfer,
                           args.overhead_s)
        print(text)
        return {}
    results: dict[str, Any] = {}
    seg_csvs, det_csvs = bdata.task_csvs(data_dir, "segmentation"), bdata.task_csvs(data_dir, "detection")
    results["segmentation"] = [
        train_and_test(row_by_name(n), "segmentation", seg_csvs, (settings.patch,) * 3, settings, work, args.reuse,
                       data_dir)
        for n in seg_rows
    ]
    results["detection"] = [
        train_and_test(row_by_name(n), "detection", det_csvs, tuple(shape), settings, work, args.reuse, data_dir)
        for n in det_rows
    ]
    if not args.no_transfer:
        random_init = next((r for r in results["segmentation"] if r["name"] == "dimlift_dxnet/b0"), None)
        results["transfer"] = transfer_experiment(data_dir, seg_csvs, settings, work, args.reuse, random_init)
    import platform

    import torch

    meta = {
        "command": "python -m benchmarks.compare " + shlex.join(argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                   f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        "wall_min": (time.time() - started) / 60,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "data": meta_data,
        "splits": "/".join(str(len(meta_data["splits"][s])) for s in bdata.SPLITS),
        "settings": asdict(settings),
    }
    (work / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    print(report(meta, results, out, args.quick))
    return results


if __name__ == "__main__":
    main()
