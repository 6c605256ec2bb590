"""`gandlf-dimlift demo DIR`: a synthetic dataset, a config, and the real `gandlf_run` training and inference.

One demo per plugin architecture, each on the task it is made for, small enough for a few minutes on 2 CPU cores:

- `dimlift_smp`: 3D segmentation with a resnet18 U-Net lifted by ACS.
- `dimlift_dxnet`: 3D segmentation with DX-Net B0; with `--transfer`, first a 2D Omnia-Net on slices cut from the
  volumes (`gandlf-dimlift slices`), then DX-Net initialised from its checkpoint (encoder and decoder).
- `dimlift_omnianet`: 2D segmentation on slices cut from the volumes.
- `dimlift_slice_attention`: 3D classification, then `gandlf-dimlift explain` (slice weights as CSV, PNG, NIfTI).

Every demo starts from random weights (`pretrained: false`), because it must run without network access; the
summary says so and how to use ImageNet weights.
"""

from __future__ import annotations

import difflib
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# DX-Net and Omnia-Net share these options so that the 2D checkpoint fits the 3D model in the transfer demo;
# narrower decoder stages than the paper's keep the demo small.
EFFICIENTNET_OPTIONS = {"variant": "b0", "decoder_channels": [64, 32, 16, 8, 8], "pretrained": False}


@dataclass(frozen=True)
class Demo:
    """One `gandlf_run` training of the demo.

    Attributes:
        architecture: The plugin architecture key.
        task: segmentation or classification.
        dimension: 2 (trained on slices cut from the volumes) or 3.
        options: Keys merged into the config's `model:`.
        config: Top-level config overrides.
        summary: What the demo shows, for the console.
    """

    architecture: str
    task: str
    dimension: int
    options: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


DEMOS = {
    "dimlift_smp": Demo(
        "dimlift_smp", "segmentation", 3,
        {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_name": "unet", "decoder_channels": [32, 16, 8],
         "converter_type": "acs", "pretrained": False},
        summary="3D segmentation: a resnet18 U-Net lifted to 3D by ACS",
    ),
    "dimlift_dxnet": Demo(
        "dimlift_dxnet", "segmentation", 3, dict(EFFICIENTNET_OPTIONS),
        # Batches of two: a batch of one fails batch norm at DX-Net's 1-voxel bottleneck of a 32^3 patch.
        {"batch_size": 2}, summary="3D segmentation: DX-Net, EfficientNet-B0 inflated to 3D",
    ),
    "dimlift_omnianet": Demo(
        "dimlift_omnianet", "segmentation", 2, dict(EFFICIENTNET_OPTIONS), {"batch_size": 4},
        summary="2D segmentation on slices cut from the volumes: Omnia-Net, an EfficientNet-B0 U-Net",
    ),
    "dimlift_slice_attention": Demo(
        "dimlift_slice_attention", "classification", 3,
        {"encoder_name": "resnet18", "encoder_depth": 3, "slice_chunk_size": 16, "pretrained": False,
         # GaNDLF's cel is cross-entropy on the model output: logits, not softmax (see the README).
         "final_layer": "logits"},
        summary="3D classification with a 2D resnet18 on every slice and attention over slices, then explain",
    ),
}
SUBJECTS = 4  # even, so no training batch of one (two training, two validation subjects)
SHAPE = (32, 32, 32)
SLICE_EVERY = 8  # slices kept per volume for the 2D runs: 4 of 32


class DemoError(RuntimeError):
    """The demo cannot run (a bad argument, an unusable folder) or a `gandlf_run` step failed."""


