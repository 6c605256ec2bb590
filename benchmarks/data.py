"""Real-anatomy benchmark data from the MNI ICBM152 template that nilearn bundles (no network needed).

Every subject is the 2009 template (T1 with grey- and white-matter probability maps) resampled to the chosen
spacing, cropped or padded to a fixed shape around the brain, then deformed by a random affine and an elastic
deformation (the same spatial transform for the T1 and both probability maps), and finally given a bias field,
Rician-like noise and a gamma change (TorchIO transforms) on the T1 only. Two GaNDLF tasks come out of it:

- ``segmentation``: ``Channel_0`` is the T1, ``Label`` holds 0 background / 1 grey matter / 2 white matter,
  the arg-max of the deformed probability maps (background = 1 - gm - wm).
- ``detection``: classification (``ValueToPredict``) of lesion present (1) / absent (0). Half the subjects
  (chosen by the seed) get an ellipsoid lesion of altered intensity at a random white-matter location, inserted
  before the intensity transforms. ``lesions.csv`` records for every subject which slices along the last axis
  (GaNDLF's slice axis, the axial one here) the lesion occupies, for scoring slice-level explanations. The
  ``Label`` column points at an all-ones ``sampling_mask.nii.gz`` only because GaNDLF 0.1.5 needs a label image
  to validate classification (without one it takes its segmentation path and fails), and its label sampler needs
  that image positive at the centre of a whole-volume patch.

Splits are fixed from the seed and written as GaNDLF CSVs: ``<task>_train.csv``, ``<task>_validation.csv``,
``<task>_test.csv`` (pass ``-i train.csv,validation.csv`` to ``gandlf_run``). ``dataset.json`` records every
generation parameter.

Usage::

    python -m benchmarks.data OUT_DIR [--subjects 40] [--spacing 2] [--seed 0] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger(__name__)

TASKS = ("segmentation", "detection")
SPLITS = ("train", "validation", "test")
SLICE_AXIS = 2  # GaNDLF's 3D layout is (B, C, X, Y, Z): the last spatial axis holds the slices


@dataclass
class DataSettings:
    """Generation parameters of a benchmark dataset.

    Attributes:
        n_subjects: Number of synthetic subjects (each one appears in both tasks).
        spacing: Isotropic voxel spacing in mm the template is resampled to.
        shape: Fixed output shape (X, Y, Z); None chooses the brain's extent at that spacing, rounded up to `multiple`.
        multiple: Rounding of the automatic shape, so that U-Nets with 4-5 poolings fit.
        seed: Seed of every random choice (deformations, intensities, lesions, splits).
        split: Fractions of subjects for train / validation / test.
        lesion_fraction: Share of subjects given a lesion.
        lesion_radius_mm: Range of the ellipsoid's semi-axes in mm.
        lesion_contrast: Range of the multiplicative intensity change inside the lesion; a subject gets either a
            hypo-intense (1 - c) or a hyper-intense (1 + c) lesion.
        max_displacement_mm: Maximum elastic displacement.
    """

    n_subjects: int = 640
    spacing: float = 6.0
    shape: tuple[int, int, int] | None = (32, 32, 32)
    multiple: int = 16
    seed: int = 0
    split: tuple[float, float, float] = (0.6, 0.1, 0.3)
    lesion_fraction: float = 0.5
    lesion_radius_mm: tuple[float, float] = (15.0, 25.0)
    lesion_contrast: tuple[float, float] = (0.6, 0.9)
    max_displacement_mm: float = 6.0
    versions: dict[str, str] = field(default_factory=dict)


QUICK = {"n_subjects": 20}


def load_template(spacing: float) -> dict[str, np.ndarray]:
    """Loads the nilearn MNI152 2009 T1, GM and WM maps (1 mm, offline) and resamples them to `spacing`.

    Returns:
        A dict with ``t1``, ``gm``, ``wm`` arrays of shape (X, Y, Z) and ``affine`` (the resampled 4x4 affine).
    """
    try:
        from nilearn import datasets
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "benchmarks.data needs nilearn for the MNI152 template: pip install 'nilearn>=0.10,<0.14'"
        ) from error
    import torchio as tio

    images = {
        "t1": datasets.load_mni152_template(resolution=1),
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
    }
    subject = tio.Subject(
        {
            name: tio.ScalarImage(tensor=np.asarray(img.get_fdata(), dtype=np.float32)[None], affine=img.affine)
            for name, img in images.items()
        }
    )
    if spacing != 1.0:
        subject = tio.Resample(spacing, image_interpolation="linear")(subject)
    out = {name: subject[name].data[0].numpy() for name in images}
    out["affine"] = subject["t1"].affine
    return out


def brain_shape(template: dict, spacing: float, multiple: int) -> tuple[int, int, int]:
    """Smallest shape holding the brain (with a 10 % margin), each axis rounded up to `multiple`."""
    mask = (template["gm"] + template["wm"]) > 0.1
    idx = np.argwhere(mask)
    extent = idx.max(0) - idx.min(0) + 1
    return tuple(int(math.ceil(e * 1.1 / multiple) * multiple) for e in extent)  # type: ignore[return-value]


def crop_or_pad(template: dict, shape: Sequence[int]) -> dict:
    """Crops or pads every array of the template to `shape`, centred on the brain's bounding box."""
    mask = (template["gm"] + template["wm"]) > 0.1
    idx = np.argwhere(mask)
    centre = (idx.min(0) + idx.max(0)) / 2.0
    out: dict = {}
    starts = [int(round(c - s / 2.0)) for c, s in zip(centre, shape, strict=True)]
    for name in ("t1", "gm", "wm"):
        src = template[name]
        dst = np.zeros(shape, dtype=np.float32)
        src_sl, dst_sl = [], []
        for axis, (start, size) in enumerate(zip(starts, shape, strict=True)):
            lo, hi = max(start, 0), min(start + size, src.shape[axis])
            src_sl.append(slice(lo, hi))
            dst_sl.append(slice(lo - start, hi - start))
        dst[tuple(dst_sl)] = src[tuple(src_sl)]
        out[name] = dst
    affine = np.array(template["affine"], dtype=float).copy()
    affine[:3, 3] = affine[:3, :3] @ np.array(starts, dtype=float) + affine[:3, 3]
    out["affine"] = affine
    return out


