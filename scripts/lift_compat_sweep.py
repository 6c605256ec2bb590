"""Compatibility sweep: lift every segmentation-models-pytorch encoder in every mode.

Usage::

    python scripts/lift_compat_sweep.py                 # full sweep -> docs/compatibility.{json,md}
    python scripts/lift_compat_sweep.py --only resnet18,vgg11 --modes inflate,2.5d
    python scripts/lift_compat_sweep.py --render        # rebuild the markdown table from the json
    python scripts/lift_compat_sweep.py --merge --skip-done --shard 0/2   # resume, two shards at once

Each encoder is built with ``weights=None`` (no hub access) and lifted with
``gandlf_dimlift.lift.lift(encoder, mode)``, which runs its check pass (a 3D forward in eval mode) at
the probe size below; then one training-mode forward and backward on a ``(2, 3, S, S, S)`` input
checks that every feature map is 5D and every parameter gets a gradient. Every encoder runs in its own
subprocess with a timeout, so a hang or a crash is recorded, not fatal. The result per
(encoder, mode) is ``ok`` or the error type and message.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "docs" / "compatibility.json"
MD_PATH = ROOT / "docs" / "compatibility.md"

#: Probe / test sizes for encoders whose 2D stems need more than 32 pixels (valid convolutions).
SIZES = {"inceptionv4": 96, "inceptionresnetv2": 96}
DEFAULT_SIZE = 32
#: Families GaNDLF's imagenet_unet cannot lift (issue 3's goal: these lift in inflate and 2.5d).
GOAL_PREFIXES = ("efficientnet-b", "timm-efficientnet-b", "vgg", "inceptionv4", "dpn", "resnext", "timm-regnet")


#: Run last (largest first-conv-to-head compute or memory), so a partial sweep covers the rest.
HEAVY = (
    "resnext101_32x16d", "resnext101_32x32d", "resnext101_32x48d", "senet154", "timm-efficientnet-l2",
    "timm-efficientnet-b8", "timm-resnest269e", "timm-resnest200e", "timm-regnetx_320", "timm-regnety_320",
    "dpn131", "dpn107", "inceptionresnetv2", "inceptionv4", "efficientnet-b7", "timm-efficientnet-b7",
)
MEMORY_LIMIT_GB = float(os.environ.get("SWEEP_MEMORY_GB", "14"))


class _Done(Exception):
    pass


def _is_memory_error(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or "can't allocate memory" in str(err) or "not enough memory" in str(err)


def run_one(name: str, modes: list[str], backward: bool = True) -> list[dict]:
    """Lift one encoder in each mode; return one result row per mode."""
    import torch
    from segmentation_models_pytorch.encoders import get_encoder

    from gandlf_dimlift.lift import lift

    torch.set_num_threads(int(os.environ.get("SWEEP_THREADS", "1")))
    size = SIZES.get(name, DEFAULT_SIZE)
    rows = []
    torch.manual_seed(0)
    enc = get_encoder(name, in_channels=3, depth=5, weights=None)
    unused: set[str] = set()
    if backward:
        # parameters the 2D encoder's forward never uses (e.g. the classifier stem left in
        # efficientnet-pytorch's encoder) get no gradient in 3D either: they are not counted
        enc.train()
        sum(f.float().mean() for f in enc(torch.randn(2, 3, size, size))[1:]).backward()
        unused = {n.rpartition(".")[0] for n, p in enc.named_parameters() if p.requires_grad and p.grad is None}
        enc.zero_grad(set_to_none=True)
    for mode in modes:
        t0 = time.time()
        row = {"encoder": name, "mode": mode, "size": size}
        lifted = feats = None
        try:
            lifted = lift(enc, mode, probe_size=size)
            if not backward:
                row.update(status="ok", checked="lift")
                raise _Done
            lifted.train()
            x = torch.randn(2, 3, size, size, size)
            feats = lifted(x)
            if any(f.dim() != 5 for f in feats):
                raise RuntimeError(f"feature maps are not all 5D: {[tuple(f.shape) for f in feats]}")
            sum(f.float().mean() for f in feats[1:]).backward()
            missing = [
                n for n, p in lifted.named_parameters()
                if p.requires_grad and p.grad is None and n.rpartition(".")[0] not in unused
            ]
            if missing:
                raise RuntimeError(f"{len(missing)} parameters got no gradient, e.g. {missing[:3]}")
            row.update(status="ok", checked="lift+backward", shapes=[list(f.shape[1:]) for f in feats])
        except _Done:
            pass
        except Exception as err:  # noqa: BLE001 - the sweep records every failure
            status = "memory" if _is_memory_error(err) else "error"
            row.update(status=status, error=type(err).__name__, message=str(err)[:600])
        lifted = feats = None  # free this mode's model before the next one is built
        gc.collect()
        row["seconds"] = round(time.time() - t0, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def sweep(
    names: list[str], modes: list[str], timeout: float, save=None, backward: bool = True, skip=None
) -> list[dict]:
    """Run :func:`run_one` for every encoder in a subprocess with a timeout; ``save(rows)`` after each.

    ``skip(name)``, checked just before each encoder, lets shards running at once share the work.
    """
    rows: list[dict] = []
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for i, name in enumerate(names):
        if skip is not None and skip(name):
            continue
        cmd = [sys.executable, __file__, "--worker", name, "--modes", ",".join(modes)]
        if not backward:
            cmd.append("--no-backward")
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode and len(got) < len(modes):
                tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
                killed = proc.returncode in (-9, 137)  # the kernel's OOM killer on a shared machine
                got += [
                    {"encoder": name, "mode": m, "status": "memory" if killed else "error",
                     "error": "Killed" if killed else "WorkerCrash", "message": tail[0][:600]}
                    for m in modes[len(got):]
                ]
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            got += [
                {"encoder": name, "mode": m, "status": "timeout", "error": "Timeout",
                 "message": f"no result within {timeout:.0f} s"}
                for m in modes[len(got):]
            ]
        rows += got
        if save is not None:
            save(rows)
        ok = sum(r["status"] == "ok" for r in got)
        took = time.time() - t0
        print(f"[{i + 1}/{len(names)}] {name}: {ok}/{len(modes)} ok ({took:.0f} s)", file=sys.stderr, flush=True)
    return rows


def render(data: dict) -> str:
    """The markdown table of a sweep result."""
    from collections import defaultdict

    modes = data["modes"]
    table: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in data["results"]:
        table[row["encoder"]][row["mode"]] = row
    counts = {m: sum(table[e].get(m, {}).get("status") == "ok" for e in table) for m in modes}
    any_ok = sum(any(r.get("status") == "ok" for r in table[e].values()) for e in table)
    with_grad = sum(r.get("checked") == "lift+backward" for r in data["results"] if r["status"] == "ok")
    n_ok = sum(r["status"] == "ok" for r in data["results"])
    lines = [
        "# Lift compatibility of segmentation-models-pytorch encoders",
        "",
        "Generated by `python scripts/lift_compat_sweep.py` (do not edit by hand; `--render` rebuilds it from",
        "`docs/compatibility.json`). Each encoder is built with `weights=None` and lifted with",
        "`gandlf_dimlift.lift(encoder, mode)`, whose check pass runs a 3D forward on a `(1, 3, S, S, S)` volume",
        "(S = 32; 96 for the Inception stems; two slices in `2.5d`) and rejects 2D-only operations; `ok`",
        "means the lift and that forward succeeded. Entries swept with the training step also ran a",
        "training-mode forward and backward on `(2, 3, S, S, S)`: every feature map 5D, every parameter the",
        "2D encoder uses got a gradient. A failure shows the error type; its message,",
        "which names the module's path and type, is in the json. `memory limit`: the worker's address-space",
        "cap (`SWEEP_MEMORY_GB`, 14 GB by default) was hit on the sweep machine; `timeout`: no result within the",
        "per-encoder time limit on the (shared, 2-core) sweep machine. Neither is a lift failure: both are",
        "undetermined here.",
        "",
        f"Environment: {data['environment']}.",
        "",
        f"Of the {n_ok} `ok` entries, {with_grad} also ran the training step; the others were swept with",
        "`--no-backward` (lift and its check pass only) to fit the shared sweep machine; the training step of",
        "every mode is covered by `tests/test_lift.py` and the representative slice in `tests/test_lift_compat.py`.",
        "",
        f"Encoders: {len(table)}; lift in at least one mode: {any_ok}. Per mode: "
        + ", ".join(f"`{m}` {counts[m]}" for m in modes) + ".",
        "",
        "| encoder | " + " | ".join(f"`{m}`" for m in modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    for enc in sorted(table):
        cells = []
        for m in modes:
            row = table[enc].get(m)
            if row is None:
                cells.append("not run")
            elif row["status"] == "ok":
                cells.append("ok")
            elif row["status"] == "memory":
                cells.append("memory limit")
            elif row["status"] == "timeout":
                cells.append("timeout")
            else:
                cells.append(row.get("error", "error"))
        lines.append(f"| {enc} | " + " | ".join(cells) + " |")
    failures = [(e, m, r) for e in sorted(table) for m, r in table[e].items() if r["status"] == "error"]
    if failures:
        lines += ["", "## Why the failures fail", ""]
        seen: dict[str, list[str]] = {}
        for e, m, r in failures:
            key = f"{r.get('error')}: {r.get('message', '')}"
            key = key.split("Modes that could work")[0].strip()
            seen.setdefault(key[:300], []).append(f"{e}/{m}")
        for key, where in seen.items():
            shown = ", ".join(where[:6]) + (f" and {len(where) - 6} more" if len(where) > 6 else "")
            lines.append(f"- {shown}: {key}")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command line entry."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--only", help="comma-separated encoder names (default: all)")
    parser.add_argument("--modes", help="comma-separated modes (default: all)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per encoder (all modes)")
    parser.add_argument(
        "--no-backward", action="store_true", help="only lift (with its check pass); skip the training step"
    )
    parser.add_argument("--reverse", action="store_true", help="run the encoder list backwards")
    parser.add_argument("--shard", help="i/n: run every n-th encoder starting at i (shards can run at once)")
    parser.add_argument(
        "--skip-done", action="store_true", help="with --merge: skip encoders with a result in every mode"
    )
    parser.add_argument("--render", action="store_true", help="only rebuild the markdown from the json")
    parser.add_argument("--merge", action="store_true", help="update the existing json instead of replacing it")
    args = parser.parse_args()

    if args.render:
        MD_PATH.write_text(render(json.loads(JSON_PATH.read_text())))
        return

    from gandlf_dimlift.lift import MODES

    modes = args.modes.split(",") if args.modes else list(MODES)
    if args.worker:
        import resource

        # address-space cap: a huge encoder fails with MemoryError (recorded as such) instead of waking
        # the OOM killer on a shared machine
        cap = int(MEMORY_LIMIT_GB * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        run_one(args.worker, modes, backward=not args.no_backward)
        return

    import segmentation_models_pytorch as smp
    import torch
    from segmentation_models_pytorch.encoders import encoders

    names = args.only.split(",") if args.only else sorted(encoders, key=lambda n: (n in HEAVY, n))
    if args.reverse:
        names = names[::-1]

    def skip(name: str) -> bool:
        if not (args.skip_done and JSON_PATH.exists()):
            return False
        have = {(r["encoder"], r["mode"]) for r in json.loads(JSON_PATH.read_text())["results"]}
        return all((name, m) in have for m in modes)
    environment = (
        f"segmentation-models-pytorch {smp.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, CPU"
    )
    if args.shard:
        index, count = (int(v) for v in args.shard.split("/"))
        names = names[index::count]
    if not args.merge and JSON_PATH.exists():
        JSON_PATH.unlink()

    def save(rows: list[dict]) -> None:
        # read-modify-write under a lock: several shards may run at once
        import fcntl

        JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
        with open(Path(tempfile.gettempdir()) / "lift_compat_sweep.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {"results": []}
            new = {(r["encoder"], r["mode"]) for r in rows}
            keep = [r for r in old["results"] if (r["encoder"], r["mode"]) not in new]
            data = {
                "environment": environment,
                "modes": list(MODES),
                "encoders": sorted(encoders),
                "results": sorted(keep + rows, key=lambda r: (r["encoder"], MODES.index(r["mode"]))),
            }
            JSON_PATH.write_text(json.dumps(data, indent=1) + "\n")
            MD_PATH.write_text(render(data))

    sweep(names, modes, args.timeout, save, backward=not args.no_backward, skip=skip)


if __name__ == "__main__":
    main()
