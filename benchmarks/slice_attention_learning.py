"""Does the slice attention classifier learn under GaNDLF's usual classification config? Side by side with resnet18.

Issue 12's setting: subjects of 32^3 where class 1 has a bright ball cut to a band of slices along the last axis
(GaNDLF's slice axis), the first half of the subjects for validation and the second half for training, GaNDLF's
classification config (`final_layer: softmax` with `loss_function: cel`, or `logits`), Adam 5e-4, 8 epochs.
Every row trains on the same data and config; only `model.architecture` (and the plugin's own options) differ.

Two runners:

- ``--runner gandlf_run`` (default): the unmodified ``gandlf_run`` in a subprocess; the metrics come from GaNDLF's
  ``logs_training.csv`` / ``logs_validation.csv``, the attention mass on the band from ``gandlf-dimlift explain``
  on the validation subjects with the ball.
- ``--runner inprocess``: GaNDLF's own objects in this process (``create_pytorch_objects``, ``train_network``,
  ``validate_network``: its loaders, preprocessing, model, optimizer, loss), with per-step measurements written to
  ``steps.jsonl``: the logit gap (class 1 minus class 0, before the final layer), the gradient norm of each
  top-level part, the norm of the head's input, the attention entropy and the attention mass on the band.

``--first-step`` prints, per row, how much one Adam step (lr * sign of the gradient, Adam's first update) of each
part of the model moves the logit gap of one training subject.

Measure another checkout (e.g. main before a change) by running this module from a copy of that checkout, or
with its path first on PYTHONPATH (``gandlf_run`` inherits it).

Example (the issue's setting, every pooling beside GaNDLF's resnet18, both final layers)::

    python -m benchmarks.slice_attention_learning --work /tmp/sa_learning --final-layers softmax logits
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.runner import gandlf_run, read_log_csv, run_process

POOLINGS = ("attention", "gated", "mean", "max")
ROWS = ("resnet18",) + tuple(f"dimlift_slice_attention/{p}" for p in POOLINGS)


@dataclass(frozen=True)
class Setting:
    """One GaNDLF configuration every row is trained under."""

    final_layer: str = "softmax"
    batch_size: int = 1
    norm_type: str = "batch"
    epochs: int = 8
    learning_rate: float = 5e-4

    @property
    def name(self) -> str:
        return f"{self.final_layer}_b{self.batch_size}_{self.norm_type}"


def write_data(out: Path, subjects: int, size: int, band: tuple[int, int], seed: int) -> dict[str, Path]:
    """Writes the dataset once; returns the training and validation CSVs (second and first half)."""
    from gandlf_dimlift.synthetic import write_dataset

    csvs = {"train": out / "train.csv", "validation": out / "validation.csv"}
    if all(p.exists() for p in csvs.values()):
        return csvs
    full = write_dataset(out, "classification", subjects, (size,) * 3, seed=seed, signal_slices=band)
    with open(full) as handle:
        rows = list(csv.DictReader(handle))
    half = len(rows) // 2
    for name, part in (("validation", rows[:half]), ("train", rows[half:])):
        with open(csvs[name], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(part)
    return csvs


def row_config(row: str, setting: Setting) -> dict[str, Any]:
    """The GaNDLF config of a row: GaNDLF's classification config, the row's architecture (and plugin options)."""
    from gandlf_dimlift.synthetic import make_config

    architecture, _, pooling = row.partition("/")
    options: dict[str, Any] = {"final_layer": setting.final_layer, "norm_type": setting.norm_type}
    if pooling:
        options.update({"encoder_name": "resnet18", "pretrained": False, "pooling": pooling})
    return make_config(architecture, "classification", num_epochs=setting.epochs, model_options=options,
                       batch_size=setting.batch_size, learning_rate=setting.learning_rate)


def _last(values: list[float] | None) -> float | None:
    return None if not values else float(values[-1])


def curves(model_dir: Path) -> dict[str, list[float]]:
    """Per-epoch train/validation loss and accuracy from GaNDLF's logs."""
    train = read_log_csv(model_dir / "logs_training.csv")
    validation = read_log_csv(model_dir / "logs_validation.csv")
    return {
        "train_loss": train.get("train_loss", []), "train_accuracy": train.get("train_accuracy", []),
        "validation_loss": validation.get("val_loss", []),
        "validation_accuracy": validation.get("val_accuracy", []),
    }


