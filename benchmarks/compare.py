"""Train GaNDLF baselines and plugin architectures on the same data and budget, with the real `gandlf_run`.

One command runs every experiment on one MNI152-derived dataset (`benchmarks.data`) and writes `RESULTS.md`,
`RESULTS.json` (issue 13's shape, see `benchmarks.report`) and PNG curves:

- detection (lesion present / absent, the whole volume): GaNDLF's 3D `resnet18` and `densenet121`,
  `dimlift_slice_attention` with attention, gated, mean and max pooling, and the `dimlift_smp` classifier (acs):
  test AUC with its 95 % bootstrap interval, accuracy;
- explanation score of every slice attention row (`benchmarks.explanation`) with a picture of the best and the
  worst explanation;
- tissue segmentation: GaNDLF's `resunet` and `imagenet_unet`, `dimlift_smp` U-Nets (acs, inflate, 2.5d), DX-Net:
  test Dice (mean of grey and white matter) with its interval;
- 2D pretraining (`benchmarks.pretraining`): for slice attention, `dimlift_smp` (acs, inflate) and DX-Net, the 3D
  row from random weights against the same row initialised from a 2D network the package trained on slices of
  the same training volumes, at every `--fractions` of the training subjects: the gain with its paired interval,
  the 2D stage's wall time beside the 3D time it saves.

Every row writes a GaNDLF config, trains with ``gandlf_run -c config.yaml -i train.csv,validation.csv -t True``
in a watched subprocess, and infers on the test split with ``gandlf_run ... -t False`` (`benchmarks.runner`).
Every row's outputs stay in ``--work``; ``--reuse`` skips rows already finished there with the same config.

Usage::

    python -m benchmarks.compare --quick                   # minutes on 2 CPU cores, writes RESULTS_quick.{md,json}
    python -m benchmarks.compare --data DATA --work WORK   # the full run (see benchmarks/README.md)
    python -m benchmarks.compare ... --estimate-from CALIBRATION_WORK/results.json   # predicted wall time
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import data as bdata
from benchmarks import explanation, pretraining, report
from benchmarks.runner import ROOT, Settings, row_by_name, train_and_test

LOGGER = logging.getLogger("benchmarks.compare")

SECTIONS = ("detection", "segmentation", "pretraining")
DETECTION_ROWS = ("resnet18", "densenet121", "dimlift_slice_attention/attention", "dimlift_slice_attention/gated",
                  "dimlift_slice_attention/mean", "dimlift_slice_attention/max", "dimlift_smp/cls")
SEGMENTATION_ROWS = ("resunet", "imagenet_unet", "dimlift_smp/acs", "dimlift_smp/inflate", "dimlift_smp/2.5d",
                     "dimlift_dxnet/b0")
FAMILIES = tuple(f.name for f in pretraining.FAMILIES)
FRACTIONS = (1.0, 0.25)
# --quick: one GaNDLF baseline and the plugin rows the pretraining experiment needs, one fraction
QUICK_DETECTION_ROWS = ("resnet18", "dimlift_slice_attention/attention", "dimlift_smp/cls")
QUICK_SEGMENTATION_ROWS = ("dimlift_dxnet/b0",)
QUICK_FAMILIES = ("dimlift_slice_attention", "dimlift_smp/acs", "dimlift_dxnet")
QUICK_FRACTIONS = (1.0,)
QUICK_SETTINGS = {"epochs": 1, "detection_epochs": 1, "pretrain_epochs": 1, "batch": 2, "segmentation_subjects": None,
                  "timeout": 900}


# ------------------------------------------------------------------------------------------------ estimate


def estimate(calibration: dict[str, Any], settings: Settings) -> tuple[str, float]:
    """Predicted wall time of every row from a calibration run of the same command with fewer epochs.

    Per row: the calibration's training + testing wall time, plus (this budget's epochs − the calibration's)
    × its measured epoch time, plus its explanation run. Data generation and slice writing are left out.

    Args:
        calibration: The `results.json` of the calibration run (in its --work).
        settings: The budget to predict.

    Returns:
        A markdown table and the total in seconds.
    """
    records = [*calibration["results"].get("detection", []), *calibration["results"].get("segmentation", [])]
    trained = {r["name"] for r in records}
    more = calibration["results"].get("pretraining") or {}
    for sources in more.get("sources", {}).values():
        records += list(sources.values())
    records += [r for name, r in more.get("rows", {}).items() if name not in trained]
    lines = ["| row | task | calibration epochs | epoch s | calibration s | epochs | estimated min |",
             "|---|---|---|---|---|---|---|"]
    total = 0.0
    for record in records:
        epochs = settings.budget(record["task"])[0]
        measured = sum(record.get(k, 0.0) for k in ("train_wall_s", "infer_wall_s", "explain_wall_s"))
        seconds = measured + (epochs - record.get("epochs", epochs)) * record.get("epoch_s", 0.0)
        total += seconds
        lines.append(f"| {record['name']} | {record['task']} | {record.get('epochs')} | "
                     f"{record.get('epoch_s', 0.0):.1f} | {measured:.0f} | {epochs} | {seconds / 60:.1f} |")
    lines.append(f"| **total** | | | | | | **{total / 60:.0f}** |")
    return "\n".join(lines), total


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="dataset directory (generated when it has no dataset.json)")
    parser.add_argument("--work", default=None, help="directory for configs, model dirs and logs")
    parser.add_argument("--out", default=None, help="markdown report; the JSON summary goes beside it "
                        "(benchmarks/RESULTS.md; quick: RESULTS_quick.md)")
    bdata.add_arguments(parser)
    defaults = Settings()
    parser.add_argument("--epochs", type=int, default=None, help=f"segmentation epochs ({defaults.epochs})")
    parser.add_argument("--lr", type=float, default=None, help=f"segmentation learning rate ({defaults.learning_rate})")
    parser.add_argument("--detection-epochs", type=int, default=None,
                        help=f"detection epochs ({defaults.detection_epochs})")
    parser.add_argument("--detection-lr", type=float, default=None,
                        help=f"detection learning rate ({defaults.detection_learning_rate})")
    parser.add_argument("--pretrain-epochs", type=int, default=None,
                        help=f"epochs of the 2D pretraining networks ({defaults.pretrain_epochs})")
    parser.add_argument("--batch", type=int, default=None, help=f"batch size ({defaults.batch})")
    parser.add_argument("--patch", type=int, default=None, help="cubic segmentation patch (the whole volume)")
    parser.add_argument("--samples-per-volume", type=int, default=None, help="segmentation patches per volume (1)")
    parser.add_argument("--segmentation-subjects", type=int, default=None,
                        help=f"train the segmentation rows on this many training subjects "
                             f"({defaults.segmentation_subjects}; 0: all)")
    parser.add_argument("--final-layer", choices=("logits", "softmax"), default=None,
                        help="final layer of the classification rows, with GaNDLF's cel loss (logits)")
    parser.add_argument("--timeout", type=int, default=None, help=f"seconds per gandlf_run call ({defaults.timeout})")
    parser.add_argument("--max-memory-gib", type=float, default=None,
                        help=f"kill a gandlf_run whose process tree exceeds this much RAM ({defaults.max_memory_gib})")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of every gandlf_run (default: the environment's). Use 1 when other "
                             "jobs share the cores: oversubscribed threads slowed a training step 10x here")
    parser.add_argument("--sections", nargs="*", choices=SECTIONS, default=None, help=f"what to run ({SECTIONS})")
    parser.add_argument("--detection-rows", nargs="*", default=None, help=f"({' '.join(DETECTION_ROWS)})")
    parser.add_argument("--segmentation-rows", nargs="*", default=None, help=f"({' '.join(SEGMENTATION_ROWS)})")
    parser.add_argument("--families", nargs="*", default=None, help=f"pretraining families ({' '.join(FAMILIES)})")
    parser.add_argument("--fractions", type=float, nargs="*", default=None,
                        help=f"fractions of the training subjects for the pretraining experiment {FRACTIONS}")
    parser.add_argument("--slices-every", type=int, default=2,
                        help="keep every n-th brain slice for the 2D segmentation source (2)")
    parser.add_argument("--reuse", action="store_true", help="reuse rows already finished in --work")
    parser.add_argument("--estimate-from", default=None, metavar="RESULTS_JSON",
                        help="only print the predicted wall time, from the results.json of a calibration run")
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> Settings:
    values: dict[str, Any] = dict(QUICK_SETTINGS) if args.quick else {}
    for key, arg in (("epochs", "epochs"), ("batch", "batch"), ("patch", "patch"),
                     ("samples_per_volume", "samples_per_volume"), ("learning_rate", "lr"), ("timeout", "timeout"),
                     ("max_memory_gib", "max_memory_gib"), ("detection_epochs", "detection_epochs"),
                     ("detection_learning_rate", "detection_lr"), ("pretrain_epochs", "pretrain_epochs"),
                     ("final_layer", "final_layer"), ("segmentation_subjects", "segmentation_subjects")):
        if getattr(args, arg) is not None:
            values[key] = getattr(args, arg)
    if values.get("segmentation_subjects") == 0:
        values["segmentation_subjects"] = None
    return Settings(**values)


def prepare_data(args: argparse.Namespace, data_dir: Path, settings: Settings) -> dict[str, Any]:
    """Generates the dataset unless `data_dir` holds it; checks it matches the options and the batch size."""
    wanted = bdata.settings_from_args(args)
    if not (data_dir / "dataset.json").exists():
        LOGGER.info("generating data into %s", data_dir)
        bdata.generate(data_dir, wanted)
    meta = json.loads((data_dir / "dataset.json").read_text())
    asked = asdict(wanted)
    keys = ("n_subjects", "spacing", "seed", "lesion_radius_mm", "lesion_contrast")
    differ = {k: (asked[k], meta[k]) for k in keys
              if getattr(args, k, None) is not None and _numbers(asked[k]) != _numbers(meta[k])}
    if differ:
        raise SystemExit(f"{data_dir} already holds a dataset with other settings (asked, found): {differ}; "
                         "choose another --data directory or drop the data options.")
    if settings.patch and any(s < settings.patch for s in meta["shape"]):
        raise SystemExit(f"--patch {settings.patch} is larger than the volume {meta['shape']}; "
                         f"choose --patch <= {min(meta['shape'])}")
    n_train = len(meta["splits"]["train"])
    if (n_train * settings.samples_per_volume) % settings.batch or n_train % settings.batch:
        raise SystemExit(
            f"{n_train} training subjects ({settings.samples_per_volume} samples each) is not a multiple of --batch "
            f"{settings.batch}: GaNDLF would end each epoch with a smaller batch, and a batch of one breaks "
            "batch-normalised encoders with a 1x1 bottleneck. Change --subjects, --samples-per-volume or --batch."
        )
    return meta


def _numbers(value: Any) -> list[float]:
    return [float(v) for v in (value if isinstance(value, list | tuple) else [value])]


def add_explanations(records: Sequence[dict[str, Any]], test_csv: Path, data_dir: Path, timeout: int) -> None:
    """Adds the explanation score to every slice attention record that has none (reused records keep theirs)."""
    for record in records:
        if record.get("architecture") != "dimlift_slice_attention" or "error" in record or "explanation" in record:
            continue
        folder = Path(record["folder"])
        start = time.perf_counter()
        try:
            record["explanation"] = explanation.explanation_score(folder / "config.yaml", folder / "model", test_csv,
                                                                  data_dir, folder / "explain", timeout)
        except Exception as error:  # noqa: BLE001 - shown in the table
            record["explanation_error"] = " ".join(str(error).split())[:500]
        record["explain_wall_s"] = time.perf_counter() - start
        (folder / "result.json").write_text(json.dumps({k: v for k, v in record.items() if k != "reused"}, indent=1))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.time()
    settings = settings_of(args)
    if args.estimate_from:
        text, _ = estimate(json.loads(Path(args.estimate_from).read_text()), settings)
        print(text)
        return {}
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every gandlf_run
    work = Path(args.work or ("/tmp/dimlift_bench_quick" if args.quick else "/tmp/dimlift_bench")).resolve()
    data_dir = Path(args.data).resolve() if args.data else work / "data"
    out = Path(args.out or ROOT / "benchmarks" / ("RESULTS_quick.md" if args.quick else "RESULTS.md"))
    meta_data = prepare_data(args, data_dir, settings)
    shape = tuple(meta_data["shape"])
    sections = SECTIONS if args.sections is None else tuple(args.sections)
    det_rows = QUICK_DETECTION_ROWS if args.quick else DETECTION_ROWS
    det_rows = det_rows if args.detection_rows is None else tuple(args.detection_rows)
    seg_rows = QUICK_SEGMENTATION_ROWS if args.quick else SEGMENTATION_ROWS
    seg_rows = seg_rows if args.segmentation_rows is None else tuple(args.segmentation_rows)
    families = QUICK_FAMILIES if args.quick else FAMILIES
    families = families if args.families is None else tuple(args.families)
    fractions = QUICK_FRACTIONS if args.quick else FRACTIONS
    fractions = fractions if args.fractions is None else tuple(args.fractions)
    csvs = {task: bdata.task_csvs(data_dir, task) for task in bdata.TASKS}
    if settings.segmentation_subjects:  # a seeded subset, the same for every segmentation row
        csvs["segmentation"]["train"] = pretraining.subset_csv(
            csvs["segmentation"]["train"], settings.segmentation_subjects, settings.batch,
            work / "subsets" / f"segmentation_train_{settings.segmentation_subjects}.csv")
    patches = {"detection": shape, "segmentation": (settings.patch,) * 3 if settings.patch else shape}

    results: dict[str, Any] = {}
    if "detection" in sections:
        results["detection"] = [train_and_test(row_by_name(n), "detection", csvs["detection"], shape, settings, work,
                                               args.reuse) for n in det_rows]
        add_explanations(results["detection"], csvs["detection"]["test"], data_dir, settings.timeout)
    if "segmentation" in sections:
        results["segmentation"] = [train_and_test(row_by_name(n), "segmentation", csvs["segmentation"],
                                                  patches["segmentation"], settings, work, args.reuse)
                                   for n in seg_rows]
    if "pretraining" in sections:
        trained = {r["name"]: r for r in [*results.get("detection", []), *results.get("segmentation", [])]}
        results["pretraining"] = pretraining.run(
            [pretraining.family_by_name(f) for f in families], fractions, data_dir, csvs, patches, settings, work,
            args.reuse, trained, slices_every=args.slices_every)
        add_explanations(list(results["pretraining"]["rows"].values()), csvs["detection"]["test"], data_dir,
                         settings.timeout)

    import torch

    records = [*results.get("detection", []), *results.get("segmentation", [])]
    extra = results.get("pretraining") or {}
    records += [r for s in extra.get("sources", {}).values() for r in s.values()]
    records += [r for name, r in extra.get("rows", {}).items() if name not in {x["name"] for x in records}]
    meta = {
        "command": "python -m benchmarks.compare " + shlex.join(argv),
        "quick": bool(args.quick),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                   f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        "wall_min": (time.time() - started) / 60,
        "summed_min": sum(r.get(k, 0) for r in records for k in ("train_wall_s", "infer_wall_s", "explain_wall_s"))
        / 60,
        "reused": sum(1 for r in records if r.get("reused")),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "data": meta_data,
        "splits": "/".join(str(len(meta_data["splits"][s])) for s in bdata.SPLITS),
        "settings": asdict(settings),
        "figures": [],
    }
    (work / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    if explanation.plot(results.get("detection", []), csvs["detection"]["test"],
                        out.parent / f"{out.stem}_explanation.png"):
        meta["figures"].append("explanation")
    text = report.write(report.summarize(meta, results), out)
    print(text)
    return results


if __name__ == "__main__":
    main()
