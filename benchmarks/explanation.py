"""Explanation score of the slice attention rows: how much slice weight falls on the slices that hold the lesion.

`gandlf-dimlift explain` (run as ``python -m gandlf_dimlift.explain``) writes every test subject's slice weights;
for the test subjects with a lesion, the mass is the sum of the weights of the slices the lesion occupies
(``lesions.csv``), the share is those slices' fraction of all slices. Mean pooling gives mass = share (ratio 1); a
ratio above 1 means the weights concentrate on the lesion. The interval of the ratio is a bootstrap over those
subjects.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import data as bdata
from benchmarks import stats
from benchmarks.runner import read_csv, read_image, run_process


def explanation_score(config: Path, model_dir: Path, test_csv: Path, data_dir: Path, out: Path,
                      timeout: int) -> dict[str, Any]:
    """Runs `gandlf_dimlift.explain` on the test split and scores the weights of the subjects with a lesion.

    Returns:
        mass, share, ratio (mass / share of the means), ratio_ci, n, and per subject: subject, mass, share and the
        weights of every slice (for the pictures).
    """
    call = run_process([sys.executable, "-m", "gandlf_dimlift.explain", "-c", str(config), "-m", str(model_dir),
                        "-i", str(test_csv), "-o", str(out), "--top-k", "1"], out.parent / "explain.log", timeout)
    weights_csv = out / "slice_weights.csv"
    if call.returncode != 0 or not weights_csv.exists():
        raise RuntimeError(f"gandlf_dimlift.explain failed (exit {call.returncode}): {call.tail()}")
    return score(weights_csv, bdata.read_lesions(data_dir))


def score(weights_csv: Path, lesions: dict[str, dict]) -> dict[str, Any]:
    """Mass on lesion slices against their share, over the subjects of `weights_csv` that have a lesion."""
    weights: dict[str, dict[int, float]] = {}
    with open(weights_csv) as handle:
        for row in csv.DictReader(handle):
            if row.get("view", "z") != "z":
                continue
            weights.setdefault(row["subject"], {})[int(row["slice_index"])] = float(row["weight"])
    subjects = []
    for sid, per_slice in sorted(weights.items()):
        info = lesions.get(sid)
        if not info or not info["lesion"] or not info["slices"]:
            continue
        curve = [per_slice.get(z, 0.0) for z in range(info["n_slices"])]
        total = sum(curve)
        subjects.append({"subject": sid, "mass": sum(curve[z] for z in info["slices"]) / total,
                         "share": len(info["slices"]) / info["n_slices"], "weights": [w / total for w in curve],
                         "slices": info["slices"]})
    if not subjects:
        raise RuntimeError(f"no test subject with a lesion among {sorted(weights)}")
    mass = np.array([s["mass"] for s in subjects])
    share = np.array([s["share"] for s in subjects])
    index = stats.resamples(len(subjects))
    ratio_ci = stats.percentile_interval(mass[index].mean(axis=1) / share[index].mean(axis=1))
    return {"mass": float(mass.mean()), "share": float(share.mean()), "ratio": float(mass.mean() / share.mean()),
            "ratio_ci": ratio_ci, "n": len(subjects), "subjects": subjects}


def best_and_worst(records: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(row, "best"/"worst", subject) of the highest and lowest mass-to-share subject of each scored row.

    Mean pooling is left out: its weights are uniform by construction.
    """
    picked = []
    for record in records:
        explained = record.get("explanation")
        pooling = record.get("config", {}).get("model", {}).get("pooling")
        if not explained or not explained["subjects"] or pooling == "mean":
            continue
        ranked = sorted(explained["subjects"], key=lambda s: s["mass"] / s["share"])
        picked += [(record["name"], "best", ranked[-1]), (record["name"], "worst", ranked[0])]
    return picked


def plot(records: list[dict[str, Any]], test_csv: Path, path: Path) -> bool:
    """Best and worst explanation of each row: the weight curve with the lesion's slices shaded, the slice of the
    highest weight and the lesion's largest slice, the lesion outlined. Returns False when there is nothing to draw."""
    picked = best_and_worst(records)
    if not picked:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = {r["SubjectID"]: r["Channel_0"] for r in read_csv(test_csv)}
    fig, axes = plt.subplots(3, len(picked), figsize=(2.6 * len(picked), 7.2), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 1.3, 1.3]})
    for column, (row, which, subject) in enumerate(picked):
        weights = np.asarray(subject["weights"])
        curve = axes[0, column]
        for z in subject["slices"]:
            curve.axvspan(z - 0.5, z + 0.5, color="tab:red", alpha=0.25, lw=0)
        curve.plot(weights, color="black", lw=1)
        curve.set_title(f"{row.split('/')[-1]}: {which}\n{subject['subject']}, mass {subject['mass']:.2f} "
                        f"/ share {subject['share']:.2f}", fontsize=7)
        curve.tick_params(labelsize=6)
        curve.set_xlabel("slice (last axis)", fontsize=6)
        image_path = Path(images[subject["subject"]])
        image, mask = read_image(image_path), read_image(image_path.with_name("lesion_mask.nii.gz"))
        top, largest = int(np.argmax(weights)), int(np.argmax(mask.sum(axis=(0, 1))))
        for view, z, title in ((axes[1, column], top, f"top-weighted slice {top}"),
                               (axes[2, column], largest, f"lesion's largest slice {largest}")):
            view.imshow(image[..., z].T, cmap="gray", origin="lower")
            if mask[..., z].any():
                view.contour(mask[..., z].T, levels=[0.5], colors="red", linewidths=0.8, origin="lower")
            view.set_title(f"{title} (weight {weights[z]:.3f})", fontsize=7)
            view.axis("off")
    fig.suptitle("Best and worst explanation per pooling (red: the lesion's slices / outline)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
