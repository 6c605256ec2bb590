"""`gandlf-dimlift demo DIR`: a synthetic dataset, a config, and the real `gandlf_run` training and inference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from gandlf_dimlift.synthetic import make_config, write_config, write_dataset

# The embedded default: a 3D segmentation U-Net on a resnet18 encoder lifted with ACS. Random encoder weights,
# because the demo must run without network access; real runs would use `pretrained: imagenet`.
DEMO_OPTIONS = {
    "dimlift_smp": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_name": "unet",
                    "decoder_channels": [32, 16, 8], "converter_type": "acs", "pretrained": False},
}


def _gandlf_run(arguments: list[str], log: Path) -> None:
    command = [str(Path(sys.executable).parent / "gandlf_run"), *arguments]
    with open(log, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if result.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"gandlf_run failed (exit {result.returncode}); full log: {log}\n{tail}")


def run_demo(directory: Path, architecture: str = "dimlift_smp", epochs: int = 2) -> int:
    """Writes the demo dataset and config, trains and infers with `gandlf_run`; returns an exit code."""
    directory = directory.resolve()
    if architecture not in DEMO_OPTIONS:
        print(f"The demo runs {list(DEMO_OPTIONS)}; got {architecture!r}.", file=sys.stderr)
        return 2
    data, model_dir, logs = directory / "data", directory / "model", directory / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=3, desc="demo", unit="step", bar_format="{desc}: {n}/{total} {bar} {postfix}")
    steps.set_postfix_str("writing 6 synthetic 32^3 NIfTI volumes")
    csv = write_dataset(data, "segmentation", n_subjects=6, shape=(32, 32, 32))
    config = make_config(architecture, "segmentation", num_epochs=epochs, model_options=DEMO_OPTIONS[architecture])
    config_path = write_config(config, directory / "config.yaml")
    steps.update()
    try:
        steps.set_postfix_str(f"training {architecture} with gandlf_run ({epochs} epochs)")
        _gandlf_run(["-c", str(config_path), "-i", str(csv), "-m", str(model_dir), "-t", "True", "-rt", "True",
                     "-d", "cpu"], logs / "train.log")
        steps.update()
        steps.set_postfix_str("inference with gandlf_run")
        _gandlf_run(["-c", str(config_path), "-i", str(csv), "-m", str(model_dir), "-t", "False", "-o",
                     str(directory / "predictions"), "-d", "cpu"], logs / "inference.log")
        steps.update()
    except RuntimeError as error:
        steps.close()
        print(error, file=sys.stderr)
        return 1
    steps.set_postfix_str("done")
    steps.close()
    masks = sorted((model_dir / "output_inference").rglob("*.nii.gz"))
    print(f"config:       {config_path}")
    print(f"data:         {csv}")
    print(f"checkpoint:   {model_dir / (architecture + '_best.pth.tar')}")
    print(f"predictions:  {len(masks)} masks under {model_dir / 'output_inference'}")
    print(f"logs:         {logs}")
    return 0