def ellipsoid(
    shape: Sequence[int], centre: Sequence[float], radii: Sequence[float], rotation: np.ndarray
) -> np.ndarray:
    """Soft ellipsoid mask (1 inside, a one-voxel linear ramp at the border) of a rotated ellipsoid."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    local = (grid - np.asarray(centre, dtype=np.float32)) @ rotation.astype(np.float32)
    r = np.sqrt(((local / np.asarray(radii, dtype=np.float32)) ** 2).sum(-1))
    # distance to the surface in units of the smallest radius, roughly in voxels
    edge = (1.0 - r) * float(min(radii))
    return np.clip(edge + 0.5, 0.0, 1.0)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _write(array: np.ndarray, affine: np.ndarray, path: Path, dtype) -> None:
    import SimpleITK as sitk

    # SimpleITK stores arrays as (Z, Y, X); GaNDLF/TorchIO read them back as (X, Y, Z).
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, dtype=dtype).transpose(2, 1, 0)))
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    image.SetSpacing([float(s) for s in spacing])
    # NIfTI RAS affine to ITK LPS: flip the sign of the first two axes of origin and direction
    flip = np.diag([-1.0, -1.0, 1.0])
    direction = flip @ (np.asarray(affine)[:3, :3] / spacing)
    image.SetDirection([float(v) for v in direction.flatten()])
    image.SetOrigin([float(v) for v in flip @ np.asarray(affine)[:3, 3]])
    sitk.WriteImage(image, str(path), useCompression=True)


def make_splits(n_subjects: int, fractions: Sequence[float], seed: int) -> dict[str, list[int]]:
    """Fixed train/validation/test split of subject indices; every split gets at least one subject."""
    if n_subjects < 3:
        raise ValueError(f"n_subjects = {n_subjects}: at least 3 are needed for train/validation/test splits.")
    rng = np.random.default_rng(seed + 1)
    order = rng.permutation(n_subjects).tolist()
    n_val = max(1, int(round(fractions[1] * n_subjects)))
    n_test = max(1, int(round(fractions[2] * n_subjects)))
    n_train = n_subjects - n_val - n_test
    if n_train < 1:
        raise ValueError(f"split {tuple(fractions)} leaves no training subject of {n_subjects}; use more subjects.")
    return {
        "train": sorted(order[:n_train]),
        "validation": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


def lesion_assignment(splits: dict[str, list[int]], fraction: float, seed: int) -> set[int]:
    """Subjects that get a lesion: `fraction` of each split, so every split holds both classes when it can."""
    rng = np.random.default_rng(seed + 2)
    chosen: set[int] = set()
    for members in splits.values():
        n = int(round(fraction * len(members)))
        if len(members) >= 2:
            n = min(max(n, 1), len(members) - 1)
        chosen.update(int(i) for i in rng.choice(members, size=n, replace=False))
    return chosen


def generate(out_dir: str | Path, settings: DataSettings | None = None) -> Path:
    """Writes the dataset (NIfTI images, GaNDLF CSVs, lesions.csv, dataset.json) into `out_dir`.

    Args:
        out_dir: Target directory (created).
        settings: Generation parameters; defaults of `DataSettings` when None.

    Returns:
        The output directory.
    """
    import torch
    import torchio as tio

    settings = settings or DataSettings()
    out = Path(out_dir)
    (out / "subjects").mkdir(parents=True, exist_ok=True)
    template = load_template(settings.spacing)
    shape = tuple(settings.shape) if settings.shape else brain_shape(template, settings.spacing, settings.multiple)
    settings.shape = shape  # type: ignore[assignment]
    base = crop_or_pad(template, shape)
    affine = base["affine"]

    spatial = tio.Compose(
        [
            tio.RandomAffine(scales=0.08, degrees=8, translation=2 * settings.spacing, image_interpolation="linear"),
            tio.RandomElasticDeformation(
                num_control_points=7,
                # torchio warns of folding beyond half the control-point spacing: stay below that
                max_displacement=min(settings.max_displacement_mm, 0.45 * min(shape) * settings.spacing / 6),
                image_interpolation="linear",
            ),
        ]
    )
    intensity = tio.Compose(
        [
            tio.RandomBiasField(coefficients=0.4, include=["t1", "t1_lesion"]),
            tio.RandomGamma(log_gamma=0.2, include=["t1", "t1_lesion"]),
            tio.RandomNoise(std=(0.01, 0.04), include=["t1", "t1_lesion"]),
        ]
    )
    splits = make_splits(settings.n_subjects, settings.split, settings.seed)
    with_lesion = lesion_assignment(splits, settings.lesion_fraction, settings.seed)
    rng = np.random.default_rng(settings.seed + 3)
    torch.manual_seed(settings.seed)

    records = []
    for index in range(settings.n_subjects):
        sid = f"sub-{index:03d}"
        folder = out / "subjects" / sid
        folder.mkdir(parents=True, exist_ok=True)
        subject = tio.Subject(
            {
                name: tio.ScalarImage(tensor=torch.from_numpy(base[name][None].copy()), affine=affine)
                for name in ("t1", "gm", "wm")
            }
        )
        subject = spatial(subject)
        t1 = subject["t1"].data[0].numpy().clip(0, None)
        gm = subject["gm"].data[0].numpy().clip(0, 1)
        wm = subject["wm"].data[0].numpy().clip(0, 1)
        tissue = np.argmax(np.stack([np.clip(1.0 - gm - wm, 0, 1), gm, wm]), 0).astype(np.uint8)

        lesion = np.zeros(shape, dtype=np.float32)
        present = index in with_lesion
        if present:
            candidates = np.argwhere(wm > 0.5)
            radii_vox = rng.uniform(*settings.lesion_radius_mm, size=3) / settings.spacing
            radii_vox = np.maximum(radii_vox, 1.0)
            centre = candidates[rng.integers(len(candidates))].astype(float)
            lesion = ellipsoid(shape, centre, radii_vox, random_rotation(rng)) * (t1 > 0.05 * t1.max())
            contrast = rng.uniform(*settings.lesion_contrast) * rng.choice([-1.0, 1.0])
        t1_lesion = t1 * (1.0 + (contrast if present else 0.0) * lesion)
        pair = tio.Subject(
            t1=tio.ScalarImage(tensor=torch.from_numpy(t1[None].copy()), affine=affine),
            t1_lesion=tio.ScalarImage(tensor=torch.from_numpy(t1_lesion[None].copy()), affine=affine),
        )
        pair = intensity(pair)
        images = {}
        for name in ("t1", "t1_lesion"):
            array = pair[name].data[0].numpy()
            array = np.clip(array / max(float(np.percentile(array, 99.5)), 1e-6), 0, 1.5)
            images[name] = array
        _write(images["t1"], affine, folder / "t1.nii.gz", np.float32)
        _write(tissue, affine, folder / "tissue.nii.gz", np.uint8)
        _write(np.ones(shape, np.uint8), affine, folder / "sampling_mask.nii.gz", np.uint8)
        detection_image = folder / ("t1_lesion.nii.gz" if present else "t1.nii.gz")
        if present:
            _write(images["t1_lesion"], affine, detection_image, np.float32)
            _write((lesion > 0.5).astype(np.uint8), affine, folder / "lesion_mask.nii.gz", np.uint8)
        occupied = np.flatnonzero((lesion > 0.5).any(axis=tuple(a for a in range(3) if a != SLICE_AXIS)))
        split = next(name for name, members in splits.items() if index in members)
        records.append(
            {
                "SubjectID": sid,
                "split": split,
                "t1": str((folder / "t1.nii.gz").resolve()),
                "tissue": str((folder / "tissue.nii.gz").resolve()),
                "sampling_mask": str((folder / "sampling_mask.nii.gz").resolve()),
                "detection_image": str(detection_image.resolve()),
                "lesion": int(present),
                "lesion_slices": ";".join(str(int(s)) for s in occupied),
                "n_slices": shape[SLICE_AXIS],
                "lesion_voxels": int((lesion > 0.5).sum()),
            }
        )
        LOGGER.info("%s (%s): lesion=%s", sid, split, present)

    for split in SPLITS:
        rows = [r for r in records if r["split"] == split]
        with open(out / f"segmentation_{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["SubjectID", "Channel_0", "Label"])
            writer.writerows([[r["SubjectID"], r["t1"], r["tissue"]] for r in rows])
        with open(out / f"detection_{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            # GaNDLF 0.1.5 validates and tests classification subjects through its label-sampler path only when
            # a Label image is present (without one it takes the segmentation path and fails). That sampler draws
            # whole-volume patches only where the label is positive at the volume's centre, so the tissue map
            # (background there in some subjects) fails: give an all-ones mask.
            writer.writerow(["SubjectID", "Channel_0", "Label", "ValueToPredict"])
            writer.writerows([[r["SubjectID"], r["detection_image"], r["sampling_mask"], r["lesion"]] for r in rows])
    with open(out / "lesions.csv", "w", newline="") as handle:
        keys = ["SubjectID", "split", "lesion", "lesion_slices", "n_slices", "lesion_voxels"]
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    settings.versions = _versions()
    meta = asdict(settings)
    meta["shape"] = list(shape)
    meta["slice_axis"] = SLICE_AXIS
    meta["splits"] = {k: [f"sub-{i:03d}" for i in v] for k, v in splits.items()}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return out


def _versions() -> dict[str, str]:
    import nilearn
    import torchio

    return {"nilearn": nilearn.__version__, "torchio": torchio.__version__}


def read_lesions(data_dir: str | Path) -> dict[str, dict]:
    """Reads ``lesions.csv``: SubjectID -> {lesion, slices (list of int), n_slices, split}."""
    out = {}
    with open(Path(data_dir) / "lesions.csv") as handle:
        for row in csv.DictReader(handle):
            out[row["SubjectID"]] = {
                "lesion": int(row["lesion"]),
                "slices": [int(s) for s in row["lesion_slices"].split(";") if s],
                "n_slices": int(row["n_slices"]),
                "split": row["split"],
            }
    return out


def task_csvs(data_dir: str | Path, task: str) -> dict[str, Path]:
    """Paths of a task's train/validation/test CSVs; raises when the dataset is incomplete."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not a benchmark task; choose one of {list(TASKS)}.")
    paths = {split: Path(data_dir) / f"{task}_{split}.csv" for split in SPLITS}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"missing {missing}; generate the data first: python -m benchmarks.data {data_dir}")
    return paths


