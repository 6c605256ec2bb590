"""The comparison's summary (RESULTS.json, in issue 13's shape) and the markdown report rendered from it alone.

`summarize` turns the full row records of a run into the summary; `markdown` renders the summary; the learning
curves are drawn from the summary too. So the committed RESULTS.md is exactly `markdown(RESULTS.json)`, which the
tests check, and ``python -m benchmarks.report benchmarks/RESULTS.json`` re-renders the markdown and curves
without re-running anything.

Summary keys: ``command``, ``meta``, ``detection`` {row: auc, auc_ci, accuracy, ...}, ``explanation`` {row: mass,
share, ratio, ratio_ci, n}, ``segmentation`` {row: dice, dice_ci, dice_per_class, ...}, ``pretraining`` {family:
{setting: random, pretrained, gain, gain_ci, metric, ...}}, ``sources`` {setting: {2D row: ...}} and ``curves``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import stats
from benchmarks.runner import validation_curve

ROW_FIELDS = ("epoch_s", "peak_mib", "params", "note", "error", "n_train", "epochs", "reused")
INTERVALS = (f"95 % intervals: percentile bootstrap over the test subjects ({stats.N_BOOTSTRAP} resamples; AUC "
             "resamples positives and negatives separately; a gain resamples the same subjects for both rows). "
             "They show the spread from the test set's size, not from training another seed.")


def _row(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in ROW_FIELDS if record.get(k) is not None}


def _curves(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per row: GaNDLF's training loss and validation metric (loss or Dice, by the row's task) per epoch."""
    return {r["name"]: {"train_loss": [float(v) for v in r.get("train_log", {}).get("train_loss", [])],
                        "validation": validation_curve(r)} for r in records}


