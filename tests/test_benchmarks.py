"""The benchmark scripts cannot rot: data, statistics, the report, the committed results, and a real quick run."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import (
    compare,
    configs,
    data,
    explanation,
    lift_ops,
    pretraining,
    report,
    runner,
    slice_attention_learning,
    slice_attention_stability,
    stats,
    throughput,
)

RESULTS = Path(compare.__file__).with_name("RESULTS.md")


@pytest.fixture(scope="module")
def quick_data(tmp_path_factory) -> Path:
    """The --quick dataset (20 subjects of 32^3 at 6 mm from the real MNI152 template)."""
    out = tmp_path_factory.mktemp("bench") / "data"
    return data.generate(out, data.DataSettings(**data.QUICK))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.slow
def test_quick_data_generation(quick_data: Path) -> None:
    meta = json.loads((quick_data / "dataset.json").read_text())
    assert meta["shape"] == [32, 32, 32] and meta["n_subjects"] == 20 and meta["split"] == [0.6, 0.1, 0.3]
    splits = {s: {r["SubjectID"] for r in _rows(quick_data / f"segmentation_{s}.csv")} for s in data.SPLITS}
    assert [len(splits[s]) for s in data.SPLITS] == [12, 2, 6]
    assert not (splits["train"] & splits["validation"]) and not (splits["train"] & splits["test"])
    for split in data.SPLITS:  # detection uses the same subjects and splits
        assert {r["SubjectID"] for r in _rows(quick_data / f"detection_{split}.csv")} == splits[split]
    lesions = data.read_lesions(quick_data)
    assert {v["lesion"] for v in lesions.values()} == {0, 1}
    for row in _rows(quick_data / "segmentation_train.csv"):
        image, label = runner.read_image(row["Channel_0"]), runner.read_image(row["Label"])
        assert image.shape == label.shape == (32, 32, 32)
        assert set(np.unique(label)) == {0, 1, 2}
        assert 0.0 <= image.min() and image.max() <= 1.5 and image.std() > 0.05
    for row in _rows(quick_data / "detection_train.csv") + _rows(quick_data / "detection_test.csv"):
        info = lesions[row["SubjectID"]]
        assert int(row["ValueToPredict"]) == info["lesion"]
        # GaNDLF's label sampler takes a whole-volume patch only where this image is positive at the centre
        assert runner.read_image(row["Label"]).min() == 1
        if info["lesion"]:
            mask = runner.read_image(Path(row["Channel_0"]).with_name("lesion_mask.nii.gz"))
            occupied = np.flatnonzero(mask.any(axis=(0, 1))).tolist()
            assert occupied == info["slices"] and occupied, "recorded lesion slices must match the lesion mask"
            clean = runner.read_image(Path(row["Channel_0"]).with_name("t1.nii.gz"))
            assert np.abs(runner.read_image(row["Channel_0"]) - clean)[mask > 0].mean() > 0.05
        else:
            assert not info["slices"]


@pytest.mark.slow
def test_slice_sets_for_the_2d_sources(quick_data: Path, tmp_path: Path) -> None:
    """Classification slices: every lesion slice positive, as many lesion-free slices; segmentation: tissue."""
    csvs = data.task_csvs(quick_data, "detection")
    out = pretraining.write_slice_sets(quick_data, csvs, tmp_path / "cls", "classification", multiple=2)
    lesions = data.read_lesions(quick_data)
    train = _rows(out["train"])
    assert len(train) % 2 == 0 and {r["ValueToPredict"] for r in train} == {"0", "1"}
    expected_positive = sum(len(lesions[r["SubjectID"]]["slices"]) for r in _rows(csvs["train"]))
    assert sum(r["ValueToPredict"] == "1" for r in train) in (expected_positive, expected_positive - 1)
    for row in train:
        subject, z = row["SubjectID"].rsplit("_z", 1)
        assert (int(z) in lesions[subject]["slices"]) == (row["ValueToPredict"] == "1")
        volume = runner.read_image(next(r["Channel_0"] for r in _rows(csvs["train"]) if r["SubjectID"] == subject))
        assert np.array_equal(runner.read_image(row["Channel_0"]), volume[..., int(z)])
    seg = pretraining.write_slice_sets(quick_data, data.task_csvs(quick_data, "segmentation"), tmp_path / "seg",
                                       "segmentation", every=2, multiple=2)
    first = _rows(seg["train"])[0]
    assert runner.read_image(first["Label"]).shape == (32, 32) and set(np.unique(runner.read_image(first["Label"])))
    assert len(_rows(seg["validation"])) > 0
    capped = pretraining.write_slice_sets(quick_data, data.task_csvs(quick_data, "segmentation"), tmp_path / "cap",
                                          "segmentation", max_validation=5)
    assert len(_rows(capped["validation"])) == 5


def test_same_seed_same_split_and_lesions() -> None:
    first = data.make_splits(20, (0.6, 0.1, 0.3), seed=3)
    assert first == data.make_splits(20, (0.6, 0.1, 0.3), seed=3)
    assert [len(first[s]) for s in data.SPLITS] == [12, 2, 6]
    assert data.make_splits(20, (0.6, 0.1, 0.3), seed=4) != first
    chosen = data.lesion_assignment(first, 0.5, seed=3)
    for members in first.values():  # every split holds both classes
        assert 0 < len(chosen & set(members)) < len(members)
    with pytest.raises(ValueError, match="at least 3"):
        data.make_splits(2, (0.6, 0.2, 0.2), seed=0)


def test_subset_is_class_balanced_and_a_multiple_of_the_batch(tmp_path: Path) -> None:
    source = tmp_path / "train.csv"
    source.write_text("SubjectID,Channel_0,Label,ValueToPredict\n" +
                      "".join(f"s{i:02d},x,y,{int(i < 12)}\n" for i in range(36)))
    subset = pretraining.subset_csv(source, 9, 4, tmp_path / "sub.csv")
    rows = _rows(subset)
    assert len(rows) == 8 and sum(r["ValueToPredict"] == "1" for r in rows) in (2, 3)
    assert rows == sorted(rows, key=lambda r: r["SubjectID"])
    assert _rows(pretraining.subset_csv(source, 9, 4, tmp_path / "again.csv")) == rows  # seeded
    assert len(_rows(pretraining.subset_csv(source, 99, 4, tmp_path / "all.csv"))) == 36
    assert pretraining.setting_name(1.0) == "full" and pretraining.setting_name(0.25) == "25%"


# ------------------------------------------------------------------------------------------------ statistics


def test_metrics() -> None:
    assert stats.auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert stats.auc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert stats.auc([0.5, 0.5], [1, 0]) == 0.5
    assert stats.auc([0.5, 0.7], [1, 1]) is None
    truth = np.array([0, 1, 1, 2, 2, 2])
    assert runner.dice(truth, truth, 2) == 1.0
    assert runner.dice(np.array([0, 1, 1, 1, 2, 2]), truth, 1) == pytest.approx(2 * 2 / (3 + 2))
    assert runner.dice(truth, truth, 5) == 1.0  # absent from both
    assert pretraining.epochs_to([0.1, 0.5, 0.7], 0.6) == 3
    assert pretraining.epochs_to([0.1, 0.5], 0.6) is None
    assert pretraining.epochs_to([0.7, 0.5, 0.3], 0.5, higher_is_better=False) == 2


def test_bootstrap_intervals() -> None:
    rng = np.random.default_rng(1)
    labels = np.array([0] * 30 + [1] * 30)
    scores = labels + rng.normal(0, 0.8, size=60)
    value = stats.auc(scores, labels)
    low, high = stats.auc_interval(scores, labels)
    assert low < value < high and 0.5 < low and high <= 1.0
    assert stats.auc_interval(labels.astype(float), labels) == [1.0, 1.0]  # perfect separation in every resample
    index = stats.resamples(60, labels, n_bootstrap=5)
    assert index.shape == (5, 60) and all((labels[i] == 1).sum() == 30 for i in index)  # stratified
    values = rng.uniform(0.7, 0.9, size=40)
    low, high = stats.mean_interval(values)
    assert low < values.mean() < high and high - low < 0.1
    assert stats.gain_interval(scores, scores, labels) == [0.0, 0.0]
    better = scores + labels * 2.0  # pushes the positives up: AUC gains in every resample
    assert stats.gain_interval(scores, better, labels)[0] > 0
    assert stats.gain_interval(values, values + 0.05) == pytest.approx([0.05, 0.05])
    with pytest.raises(ValueError, match="differ in length"):
        stats.gain_interval([0.1], [0.1, 0.2])


# ------------------------------------------------------------------------------------------------ configs and rows


def test_every_default_row_exists() -> None:
    for name in compare.DETECTION_ROWS + compare.SEGMENTATION_ROWS + compare.QUICK_DETECTION_ROWS:
        assert runner.row_by_name(name).name == name
    for family in pretraining.FAMILIES:
        row, source = runner.row_by_name(family.row), runner.row_by_name(family.source)
        assert source.dimension == 2 and row.architecture.startswith("dimlift_")
        assert row.task == ("classification" if family.task == "detection" else "segmentation")
    names = {r.name for r in throughput.ROWS}
    assert {"resnet18", "densenet121", "dimlift_smp/cls", "dimlift_dxnet/b0"} <= names
    with pytest.raises(SystemExit, match="unknown row"):
        runner.row_by_name("no-such-row")
    with pytest.raises(SystemExit, match="unknown pretraining family"):
        pretraining.family_by_name("no-such-family")


def test_budget_and_final_layer() -> None:
    settings = runner.Settings(epochs=4, learning_rate=1e-3, detection_epochs=9, detection_learning_rate=1e-4,
                               pretrain_epochs=3)
    assert settings.budget("segmentation") == (4, 1e-3) and settings.budget("detection") == (9, 1e-4)
    assert settings.budget("slices-detection") == (3, 1e-4) and settings.budget("slices-segmentation") == (3, 1e-3)
    unset = runner.Settings(epochs=4, detection_epochs=None, detection_learning_rate=None, pretrain_epochs=None)
    assert unset.budget("detection") == (4, 1e-3) and unset.budget("slices-segmentation") == (4, 1e-3)
    row = runner.row_by_name("dimlift_slice_attention/attention")
    config = configs.make_config(row, (32, 32, 32), num_epochs=9, learning_rate=1e-4)
    # GaNDLF's cel is cross-entropy on the model output: a softmax final layer would apply softmax twice
    assert config["model"]["final_layer"] == "logits" and config["loss_function"] == "cel"
    assert (config["num_epochs"], config["learning_rate"], config["patience"]) == (9, 1e-4, 10)
    assert configs.make_config(row, (32, 32, 32), final_layer="softmax")["model"]["final_layer"] == "softmax"
    with pytest.raises(ValueError, match="choose one of"):
        configs.make_config(row, (32, 32, 32), final_layer="sigmoid")
    segmentation = configs.make_config(runner.row_by_name("resunet"), (32, 32, 32))
    assert segmentation["model"]["class_list"] == [0, 1, 2] and segmentation["model"]["final_layer"] == "softmax"


def test_the_2d_source_loads_into_every_detection_family(tmp_path: Path) -> None:
    """The 2D classifier's checkpoint initialises dimlift_smp (acs, inflate) as written by GaNDLF, and slice attention
    through its encoder written 3-channel, which answers a grey slice as the 2D encoder does."""
    import torch
    from GANDLF.models import get_model

    def build(name: str, pretrained: Path | None = None, seed: int = 0):
        base = runner.row_by_name(name)
        options = {**base.model, **({"pretrained": str(pretrained)} if pretrained else {})}
        row = throughput.Row(name, base.architecture, base.task, options, dimension=base.dimension)
        torch.manual_seed(seed)
        return get_model(throughput.gandlf_parameters(row, 32, 2))

    two_d = build("dimlift_smp/cls-2d", seed=1)
    checkpoint = tmp_path / "dimlift_smp_best.pth.tar"
    torch.save({"model_state_dict": two_d.state_dict()}, checkpoint)
    kernel = two_d.state_dict()["net.encoder.layer1.0.conv1.weight"]
    acs = build("dimlift_smp/cls", checkpoint).state_dict()["net.encoder.layer1.0.conv1.weight"]
    assert torch.equal(acs, kernel)  # ACS keeps the 2D kernel
    inflate = build("dimlift_smp/cls-inflate", checkpoint).state_dict()["net.encoder.layer1.0.conv1.weight"]
    assert torch.allclose(inflate.sum(dim=-1), kernel, atol=1e-6)  # I3D: the kernel repeated along z, over 3

    encoder_file = pretraining.rgb_encoder_state(checkpoint, tmp_path / "encoder_rgb.pth")
    attention = build("dimlift_slice_attention/attention", encoder_file)
    slices = torch.rand(3, 1, 32, 32)
    two_d.eval(), attention.eval()
    with torch.no_grad():
        expected = two_d.net.encoder(slices)[-1]
        grey = attention.encoder(slices.expand(-1, 3, -1, -1))[-1]
    assert torch.allclose(grey, expected, atol=1e-5)
    torch.save({"model_state_dict": {"other.weight": torch.zeros(1)}}, tmp_path / "bad.pth.tar")
    with pytest.raises(ValueError, match="net.encoder"):
        pretraining.rgb_encoder_state(tmp_path / "bad.pth.tar", tmp_path / "x.pth")


# ------------------------------------------------------------------------------------------------ report


def _fake_results() -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    labels = [0, 1] * 10
    subjects = [f"s{i:02d}" for i in range(20)]

    def detection(name: str, architecture: str, strength: float) -> dict:
        scores = [float(y * strength + rng.uniform()) for y in labels]
        return {"name": name, "architecture": architecture, "task": "detection", "note": "n", "epochs": 3,
                "epoch_s": 2.0, "train_wall_s": 30.0, "infer_wall_s": 10.0, "peak_mib": 500.0, "params": 1e6,
                "n_train": 40, "subjects": subjects, "scores": scores, "labels": labels,
                "auc": stats.auc(scores, labels), "auc_ci": stats.auc_interval(scores, labels), "accuracy": 0.7,
                "n_test": 20, "n_positive": 10, "config": {"loss_function": "cel", "model": {"pooling": "attention"}},
                "train_log": {"train_loss": [0.7, 0.5, 0.4]},
                "validation_log": {"val_loss": [0.7, 0.6, 0.5 if strength < 1 else 0.4]}}

    def segmentation(name: str, level: float) -> dict:
        per_subject = [float(level + rng.uniform(-0.02, 0.02)) for _ in subjects]
        return {"name": name, "architecture": name, "task": "segmentation", "note": "", "epochs": 3, "epoch_s": 5.0,
                "train_wall_s": 60.0, "infer_wall_s": 10.0, "subjects": subjects, "subject_dice_fg": per_subject,
                "dice_fg": float(np.mean(per_subject)), "dice_fg_ci": stats.mean_interval(per_subject),
                "dice": [0.99, level, level], "config": {"loss_function": "dc"},
                "validation_log": {"val_dice": [0.5, 0.6, level]}, "train_log": {"train_loss": [0.5, 0.4, 0.3]}}

    attention = detection("dimlift_slice_attention/attention", "dimlift_slice_attention", 0.5)
    attention["explanation"] = {"mass": 0.3, "share": 0.15, "ratio": 2.0, "ratio_ci": [1.5, 2.5], "n": 10,
                                "subjects": []}
    family = pretraining.FAMILIES[0]
    pretrained = detection("dimlift_slice_attention/attention+2d", "dimlift_slice_attention", 2.0)
    random_seg, pretrained_seg = segmentation("dimlift_dxnet/b0", 0.8), segmentation("dimlift_dxnet/b0+2d", 0.85)
    source = {"name": "dimlift_smp/cls-2d@full", "task": "slices-detection", "epochs": 2, "epoch_s": 3.0,
              "train_wall_s": 20.0, "n_slices": 100, "config": {"loss_function": "cel"},
              "validation_log": {"val_loss": [0.5, 0.4]}}
    results = {
        "detection": [detection("resnet18", "resnet18", 1.0), attention],
        "segmentation": [segmentation("resunet", 0.85), random_seg],
        "pretraining": {
            "sources": {"full": {"dimlift_smp/cls-2d": source}},
            "rows": {attention["name"]: attention, pretrained["name"]: pretrained},
            "families": {family.name: {"full": {**pretraining.compare_pair(family, attention, pretrained),
                                                "source_wall_s": 20.0, "n_train": 40}},
                         "dimlift_dxnet": {"full": pretraining.compare_pair(pretraining.FAMILIES[3], random_seg,
                                                                            pretrained_seg)}},
        },
    }
    meta = {"command": "python -m benchmarks.compare --test", "quick": False, "machine": "test", "wall_min": 1.0,
            "summed_min": 2.0, "reused": 0, "finished": "now", "splits": "40/5/20", "figures": [],
            "data": {"n_subjects": 65, "spacing": 6.0, "shape": [32, 32, 32], "seed": 0,
                     "lesion_radius_mm": [8.0, 16.0], "lesion_contrast": [0.35, 0.6]},
            "settings": dataclasses.asdict(runner.Settings(epochs=3))}
    return meta, results


def test_report_renders_the_summary_alone(tmp_path: Path) -> None:
    meta, results = _fake_results()
    summary = report.summarize(meta, results)
    assert summary["detection"]["resnet18"]["auc_ci"][0] <= summary["detection"]["resnet18"]["auc"]
    assert summary["explanation"]["dimlift_slice_attention/attention"]["ratio"] == 2.0
    gain = summary["pretraining"]["dimlift_slice_attention"]["full"]
    assert gain["metric"] == "auc" and gain["gain"] > 0 and gain["gain_ci"][0] > 0
    assert gain["validation_metric"] == "val_loss" and gain["target"] == 0.5
    assert gain["random_epochs"] == 3 and gain["pretrained_epochs"] == 3 and gain["saved_s"] == 0.0
    dxnet = summary["pretraining"]["dimlift_dxnet"]["full"]
    assert dxnet["metric"] == "dice" and dxnet["gain"] == pytest.approx(0.05, abs=0.01)
    out = tmp_path / "R.md"
    text = report.write(summary, out)
    assert text == out.read_text() == report.markdown(json.loads(out.with_suffix(".json").read_text()), "R")
    for name in ("detection", "segmentation", "pretraining"):
        assert (tmp_path / f"R_{name}.png").stat().st_size > 1000 and f"(R_{name}.png)" in text
    assert "| resnet18 | " in text and "| dimlift_dxnet | full | " in text and "2.00 |" in text


# The committed results: the quick run and the full run (RESULTS, about 4.5 hours of a quiet machine over several
# invocations into one --work; its command in the file), each with every row and family of its command.
COMMITTED = {
    "RESULTS_quick": (compare.QUICK_DETECTION_ROWS, compare.QUICK_SEGMENTATION_ROWS, compare.QUICK_FAMILIES,
                      compare.QUICK_FRACTIONS),
    "RESULTS": (compare.DETECTION_ROWS, compare.SEGMENTATION_ROWS, compare.FAMILIES, compare.FRACTIONS),
}


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_committed_results_agree_and_cover_every_row(name: str) -> None:
    """The markdown is the rendering of the JSON; both cover every row and family of the run that wrote them."""
    results = RESULTS.with_name(f"{name}.md")
    detection, segmentation, families, fractions = COMMITTED[name]
    summary = json.loads(results.with_suffix(".json").read_text())
    assert results.read_text() == report.markdown(summary, name), f"re-render: python -m benchmarks.report {results}"
    assert summary["command"].startswith("python -m benchmarks.compare")
    assert ("--quick" in summary["command"]) == name.endswith("_quick")
    assert set(detection) <= set(summary["detection"])
    assert set(segmentation) <= set(summary["segmentation"])
    attention_rows = {n for n in detection if n.startswith("dimlift_slice_attention")}
    assert attention_rows <= set(summary["explanation"])
    for family in families:
        assert {pretraining.setting_name(f) for f in fractions} <= set(summary["pretraining"][family])
    for row in summary["detection"].values():
        assert "error" in row or (row["auc_ci"][0] <= row["auc"] <= row["auc_ci"][1])
    for row in summary["segmentation"].values():
        assert "error" in row or (row["dice_ci"][0] <= row["dice"] <= row["dice_ci"][1])
    for figure in summary["meta"]["figures"]:
        assert results.with_name(f"{name}_{figure}.png").stat().st_size > 0
    # the README's reproduction command is the one that wrote the file
    readme = " ".join(RESULTS.parents[1].joinpath("README.md").read_text().replace("\\\n", " ").split())
    readme += " " + " ".join(RESULTS.with_name("README.md").read_text().replace("\\\n", " ").split())
    assert " ".join(summary["command"].split()) in readme


def test_estimate_from_a_calibration_run() -> None:
    calibration = {"results": {
        "detection": [{"name": "resnet18", "task": "detection", "epochs": 2, "epoch_s": 10.0, "train_wall_s": 50.0,
                       "infer_wall_s": 15.0}],
        "segmentation": [{"name": "resunet", "task": "segmentation", "epochs": 2, "epoch_s": 20.0,
                          "train_wall_s": 70.0, "infer_wall_s": 20.0}],
        "pretraining": {"sources": {"full": {"cls": {"name": "cls@full", "task": "slices-detection", "epochs": 2,
                                                     "epoch_s": 5.0, "train_wall_s": 30.0}}},
                        "rows": {"resnet18": {"name": "resnet18"}}},  # already counted in detection
    }}
    text, total = compare.estimate(calibration, runner.Settings(epochs=4, detection_epochs=12, pretrain_epochs=3))
    assert total == pytest.approx((65 + 10 * 10.0) + (90 + 2 * 20.0) + (30 + 1 * 5.0))
    assert "| resnet18 | detection | 2 | 10.0 | 65 | 12 | 2.8 |" in text


def test_explanation_score_and_best_and_worst(tmp_path: Path) -> None:
    weights = tmp_path / "slice_weights.csv"
    lines = ["subject,view,slice_index,weight,prediction"]
    for subject, peak in (("a", 2), ("b", 6), ("c", 0)):
        lines += [f"{subject},z,{z},{0.6 if z == peak else 0.05},1" for z in range(8)]
    weights.write_text("\n".join(lines) + "\n")
    lesions = {"a": {"lesion": 1, "slices": [2, 3], "n_slices": 8}, "b": {"lesion": 1, "slices": [2, 3], "n_slices": 8},
               "c": {"lesion": 0, "slices": [], "n_slices": 8}}
    scored = explanation.score(weights, lesions)
    assert scored["n"] == 2 and scored["share"] == 0.25
    assert scored["mass"] == pytest.approx(np.mean([0.65 / 0.95, 0.1 / 0.95]))
    assert scored["ratio"] == pytest.approx(scored["mass"] / 0.25)
    picked = explanation.best_and_worst([{"name": "r", "explanation": scored, "config": {"model": {}}}])
    assert [(w, s["subject"]) for _, w, s in picked] == [("best", "a"), ("worst", "b")]
    assert explanation.best_and_worst([{"name": "m", "explanation": scored,
                                        "config": {"model": {"pooling": "mean"}}}]) == []


# ------------------------------------------------------------------------------------------------ GaNDLF runs


@pytest.mark.slow
def test_throughput_quick_rows_in_process(tmp_path: Path) -> None:
    """A GaNDLF baseline, a plugin row, and an unknown key (an error row, not a crash)."""
    unknown = throughput.Row("unknown", "dimlift_not_a_model", "classification")
    args = throughput.parse_args(["--quick", "--batch", "2", "--profile", "3"])
    results = [throughput.run_row(throughput.ROWS[[r.name for r in throughput.ROWS].index(name)], 32, args)
               for name in ("resnet18", "dimlift_slice_attention/mean")]
    results.append(throughput.run_row(unknown, 32, args))
    for result in results[:2]:
        assert "error" not in result, result
        assert result["params"] > 1e5 and result["train_s"] > 0 and result["infer_s"] > 0
        assert result["train_flops"] > result["infer_flops"] > 0
        assert result["output_shape"] == [2, 2]
    assert "dimlift_not_a_model" in results[2]["error"]
    for result in results[:2]:  # the step's three costliest operators, costliest first
        shares = [e["share"] for e in result["profile"]]
        assert len(shares) == 3 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
    assert throughput.profile_text(results).count("Profile of one train step") == 2
    text = throughput.table(results, 1e11, "resnet18", list(throughput.ROWS) + [unknown])
    assert text.count("\n") == 4 and "error:" in text and "| 1.00 |" in text


def test_acs_limits_rows() -> None:
    """lift_ops --limits on one tiny shape: every view in both layouts against the peak, the operator beside
    acsconv's in both layouts."""
    rows = lift_ops.run_limits(repeats=1, batch=1, shapes=((4, 7, 6),))
    views = [r for r in rows if r["what"].startswith("view")]
    assert sorted((r["what"][:6], r["input"]) for r in views) == sorted(
        (f"view {v}", layout) for v in range(3) for layout in ("standard", "channels_last_3d"))
    per_view = [int(r["what"].split("(")[1].split()[0]) for r in views if r["input"] == "standard"]
    assert sum(per_view) == 7  # the output channels split over the views
    assert all(r["seconds"] > 0 and r["share"] > 0 for r in views)
    operator = [r for r in rows if r not in views]
    assert [r["input"] for r in operator] == ["standard", "channels_last_3d"]
    assert all(r["seconds"] > 0 and r["acsconv"] > 0 for r in operator)


