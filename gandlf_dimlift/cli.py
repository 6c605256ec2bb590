"""`gandlf-dimlift`: list the plugin architectures, check the installation, run a demo, explain predictions."""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import subprocess
import sys
from pathlib import Path

HUB_HOST = ("download.pytorch.org", 443)


def command_list(args: argparse.Namespace) -> int:
    """Prints every plugin architecture of the `gandlf.models` group with its declared options."""
    from gandlf_dimlift.models.builder import Architecture
    from gandlf_dimlift.registry import failures, load_entries

    for entry in sorted(load_entries(), key=lambda e: e.key):
        builder = entry.builder
        print(f"{entry.key}  (from {entry.distribution})")
        if isinstance(builder, Architecture):
            print(f"  {builder.summary}")
            print(f"  dimensions: {list(builder.dimensions)}; problems: {', '.join(builder.problem_types)}")
            print("  model: options")
            for option in builder.options:
                print(f"    {option.describe()}")
        else:
            print("  (options not declared by this plugin)")
        print()
    for failure in failures:
        print(f"{failure.key}  (from {failure.distribution})  FAILED TO LOAD: {failure.error}")
    return 1 if failures else 0


def _hook_files() -> list[Path]:
    import site

    folders = site.getsitepackages() + [site.getusersitepackages()]
    return [Path(f) / "gandlf_dimlift_hook.pth" for f in folders if (Path(f) / "gandlf_dimlift_hook.pth").is_file()]


def _hook_registers() -> tuple[bool, str]:
    """Whether a fresh interpreter that imports only GaNDLF sees the plugin keys (the hook at work)."""
    probe = "import GANDLF.models as m; print(' '.join(sorted(k for k in m.global_models_dict if 'dimlift' in k)))"
    env = {k: v for k, v in os.environ.items() if k != "GANDLF_DIMLIFT_DISABLE"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    keys = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    problem = " ".join(result.stderr.split())[-300:] if result.returncode or "WARNING" in result.stderr else ""
    return bool(keys) and not problem, keys or problem or "no plugin key registered"


def command_doctor(args: argparse.Namespace) -> int:
    """Prints a report of the installation; exits 1 when something is broken."""
    from importlib.metadata import version

    from gandlf_dimlift import __version__, _startup

    broken = []
    lines = [f"gandlf-dimlift  {__version__}"]

    def check(label: str, ok: bool, detail: str, fatal: bool = True) -> None:
        mark = "ok" if ok else ("BROKEN" if fatal else "warning")
        lines.append(f"{label:<22} {mark:<8} {detail}")
        if fatal and not ok:
            broken.append(label)

    try:
        import torch

        check("torch", True, torch.__version__)
        cuda = torch.cuda.is_available()
        devices = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else ""
        check("CUDA", cuda, devices or "not available (CPU only)", fatal=False)
    except Exception as error:  # noqa: BLE001
        check("torch", False, f"{type(error).__name__}: {error}")
    try:
        check("GaNDLF", True, version("GANDLF"))
    except Exception as error:  # noqa: BLE001
        check("GaNDLF", False, f"not installed ({error}); pip install gandlf==0.1.5")
    hook_files = _hook_files()
    check("startup hook file", bool(hook_files), str(hook_files[0]) if hook_files else "gandlf_dimlift_hook.pth "
          "is missing from site-packages; reinstall with pip install gandlf-dimlift")
    if _startup.disabled():
        check("startup hook", False, f"{_startup.DISABLE_VARIABLE} is set: call gandlf_dimlift.register() yourself",
              fatal=False)
    ok, detail = _hook_registers()
    check("registration", ok, detail)
    from gandlf_dimlift.registry import failures, load_entries

    load_entries()
    for failure in failures:
        check(f"plugin {failure.key}", False, f"{failure.distribution}: {failure.error}")
    import torch

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cached = sorted(p.name for p in cache.glob("*")) if cache.is_dir() else []
    check("weights cache", True, f"{cache} ({len(cached)} files{': ' + ', '.join(cached[:5]) if cached else ''})")
    try:
        socket.create_connection(HUB_HOST, timeout=3).close()
        check("model hub", True, f"{HUB_HOST[0]} reachable", fatal=False)
    except OSError as error:
        check("model hub", False, f"{HUB_HOST[0]} unreachable ({error}); pretrained tags need files in the cache "
              "or pretrained: <path>", fatal=False)
    print("\n".join(lines))
    print("\nstatus: " + (f"BROKEN ({', '.join(broken)})" if broken else "ok"))
    return 1 if broken else 0


def command_demo(args: argparse.Namespace) -> int:
    from gandlf_dimlift.demo import run_demo

    return run_demo(Path(args.directory), architecture=args.architecture, epochs=args.epochs)


def command_explain(args: argparse.Namespace) -> int:
    explain = importlib.import_module("gandlf_dimlift.explain")
    return explain.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gandlf-dimlift", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="plugin architectures and their model: options").set_defaults(run=command_list)
    commands.add_parser("doctor", help="check the installation").set_defaults(run=command_doctor)
    demo = commands.add_parser("demo", help="train and infer with gandlf_run on a small synthetic dataset")
    demo.add_argument("directory", help="folder for the data, config, model and predictions")
    demo.add_argument("--architecture", default="dimlift_smp", help="plugin architecture (default dimlift_smp)")
    demo.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    demo.set_defaults(run=command_demo)
    explain = commands.add_parser("explain", help="per-slice weights of a trained dimlift_slice_attention model")
    importlib.import_module("gandlf_dimlift.explain").add_arguments(explain)
    explain.set_defaults(run=command_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
