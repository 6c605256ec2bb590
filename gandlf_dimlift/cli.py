"""`gandlf-dimlift`: list the plugin architectures, check the installation, run a demo, cut volumes into slices,
explain predictions.

Every command ends a failure with one readable message on stderr and a non-zero exit; `--debug` (or
GANDLF_DIMLIFT_DEBUG=1) shows the traceback instead. This module imports nothing heavy at start, so `doctor` and
the error messages work when torch, numpy or GaNDLF are broken.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HUB_HOST = ("download.pytorch.org", 443)
DEBUG_VARIABLE = "GANDLF_DIMLIFT_DEBUG"
PROBE_TIMEOUT_S = 120
FULL_TIMEOUT_S = 900


class CommandError(RuntimeError):
    """A failure whose message already names the problem and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# list


def command_list(args: argparse.Namespace) -> int:
    """Prints every plugin architecture of the `gandlf.models` group with its declared options."""
    import warnings

    from gandlf_dimlift._startup import failures_by_cause
    from gandlf_dimlift.registry import failures, load_entries

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # failures are listed below, one line per cause
        entries = load_entries()
    if entries:  # the builder imports torch: only once a plugin loaded (with torch broken none does)
        from gandlf_dimlift.models.builder import Architecture
    for entry in sorted(entries, key=lambda e: e.key):
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
    causes = failures_by_cause([(f.key, f.distribution, f.error) for f in failures])
    for (distribution, error), keys in causes.items():
        print(f"{', '.join(keys)}  (from {distribution})  FAILED TO LOAD: {error}")
    if causes:
        print("Run `gandlf-dimlift doctor` to see which part of the installation is broken.")
    return 1 if causes else 0


# ---------------------------------------------------------------------------------------------------------------
# doctor

# Each probe runs in its own fresh interpreter, all at once: a broken (or crashing) package takes out only its own
# line, and the slowest import (torch, a few seconds) bounds the default check.
PROBES = {
    "numpy": "import numpy; print(numpy.__version__)",
    "torch": (
        "import torch; print(torch.__version__); cuda = torch.cuda.is_available(); print(cuda); "
        "print(', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else ''); "
        "print(torch.hub.get_dir())"
    ),
    "SimpleITK": "import SimpleITK; print(SimpleITK.Version_VersionString())",
    "GaNDLF": (
        "import importlib.metadata as m, importlib.util as u, GANDLF; "
        "assert u.find_spec('GANDLF.models'), 'GANDLF.models is missing'; print(m.version('GANDLF'))"
    ),
    "startup hook": (
        "import sys; print(' '.join(type(f).__name__ for f in sys.meta_path if 'Gandlf' in type(f).__name__))"
    ),
    "plugin architectures": (
        "import json, warnings; warnings.simplefilter('ignore'); "
        "from gandlf_dimlift.registry import failures, load_entries; "
        "print(json.dumps([[e.key, e.distribution] for e in load_entries()])); "
        "print(json.dumps([[f.key, f.distribution, f.error] for f in failures]))"
    ),
}
# The full check: what gandlf_run does first (import all of GaNDLF, whose import the hook answers by registering),
# then GaNDLF's config validation and model build for every demo config.
FULL_PROBE = """
import json, tempfile, time, warnings
warnings.simplefilter("ignore")
start = time.time()
import GANDLF.models as models
from GANDLF.config_manager import ConfigManager
from gandlf_dimlift.demo import DEMOS, demo_config
from gandlf_dimlift.synthetic import write_config
print(json.dumps({"keys": sorted(k for k in models.global_models_dict if "dimlift" in k),
                  "seconds": round(time.time() - start, 1)}), flush=True)
for key in sorted(DEMOS):
    start = time.time()
    try:
        with tempfile.TemporaryDirectory() as folder:
            parameters = ConfigManager(str(write_config(demo_config(key), folder + "/config.yaml")))
        parameters["problem_type"] = DEMOS[key].task
        parameters["model"].setdefault("num_classes", len(parameters["model"]["class_list"]))
        model = models.get_model(parameters)
        detail = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters"
        ok = True
    except Exception as error:
        detail, ok = " ".join(f"{type(error).__name__}: {error}".split())[:300], False
    print(json.dumps({"build": key, "ok": ok, "detail": detail, "seconds": round(time.time() - start, 1)}),
          flush=True)
"""


def _probe_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GANDLF_DIMLIFT_DISABLE"}
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _start_probe(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_probe_environment(), stdin=subprocess.DEVNULL)


