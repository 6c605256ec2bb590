"""Lifted operators against acsconv's own: forward+backward time and output equality (CPU).

Usage::

    python -m benchmarks.lift_ops                    # one conv layer and a resnet18 encoder at 64^3
    python -m benchmarks.lift_ops --size 32 --repeats 2
    python -m benchmarks.lift_ops --paths            # each operator path per layer shape (ACSConv3d.path's choice)
    python -m benchmarks.lift_ops --limits           # what bounds one acs convolution (views against matmul peak)

For each mode (``acs``, ``soft``, ``mean``, ``inflate``, ``2.5d``) the 2D module is lifted with
``gandlf_dimlift.lift.lift``; the reference is the same lifted network with every convolution replaced
by acsconv's operator for that mode, holding the same weights:

* ``acs``: ``acsconv.operators.ACSConv``; ``soft`` / ``mean``: ``acsconv.operators.SoftACSConv``
  (``mean=True`` for mean; the soft mixing weights copied);
* ``inflate``: ``nn.Conv3d`` with the weights of acsconv's I3D loader
  (``acsconv.converters.conv3d_converter.load_state_dict_from_2d_to_i3d``, repeat axis -1);
* ``2.5d``: ``acsconv.operators.Conv2_5d(unsqueeze_axis=-1)`` (kernel ``(k, k, 1)``).

Pools, norms and the rest are the lifted ones in both, so the comparison isolates the conv operator.
acsconv's whole-model converters are not used: ``Conv2_5dConverter`` fails to load its own weights
when ``unsqueeze_axis != -3`` and its pools are cubic, which is not 2.5D. The reported ratio is
``gandlf_dimlift time / acsconv time`` (below 1: faster), median of ``--repeats`` runs timed
alternately (ours, acsconv, ours, ...) after one warm-up each, on whatever CPU threads torch uses here;
on a shared machine the ratio is the figure to read, not the seconds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from gandlf_dimlift.lift import lift
from gandlf_dimlift.lift.ops import ACSConv3d, operator_choice

MODES = ("acs", "soft", "mean", "inflate", "2.5d")


def _acsconv_twin(conv2d: nn.Conv2d, lifted: nn.Module, mode: str) -> nn.Module:
    """acsconv's operator for ``mode`` with the weights of ``conv2d`` (and of ``lifted`` for soft)."""
    from acsconv.converters.conv3d_converter import load_state_dict_from_2d_to_i3d
    from acsconv.operators import ACSConv, Conv2_5d, SoftACSConv

    k, s, p, d = conv2d.kernel_size[0], conv2d.stride[0], conv2d.padding[0], conv2d.dilation[0]
    args = (conv2d.in_channels, conv2d.out_channels, k, s, p, d, conv2d.groups)
    bias = conv2d.bias is not None
    if mode == "acs":
        ref = ACSConv(*args, bias=bias)
    elif mode in ("soft", "mean"):
        ref = SoftACSConv(*args, mean=mode == "mean", bias=bias)
    elif mode == "inflate":
        ref = nn.Conv3d(*args[:2], (k, k, k), s, p, d, conv2d.groups, bias)
        holder = nn.Module()
        holder.c = ref
        load_state_dict_from_2d_to_i3d(holder, {f"c.{n}": t.detach().clone() for n, t in conv2d.state_dict().items()},
                                       repeat_axis=-1)
        return ref
    else:
        ref = Conv2_5d(*args, bias=bias, unsqueeze_axis=-1)
        # acsconv's Conv2_5d also strides along the slice axis; 2.5D here keeps every slice
        ref.stride = (s, s, 1)
    state = {n: t.detach().clone() for n, t in conv2d.state_dict().items()}
    if mode == "2.5d":
        state["weight"] = state["weight"].unsqueeze(-1)
    if mode == "soft":
        state["soft_w_core"] = lifted.soft_w_core.detach().clone()
    ref.load_state_dict(state)
    return ref


def reference(model2d: nn.Module, lifted: nn.Module, mode: str) -> nn.Module:
    """A copy of ``lifted`` whose convolutions are acsconv's operators with the same weights."""
    ref = copy.deepcopy(lifted)
    convs2d = dict(model2d.named_modules())
    targets = (ACSConv3d, nn.Conv3d)
    if isinstance(ref, targets):
        return _acsconv_twin(model2d, lifted, mode)
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, targets) and name in convs2d:
            parent_name, _, child = name.rpartition(".")
            parent = ref.get_submodule(parent_name) if parent_name else ref
            setattr(parent, child, _acsconv_twin(convs2d[name], mod, mode))
    return ref