@pytest.mark.slow
@pytest.mark.sweep  # the quick benchmark itself (about 18 minutes): CI checks its committed output instead
def test_quick_comparison_end_to_end(tmp_path: Path) -> None:
    """`compare --quick`: every section through the real gandlf_run, then a --reuse run that trains nothing."""
    work, out = tmp_path / "work", tmp_path / "R.md"
    argv = ["--quick", "--work", str(work), "--out", str(out), "--threads", "1"]
    compare.main(argv)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert out.read_text() == report.markdown(summary, "R")
    assert set(summary["detection"]) == set(compare.QUICK_DETECTION_ROWS)
    for name, row in summary["detection"].items():
        assert "error" not in row, (name, row)
        assert 0 <= row["auc_ci"][0] <= row["auc"] <= row["auc_ci"][1] <= 1 and row["n_test"] == 6
    assert summary["explanation"]["dimlift_slice_attention/attention"]["share"] > 0
    assert (tmp_path / "R_explanation.png").stat().st_size > 1000
    assert 0 < summary["segmentation"]["dimlift_dxnet/b0"]["dice"] <= 1
    for family in compare.QUICK_FAMILIES:
        result = summary["pretraining"][family]["full"]
        assert "error" not in result, (family, result)
        assert result["gain_ci"][0] <= result["gain_ci"][1] and result["source_wall_s"] > 0
    again = compare.main([*argv, "--reuse"])
    assert all(r.get("reused") for r in again["detection"] + again["segmentation"])
    assert all(r.get("reused") for r in again["pretraining"]["rows"].values())


