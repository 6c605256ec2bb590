"""Train-step and inference time, peak memory and FLOP/s of every architecture, GaNDLF baselines and plugin alike.

Every row is built through GaNDLF's own `GANDLF.models.get_model(params)` from a GaNDLF-validated configuration
(after `import gandlf_dimlift`, which registers the plugin keys), so baselines and plugin rows take the same path.
Each (row, size) runs in a fresh subprocess (``--in-process``, the quick default: all rows in one subprocess),
watched: above ``--max-memory-gib`` of RAM or past ``--timeout`` it is killed and becomes an error row. Its peak
memory is its own: on CPU the increase of the peak
resident set size (`resource.getrusage`) over the process's size after building the model and the batch; on CUDA
`torch.cuda.max_memory_allocated`. FLOPs come from `torch.utils.flop_counter.FlopCounterMode`; the achieved
FLOP/s of a training step is shown as a share of this machine's measured float32 matmul peak.

A row whose key is not registered, or whose model fails to build or run, becomes a table row with the error.

Operators: the `op/` rows time one ACS convolution (32 -> 48 channels, 3x3, batch x 32 x 48^3, its own size whatever
`--sizes` says) of each ACS mode against acsconv's operator (`ACSConv` / `SoftACSConv`, the operators GaNDLF's
`imagenet_unet` uses); their ratio columns compare with that acsconv row. Before and after: every row that lifts has
a twin `... (reference ops)` measured in the same run with the lifted layers computing as before they were tuned
(`gandlf_dimlift.lift.ops.operator_choice("views", channels_last=False)`: one thin convolution per ACS view, the
standard memory layout); the `x ref ops` column is the row against its twin.

Usage::

    python -m benchmarks.throughput [--sizes 32 64 128] [--batch 2] [--rows dimlift_smp] [--device cpu|cuda]
                                    [--reference imagenet_unet] [--out benchmarks/THROUGHPUT.md] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

# Keep in step with the families' declared options; a misspelt option shows up as that row's error.
PRETRAINED_OFF = {"pretrained": False}  # no model hub here: every row starts from random weights


@dataclass(frozen=True)
class Row:
    """One architecture and setting.

    Attributes:
        name: Row name (unique; `--rows` filters on it).
        architecture: GaNDLF `model.architecture` key.
        task: "segmentation" or "classification".
        model: Extra keys of the `model:` section.
        note: Short description for the table.
        dimension: 3, or 2 for 2D rows (their patch is the size squared).
        operators: "tuned", or "reference": lifted layers compute as before they were tuned (the twin rows).
        compare_to: Row the ratio columns use instead of `--reference` (operator rows: acsconv's operator).
        size: A fixed cube size for this row, whatever `--sizes` says (operator rows).
    """

    name: str
    architecture: str
    task: str
    model: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    dimension: int = 3
    operators: str = "tuned"
    compare_to: str | None = None
    size: int | None = None


REFERENCE_OPS = " (reference ops)"
OPERATOR = "operator"  # the architecture of operator rows
OP_SIZE = 48  # operator rows: batch x 32 x 48^3 -> 48 channels, the single-convolution case


def with_reference_twins(rows: Sequence[Row]) -> tuple[Row, ...]:
    """`rows`, each row that lifts followed by its twin measured with the reference operators."""
    lifts = ("dimlift_smp", "dimlift_dxnet", "dimlift_slice_attention", OPERATOR)
    out: list[Row] = []
    for row in rows:
        out.append(row)
        if row.architecture in lifts and row.model.get("op") != "acsconv":
            out.append(replace(row, name=row.name + REFERENCE_OPS, operators="reference",
                               note=f"{row.note}; operators before tuning"))
    return tuple(out)


def _operator_rows() -> tuple[Row, ...]:
    rows = []
    for mode in ("acs", "soft", "mean"):
        acsconv = f"op/acsconv-{mode}"
        rows.append(Row(f"op/{mode}", OPERATOR, OPERATOR, {"op": "lift", "mode": mode},
                        f"ACSConv3d {mode}, 32->48, 3x3", compare_to=acsconv, size=OP_SIZE))
        rows.append(Row(acsconv, OPERATOR, OPERATOR, {"op": "acsconv", "mode": mode},
                        f"acsconv {'ACSConv' if mode == 'acs' else 'SoftACSConv'}{' mean' if mode == 'mean' else ''}",
                        compare_to=acsconv, size=OP_SIZE))
    return tuple(rows)


ROWS: tuple[Row, ...] = with_reference_twins((
    # GaNDLF baselines
    Row("resunet", "resunet", "segmentation", {"base_filters": 16}, "GaNDLF residual U-Net, 16 base filters"),
    Row("imagenet_unet", "imagenet_unet", "segmentation", {"encoder_name": "resnet18", "pretrained": False},
        "GaNDLF smp U-Net resnet18, its default soft-ACS converter"),
    Row("resnet18", "resnet18", "classification", {}, "GaNDLF 3D ResNet-18"),
    Row("densenet121", "densenet121", "classification", {}, "GaNDLF 3D DenseNet-121"),
    Row("efficientnetb0", "efficientnetb0", "classification", {}, "GaNDLF 3D EfficientNet-B0"),
    # dimlift_smp: ACS-lifted smp models
    *(
        Row(f"dimlift_smp/{mode}", "dimlift_smp", "segmentation",
            {"encoder_name": "resnet18", "converter_type": mode, **PRETRAINED_OFF}, f"smp U-Net resnet18, {mode}")
        for mode in ("acs", "soft", "mean", "inflate", "2.5d")
    ),
    Row("dimlift_smp/cls", "dimlift_smp", "classification",
        {"encoder_name": "resnet18", "converter_type": "acs", **PRETRAINED_OFF}, "smp resnet18 classifier, acs"),
    # DX-Net
    Row("dimlift_dxnet/b0", "dimlift_dxnet", "segmentation", {"variant": "b0", **PRETRAINED_OFF},
        "DX-Net B0 U-Net (inflated EfficientNet)"),
    Row("dimlift_dxnet/b0-cls", "dimlift_dxnet", "classification", {"variant": "b0", **PRETRAINED_OFF},
        "DX-Net B0 classifier"),
    # the 2D source of the dimensional transfer experiment (patch = size squared)
    Row("dimlift_omnianet/b0-2d", "dimlift_omnianet", "segmentation", {"variant": "b0", **PRETRAINED_OFF},
        "2D Omnia-Net B0 (transfer source)", dimension=2),
    # slice attention
    *(
        Row(f"dimlift_slice_attention/{pooling}", "dimlift_slice_attention", "classification",
            {"encoder_name": "resnet18", "pooling": pooling, **PRETRAINED_OFF},
            f"resnet18 per slice, {pooling} pooling")
        for pooling in ("attention", "gated", "mean")
    ),
    *_operator_rows(),
))

CLASSES = {"segmentation": [0, 1, 2], "classification": [0, 1], OPERATOR: []}


def select_rows(patterns: Sequence[str] | None, rows: Sequence[Row] = ROWS) -> list[Row]:
    """Rows whose name contains any of `patterns` (all rows when none); raises when nothing matches."""
    if not patterns:
        return list(rows)
    chosen = [row for row in rows if any(p in row.name for p in patterns)]
    if not chosen:
        raise SystemExit(f"--rows {list(patterns)} matches no row; rows are: {[r.name for r in rows]}")
    return chosen


def patch_of(size: int | str, dimension: int) -> tuple[int, ...]:
    """A patch shape from a size: 64 -> (64, 64, 64) (squared for 2D rows); "48x64x48" -> (48, 64, 48)."""
    if isinstance(size, int) or str(size).isdigit():
        return (int(size),) * dimension
    parts = tuple(int(p) for p in str(size).lower().split("x"))
    if len(parts) != 3 or dimension != 3:
        raise ValueError(f"size {size!r}: use one integer (cube) or XxYxZ for 3D rows, e.g. 48x64x48.")
    return parts


def size_label(size: int | str, dimension: int = 3) -> str:
    if isinstance(size, int) or str(size).isdigit():
        return f"{size}{'³' if dimension == 3 else '²'}"
    return str(size)


def gandlf_parameters(row: Row, size: int | str, batch: int, num_epochs: int = 1) -> dict[str, Any]:
    """GaNDLF's parameter dict for `row` at patch `size`, as `gandlf_run` would build it (ConfigManager + headers).

    Importing this registers the plugin keys (``import gandlf_dimlift`` before ``GANDLF``) when it is installed.
    """
    from benchmarks.configs import make_config

    config = make_config(row, patch_size=patch_of(size, row.dimension), batch_size=batch, num_epochs=num_epochs)
    return config_to_parameters(config, row.task)


def config_to_parameters(config: dict[str, Any], task: str) -> dict[str, Any]:
    """Runs GaNDLF's ConfigManager on `config` and adds the CSV header information `gandlf_run` adds."""
    try:
        import gandlf_dimlift  # noqa: F401 - arms the registration of the plugin keys
    except ImportError:
        pass
    import GANDLF.models  # noqa: F401 - registration happens when this is imported
    from GANDLF.config_manager import ConfigManager
    from GANDLF.utils import populate_header_in_parameters

    register_plugins()
    check_registered(config["model"]["architecture"])  # before GaNDLF's validation, whose message is truncated
    headers = {"subjectIDHeader": 0, "channelHeaders": [1], "labelHeader": None, "predictionHeaders": []}
    if task == "segmentation":
        headers["labelHeader"] = 2
    else:
        headers["predictionHeaders"] = [2]
    parameters = ConfigManager(config)
    return populate_header_in_parameters(parameters, headers)


def register_plugins() -> None:
    """Registers the plugin's architectures with GaNDLF when the plugin is installed (quietly otherwise)."""
    try:
        from gandlf_dimlift.registry import register
    except ImportError:
        return
    try:
        register()
    except Exception:  # noqa: BLE001 - an unregistered key is reported by its row
        pass


def check_registered(architecture: str) -> None:
    from GANDLF.models import global_models_dict

    if architecture not in global_models_dict:
        plugin = [k for k in global_models_dict if k.startswith("dimlift_")]
        raise KeyError(
            f"architecture {architecture!r} is not registered in GaNDLF (registered plugin keys: {plugin}); "
            "install the plugin (pip install -e .) or wait for its family to land"
        )


# ----------------------------------------------------------------------------------------------- the worker


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class PeakRSS:
    """Peak resident set size (MiB) over a window, sampled by a background thread every few milliseconds.

    Used with `ru_maxrss` (which only grows over a process's life) so that rows measured in one process still get
    their own peak; a fresh process per row gives the exact kernel peak too and the larger of the two is kept.
    """

    def __init__(self, interval: float = 0.002) -> None:
        import threading

        self.interval = interval
        self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mib())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