def demo_config(architecture: str, epochs: int = 2, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The GaNDLF config a demo trains with (also what `gandlf-dimlift doctor --full` builds)."""
    from gandlf_dimlift.synthetic import make_config

    demo = DEMOS[architecture]
    patch = SHAPE[:2] if demo.dimension == 2 else SHAPE
    model_options = {**demo.options, **(options or {})}
    config = make_config(architecture, demo.task, patch_size=patch, dimension=demo.dimension, num_epochs=epochs,
                         model_options=model_options)
    config.update(demo.config)
    return config


def check_arguments(directory: Path, architecture: str, transfer: bool, epochs: int) -> None:
    """Raises DemoError for a bad demo argument, before anything is written."""
    if architecture not in DEMOS:
        near = difflib.get_close_matches(architecture, list(DEMOS), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise DemoError(f"--architecture {architecture!r} has no demo; choose one of {sorted(DEMOS)}.{hint}")
    if transfer and architecture != "dimlift_dxnet":
        raise DemoError("--transfer is the 2D -> 3D transfer of DX-Net: use it with --architecture dimlift_dxnet.")
    if epochs < 1:
        raise DemoError(f"--epochs {epochs}: train at least one epoch.")
    if directory.exists() and not directory.is_dir():
        raise DemoError(f"{directory} is a file; give a new folder for the demo.")
    if directory.is_dir() and any(directory.iterdir()):
        raise DemoError(f"{directory} is not empty; give a new folder (the demo writes its data, configs, models and "
                        "logs there).")
    if not _gandlf_run().is_file():
        raise DemoError(f"gandlf_run is not installed next to {sys.executable}; install GaNDLF 0.1.5 into this "
                        "environment (pip install gandlf==0.1.5).")


def _gandlf_run() -> Path:
    return Path(sys.executable).parent / "gandlf_run"


def _gandlf(arguments: list[str], log: Path) -> None:
    with open(log, "w") as handle:
        result = subprocess.run([str(_gandlf_run()), *arguments], stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    if result.returncode:
        raise DemoError(f"gandlf_run failed (exit {result.returncode}): {_last_error(log)}\nFull log: {log}")


def _last_error(log: Path) -> str:
    """The error at the end of a log: the lines after its last traceback's frames, else its last lines."""
    lines = [line.rstrip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        after = lines[starts[-1] + 1:]
        message = [line for line in after if not line.startswith((" ", "\t"))]
        return "\n".join(message[-5:]) or "(no message)"
    return "\n".join(lines[-5:]) or "(empty log)"


class _Steps:
    """A progress bar over the demo's steps, naming the running one."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="demo", unit="step", bar_format="{desc}: {n}/{total} {bar} {postfix}")

    def run(self, what: str, action: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.bar.set_postfix_str(what)
        result = action(*args, **kwargs)
        self.bar.update()
        return result

    def close(self) -> None:
        self.bar.set_postfix_str("done" if self.bar.n == self.bar.total else "stopped")
        self.bar.close()


def run_demo(directory: Path, architecture: str = "dimlift_smp", epochs: int = 2, transfer: bool = False) -> str:
    """Writes the demo dataset and configs, trains and infers with `gandlf_run`; returns the summary to print.

    Raises:
        DemoError: A bad argument (before anything is written) or a failed step (naming its log).
    """
    from gandlf_dimlift.slices import cut_slices
    from gandlf_dimlift.synthetic import write_config, write_dataset

    directory = Path(directory).resolve()
    check_arguments(directory, architecture, transfer, epochs)
    demo = DEMOS[architecture]
    logs = directory / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs = [DEMOS["dimlift_omnianet"], demo] if transfer else [demo]
    needs_slices = any(run.dimension == 2 for run in runs)
    explains = architecture == "dimlift_slice_attention"
    # data, slices when a run is 2D, one training per run, inference of the last run, explain for slice attention
    steps = _Steps(1 + needs_slices + len(runs) + 1 + explains)
    lines = []
    try:
        csv_3d = steps.run(f"writing {SUBJECTS} synthetic 32^3 NIfTI volumes", write_dataset, directory / "data",
                           demo.task, n_subjects=SUBJECTS, shape=SHAPE)
        lines.append(f"data:         {csv_3d} ({SUBJECTS} synthetic 32^3 volumes, {demo.task})")
        csv_2d = None
        if needs_slices:
            table = steps.run("cutting the volumes into 2D slices (gandlf-dimlift slices)", cut_slices, csv_3d,
                              directory / "slices", axis="z", every=SLICE_EVERY, progress=False)
            csv_2d = table.csv
            lines.append(f"2D slices:    {csv_2d} ({table.slices} slices, every {SLICE_EVERY}th slice along z; "
                         f"gandlf-dimlift slices -i {csv_3d} -o {csv_2d.parent} --axis z --every {SLICE_EVERY})")
        previous = None
        for run in runs:
            options = {"pretrained": str(previous)} if previous is not None else None
            config = demo_config(run.architecture, epochs, options)
            config_path = write_config(config, directory / f"config_{run.architecture}.yaml")
            data = csv_2d if run.dimension == 2 else csv_3d
            model_dir = directory / f"model_{run.architecture}"
            common = ["-c", str(config_path), "-i", str(data), "-m", str(model_dir), "-d", "cpu"]
            steps.run(f"training {run.architecture} with gandlf_run ({epochs} epochs)", _gandlf,
                      [*common, "-t", "True", "-rt", "True"], logs / f"train_{run.architecture}.log")
            checkpoint = model_dir / f"{run.architecture}_best.pth.tar"
            lines.append(f"{run.architecture}: {run.summary}")
            lines.append(f"  config:       {config_path}")
            lines.append(f"  checkpoint:   {checkpoint}")
            if transfer and run is not demo:
                previous = checkpoint
                continue
            predictions = directory / f"predictions_{run.architecture}"
            steps.run(f"inference with {run.architecture}", _gandlf, [*common, "-t", "False", "-o", str(predictions)],
                      logs / f"inference_{run.architecture}.log")
            lines.append("  predictions:  " + _predictions(run, model_dir, predictions))
            if explains:
                lines += steps.run("explaining with gandlf-dimlift explain", _explain, config_path, model_dir, csv_3d,
                                   directory / "explained")
    finally:
        steps.close()
    lines.append(f"logs:         {logs}")
    lines.append(_weights_note(transfer))
    return "\n".join(lines)


def _predictions(run: Demo, model_dir: Path, output: Path) -> str:
    if run.task == "segmentation":
        masks = sorted((model_dir / "output_inference").rglob("*.nii.gz"))
        return f"{len(masks)} masks under {model_dir / 'output_inference'}"
    tables = sorted(output.rglob("final_preds_and_avg_probs.csv"))
    return f"{tables[0]}" if tables else f"(no prediction table under {output})"


def _explain(config: Path, model_dir: Path, data: Path, output: Path) -> list[str]:
    from gandlf_dimlift.explain import explain

    result = explain(config, model_dir, data, output)
    return [
        f"  explanation:  {result.table} (slice weights)",
        f"                {len(result.pictures)} PNG, e.g. {result.pictures[0]}",
        f"                {len(result.volumes)} NIfTI weight volumes, e.g. {result.volumes[0]}",
    ]


def _weights_note(transfer: bool) -> str:
    start = (
        "weights:      DX-Net started from the trained 2D Omnia-Net checkpoint (encoder and decoder, dimensional "
        "transfer); Omnia-Net itself started from random weights"
        if transfer
        else "weights:      random initialisation"
    )
    return (
        f"{start} (pretrained: false), because the demo runs offline. For ImageNet weights set "
        "model.pretrained: imagenet in the config: smp downloads them into the torch hub cache, or place the file "
        "there offline (gandlf-dimlift doctor shows the cache)."
    )