def test_medmnist_conversion_from_a_local_npz(tmp_path: Path) -> None:
    """The MedMNIST runner's offline path: a local <flag>.npz becomes NIfTI volumes and GaNDLF CSVs."""
    from benchmarks import medmnist

    rng = np.random.default_rng(0)
    arrays = {}
    for key, n in (("train", 4), ("val", 2), ("test", 3)):
        arrays[f"{key}_images"] = rng.integers(0, 256, size=(n, 28, 28, 28), dtype=np.uint8)
        arrays[f"{key}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    np.savez(tmp_path / "nodulemnist3d.npz", **arrays)
    npz = medmnist.fetch("nodulemnist3d", 28, tmp_path / "cache", tmp_path)
    assert npz == tmp_path / "nodulemnist3d.npz"
    csvs = medmnist.to_gandlf(npz, tmp_path / "data")
    rows = _rows(csvs["test"])
    assert [r["ValueToPredict"] for r in rows] == ["0", "1", "0"]
    volume = runner.read_image(rows[1]["Channel_0"])
    assert volume.shape == (28, 28, 28)
    assert np.allclose(volume, arrays["test_images"][1] / 255.0, atol=1e-6)  # same axis order as the array
    assert len(_rows(csvs["train"])) == 4 and len(_rows(csvs["validation"])) == 2
    text = medmnist.table({"nodulemnist3d": [{"name": "resnet18", "auc": 0.5, "accuracy": 0.6, "epoch_s": 1.0}]}, 28)
    assert "| nodulemnist3d | resnet18 | 0.500 | 0.600 |" in text and "reference: ResNet-18+3D" in text


def test_multiclass_detection_scores(tmp_path: Path) -> None:
    (tmp_path / "test.csv").write_text("SubjectID,Channel_0,Label,ValueToPredict\na,x,y,0\nb,x,y,1\nc,x,y,2\n")
    (tmp_path / "final_preds_and_avg_probs.csv").write_text(
        "SubjectID,PredictedClass,0,1,2\na,0,0.8,0.1,0.1\nb,1,0.1,0.8,0.1\nc,1,0.1,0.5,0.4\n")
    scores = runner.detection_scores(tmp_path, tmp_path / "test.csv")
    assert scores["accuracy"] == pytest.approx(2 / 3) and scores["auc"] == pytest.approx(1.0)


def _stability_rows(table: str) -> list[list[str]]:
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()
             if line.startswith("| ")]
    return [row for row in cells if row[1] in ("logits", "softmax")]