def band_mass_from_explain(config: Path, model_dir: Path, validation_csv: Path, band: tuple[int, int],
                           out: Path, timeout: int) -> dict[str, float]:
    """Mean slice-weight mass on the band over validation subjects with the ball, from `gandlf-dimlift explain`."""
    call = run_process([sys.executable, "-m", "gandlf_dimlift.explain", "-c", str(config), "-m", str(model_dir),
                        "-i", str(validation_csv), "-o", str(out), "--top-k", "1"], out / "explain.log", timeout)
    weights_csv = out / "slice_weights.csv"
    if call.returncode != 0 or not weights_csv.exists():
        raise RuntimeError(f"gandlf_dimlift.explain failed (exit {call.returncode}): {call.tail()}")
    with open(validation_csv) as handle:
        positive = {r["SubjectID"] for r in csv.DictReader(handle) if r["ValueToPredict"] == "1"}
    weights: dict[str, dict[int, float]] = {}
    with open(weights_csv) as handle:
        for r in csv.DictReader(handle):
            if r["subject"] in positive and r.get("view", "z") == "z":
                weights.setdefault(r["subject"], {})[int(r["slice_index"])] = float(r["weight"])
    masses = [sum(w for s, w in per_slice.items() if band[0] <= s < band[1]) / sum(per_slice.values())
              for per_slice in weights.values()]
    n_slices = max(len(p) for p in weights.values())
    return {"mass": float(np.mean(masses)), "share": (band[1] - band[0]) / n_slices, "n": len(masses)}


def train_with_gandlf_run(row: str, setting: Setting, csvs: dict[str, Path], band: tuple[int, int], work: Path,
                          timeout: int) -> dict[str, Any]:
    """Trains one row with `gandlf_run`; returns its curves (and the band mass for slice attention)."""
    from gandlf_dimlift.synthetic import write_config

    folder = work / setting.name / row.replace("/", "_")
    config = write_config(row_config(row, setting), folder / "config.yaml")
    model_dir = folder / "model"
    call = run_process([gandlf_run(), "-c", str(config), "-i", f"{csvs['train']},{csvs['validation']}", "-t", "True",
                        "-m", str(model_dir), "-rt", "True", "-d", "cpu"], folder / "train.log", timeout)
    record: dict[str, Any] = {"row": row, "setting": asdict(setting), "exit": call.returncode,
                              "wall_s": round(call.wall_s, 1), **curves(model_dir)}
    if call.returncode != 0:
        record["error"] = call.tail()
    elif row.startswith("dimlift_slice_attention"):
        record["band"] = band_mass_from_explain(config, model_dir, csvs["validation"], band, folder / "explain",
                                                timeout)
    return record


# ----------------------------------------------------------------------------------------- GaNDLF in process


def gandlf_objects(row: str, setting: Setting, csvs: dict[str, Path], folder: Path) -> tuple:
    """GaNDLF's model, optimizer, loaders, scheduler and parameters for a row, built as `gandlf_run` builds them."""
    from GANDLF.compute.generic import create_pytorch_objects
    from GANDLF.config_manager import ConfigManager
    from GANDLF.utils import parseTrainingCSV, populate_header_in_parameters

    import gandlf_dimlift  # noqa: F401 - registers the plugin architectures
    from gandlf_dimlift.synthetic import write_config

    config = write_config(row_config(row, setting), folder / "config.yaml")
    with contextlib.redirect_stdout(io.StringIO()):
        parameters = ConfigManager(str(config))
        parameters["output_dir"] = str(folder)
        train, headers = parseTrainingCSV(str(csvs["train"]), train=True)
        validation, _ = parseTrainingCSV(str(csvs["validation"]), train=True)
        parameters = populate_header_in_parameters(parameters, headers)
        parameters.update({"training_data": train, "validation_data": validation, "testing_data": None})
        return create_pytorch_objects(parameters, train, validation, "cpu")