_MEASURED = 0  # models measured in this process


def build_model(row: Row, size: int | str, batch: int, device: str) -> tuple[Any, Any]:
    """The row's model, built through GaNDLF's `get_model` from a validated config, and a random batch."""
    import torch

    parameters = gandlf_parameters(row, size, batch)
    check_registered(row.architecture)
    from GANDLF.models import get_model

    model = get_model(parameters).to(device)
    return model, torch.randn((batch, 1) + patch_of(size, row.dimension), device=device)


def build_operator(row: Row, size: int, batch: int, device: str) -> tuple[Any, Any]:
    """An operator row's convolution (32 -> 48 channels, 3x3): ours lifted from a Conv2d, or acsconv's with the same
    weights (soft: acsconv draws its mixing weights at random, they are set to ours, the equal start)."""
    import torch
    from torch import nn

    from gandlf_dimlift.lift import lift

    mode = row.model["mode"]
    conv2d = nn.Conv2d(32, 48, 3, padding=1)
    ours = lift(conv2d, mode, check=False)
    if row.model["op"] == "acsconv":
        from acsconv.operators import ACSConv, SoftACSConv

        twin = ACSConv(32, 48, 3, 1, 1) if mode == "acs" else SoftACSConv(32, 48, 3, 1, 1, mean=mode == "mean")
        state = {"weight": conv2d.weight.detach().clone(), "bias": conv2d.bias.detach().clone()}
        if mode == "soft":
            state["soft_w_core"] = ours.soft_w_core.detach().clone()
        twin.load_state_dict(state)
        ours = twin
    return ours.to(device), torch.randn(batch, 32, size, size, size, device=device)


