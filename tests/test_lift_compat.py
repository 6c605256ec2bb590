"""The committed lift compatibility table (docs/compatibility.json, .md) and a re-run of part of it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from gandlf_dimlift.lift import MODES

smp = pytest.importorskip("segmentation_models_pytorch")

ROOT = Path(__file__).resolve().parents[1]
DATA = json.loads((ROOT / "docs" / "compatibility.json").read_text())
RESULTS = {(r["encoder"], r["mode"]): r for r in DATA["results"]}


def _sweep_module():
    spec = importlib.util.spec_from_file_location("lift_compat_sweep", ROOT / "scripts" / "lift_compat_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_covers_every_installed_encoder_and_mode() -> None:
    from segmentation_models_pytorch.encoders import encoders

    missing = [(e, m) for e in sorted(encoders) for m in MODES if (e, m) not in RESULTS]
    assert not missing, f"{len(missing)} (encoder, mode) pairs not in the sweep, e.g. {missing[:5]}; rerun the sweep"


def test_markdown_is_rendered_from_the_json() -> None:
    assert (ROOT / "docs" / "compatibility.md").read_text() == _sweep_module().render(DATA)


def test_failures_are_named_lift_errors() -> None:
    # the rest fail with the named error (path, type, modes), not a shape error deep inside torch;
    # "memory" / "timeout" rows are resource limits of the sweep machine, not lift results
    assert {r["status"] for r in RESULTS.values()} <= {"ok", "error", "memory", "timeout"}
    bad = [(k, r.get("error")) for k, r in RESULTS.items() if r["status"] == "error" and r.get("error") != "LiftError"]
    assert not bad, bad
    named = [r for r in RESULTS.values() if r["status"] == "error"]
    assert all(r["message"].startswith("module '") for r in named)


GOAL = ("efficientnet-b", "timm-efficientnet-b", "vgg", "inceptionv4", "dpn", "resnext", "timm-regnet")


def test_families_gandlf_cannot_lift_lift_in_inflate_and_2p5d() -> None:
    goal = [e for e in DATA["encoders"] if e.startswith(GOAL)]
    assert len(goal) > 40
    failing = [(e, m) for e in goal for m in ("inflate", "2.5d") if RESULTS[(e, m)]["status"] == "error"]
    assert not failing, failing


# a representative slice, re-run on every test run: one encoder per family and a mode each
SLICE = [
    ("resnet18", "acs"), ("resnet18", "2.5d"), ("efficientnet-b0", "inflate"), ("timm-efficientnet-b0", "soft"),
    ("vgg11", "mean"), ("timm-regnetx_002", "inflate_center"), ("timm-mobilenetv3_small_100", "conv3d"),
]


def _rerun(encoder: str, mode: str, backward: bool) -> dict:
    return _sweep_module().run_one(encoder, [mode], backward=backward)[0]


@pytest.mark.parametrize(("encoder", "mode"), SLICE)
def test_representative_slice_still_lifts(encoder: str, mode: str) -> None:
    before = RESULTS[(encoder, mode)]["status"]
    now = _rerun(encoder, mode, backward=True)
    if before == "ok":
        assert now["status"] == "ok", f"{encoder}/{mode} lifted before and fails now: {now.get('message')}"


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize("key", sorted(k for k, r in RESULTS.items() if r["status"] == "ok"))
def test_every_encoder_that_lifted_still_lifts(key: tuple[str, str]) -> None:
    now = _rerun(*key, backward=False)
    assert now["status"] == "ok", f"{key} lifted before and fails now: {now.get('message')}"