def head_of(model: Any) -> Any:
    """The last linear layer (the plugin's `head`, GaNDLF resnet's `classifier`)."""
    return model.head if hasattr(model, "head") else model.classifier


def train_in_process(row: str, setting: Setting, csvs: dict[str, Path], band: tuple[int, int], work: Path,
                     seed: int) -> dict[str, Any]:
    """Trains one row with GaNDLF's own training and validation functions; writes per-step measurements."""
    import torch
    from GANDLF.compute.forward_pass import validate_network
    from GANDLF.compute.training_loop import train_network

    folder = work / "inprocess" / setting.name / row.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, optimizer, train_loader, validation_loader, scheduler, parameters = gandlf_objects(
        row, setting, csvs, folder)
    seen: dict[str, Any] = {}
    head_of(model).register_forward_hook(lambda m, i, o: seen.update(logits=o.detach(), head_input=i[0].detach()))
    parts: dict[str, list] = {}
    for name, parameter in model.named_parameters():
        parts.setdefault(name.split(".")[0], []).append(parameter)
    steps: list[dict[str, Any]] = []
    original_step = optimizer.step

    def measured_step(*args: Any, **kwargs: Any) -> Any:
        logits = seen["logits"]
        entry: dict[str, Any] = {
            "epoch": len(record["train_loss"]),
            "logit_gap": [round(float(g), 3) for g in logits[:, 1] - logits[:, 0]],
            "head_input_norm": round(float(seen["head_input"].norm(dim=1).mean()), 3),
            "grad_norm": {part: float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ps if p.grad is not None)))
                          for part, ps in parts.items()},
        }
        weights = getattr(model, "last_slice_weights", {}).get("z")
        if weights is not None:
            entropy = -(weights * weights.clamp_min(1e-12).log()).sum(1) / math.log(weights.shape[1])
            entry["attention_entropy"] = round(float(entropy.mean()), 4)
            entry["band_mass"] = [round(float(m), 3) for m in weights[:, band[0]: band[1]].sum(1)]
        steps.append(entry)
        return original_step(*args, **kwargs)

    optimizer.step = measured_step
    record: dict[str, Any] = {"row": row, "setting": asdict(setting), "train_loss": [], "train_accuracy": [],
                              "validation_loss": [], "validation_accuracy": []}
    for epoch in range(setting.epochs):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            loss, metrics = train_network(model, train_loader, optimizer, parameters)
            validation_loss, validation_metrics = validate_network(
                model, validation_loader, scheduler, parameters, epoch, mode="validation")
        record["train_loss"].append(float(loss))
        record["train_accuracy"].append(float(metrics["accuracy"]))
        record["validation_loss"].append(float(validation_loss))
        record["validation_accuracy"].append(float(validation_metrics["accuracy"]))
        gaps = [abs(g) for s in steps if s["epoch"] == epoch for g in s["logit_gap"]]
        print(f"  {row} epoch {epoch}: train loss {loss:.4f} acc {metrics['accuracy']:.3f} | validation loss "
              f"{validation_loss:.4f} acc {validation_metrics['accuracy']:.3f} | max |logit gap| {max(gaps):.2f}",
              flush=True)
    with open(folder / "steps.jsonl", "w") as handle:
        handle.writelines(json.dumps(s) + "\n" for s in steps)
    record["steps_file"] = str(folder / "steps.jsonl")
    record["max_abs_logit_gap"] = max(abs(g) for s in steps for g in s["logit_gap"])
    return record