def _finish_probe(process: subprocess.Popen, timeout: float) -> tuple[bool, list[str]]:
    """(ok, stdout lines) of a probe, or (False, [the error's last line]) when it failed or timed out."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return False, [f"no answer within {timeout:.0f} s (killed)"]
    if process.returncode != 0:
        lines = [line.strip() for line in err.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {process.returncode}"
        if process.returncode < 0:
            last = f"the interpreter crashed (signal {-process.returncode}) while importing it"
        return False, [last[:300]]
    return True, out.splitlines()


def _hub_reachable(result: list) -> None:
    try:
        socket.create_connection(HUB_HOST, timeout=3).close()
        result.append(None)
    except OSError as error:
        result.append(error)


def _gandlf_requirement(package: str) -> str:
    """GaNDLF's requirement for `package` (e.g. 'torch==2.7.1'), or the bare name when GaNDLF's metadata lacks it."""
    from importlib.metadata import requires

    try:
        found = [r.split(";")[0] for r in requires("GANDLF") or [] if r.lower().startswith(package.lower())]
    except Exception:  # noqa: BLE001 - GaNDLF not installed
        found = []
    exact = [r for r in found if r[len(package):len(package) + 2] in ("==", ">=", "<=", "!=", "~=")]
    return ",".join(exact) if exact else package


def _hook_files() -> list[Path]:
    import site

    folders = site.getsitepackages() + [site.getusersitepackages()]
    return [Path(f) / "gandlf_dimlift_hook.pth" for f in folders if (Path(f) / "gandlf_dimlift_hook.pth").is_file()]


class _Report:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.broken: list[str] = []

    def check(self, label: str, ok: bool, detail: str, fatal: bool = True) -> None:
        mark = "ok" if ok else ("BROKEN" if fatal else "warning")
        self.lines.append(f"{label:<22} {mark:<8} {detail}")
        if fatal and not ok and label not in self.broken:
            self.broken.append(label)


def command_doctor(args: argparse.Namespace) -> int:
    """Prints a report of the installation; exits 1 when something is broken."""
    from gandlf_dimlift import __version__

    started = time.perf_counter()
    processes = {label: _start_probe(code) for label, code in PROBES.items()}
    full = _start_probe(FULL_PROBE) if args.full else None
    hub: list = []
    hub_thread = threading.Thread(target=_hub_reachable, args=(hub,), daemon=True)
    hub_thread.start()
    results = {label: _finish_probe(process, PROBE_TIMEOUT_S) for label, process in processes.items()}

    report = _Report()
    report.lines.append(f"gandlf-dimlift  {__version__}  (Python {sys.version.split()[0]}, {sys.executable})")
    hub_dir = _package_checks(report, results)
    _hook_checks(report, results["startup hook"])
    _plugin_checks(report, results["plugin architectures"])
    if full is not None:
        _full_checks(report, full)
    else:
        report.lines.append(f"{'registration':<22} {'skipped':<8} importing all of GaNDLF as gandlf_run does takes "
                            "10-30 s: `gandlf-dimlift doctor --full` runs it and builds every demo model")
    if hub_dir is not None:
        cache = hub_dir / "checkpoints"
        cached = sorted(p.name for p in cache.glob("*")) if cache.is_dir() else []
        listed = f": {', '.join(cached[:5])}" if cached else ""
        report.check("weights cache", True, f"{cache} ({len(cached)} files{listed})")
    hub_thread.join(timeout=5)
    if hub and hub[0] is None:
        report.check("model hub", True, f"{HUB_HOST[0]} reachable", fatal=False)
    else:
        why = hub[0] if hub else "no answer within 5 s"
        report.check("model hub", False, f"{HUB_HOST[0]} unreachable ({why}); pretrained tags need files in the "
                     "cache or pretrained: <path>", fatal=False)
    print("\n".join(report.lines))
    status = f"BROKEN ({', '.join(report.broken)})" if report.broken else "ok"
    print(f"\nstatus: {status}  ({time.perf_counter() - started:.1f} s)")
    return 1 if report.broken else 0


def _package_checks(report: _Report, results: dict[str, tuple[bool, list[str]]]) -> Path | None:
    """numpy, SimpleITK, torch (and CUDA), GaNDLF; returns torch's hub folder when torch works."""
    from importlib.metadata import PackageNotFoundError, version

    for package in ("numpy", "SimpleITK"):
        ok, out = results[package]
        report.check(package, ok, out[0] if ok else f"cannot be imported: {out[0]}; reinstall it "
                     f"(pip install --force-reinstall '{_gandlf_requirement(package)}')")
    ok, out = results["torch"]
    hub_dir = None
    if ok:
        report.check("torch", True, out[0])
        report.check("CUDA", out[1] == "True", out[2] if out[1] == "True" else "not available (CPU only)", fatal=False)
        hub_dir = Path(out[3])
    else:
        report.check("torch", False, f"cannot be imported: {out[0]}; reinstall the torch GaNDLF pins (pip install "
                     f"--force-reinstall '{_gandlf_requirement('torch')}', or its CPU-only build: see the README)")
    ok, out = results["GaNDLF"]
    try:
        installed = version("GANDLF")
    except PackageNotFoundError:
        installed = None
    if installed is None:
        report.check("GaNDLF", False, "not installed; pip install gandlf==0.1.5")
    elif not ok:
        report.check("GaNDLF", False, f"{installed} installed but cannot be imported: {out[0]}; "
                     "pip install --force-reinstall gandlf==0.1.5")
    elif installed != "0.1.5":
        report.check("GaNDLF", False, f"{installed}; gandlf-dimlift needs 0.1.5: pip install gandlf==0.1.5")
    else:
        report.check("GaNDLF", True, f"{installed} (package import only; `--full` imports all of it)")
    return hub_dir