@pytest.mark.slow
def test_slice_attention_stability_attributes_every_swing() -> None:
    table = slice_attention_stability.main(["--seeds", "1", "--epochs", "2", "--final-layers", "logits",
                                            "--swing", "0.05", "--rows", "dimlift_slice_attention", "resnet18"])
    rows = _stability_rows(table)
    assert [row[0] for row in rows] == ["dimlift_slice_attention", "resnet18"], table
    for row in rows:
        swings, by_statistics, by_weights = (int(value) for value in row[4:7])
        assert swings > 0, table  # at a 0.05-logit threshold some step always moves a subject
        assert swings == by_statistics + by_weights, table
        assert 0.0 <= float(row[7]) <= 1.0, table
        assert float(row[9]) > 0.0, table  # a cross-entropy of 6 validation subjects after 2 epochs
        assert row[10] in ("1", "2", "-"), table  # the first epoch with every training prediction right, if any


def test_stability_splits_hold_the_asked_class_balance() -> None:
    labels = torch.tensor([i % 2 for i in range(slice_attention_stability.SUBJECTS)])  # write_dataset's classes
    for positives in (1, 2, 3, 5):
        train, validation = slice_attention_stability.split(labels, positives)
        assert len(train) == len(validation) == len(labels) // 2 and not set(train) & set(validation)
        assert int(labels[train].sum()) == positives
    assert slice_attention_stability.split(labels, 3)[0] == list(range(6, 12))  # the first-half split
    with pytest.raises(ValueError, match="choose 1 to 5"):
        slice_attention_stability.split(labels, 6)


