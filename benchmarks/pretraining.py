"""2D pretraining by the package itself, measured for all three families, at full and at reduced training sets.

No model hub is reachable here, so ImageNet weights cannot be the source. Instead the package trains a 2D network
with `gandlf_run` on 2D slices (along the last axis, GaNDLF's slice axis) of the SAME training volumes the 3D rows
get, supervised on slice labels:

- for the detection families, a 2D `dimlift_smp` resnet18 classifier of "this slice holds lesion voxels"
  (every lesion slice, and as many lesion-free brain slices drawn at random). These labels say WHERE the lesion is,
  which the 3D rows' volume labels do not: the gain measures what that slice-level supervision, moved into 3D
  through `pretrained:`, is worth. Its checkpoint is the `pretrained:` file of
  - `dimlift_smp` classification (`acs`, `inflate`): the 2D `dimlift_smp_best.pth.tar` as GaNDLF wrote it;
  - `dimlift_slice_attention`: its encoder as a 3-channel state dict (`rgb_encoder_state`), because the slice
    encoder takes 3 channels and the 2D run had 1;
- for `dimlift_dxnet`, a 2D `dimlift_omnianet` B0 trained on tissue segmentation of the slices (the existing
  Omnia-Net -> DX-Net transfer), its checkpoint the `pretrained:` file of the 3D DX-Net.

Each family's rows from random weights and from the 2D network are trained with the same config, at every
fraction of the training subjects (a class-balanced subset; the 2D network then sees only that subset's slices).
Per setting the report gives the test metric of both, the gain and its paired bootstrap interval over the test
subjects, the wall time of the 2D stage, and the 3D training time the pretrained start saves (epochs until it
matches the random start's best validation value, times the 3D epoch time).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import data as bdata
from benchmarks import stats
from benchmarks.runner import (
    Settings,
    read_csv,
    read_image,
    row_by_name,
    safe,
    train_and_test,
    validation_curve,
    validation_metric,
)
from benchmarks.throughput import Row

LOGGER = logging.getLogger("benchmarks.pretraining")


@dataclass(frozen=True)
class Family:
    """A family's pretraining experiment: its 3D row, the task, and which 2D source feeds it.

    Attributes:
        name: Family key in the results.
        row: The 3D row (random weights) of `benchmarks.runner.row_by_name`.
        task: detection (metric AUC) or segmentation (metric Dice).
        source: The 2D row trained on slices: `dimlift_smp/cls-2d` or `dimlift_omnianet/b0-2d`.
        encoder_only: Give the 3D row the 2D encoder as a 3-channel state dict instead of the checkpoint.
    """

    name: str
    row: str
    task: str
    source: str
    encoder_only: bool = False

    @property
    def metric(self) -> str:
        return "auc" if self.task == "detection" else "dice"


FAMILIES: tuple[Family, ...] = (
    Family("dimlift_slice_attention", "dimlift_slice_attention/attention", "detection", "dimlift_smp/cls-2d",
           encoder_only=True),
    Family("dimlift_smp/acs", "dimlift_smp/cls", "detection", "dimlift_smp/cls-2d"),
    Family("dimlift_smp/inflate", "dimlift_smp/cls-inflate", "detection", "dimlift_smp/cls-2d"),
    Family("dimlift_dxnet", "dimlift_dxnet/b0", "segmentation", "dimlift_omnianet/b0-2d"),
)


def family_by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise SystemExit(f"unknown pretraining family {name!r}; families are {[f.name for f in FAMILIES]}")


def setting_name(fraction: float) -> str:
    """`full` for 1, else the percentage: 0.25 -> `25%`."""
    return "full" if fraction >= 1 else f"{round(100 * fraction)}%"


# ------------------------------------------------------------------------------------------------ data


def subset_csv(source: Path, count: int, multiple: int, out: Path, seed: int = 0) -> Path:
    """Writes `count` subjects of a GaNDLF CSV, drawn at random (class-balanced when it has `ValueToPredict`).

    The count is rounded down to a multiple of `multiple` (the batch size: GaNDLF keeps a last, smaller batch, and
    a batch of one fails batch-normalised encoders with a 1x1 bottleneck).
    """
    rows = read_csv(source)
    wanted = max(multiple, min(count, len(rows)) // multiple * multiple)
    rng = np.random.default_rng(seed)
    labels = [r.get("ValueToPredict", "") for r in rows]
    groups = {label: [i for i, x in enumerate(labels) if x == label] for label in sorted(set(labels))}
    chosen: list[int] = []
    for index, members in enumerate(groups.values()):  # split the count over the classes, remainder to the last
        share = wanted - len(chosen) if index == len(groups) - 1 else round(wanted * len(members) / len(rows))
        chosen += rng.choice(members, size=min(share, len(members)), replace=False).tolist()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[i] for i in sorted(chosen))
    return out


def _write_2d(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(array.T)), str(path))


def brain_slices(tissue: np.ndarray) -> list[int]:
    """Indices of the slices (last axis) in which brain tissue covers more than 5 % of the slice."""
    return [z for z in range(tissue.shape[-1]) if (tissue[..., z] > 0).mean() > 0.05]


def write_slice_sets(data_dir: Path, csvs: dict[str, Path], out: Path, kind: str, every: int = 1,
                     multiple: int = 1, seed: int = 0, max_validation: int = 256) -> dict[str, Path]:
    """2D slices of the train and validation subjects of `csvs`, as NIfTI images and GaNDLF CSVs.

    Args:
        data_dir: The dataset (for `lesions.csv`).
        csvs: train and validation CSVs of the 3D task (detection for `classification`, segmentation else).
        out: Output folder.
        kind: `classification`: every lesion slice (label 1) and as many lesion-free brain slices drawn at random
            (label 0), with an all-ones 2D `Label` image (GaNDLF 0.1.5 needs one to sample classification patches);
            `segmentation`: every `every`-th brain slice with its tissue label.
        every: Keep every n-th brain slice (segmentation).
        multiple: The training slices are trimmed to a multiple of this (the batch size).
        seed: Seed of the negative slices' draw and of the validation subsample.
        max_validation: At most this many validation slices (drawn at random): the 2D network's validation only
            chooses its best checkpoint, and every slice costs time in every epoch.

    Returns:
        train and validation CSV paths of the slices.
    """
    lesions = bdata.read_lesions(data_dir)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split in ("train", "validation"):
        positives, negatives = [], []
        for subject in read_csv(csvs[split]):
            sid = subject["SubjectID"]
            image = read_image(subject["Channel_0"])
            tissue = read_image(Path(subject["Channel_0"]).with_name("tissue.nii.gz"))
            brain = brain_slices(tissue)
            if kind == "segmentation":
                label = read_image(subject["Label"])
                for z in brain[::every]:
                    name = f"{sid}_z{z:03d}"
                    _write_2d(image[..., z].astype(np.float32), out / f"{name}_image.nii.gz")
                    _write_2d(label[..., z].astype(np.uint8), out / f"{name}_label.nii.gz")
                    positives.append([name, str(out / f"{name}_image.nii.gz"), str(out / f"{name}_label.nii.gz")])
                continue
            lesion_slices = set(lesions[sid]["slices"])
            for z in brain:
                (positives if z in lesion_slices else negatives).append((sid, z, image[..., z]))
        if kind == "segmentation":
            rows, header = positives, ["SubjectID", "Channel_0", "Label"]
        else:
            ones = out / "ones.nii.gz"
            if positives:
                _write_2d(np.ones(positives[0][2].shape, np.uint8), ones)
            picked = [negatives[i] for i in rng.choice(len(negatives), size=min(len(positives), len(negatives)),
                                                        replace=False)]
            rows, header = [], ["SubjectID", "Channel_0", "Label", "ValueToPredict"]
            for value, items in ((1, positives), (0, picked)):
                for sid, z, array in items:
                    name = f"{sid}_z{z:03d}"
                    _write_2d(array.astype(np.float32), out / f"{name}.nii.gz")
                    rows.append([name, str(out / f"{name}.nii.gz"), str(ones), value])
            rows.sort(key=lambda r: r[0])
        if split == "train":
            rows = rows[: len(rows) - len(rows) % multiple]
        elif len(rows) > max_validation:
            rows = [rows[i] for i in sorted(rng.choice(len(rows), size=max_validation, replace=False))]
        paths[split] = out / f"slices_{split}.csv"
        with open(paths[split], "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
    return paths


def rgb_encoder_state(checkpoint: Path, out: Path) -> Path:
    """The encoder of a 1-channel 2D `dimlift_smp` checkpoint as a 3-channel encoder state dict.

    `dimlift_slice_attention` repeats a grey slice into its encoder's 3 input channels, so a first convolution
    whose 3 input kernels are the 1-channel kernel divided by 3 gives the 2D network's response exactly.
    """
    import torch

    from gandlf_dimlift import weights

    state = weights.read_weights_file(checkpoint).state_dict
    prefix = "net.encoder."
    encoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder:
        raise ValueError(f"{checkpoint} holds no `{prefix}` keys: it is not a dimlift_smp classifier checkpoint")
    first = encoder["conv1.weight"]
    if first.shape[1] == 1:
        encoder["conv1.weight"] = first.repeat(1, 3, 1, 1) / 3
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(encoder, out)
    return out


# ------------------------------------------------------------------------------------------------ experiment


def epochs_to(values: Sequence[float], target: float, higher_is_better: bool = True) -> int | None:
    """First epoch (1-based) whose value reaches `target` (at or above it, or at or below when lower is better)."""
    for index, value in enumerate(values):
        if (value >= target) if higher_is_better else (value <= target):
            return index + 1
    return None


def time_saved(random: dict[str, Any], pretrained: dict[str, Any]) -> dict[str, Any]:
    """3D epochs (and seconds) the pretrained start saves to reach the random start's best validation value.

    The validation value is GaNDLF's Dice for segmentation and its loss for classification (`validation_metric`).
    """
    curve_random, curve_pretrained = validation_curve(random), validation_curve(pretrained)
    if not curve_random or not curve_pretrained:
        return {}
    metric, higher = validation_metric(random)
    target = max(curve_random) if higher else min(curve_random)
    random_epochs = curve_random.index(target) + 1
    pretrained_epochs = epochs_to(curve_pretrained, target, higher)
    out: dict[str, Any] = {"validation_metric": metric, "target": target, "random_epochs": random_epochs,
                           "pretrained_epochs": pretrained_epochs}
    if pretrained_epochs is not None:
        out["saved_s"] = (random_epochs - pretrained_epochs) * pretrained.get("epoch_s", 0.0)
    return out


def compare_pair(family: Family, random: dict[str, Any], pretrained: dict[str, Any]) -> dict[str, Any]:
    """Test metric of both starts, the gain and its paired bootstrap interval over the same test subjects."""
    out: dict[str, Any] = {"metric": family.metric, "random_row": random.get("name"),
                           "pretrained_row": pretrained.get("name")}
    errors = [r["error"] for r in (random, pretrained) if r.get("error")]
    if errors:
        out["error"] = "; ".join(errors)[:500]
        return out
    if family.metric == "auc":
        a = dict(zip(random["subjects"], random["scores"], strict=True))
        b = dict(zip(pretrained["subjects"], pretrained["scores"], strict=True))
        labels = dict(zip(random["subjects"], random["labels"], strict=True))
        common = sorted(set(a) & set(b))
        out.update(random=random["auc"], pretrained=pretrained["auc"],
                   gain_ci=stats.gain_interval([a[s] for s in common], [b[s] for s in common],
                                               [labels[s] for s in common]))
    else:
        a = dict(zip(random["subjects"], random["subject_dice_fg"], strict=True))
        b = dict(zip(pretrained["subjects"], pretrained["subject_dice_fg"], strict=True))
        common = sorted(set(a) & set(b))
        out.update(random=random["dice_fg"], pretrained=pretrained["dice_fg"],
                   gain_ci=stats.gain_interval([a[s] for s in common], [b[s] for s in common]))
    out["gain"] = out["pretrained"] - out["random"]
    out["n_test"] = len(common)
    out["epoch_s_random"], out["epoch_s_pretrained"] = random.get("epoch_s"), pretrained.get("epoch_s")
    out.update(time_saved(random, pretrained))
    return out


def run(families: Sequence[Family], fractions: Sequence[float], data_dir: Path, task_csvs: dict[str, dict[str, Path]],
        patches: dict[str, tuple[int, ...]], settings: Settings, work: Path, reuse: bool,
        trained: dict[str, dict[str, Any]], slices_every: int = 1) -> dict[str, Any]:
    """The pretraining experiment: 2D sources, then every family's random and pretrained 3D rows per fraction.

    Args:
        families: Families to measure.
        fractions: Fractions of the training subjects (1 = the task's whole training split).
        data_dir: The dataset.
        task_csvs: The train/validation/test CSVs of `detection` and `segmentation`.
        patches: The 3D patch of each task.
        settings: The budget (2D sources: `Settings.budget("slices-<task>")`).
        work: Work directory (this experiment writes under `work/pretraining`).
        reuse: Reuse finished rows.
        trained: Records already trained at full data by the sections (by row name): the random rows reuse them.
        slices_every: Keep every n-th brain slice for the 2D segmentation source.

    Returns:
        {"sources": {setting: {source row: record}}, "rows": {row name: record},
         "families": {family: {setting: comparison}}}.
    """
    root = work / "pretraining"
    out: dict[str, Any] = {"sources": {}, "rows": {}, "families": {}}
    for fraction in fractions:
        setting = setting_name(fraction)
        csvs: dict[str, dict[str, Path]] = {}
        for task in {f.task for f in families}:
            csvs[task] = dict(task_csvs[task])
            if fraction < 1:
                full = task_csvs[task]["train"]
                csvs[task]["train"] = subset_csv(full, int(len(read_csv(full)) * fraction), settings.batch,
                                                 root / "subsets" / f"{task}_train_{safe(setting)}.csv")
        sources: dict[str, dict[str, Any]] = {}
        for source in sorted({f.source for f in families}):
            task = next(f.task for f in families if f.source == source)
            kind = "classification" if task == "detection" else "segmentation"
            slices = write_slice_sets(data_dir, csvs[task], root / "slices" / f"{safe(source)}_{safe(setting)}",
                                      kind, every=slices_every, multiple=settings.batch)
            base = row_by_name(source)
            row = Row(f"{source}@{setting}", base.architecture, base.task, base.model, base.note, base.dimension)
            sources[source] = train_and_test(row, f"slices-{task}", slices, patches[task][:2], settings, root,
                                             reuse)
            sources[source]["n_slices"] = len(read_csv(slices["train"]))
        out["sources"][setting] = sources
        for family in families:
            base = row_by_name(family.row)
            source = sources[family.source]
            random_name = family.row if fraction >= 1 else f"{family.row}@{setting}"
            random = trained.get(random_name) or out["rows"].get(random_name)
            if random is None:
                row = Row(random_name, base.architecture, base.task, base.model, base.note, base.dimension)
                random = train_and_test(row, family.task, csvs[family.task], patches[family.task], settings, root,
                                        reuse)
            out["rows"][random_name] = random
            pretrained_name = f"{family.row}+2d" + ("" if fraction >= 1 else f"@{setting}")
            if source.get("error") or not source.get("checkpoint"):
                pretrained = {"name": pretrained_name, "error": f"the 2D source failed: {source.get('error')}"}
            else:
                weights_file = Path(source["checkpoint"])
                if family.encoder_only:
                    weights_file = rgb_encoder_state(weights_file, weights_file.parent / "encoder_rgb.pth")
                options = {**base.model, "pretrained": str(weights_file)}
                row = Row(pretrained_name, base.architecture, base.task, options,
                          f"{base.note}, initialised from the 2D {family.source}")
                # the config names the same file whatever 2D run wrote it: reuse only with that very 2D run
                pretrained = train_and_test(row, family.task, csvs[family.task], patches[family.task], settings,
                                            root, reuse and bool(source.get("reused")))
            out["rows"][pretrained_name] = pretrained
            comparison = compare_pair(family, random, pretrained)
            comparison["source_wall_s"] = source.get("train_wall_s")
            comparison["source_epoch_s"] = source.get("epoch_s")
            comparison["n_train"] = random.get("n_train")
            out["families"].setdefault(family.name, {})[setting] = comparison
    return out