def first_step(row: str, setting: Setting, csvs: dict[str, Path], work: Path, seed: int) -> dict[str, float]:
    """How far one Adam step of each part moves the logit gap of the first training subject (train mode)."""
    import torch
    import torchio

    folder = work / "first_step" / row.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, _, train_loader, _, _, parameters = gandlf_objects(row, setting, csvs, folder)
    subject = next(iter(train_loader))
    image = torch.cat([subject[k][torchio.DATA] for k in parameters["channel_keys"]], dim=1).float()
    label = torch.cat([subject[k] for k in parameters["value_keys"]], dim=0).long().view(-1)
    seen: dict[str, Any] = {}
    head_of(model).register_forward_hook(lambda m, i, o: seen.update(logits=o.detach()))

    def gap() -> float:
        saved = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("weight", "bias"))}
        with torch.no_grad():
            model(image)
        model.load_state_dict(saved, strict=False)  # the probe must not move the running statistics
        return float(seen["logits"][0, 1] - seen["logits"][0, 0])

    from GANDLF.compute.loss_and_metric import global_losses_dict

    model.train()
    global_losses_dict["cel"](model(image), label, parameters).backward()
    before = gap()
    groups: dict[str, list[str]] = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            groups.setdefault(name.split(".")[0], []).append(name)
            if ".in_proj" in name or ".out_proj" in name:
                groups.setdefault("pooling projections", []).append(name)
    groups["all"] = [n for names in groups.values() for n in names]
    named = dict(model.named_parameters())
    moved: dict[str, float] = {"gap_before": round(before, 3)}
    for group, names in groups.items():
        names = sorted(set(names))
        saved = {n: named[n].detach().clone() for n in names}
        with torch.no_grad():
            for n in names:
                named[n] -= setting.learning_rate * torch.sign(named[n].grad)
        moved[group] = round(gap() - before, 3)
        with torch.no_grad():
            for n in names:
                named[n].copy_(saved[n])
    return moved


# ---------------------------------------------------------------------------------------------------- report


def table(records: list[dict[str, Any]]) -> str:
    """A markdown table: per setting and row, the train/validation metrics after the first and last epoch."""
    lines = ["| setting | row | train acc (ep 1 / last) | train loss last | validation acc last | "
             "validation loss (max jump) | band mass / share |", "|---|---|---|---|---|---|---|"]
    for r in records:
        setting = Setting(**r["setting"]).name
        if r.get("error"):
            lines.append(f"| {setting} | {r['row']} | failed: {r['error'][:80]} | | | | |")
            continue
        acc, losses = r["train_accuracy"], r["validation_loss"]
        jump = max((b - a for a, b in zip(losses, losses[1:], strict=False)), default=0.0)
        band = r.get("band")
        band_text = f"{band['mass']:.3f} / {band['share']:.3f} ({band['mass'] / band['share']:.2f}x)" if band else ""
        lines.append(f"| {setting} | {r['row']} | {acc[0]:.3f} / {acc[-1]:.3f} | {_last(r['train_loss']):.4f} | "
                     f"{_last(r['validation_accuracy']):.3f} | {_last(losses):.4f} ({jump:+.2f}) | {band_text} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the data, runs and results")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help=f"rows to train (default: {list(ROWS)})")
    parser.add_argument("--final-layers", nargs="+", default=["softmax"], choices=["softmax", "logits"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    parser.add_argument("--norm-types", nargs="+", default=["batch"], choices=["batch", "instance"])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--subjects", type=int, default=24, help="half train, half validation")
    parser.add_argument("--size", type=int, default=32, help="volume edge (voxels)")
    parser.add_argument("--band", nargs=2, type=int, default=[12, 20], help="[start, stop) slices with the signal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runner", choices=["gandlf_run", "inprocess"], default="gandlf_run")
    parser.add_argument("--first-step", action="store_true", help="only measure one Adam step per part and row")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per gandlf_run call")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    band = (args.band[0], args.band[1])
    csvs = write_data(args.work / "data", args.subjects, args.size, band, args.seed)
    settings = [Setting(f, b, n, args.epochs, args.learning_rate)
                for f in args.final_layers for b in args.batch_sizes for n in args.norm_types]
    if args.first_step:
        for setting in settings:
            for row in args.rows:
                print(f"{setting.name} {row}: logit gap moved by one Adam step of each part: "
                      f"{first_step(row, setting, csvs, args.work, args.seed)}", flush=True)
        return []
    records = []
    results = args.work / f"results_{args.runner}.json"
    for setting in settings:
        for row in args.rows:
            print(f"{setting.name} {row} ({args.runner})", flush=True)
            if args.runner == "gandlf_run":
                record = train_with_gandlf_run(row, setting, csvs, band, args.work, args.timeout)
            else:
                record = train_in_process(row, setting, csvs, band, args.work, args.seed)
            records.append(record)
            results.write_text(json.dumps(records, indent=1))
    print(table(records))
    return records


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