def test_committed_stability_table_covers_both_final_layers_and_splits() -> None:
    table = (Path(__file__).parents[1] / "benchmarks" / "SLICE_ATTENTION_STABILITY.md").read_text()
    assert table.startswith("Command: `python -m benchmarks.slice_attention_stability")
    rows = _stability_rows(table)
    assert {tuple(row[:4]) for row in rows} == {
        (r, f, str(k), str(s)) for r in ("dimlift_slice_attention", "resnet18") for f in ("logits", "softmax")
        for k in (3, 2, 1) for s in range(8)
    }
    for row in rows:
        assert int(row[4]) == int(row[5]) + int(row[6]), row
        assert len(row) == 11 and float(row[9]) > 0.0, row  # the final validation loss: how far a row commits
        assert row[10] in ("1", "2", "3", "4", "5", "-"), row  # how fast it starts: of the 5 epochs, or none


def test_slice_attention_learning_rows_get_gandlf_configs() -> None:
    setting = slice_attention_learning.Setting(final_layer="logits", batch_size=2)
    plugin = slice_attention_learning.row_config("dimlift_slice_attention/gated", setting)
    reference = slice_attention_learning.row_config("resnet18", setting)
    assert plugin["model"]["architecture"] == "dimlift_slice_attention" and plugin["model"]["pooling"] == "gated"
    assert "pooling" not in reference["model"] and reference["model"]["architecture"] == "resnet18"
    for config in (plugin, reference):
        assert (config["model"]["final_layer"], config["batch_size"], config["loss_function"]) == ("logits", 2, "cel")