def measure(
    row: Row, size: int | str, batch: int, device: str, repeats: int, threads: int | None, profile: int = 0
) -> dict[str, Any]:
    """Builds the row's model (through GaNDLF) or operator and measures it. Runs inside a fresh process."""
    import torch

    from gandlf_dimlift.lift.ops import operator_choice

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    result: dict[str, Any] = {"name": row.name, "size": size, "batch": batch, "device": device}
    if row.architecture == OPERATOR:
        model, x = build_operator(row, int(size), batch, device)
    else:
        model, x = build_model(row, size, batch, device)
    choice = operator_choice("views", channels_last=False) if row.operators == "reference" else operator_choice()
    with choice:
        return _measure(row, size, batch, device, repeats, model, x, result, profile)


def _measure(
    row: Row, size: int | str, batch: int, device: str, repeats: int, model: Any, x: Any, result: dict[str, Any],
    profile: int = 0,
) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    result["params"] = sum(p.numel() for p in model.parameters())
    n_classes = len(CLASSES[row.task])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def loss_of(out: torch.Tensor) -> torch.Tensor:
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out.float().square().mean()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(model(x)).backward()
        optimizer.step()

    base = _rss_mib()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() / 2**20
    # inference first (the process peak only grows), then training
    global _MEASURED
    fresh = _MEASURED == 0  # the first model of this process: its RSS growth is its own, ru_maxrss is exact
    _MEASURED += 1
    model.eval()
    times = []
    with torch.no_grad(), PeakRSS() as sampler:
        for i in range(repeats + 1):
            sync()
            start = time.perf_counter()
            model(x)
            sync()
            if i:  # the first call is a warm-up
                times.append(time.perf_counter() - start)
    result["infer_s"] = min(times)
    if device == "cuda":
        result["infer_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 - base_cuda
        torch.cuda.reset_peak_memory_stats()
    else:
        peak = max(sampler.peak, _maxrss_mib()) if fresh else sampler.peak
        result["infer_peak_mib"] = max(peak - base, 0.0)
    model.train()
    times = []
    with PeakRSS() as sampler:
        for i in range(repeats + 1):
            sync()
            start = time.perf_counter()
            train_step()
            sync()
            if i:
                times.append(time.perf_counter() - start)
    result["train_s"] = min(times)
    if device == "cuda":
        result["train_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 - base_cuda
    else:
        peak = max(sampler.peak, _maxrss_mib()) if fresh else sampler.peak
        result["train_peak_mib"] = max(peak - base, 0.0)
    # FLOPs of one inference forward and of one training step (forward + backward)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    result["output_shape"] = list(out.shape)
    expected = (batch, n_classes) + (patch_of(size, row.dimension) if row.task == "segmentation" else ())
    if row.task != OPERATOR and tuple(out.shape) != expected:
        result["warning"] = f"output shape {tuple(out.shape)} != expected {expected}"
    result["infer_flops"] = counter.get_total_flops()
    model.train()
    with FlopCounterMode(display=False) as counter:
        loss_of(model(x)).backward()
    result["train_flops"] = counter.get_total_flops()
    optimizer.zero_grad(set_to_none=True)
    del out
    result["isolated"] = fresh
    if profile:
        result["profile"] = profile_train_step(train_step, sync, profile, device)
    return result


def profile_train_step(train_step: Any, sync: Any, top: int, device: str) -> list[dict[str, Any]]:
    """The ``top`` operators of one training step by their own (self) time under torch's profiler (on CUDA their
    kernels' time), with their share of the step's total."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiler:
        train_step()
        sync()
    attribute = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [(e, getattr(e, attribute)) for e in profiler.key_averages() if getattr(e, attribute) > 0]
    total = sum(t for _, t in events)
    events.sort(key=lambda pair: pair[1], reverse=True)
    return [{"op": e.key, "calls": e.count, "self_s": t / 1e6, "share": t / total} for e, t in events[:top]]


def profile_text(results: list[dict[str, Any]]) -> str:
    """Markdown: each profiled row's operators by self time in one training step."""
    blocks = []
    for r in results:
        if r.get("profile"):
            lines = [f"Profile of one train step, {r['name']} at {size_label(r['size'])} (self time per operator):",
                     "", "| operator | calls | self s | share of step |", "|---|---|---|---|"]
            lines += [f"| `{e['op']}` | {e['calls']} | {e['self_s']:.3f} | {100 * e['share']:.1f} % |"
                      for e in r["profile"]]
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def matmul_peak(device: str, threads: int | None = None, n: int | None = None, seconds: float = 2.0) -> float:
    """Measured float32 matmul FLOP/s of this machine (best of repeated n x n products)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    n = n or (8192 if device == "cuda" else 1024)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.matmul(a, b)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


# ----------------------------------------------------------------------------------------------- the driver


def process_rss_mib(pid: int) -> float:
    """Resident set size of another process in MiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


def run_worker(specs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measures `specs` in one fresh interpreter, watched for time and memory.

    The worker prints ``START <i>`` before and ``RESULT <json>`` after each spec. A worker above
    ``--max-memory-gib`` or past ``--timeout`` (per spec) is killed; the spec it was on becomes an error row and
    the remaining specs go to a new worker.
    """
    import threading

    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    results: list[dict[str, Any]] = []
    remaining = list(specs)
    while remaining:
        command = [sys.executable, "-m", "benchmarks.throughput", "--worker", json.dumps(remaining)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
                                   env=env)
        lines: list[str] = []
        errors: list[str] = []
        readers = [threading.Thread(target=lambda s=stream, o=out: o.extend(s), daemon=True)
                   for stream, out in ((process.stdout, lines), (process.stderr, errors))]
        for reader in readers:
            reader.start()
        started, current, killed = time.perf_counter(), -1, ""
        while process.poll() is None:
            time.sleep(0.2)
            starts = [int(line.split()[1]) for line in list(lines) if line.startswith("START ")]
            if starts and starts[-1] != current:
                current, started = starts[-1], time.perf_counter()
            if process_rss_mib(process.pid) > args.max_memory_gib * 1024:
                killed = f"killed above --max-memory-gib {args.max_memory_gib} GiB"
            elif time.perf_counter() - started > args.timeout:
                killed = f"killed after --timeout {args.timeout} s"
            if killed:
                process.kill()
                break
        process.wait()
        for reader in readers:
            reader.join(timeout=5)
        done = [json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")]
        results.extend(done)
        for result in done:
            _progress(result)
        remaining = remaining[len(done):]
        if remaining:
            spec = remaining.pop(0)
            tail = (killed or f"worker exit {process.returncode}: "
                    + ((" ".join(errors).strip().splitlines() or ["no output"])[-1])[:300])
            results.append({"name": spec["row"]["name"], "size": spec["size"], "error": tail})
            _progress(results[-1])
    return results


def _progress(result: dict[str, Any]) -> None:
    status = result.get("error") or f"train {result['train_s']:.3f} s, infer {result['infer_s']:.3f} s"
    print(f"[throughput] {result['name']} {size_label(result['size'])}: {status}", file=sys.stderr, flush=True)


def run_rows(rows: Sequence[Row], sizes: Sequence[int | str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (size, row): one fresh process each, or all in one watched process with `--in-process`."""
    def spec(row: Row, size: int | str) -> dict[str, Any]:
        return {"row": asdict(row), "size": size, "batch": args.batch, "device": args.device, "repeats": args.repeats,
                "threads": args.threads, "profile": args.profile}

    specs = [spec(row, size) for size in sizes for row in rows if row.size is None]
    specs += [spec(row, row.size) for row in rows if row.size is not None]  # operator rows: their own size, once
    if args.in_process:
        return run_worker(specs, args)
    return [result for spec in specs for result in run_worker([spec], args)]


def run_row(row: Row, size: int | str, args: argparse.Namespace) -> dict[str, Any]:
    """Measures one row at one size in a fresh, watched process."""
    return run_rows([row], [size], args)[0]


def worker(specs: list[dict[str, Any]]) -> None:
    """The worker side of `run_worker`."""
    import gc

    peak = None
    for index, spec in enumerate(specs):
        print(f"START {index}", flush=True)
        spec = dict(spec)
        row = Row(**spec.pop("row"))
        try:
            if peak is None:  # the same process and moment as the rows: their shares compare like with like
                peak = matmul_peak(spec["device"], spec.get("threads"), seconds=1.0)
            result = measure(row, **spec)
            result["matmul_peak"] = peak
        except Exception as error:  # noqa: BLE001 - reported as the row's error
            message = " ".join(f"{type(error).__name__}: {error}".split())
            result = {"name": row.name, "size": spec["size"], "error": message[:400]}
        print("RESULT " + json.dumps(result), flush=True)
        gc.collect()


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _si(value: float | None) -> str:
    if value is None:
        return "—"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def table(results: list[dict[str, Any]], peak: float, reference: str | None, rows: Sequence[Row]) -> str:
    """Markdown table of `results`; ratios are against the `reference` row of the same size (operator rows: against
    their `compare_to` row), and `x ref ops` against the row's twin measured with the reference operators."""
    notes = {r.name: r for r in rows}
    ok = {(r["name"], r["size"]): r for r in results if "error" not in r}

    def memory(r: dict[str, Any] | None) -> float | None:
        return r["train_peak_mib"] if r and r.get("isolated", True) and r.get("train_peak_mib") else None

    lines = [
        "| row | task | size | params | train step s | infer s | train peak MiB | infer peak MiB | train GFLOP"
        " | achieved TFLOP/s | % of matmul peak | train time × ref | train mem × ref | × ref ops (time / mem) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        row = notes.get(r["name"])
        task = row.task if row else ""
        note = row.note if row else ""
        dimension = row.dimension if row else 3
        if "error" in r:
            lines.append(f"| {r['name']} | {task} | {r['size']} | — | — | — | — | — | — | — | — | — | — | — | "
                         f"error: {r['error'].replace('|', '/')} |")
            continue
        rate = r["train_flops"] / r["train_s"] if r["train_s"] else None
        row_peak = r.get("matmul_peak") or peak
        if not r.get("isolated", True):  # other rows ran in this process before: its RSS peak is not this row's
            r = {**r, "train_peak_mib": None, "infer_peak_mib": None}
        ref = ok.get(((row.compare_to if row and row.compare_to else reference), r["size"]))
        twin = ok.get((r["name"] + REFERENCE_OPS, r["size"]))
        t_ratio = _ratio(r["train_s"], ref["train_s"] if ref else None)
        m_ratio = _ratio(memory(r), memory(ref))
        versus_twin = "—"
        if twin:
            versus_twin = f"{_fmt(_ratio(r['train_s'], twin['train_s']))} / {_fmt(_ratio(memory(r), memory(twin)))}"
        if r.get("warning"):
            note = f"{note}; {r['warning']}"
        lines.append(
            f"| {r['name']} | {task} | {size_label(r['size'], dimension)} | {r['params'] / 1e6:.2f} M | "
            f"{_fmt(r['train_s'], 3)} | "
            f"{_fmt(r['infer_s'], 3)} | {_fmt(r['train_peak_mib'], 0)} | {_fmt(r['infer_peak_mib'], 0)} | "
            f"{r['train_flops'] / 1e9:.1f} | {_fmt(rate / 1e12 if rate else None, 3)} | "
            f"{_fmt(100 * rate / row_peak if rate else None, 1)} | {_fmt(t_ratio)} | {_fmt(m_ratio)} | {versus_twin} | "
            f"{note} |"
        )
    return "\n".join(lines)


def header(args: argparse.Namespace, peak: float, argv: Sequence[str]) -> str:
    import platform

    import torch

    if args.device == "cuda":
        machine = torch.cuda.get_device_name(0)
    else:
        machine = f"{platform.processor() or platform.machine()}, {args.threads or torch.get_num_threads()} threads"
    command = "python -m benchmarks.throughput " + " ".join(argv)
    if args.device == "cuda":
        memory = "CUDA max_memory_allocated"
    elif args.in_process:
        memory = ("peak RSS sampled every 2 ms, all rows in one process: only the first row of each process has a "
                  "memory figure (later rows reuse memory freed by earlier ones); run without --in-process for memory")
    else:
        memory = "peak RSS of a fresh process per row"
    return (
        f"Command: `{command}`\n\n"
        f"Device: {args.device} ({machine}); torch {torch.__version__}; batch {args.batch}; "
        f"best of {args.repeats} timed steps after one warm-up; every row from random weights.\n\n"
        f"Measured float32 matmul peak: {peak / 1e12:.3f} TFLOP/s here (each measuring process re-measures it "
        f"before its first row, and its rows' shares use that figure: on a loaded machine both move). "
        f"Train step = forward + backward + Adam step "
        f"(FLOPs: forward + backward). Peak memory is the increase over the built model and batch "
        f"({memory}). "
        f"Ratios are against `{args.reference}` at the same size.\n"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=None,
                        help="patch sizes: integers for cubes, or XxYxZ (default 32 64 128)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (2)")
    parser.add_argument("--rows", nargs="+", default=None, help="keep rows whose name contains any of these")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--reference", default="imagenet_unet", help="row the ratio columns compare against")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per row after a warm-up (3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch's default)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per (row, size) measurement (1800)")
    parser.add_argument("--max-memory-gib", type=float, default=6.0,
                        help="kill a measurement whose process grows beyond this many GiB of RAM (6)")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    parser.add_argument("--json", default=None, help="also write the raw results as JSON")
    parser.add_argument("--in-process", action="store_true",
                        help="measure every row in this process (faster; peak memory from a sampling thread)")
    parser.add_argument("--isolate", action="store_true", help="with --quick: still one fresh process per row")
    parser.add_argument("--quick", action="store_true", help="size 32, one timed step, rows measured in-process")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile one train step per row and show its N costliest operators")
    parser.add_argument("--render", default=None, metavar="JSON", help="print the table of an earlier --json file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or [32]
        args.repeats = args.repeats or 1
        args.in_process = args.in_process or not args.isolate
    args.sizes = [int(s) if str(s).isdigit() else s for s in (args.sizes or [32, 64, 128])]
    args.repeats = args.repeats or 3
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return []
    rows = select_rows(args.rows)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        print(table(saved["results"], saved["peak_flops"], args.reference, ROWS))
        return saved["results"]
    if args.list:
        for row in rows:
            print(f"{row.name:36s} {row.architecture:26s} {row.task:15s} {row.model}")
        return []
    peak = matmul_peak(args.device, args.threads)
    results = run_rows(rows, args.sizes, args)
    text = header(args, peak, argv) + "\n" + table(results, peak, args.reference, rows) + "\n"
    if args.profile:
        text += "\n" + profile_text(results) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_flops": peak, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