def _step(module: nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    module.zero_grad(set_to_none=True)
    out = module(x)
    out = out if isinstance(out, torch.Tensor) else sum(o.float().mean() for o in out[1:])
    out.float().mean().backward()
    return time.perf_counter() - t0


def _time_pair(a: nn.Module, b: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median forward+backward seconds of ``a`` and ``b``, timed alternately (after one warm-up each)."""
    _step(a, x), _step(b, x)
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_step(a, x))
        tb.append(_step(b, x))
    return statistics.median(ta), statistics.median(tb)


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    if isinstance(ya, torch.Tensor):
        ya, yb = [ya], [yb]
    return max((p - q).abs().max().item() for p, q in zip(ya, yb, strict=True))


def run(size: int, repeats: int, channels: int) -> list[dict]:
    """Time every mode on one conv layer and on a resnet18 encoder."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    cases = {
        f"Conv2d({channels}, {channels}, 3, padding=1)": nn.Conv2d(channels, channels, 3, padding=1),
        "smp resnet18 encoder": smp.encoders.get_encoder("resnet18", weights=None),
    }
    rows = []
    for case, model2d in cases.items():
        model2d.train()
        cin = model2d.in_channels if isinstance(model2d, nn.Conv2d) else 3
        x = torch.randn(2 if cin == 3 else 1, cin, size, size, size)
        for mode in MODES:
            ours = lift(model2d, mode).train()
            ref = reference(model2d, ours, mode).train()
            diff = _max_diff(ours.eval(), ref.eval(), x)
            ours.train(), ref.train()
            t_ours, t_ref = _time_pair(ours, ref, x, repeats)
            rows.append({"case": case, "mode": mode, "ours_s": t_ours, "acsconv_s": t_ref, "max_abs_diff": diff})
            print(f"{case:28s} {mode:8s} ours {t_ours:7.3f} s  acsconv {t_ref:7.3f} s  ratio {t_ours / t_ref:5.2f}  "
                  f"max|diff| {diff:.1e}", flush=True)
    return rows


#: (in, out, spatial size, stride) of the 3x3 convolutions of a resnet18 U-Net on 64^3 (encoder and decoder).
PATH_SHAPES = ((16, 16, 64, 1), (32, 32, 32, 1), (64, 64, 16, 1), (64, 128, 16, 2), (128, 128, 8, 1),
               (256, 256, 4, 1))
PATHS = ("views", "dense")  # the two computations ACSConv3d.path chooses between


class _Forced(nn.Module):
    """``module`` computed under one :func:`operator_choice` (``path`` None: the shape-based choice)."""

    def __init__(self, module: nn.Module, path: str | None) -> None:
        super().__init__()
        self.module, self.path = module, path

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        with operator_choice(path=self.path):
            return self.module(x)


def run_paths(repeats: int, batch: int) -> list[dict]:
    """Times both paths of the ACS convolution (acs, soft) per layer shape (the choice of :meth:`ACSConv3d.path`).

    The paths are timed alternately in one loop (forward + backward, median of ``repeats`` after a warm-up), so
    their ratios hold on a shared machine; ``chosen`` is what the operator picks for that shape.
    """
    rows = []
    for cin, cout, size, stride in PATH_SHAPES:
        x = torch.randn(batch, cin, size, size, size).contiguous(memory_format=torch.channels_last_3d)
        for mode in ("acs", "soft"):
            layer = ACSConv3d(cin, cout, 3, stride, 1, mode=mode)
            forced = {path: _Forced(layer, path) for path in PATHS}
            times: dict[str, list[float]] = {path: [] for path in PATHS}
            for module in forced.values():
                _step(module, x)
            for _ in range(repeats):
                for path, module in forced.items():
                    times[path].append(_step(module, x))
            median = {path: statistics.median(t) for path, t in times.items()}
            chosen = layer.path(x.shape)
            rows.append({"shape": f"{cin}->{cout}, {size}^3, stride {stride}", "mode": mode, "seconds": median,
                         "fastest": min(median, key=median.get), "chosen": chosen})
            print(f"{rows[-1]['shape']:28s} {mode:5s} " + "  ".join(f"{p} {t:.4f} s" for p, t in median.items())
                  + f"  fastest {rows[-1]['fastest']}, chosen {chosen}", flush=True)
    return rows


#: (in, out, spatial size) of the ACS convolutions --limits reads: throughput.py's operator row, and a U-Net's last
#: decoder stage (5-6 output channels per view at 64^3, where ACSConv3d.path takes the dense path).
LIMIT_SHAPES = ((32, 48, 48), (32, 16, 64))


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_limits(repeats: int, batch: int, shapes: Sequence[tuple[int, int, int]] = LIMIT_SHAPES) -> list[dict]:
    """What bounds one ``acs`` convolution on this CPU: each view's thin convolution (forward) against the measured
    float32 matmul peak, and the whole operator (forward + backward) beside acsconv's ``ACSConv``, each given the
    input in the standard layout and in ``channels_last_3d`` (timed alternately)."""
    from benchmarks.throughput import matmul_peak

    peak = matmul_peak("cpu")
    print(f"measured float32 matmul peak: {peak / 1e12:.3f} TFLOP/s", flush=True)
    rows = []
    for cin, cout, size in shapes:
        conv2d = nn.Conv2d(cin, cout, 3, padding=1)
        ours = lift(conv2d, "acs", check=False)
        twin = _acsconv_twin(conv2d, ours, "acs")
        standard = torch.randn(batch, cin, size, size, size)
        last = standard.contiguous(memory_format=torch.channels_last_3d)
        shape = f"{cin}->{cout}, {size}^3"
        for view in range(3):
            lo, hi = ours.view_channels(view)
            flops = 2 * batch * size**3 * (hi - lo) * cin * 9
            for layout, x in (("standard", standard), ("channels_last_3d", last)):
                with torch.no_grad():  # the operator's own thin convolution of that view
                    seconds = _median_seconds(lambda x=x, v=view, op=ours: op._view(x, v), repeats)
                rows.append({"shape": shape, "what": f"view {view} forward ({hi - lo} channels)", "input": layout,
                             "seconds": seconds, "share": flops / seconds / peak})
        for layout, x in (("standard", standard), ("channels_last_3d", last)):
            t_ours, t_twin = _time_pair(ours, twin, x, repeats)
            rows.append({"shape": shape, "what": "acs operator forward + backward", "input": layout,
                         "seconds": t_ours, "acsconv": t_twin})
        print(f"{shape}: acs operator {t_ours:.4f} s, acsconv {t_twin:.4f} s (channels_last_3d input)", flush=True)
    return rows


def main() -> None:
    """Command line entry: print the table of ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="cube side of the input volume")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    parser.add_argument("--channels", type=int, default=32, help="channels of the single conv layer")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--paths", action="store_true", help="time each operator path per layer shape instead")
    parser.add_argument("--limits", action="store_true", help="what bounds one acs convolution instead")
    parser.add_argument("--batch", type=int, default=2, help="batch size of --paths and --limits")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.limits:
        rows = run_limits(args.repeats, args.batch)
        print(f"\nbatch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads; share: forward "
              "FLOP/s of the view's thin convolution / measured matmul peak")
        print("| layer | what | input layout | gandlf_dimlift s | share of matmul peak | acsconv ACSConv s |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            share = f"{100 * r['share']:.0f} %" if "share" in r else ""
            twin = f"{r['acsconv']:.4f}" if "acsconv" in r else ""
            print(f"| {r['shape']} | {r['what']} | {r['input']} | {r['seconds']:.4f} | {share} | {twin} |")
        return
    if args.paths:
        rows = run_paths(args.repeats, args.batch)
        print(f"\nforward+backward seconds per path, batch {args.batch}, channels_last_3d input, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads")
        print("| layer | mode | views | dense | fastest | chosen |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            cells = " | ".join(f"{r['seconds'][p]:.4f}" for p in PATHS)
            print(f"| {r['shape']} | {r['mode']} | {cells} | {r['fastest']} | {r['chosen']} |")
        return
    rows = run(args.size, args.repeats, args.channels)
    print(f"\nforward+backward, input {args.size}^3, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          "ratio = gandlf_dimlift / acsconv")
    print("| case | mode | gandlf_dimlift (s) | acsconv (s) | ratio | max abs diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['mode']} | {r['ours_s']:.3f} | {r['acsconv_s']:.3f} | "
              f"{r['ours_s'] / r['acsconv_s']:.2f} | {r['max_abs_diff']:.1e} |")
    worst = max(r["max_abs_diff"] for r in rows)
    print(f"\nlargest output difference: {worst:.1e} ({'within' if worst <= 1e-5 else 'ABOVE'} 1e-5)")


if __name__ == "__main__":
    main()