def settings_from_args(args: argparse.Namespace) -> DataSettings:
    values = dict(QUICK) if args.quick else {}
    for key in ("n_subjects", "spacing", "seed"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    for key in ("shape", "lesion_radius_mm", "lesion_contrast"):
        if getattr(args, key) is not None:
            values[key] = tuple(getattr(args, key))
    return DataSettings(**values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subjects", dest="n_subjects", type=int, default=None, help="number of subjects (40)")
    parser.add_argument("--spacing", type=float, default=None, help="isotropic spacing in mm (2)")
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="fixed X Y Z shape (default: brain extent)")
    parser.add_argument("--seed", type=int, default=None, help="seed of deformations, lesions and splits (0)")
    defaults = DataSettings()
    parser.add_argument("--lesion-radius-mm", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help=f"range of the lesion ellipsoid's semi-axes in mm {defaults.lesion_radius_mm}")
    parser.add_argument("--lesion-contrast", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help=f"range of the lesion's relative intensity change {defaults.lesion_contrast}")
    parser.add_argument("--quick", action="store_true", help=f"tiny dataset for smoke tests: {QUICK}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to write the dataset into")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = generate(args.out_dir, settings_from_args(args))
    meta = json.loads((out / "dataset.json").read_text())
    print(f"wrote {meta['n_subjects']} subjects of shape {meta['shape']} at {meta['spacing']} mm to {out}")


if __name__ == "__main__":
    main()