def _hook_checks(report: _Report, result: tuple[bool, list[str]]) -> None:
    """The .pth file, and whether it arms the hook in a fresh interpreter."""
    from gandlf_dimlift import _startup

    hook_files = _hook_files()
    report.check("startup hook file", bool(hook_files), str(hook_files[0]) if hook_files else
                 "gandlf_dimlift_hook.pth is missing from site-packages; reinstall with pip install gandlf-dimlift")
    ok, out = result
    finders = out[0].split() if ok and out else []
    if _startup.disabled():
        report.check("startup hook", False, f"{_startup.DISABLE_VARIABLE} is set: call gandlf_dimlift.register() "
                     "yourself", fatal=False)
    elif "GandlfModelsFinder" in finders:
        report.check("startup hook", True, "armed in a fresh interpreter")
    elif "GandlfDimliftImportFailure" in finders:
        report.check("startup hook", False, "the gandlf_dimlift package fails to import at start-up; reinstall "
                     "gandlf-dimlift")
    else:
        report.check("startup hook", False, "not armed in a fresh interpreter (the .pth file is not processed); "
                     "reinstall with pip install gandlf-dimlift, or call gandlf_dimlift.register() before GaNDLF")


def _plugin_checks(report: _Report, result: tuple[bool, list[str]]) -> None:
    """Every `gandlf.models` entry point loads; failures one line per cause."""
    from gandlf_dimlift._startup import failures_by_cause

    ok, out = result
    if not ok:
        report.check("plugin architectures", False, f"the registry cannot load: {out[0]}")
        return
    entries, failures = json.loads(out[0]), json.loads(out[1])
    if entries:
        report.check("plugin architectures", True, " ".join(sorted(key for key, _ in entries)))
    for (distribution, error), keys in failures_by_cause(failures).items():
        verb = "fail" if len(keys) > 1 else "fails"
        report.check("plugin architectures", False, f"{', '.join(keys)} of {distribution} {verb} to load: {error}")
    if not entries and not failures:
        report.check("plugin architectures", False, "no gandlf.models entry point is installed; reinstall "
                     "gandlf-dimlift")


def _full_checks(report: _Report, process: subprocess.Popen) -> None:
    ok, out = _finish_probe(process, FULL_TIMEOUT_S)
    if not ok:
        report.check("registration", False, f"importing GANDLF.models failed: {out[0]}")
        return
    records = [json.loads(line) for line in out if line.startswith("{")]
    first = records[0] if records else {"keys": [], "seconds": 0}
    report.check("registration", bool(first["keys"]), f"{' '.join(first['keys']) or 'no plugin key registered'} "
                 f"(GANDLF.models imported in {first['seconds']} s)")
    for record in records[1:]:
        report.check("model build", record["ok"], f"{record['build']}: {record['detail']} ({record['seconds']} s: "
                     "GaNDLF's config validation and get_model on its demo config)")


# ---------------------------------------------------------------------------------------------------------------
# demo, slices, explain


def command_demo(args: argparse.Namespace) -> int:
    from gandlf_dimlift.demo import run_demo

    print(run_demo(Path(args.directory), architecture=args.architecture, epochs=args.epochs, transfer=args.transfer))
    return 0


def command_slices(args: argparse.Namespace) -> int:
    from gandlf_dimlift.slices import cut_slices, describe

    table = cut_slices(args.inputdata, args.outputdir, axis=args.axis, every=args.every, skip_empty=args.skip_empty)
    print(describe(table, args.axis))
    return 0