def summarize(meta: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """The summary of a run: every figure the report shows, per row and experiment."""
    summary: dict[str, Any] = {"command": meta["command"], "meta": {k: v for k, v in meta.items() if k != "command"}}
    detection = results.get("detection", [])
    summary["detection"] = {
        r["name"]: {**{k: r.get(k) for k in ("auc", "auc_ci", "accuracy", "n_test", "n_positive")}, **_row(r)}
        for r in detection
    }
    pretraining = results.get("pretraining") or {}
    explained = {r["name"]: r for r in [*detection, *pretraining.get("rows", {}).values()]}
    summary["explanation"] = {
        name: ({k: r["explanation"][k] for k in ("mass", "share", "ratio", "ratio_ci", "n")}
               if r.get("explanation") else {"error": r.get("explanation_error") or r.get("error")})
        for name, r in explained.items() if r.get("architecture") == "dimlift_slice_attention"
    }
    summary["segmentation"] = {
        r["name"]: {"dice": r.get("dice_fg"), "dice_ci": r.get("dice_fg_ci"), "dice_per_class": r.get("dice"),
                    "n_test": r.get("n_test"), **_row(r)}
        for r in results.get("segmentation", [])
    }
    summary["pretraining"] = pretraining.get("families", {})
    summary["sources"] = {
        setting: {name: {"n_slices": r.get("n_slices"), "train_wall_s": r.get("train_wall_s"),
                         "final_validation": (_curves([r])[r["name"]]["validation"] or [None])[-1], **_row(r)}
                  for name, r in sources.items()}
        for setting, sources in pretraining.get("sources", {}).items()
    }
    summary["curves"] = {"detection": _curves(detection), "segmentation": _curves(results.get("segmentation", [])),
                         "pretraining": _curves(list(pretraining.get("rows", {}).values()))}
    return summary


# ------------------------------------------------------------------------------------------------ markdown


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _ci(interval: Sequence[float] | None, digits: int = 3) -> str:
    return "—" if not interval else f"{interval[0]:.{digits}f} – {interval[1]:.{digits}f}"


def _params(record: dict[str, Any]) -> str:
    return f"{record['params'] / 1e6:.2f} M" if record.get("params") else "—"


def _note(record: dict[str, Any]) -> str:
    text = record.get("error") or record.get("note", "")
    if record.get("reused") and not record.get("error"):
        text += " (reused)"
    return str(text).replace("|", "/").replace("\n", " ")[:300]


def _header(summary: dict[str, Any]) -> list[str]:
    meta = summary["meta"]
    data, settings = meta["data"], meta["settings"]
    quick = " (QUICK smoke run: tiny data, 1 epoch per row; not evidence)" if meta.get("quick") else ""
    reused = f" ({meta['reused']} rows reused from an earlier invocation in the same --work)" if meta.get("reused") \
        else ""
    patch = f"{settings['patch']}³ patches" if settings.get("patch") else "the whole volume"
    pretrain = (f"{settings['pretrain_epochs']} epochs" if settings.get("pretrain_epochs") else
                "as many epochs as the 3D task they feed")
    seg_subjects = (f", {settings['segmentation_subjects']} of the training subjects drawn with a fixed seed"
                    if settings.get("segmentation_subjects") else "")
    det_epochs = settings.get("detection_epochs") or settings["epochs"]
    det_lr = settings.get("detection_learning_rate") or settings["learning_rate"]
    return [
        f"# Benchmark results{quick}", "",
        f"Command: `{summary['command']}`", "",
        f"Machine: {meta['machine']}; wall time {meta['wall_min']:.1f} min{reused}; training, testing and explanation "
        f"time summed over every row {meta['summed_min']:.1f} min; finished {meta['finished']}.", "",
        f"Data: {data['n_subjects']} subjects deformed from the MNI152 2009 template, spacing {data['spacing']} mm, "
        f"whole volumes of {' × '.join(str(s) for s in data['shape'])}, seed {data['seed']}; splits "
        f"train/validation/test = {meta['splits']}; half of each split has one ellipsoid lesion (semi-axes "
        f"{data['lesion_radius_mm'][0]:g}–{data['lesion_radius_mm'][1]:g} mm, intensity × (1 ± "
        f"{data['lesion_contrast'][0]:g}–{data['lesion_contrast'][1]:g})). Every 3D row starts from random weights "
        "unless it says it was initialised from a 2D network (no model hub here).", "",
        f"Budget: batch {settings['batch']}, Adam with GaNDLF's default triangle scheduler; detection (the whole "
        f"volume, GaNDLF's `cel` loss with `final_layer: {settings['final_layer']}`) {det_epochs} epochs at lr "
        f"{det_lr:g}; segmentation (Dice loss, {patch}{seg_subjects}) {settings['epochs']} epochs at lr "
        f"{settings['learning_rate']:g}; 2D pretraining networks: {pretrain}.",
        "", INTERVALS, "",
    ]


def _section(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str] = (),
             figure: str | None = None) -> list[str]:
    """A report section: heading, table, notes below it, and the figure link when there is one."""
    lines = [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [""] + list(notes) if notes else []
    lines += ["", figure] if figure else []
    return lines + [""]


def markdown(summary: dict[str, Any], stem: str = "RESULTS") -> str:
    """The report, from the summary alone."""
    lines = _header(summary)
    figures = summary["meta"].get("figures", [])

    def figure(name: str, alt: str) -> str | None:
        return f"![{alt}]({stem}_{name}.png)" if name in figures else None

    if summary.get("detection"):
        lines += _section(
            "Lesion detection (test split)",
            ("row", "AUC", "AUC 95 % CI", "accuracy", "positives / test", "epoch s", "peak MiB", "params", "note"),
            [(name, _f(r.get("auc")), _ci(r.get("auc_ci")), _f(r.get("accuracy")),
              f"{r.get('n_positive', '—')} / {r.get('n_test', '—')}", _f(r.get("epoch_s"), 1),
              _f(r.get("peak_mib"), 0), _params(r), _note(r)) for name, r in summary["detection"].items()],
            figure=figure("detection", "detection curves"))
    if summary.get("explanation"):
        lines += _section(
            "Explanation score (slice attention, test subjects with a lesion)",
            ("row", "attention mass on lesion slices", "share of those slices", "ratio", "ratio 95 % CI",
             "subjects"),
            [(name, "—", "—", "—", "—", _note(e)) if e.get("error") or e.get("mass") is None else
             (name, _f(e["mass"]), _f(e["share"]), _f(e["ratio"], 2), _ci(e.get("ratio_ci"), 2), str(e["n"]))
             for name, e in summary["explanation"].items()],
            ["A ratio above 1 means the weights concentrate on the lesion's slices; mean pooling gives 1 by "
             "construction."],
            figure("explanation", "best and worst explanation"))
    if summary.get("segmentation"):
        rows = []
        for name, r in summary["segmentation"].items():
            d = r.get("dice_per_class") or [None] * 3
            rows.append((name, _f(r.get("dice")), _ci(r.get("dice_ci")), _f(d[0]), _f(d[1]), _f(d[2]),
                         _f(r.get("epoch_s"), 1), _f(r.get("peak_mib"), 0), _params(r), _note(r)))
        lines += _section(
            "Tissue segmentation (test split)",
            ("row", "mean GM/WM Dice", "95 % CI", "Dice bg", "Dice GM", "Dice WM", "epoch s", "peak MiB", "params",
             "note"), rows, figure=figure("segmentation", "segmentation curves"))
    if summary.get("pretraining"):
        rows = []
        for family, settings in summary["pretraining"].items():
            for setting, p in settings.items():
                reached = (f"{p['random_epochs']} → {p['pretrained_epochs'] or 'not reached'}"
                           if p.get("random_epochs") else "—")
                rows.append((family, setting, str(p.get("n_train", "—")), p["metric"], _f(p.get("random")),
                             _f(p.get("pretrained")), _f(p.get("gain")), _ci(p.get("gain_ci")),
                             _f(p.get("source_wall_s"), 0), reached, _f(p.get("saved_s"), 0), _note(p)))
        notes = ["The 2D stage is the `gandlf_run` training wall time of the 2D network (shared by the three "
                 "detection families of a setting); \"3D s saved\" is (epochs the random start needs to reach its "
                 "best validation value − epochs the pretrained start needs to reach the same) × the pretrained "
                 "row's epoch time; negative when the pretrained start gets there later. The validation value is "
                 "GaNDLF's loss for detection (GaNDLF 0.1.5 logs its AUC metric empty) and its Dice for "
                 "segmentation.", ""]
        notes += [f"- 2D source {name} ({setting}): {s.get('n_slices', '—')} training slices, {s.get('epochs', '—')} "
                  f"epochs of {_f(s.get('epoch_s'), 1)} s, final validation {_f(s.get('final_validation'))}"
                  f"{'; ' + _note(s) if s.get('error') else ''}."
                  for setting, sources in summary.get("sources", {}).items() for name, s in sources.items()]
        lines += _section(
            "2D pretraining: random weights against a 2D network trained by the package on the slices",
            ("family", "setting", "3D train subjects", "metric", "random", "from 2D", "gain", "gain 95 % CI",
             "2D stage s", "epochs to random's best (random → from 2D)", "3D s saved", "note"),
            rows, notes, figure("pretraining", "pretraining curves"))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ figures


def plot_curves(curves: dict[str, dict[str, list[float]]], metric: str, path: Path, title: str) -> bool:
    """Training loss and the validation metric per epoch, one line per row. Returns False when nothing to draw."""
    if not any(c["train_loss"] or c["validation"] for c in curves.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        if curve["train_loss"]:
            axes[0].plot(range(1, len(curve["train_loss"]) + 1), curve["train_loss"], marker="o", ms=3, label=name)
        if curve["validation"]:
            axes[1].plot(range(1, len(curve["validation"]) + 1), curve["validation"], marker="o", ms=3, label=name)
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].set(title=f"validation {metric}", xlabel="epoch")
    axes[1].legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_pretraining(summary: dict[str, Any], path: Path) -> bool:
    """One panel per family: the validation curve of each setting's random (solid) and 2D-initialised (dashed)
    row. Returns False when there is nothing to draw."""
    families = summary.get("pretraining", {})
    curves = summary.get("curves", {}).get("pretraining", {})
    if not families or not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(families), figsize=(4 * len(families), 3.6), squeeze=False)
    for axis, (family, settings) in zip(axes[0], families.items(), strict=True):
        for index, (setting, result) in enumerate(settings.items()):
            color = f"C{index}"
            for key, style, marker, label in (("random_row", "-", "o", "random"),
                                              ("pretrained_row", "--", "s", "from 2D")):
                values = curves.get(result.get(key) or "", {}).get("validation", [])
                if values:
                    axis.plot(range(1, len(values) + 1), values, style, color=color, marker=marker, ms=3,
                              label=f"{setting}, {label}")
        metric = "Dice" if settings and next(iter(settings.values())).get("metric") == "dice" else "loss"
        axis.set(title=family, xlabel="epoch", ylabel=f"validation {metric}")
        axis.legend(fontsize=6)
    fig.suptitle("random weights (solid) against the 2D-initialised start (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write(summary: dict[str, Any], out: Path) -> str:
    """Writes the curves, `<out>.json` and the markdown `out`; returns the markdown."""
    stem = out.stem
    curves = summary.get("curves", {})
    figures = [name for name in summary["meta"].get("figures", []) if name == "explanation"]
    for name, metric, title in (("detection", "loss", "lesion detection"),
                                ("segmentation", "Dice (GM/WM)", "tissue segmentation")):
        if plot_curves(curves.get(name, {}), metric, out.parent / f"{stem}_{name}.png", title):
            figures.append(name)
    if plot_pretraining(summary, out.parent / f"{stem}_pretraining.png"):
        figures.append("pretraining")
    summary["meta"]["figures"] = sorted(figures)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    text = markdown(summary, stem)
    out.write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Re-render a benchmark report (markdown and curves) from its JSON.")
    parser.add_argument("summary", help="RESULTS.json written by benchmarks.compare")
    args = parser.parse_args(argv)
    path = Path(args.summary)
    print(write(json.loads(path.read_text()), path.with_suffix(".md")))


if __name__ == "__main__":
    main()
