"""GaNDLF's own test flows and the learning check: the committed sweep (docs/conformance.json, .md) and a re-run of
a representative slice of it (scripts/conformance.py runs the whole matrix)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = json.loads((ROOT / "docs" / "conformance.json").read_text())


def _script():
    spec = importlib.util.spec_from_file_location("conformance", ROOT / "scripts" / "conformance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["conformance"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


SCRIPT = _script()


def _registered():
    import GANDLF.models  # noqa: F401 - the hook registers the plugin on this import

    from gandlf_dimlift.registry import registered

    return {key: entry.builder for key, entry in registered().items()}


def test_sweep_covers_every_registered_architecture_and_applicable_flow():
    rows = {(r["architecture"], r["flow"]) for r in DATA["flows"]}
    expected = {(key, name) for key, builder in _registered().items() for name, flow in SCRIPT.FLOWS.items()
                if SCRIPT.applicable(builder, flow)}
    assert expected <= rows, f"not in the sweep (rerun scripts/conformance.py): {sorted(expected - rows)[:8]}"


def test_every_flow_passes_or_is_refused_before_training_with_the_fix():
    assert {r["status"] for r in DATA["flows"]} <= {"pass", "refused"}, [
        (r["architecture"], r["flow"], r.get("message")) for r in DATA["flows"] if r["status"] == "fail"]
    for row in (r for r in DATA["flows"] if r["status"] == "refused"):
        assert "patch" in row["message"] and ("Use " in row["message"] or "set " in row["message"]), row


def test_every_plugin_architecture_learns_at_least_as_well_as_gandlfs_builtin():
    """The rule of `ONE_OF_12_SUBJECTS` in the script: each plugin row's mean is at least the built-in's, or its
    difference's 95% interval stays above minus the check's margin, over the check's number of runs."""
    builders = _registered()
    for name, check in SCRIPT.LEARNING.items():
        rows = {r["architecture"]: r for r in DATA["learning"] if r["check"] == name}
        expected = {k for k, b in builders.items() if check.dimension in b.dimensions and check.task in
                    b.problem_types}
        assert expected | {check.reference} <= set(rows), (name, sorted(rows))
        reference = rows[check.reference]
        assert reference["status"] == "pass" and reference["value"] > 0.6, f"{name}: the built-in did not learn"
        assert all(rows[k]["status"] == "pass" for k in expected), (name, [rows[k] for k in expected])
        assert {len(rows[k]["runs"]) for k in expected | {check.reference}} == {check.repeats}, name
        assert all(rows[k]["curve"][-1] > rows[k]["curve"][0] for k in expected), f"{name}: a row does not learn"
        verdicts = {k: SCRIPT.learning_verdict(rows[k], reference, check.margin) for k in expected}
        behind = {k: (rows[k]["value"], interval) for k, (verdict, interval) in verdicts.items() if verdict == "behind"}
        assert not behind, f"{name}: behind GaNDLF's {check.reference} ({reference['value']:.3f}): {behind}"


def test_a_row_is_behind_when_its_interval_leaves_the_margin():
    level = [1.0] * 16
    one_short = {"value": 15 / 16 + 11 / 12 / 16, "runs": [1.0] * 15 + [11 / 12]}
    assert SCRIPT.learning_verdict(one_short, {"value": 1.0, "runs": level}, 1 / 12)[0] == "within the margin"
    assert SCRIPT.learning_verdict(one_short, {"value": 1.0, "runs": level}, 0.0)[0] == "behind"
    assert SCRIPT.learning_verdict({"value": 1.0, "runs": level}, {"value": 1.0, "runs": level}, 0.0)[0] == (
        "at least level")
    lagging = [11 / 12, 10 / 12, 1.0, 11 / 12] * 4  # a subject short on average
    assert SCRIPT.learning_verdict({"value": sum(lagging) / 16, "runs": lagging}, {"value": 1.0, "runs": level},
                                   1 / 12)[0] == "behind"


def test_difference_interval_reaches_zero_only_within_the_spread():
    assert SCRIPT.difference_interval([1.0] * 7 + [0.92], [1.0] * 8)[1] == 0
    assert SCRIPT.difference_interval([0.92, 0.83, 1.0, 0.92] * 2, [1.0] * 8)[1] < 0


def test_every_learning_row_records_its_held_out_metric_per_run():
    for row in (r for r in DATA["learning"] if r["status"] == "pass"):
        assert len(row["validation_runs"]) == len(row["runs"]), (row["architecture"], row["check"])
        assert 0 <= min(row["validation_runs"]) and max(row["validation_runs"]) <= 1, row
        assert row["validation"] == pytest.approx(sum(row["validation_runs"]) / len(row["runs"]), abs=1e-3), row


def test_markdown_is_rendered_from_the_json():
    assert (ROOT / "docs" / "conformance.md").read_text() == SCRIPT.render(DATA)


def test_a_partial_sweep_replaces_its_rows_in_place():
    table = {"flows": [], "learning": [{"architecture": a, "check": "c", "value": 0} for a in ("ref", "x", "y")]}
    partial = {"gandlf": "g", "torch": "t", "machine": "m", "date": "d", "flows": [],
               "learning": [{"architecture": a, "check": "c", "value": 1} for a in ("z", "x", "ref")]}
    rows = SCRIPT.merged(table, partial)["learning"]
    assert [(r["architecture"], r["value"]) for r in rows] == [("ref", 1), ("x", 1), ("y", 0), ("z", 1)]


# A representative slice, re-run: a lifted family per dimension and final layer kind, the logits inference without
# ground truth, ONNX export, a last batch of one sample, and DX-Net's regression head at batch 1 (refused while it
# averaged over space).
SLICE = [
    ("dimlift_smp", "seg3d-softmax"), ("dimlift_omnianet", "seg2d-sigmoid"), ("dimlift_dxnet", "seg3d-batch2-odd"),
    ("dimlift_dxnet", "seg3d-identity"), ("dimlift_slice_attention", "cls3d-logits-infer"),
    ("dimlift_smp", "cls3d-optimize"), ("dimlift_dxnet", "reg3d"),
]


@pytest.fixture(scope="module")
def gandlf_data(tmp_path_factory):
    return SCRIPT.write_gandlf_test_data(tmp_path_factory.mktemp("gandlf_data"))["3d_rad_segmentation"].parent


@pytest.mark.slow
@pytest.mark.parametrize(("architecture", "flow"), SLICE)
def test_representative_slice_still_conforms(architecture, flow, gandlf_data, tmp_path):
    committed = next(r for r in DATA["flows"] if (r["architecture"], r["flow"]) == (architecture, flow))
    now = SCRIPT._in_subprocess("flow", architecture, flow, gandlf_data, tmp_path / "work", timeout=900)
    assert now["status"] == committed["status"], now.get("message")
    if now["status"] == "refused":
        assert now["message"] == committed["message"]