def command_explain(args: argparse.Namespace) -> int:
    from gandlf_dimlift.explain import describe, explain

    result = explain(args.config, args.modeldir, args.inputdata, args.outputdir, device=args.device, top_k=args.top_k)
    print(describe(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=f"show the full traceback of a failure (or set {DEBUG_VARIABLE}=1)")
    parser = argparse.ArgumentParser(prog="gandlf-dimlift", description=__doc__.split("\n\n")[0], parents=[debug])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="plugin architectures and their model: options",
                        parents=[debug]).set_defaults(run=command_list)
    doctor = commands.add_parser("doctor", help="check the installation (a few seconds)", parents=[debug])
    doctor.add_argument("--full", action="store_true", help="also import all of GaNDLF as gandlf_run does and build "
                        "every demo model (about a minute)")
    doctor.set_defaults(run=command_doctor)

    demo = commands.add_parser("demo", help="train and infer with gandlf_run on a small synthetic dataset",
                               parents=[debug])
    demo.add_argument("directory", help="a new folder for the data, configs, models and predictions")
    demo.add_argument("--architecture", default="dimlift_smp", help="plugin architecture: dimlift_smp (default), "
                      "dimlift_dxnet, dimlift_omnianet or dimlift_slice_attention")
    demo.add_argument("--transfer", action="store_true", help="with dimlift_dxnet: train Omnia-Net on 2D slices "
                      "first, then DX-Net from its checkpoint")
    demo.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    demo.set_defaults(run=command_demo)

    slices = commands.add_parser("slices", help="cut the volumes of a GaNDLF CSV into 2D slices and a 2D CSV",
                                 parents=[debug])
    slices.add_argument("-i", "--inputdata", required=True, help="GaNDLF data CSV of 3D volumes")
    slices.add_argument("-o", "--outputdir", required=True, help="folder for the slices and slices_2d.csv")
    slices.add_argument("--axis", default="z", choices=["x", "y", "z"], help="axis of GaNDLF's (X, Y, Z) layout to "
                        "cut across (default z, the last)")
    slices.add_argument("--every", type=int, default=1, help="keep every n-th slice (default 1: all)")
    slices.add_argument("--skip-empty", action="store_true", help="leave out slices whose label is all background")
    slices.set_defaults(run=command_slices)

    explain = commands.add_parser("explain", help="per-slice weights of a trained dimlift_slice_attention model",
                                  parents=[debug])
    explain.add_argument("-c", "--config", required=True, help="GaNDLF YAML the model was trained with")
    explain.add_argument("-m", "--modeldir", required=True, help="model directory written by gandlf_run training")
    explain.add_argument("-i", "--inputdata", required=True, help="GaNDLF data CSV of the subjects to explain")
    explain.add_argument("-o", "--outputdir", required=True, help="folder for slice_weights.csv, PNGs and NIfTIs")
    explain.add_argument("-d", "--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    explain.add_argument("--top-k", type=int, default=3, help="top-weighted slices shown per view (default 3)")
    explain.set_defaults(run=command_explain)
    return parser


def _debugging(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in (
        "", "0", "false", "no")


def _failure_message(error: BaseException) -> str:
    """One readable message for a failure: ours say what to do; others get their type and a pointer to --debug."""
    module = type(error).__module__ or ""
    if module.startswith("gandlf_dimlift") or isinstance(error, CommandError):
        return str(error)
    if isinstance(error, ImportError):
        name = getattr(error, "name", None) or _raising_package(error) or "a dependency"
        return (f"cannot import {name} ({type(error).__name__}: {' '.join(str(error).split())}); the installation is "
                "broken: run `gandlf-dimlift doctor` to see which package.")
    if isinstance(error, OSError):
        return f"{type(error).__name__}: {error}"
    text = " ".join(str(error).split())[:600]
    return f"{type(error).__name__}: {text} (unexpected: rerun with --debug for the traceback and report it)"


def _raising_package(error: BaseException) -> str | None:
    """The top-level package whose code raised `error` (a package that fails inside its own import)."""
    traceback, name = error.__traceback__, None
    while traceback is not None:
        name = traceback.tb_frame.f_globals.get("__name__", name)
        traceback = traceback.tb_next
    return name.split(".")[0] if name and name != "__main__" else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"gandlf-dimlift {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure ends as one message, unless debugging
        if _debugging(args):
            raise
        print(f"gandlf-dimlift {args.command}: error: {_failure_message(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
