"""The benchmark scripts cannot rot: quick data generation, one real comparison row, throughput rows, metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import compare, data, throughput


@pytest.fixture(scope="module")
def quick_data(tmp_path_factory) -> Path:
    """The --quick dataset (8 subjects of 32^3 at 6 mm from the real MNI152 template)."""
    out = tmp_path_factory.mktemp("bench") / "data"
    return data.generate(out, data.DataSettings(**data.QUICK))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_quick_data_generation(quick_data: Path) -> None:
    meta = json.loads((quick_data / "dataset.json").read_text())
    assert meta["shape"] == [32, 32, 32] and meta["n_subjects"] == 8
    splits = {s: {r["SubjectID"] for r in _rows(quick_data / f"segmentation_{s}.csv")} for s in data.SPLITS}
    assert sum(len(v) for v in splits.values()) == 8
    assert not (splits["train"] & splits["validation"]) and not (splits["train"] & splits["test"])
    for split in data.SPLITS:  # detection uses the same subjects and splits
        assert {r["SubjectID"] for r in _rows(quick_data / f"detection_{split}.csv")} == splits[split]
    lesions = data.read_lesions(quick_data)
    assert {v["lesion"] for v in lesions.values()} == {0, 1}
    for row in _rows(quick_data / "segmentation_train.csv"):
        image, label = compare.read_image(row["Channel_0"]), compare.read_image(row["Label"])
        assert image.shape == label.shape == (32, 32, 32)
        assert set(np.unique(label)) == {0, 1, 2}
        assert 0.0 <= image.min() and image.max() <= 1.5 and image.std() > 0.05
    for row in _rows(quick_data / "detection_train.csv") + _rows(quick_data / "detection_test.csv"):
        info = lesions[row["SubjectID"]]
        assert int(row["ValueToPredict"]) == info["lesion"]
        # GaNDLF's label sampler takes a whole-volume patch only where this image is positive at the centre
        assert compare.read_image(row["Label"]).min() == 1
        if info["lesion"]:
            mask = compare.read_image(Path(row["Channel_0"]).with_name("lesion_mask.nii.gz"))
            occupied = np.flatnonzero(mask.any(axis=(0, 1))).tolist()
            assert occupied == info["slices"] and occupied, "recorded lesion slices must match the lesion mask"
            clean = compare.read_image(Path(row["Channel_0"]).with_name("t1.nii.gz"))
            assert np.abs(compare.read_image(row["Channel_0"]) - clean)[mask > 0].mean() > 0.05
        else:
            assert not info["slices"]


def test_same_seed_same_split_and_lesions() -> None:
    first = data.make_splits(20, (0.6, 0.2, 0.2), seed=3)
    assert first == data.make_splits(20, (0.6, 0.2, 0.2), seed=3)
    assert [len(first[s]) for s in data.SPLITS] == [12, 4, 4]
    assert data.make_splits(20, (0.6, 0.2, 0.2), seed=4) != first
    chosen = data.lesion_assignment(first, 0.5, seed=3)
    for members in first.values():  # every split holds both classes
        assert 0 < len(chosen & set(members)) < len(members)
    with pytest.raises(ValueError, match="at least 3"):
        data.make_splits(2, (0.6, 0.2, 0.2), seed=0)


def test_metrics() -> None:
    assert compare.auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert compare.auc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert compare.auc([0.5, 0.5], [1, 0]) == 0.5
    assert compare.auc([0.5, 0.7], [1, 1]) is None
    truth = np.array([0, 1, 1, 2, 2, 2])
    assert compare.dice(truth, truth, 2) == 1.0
    assert compare.dice(np.array([0, 1, 1, 1, 2, 2]), truth, 1) == pytest.approx(2 * 2 / (3 + 2))
    assert compare.dice(truth, truth, 5) == 1.0  # absent from both
    assert compare.epochs_to([0.1, 0.5, 0.7], 0.6) == 3
    assert compare.epochs_to([0.1, 0.5], 0.6) is None


def test_throughput_rows_cover_the_issue() -> None:
    names = {r.name for r in throughput.ROWS}
    for required in ("resunet", "imagenet_unet", "resnet18", "densenet121", "efficientnetb0", "dimlift_smp/acs",
                     "dimlift_smp/inflate", "dimlift_smp/2.5d", "dimlift_dxnet/b0", "dimlift_slice_attention/attention",
                     "dimlift_slice_attention/mean"):
        assert required in names
    for name in compare.SEGMENTATION_ROWS + compare.DETECTION_ROWS:
        assert name in names
    assert [r.name for r in throughput.select_rows(["dimlift_smp"])][:1] == ["dimlift_smp/acs"]
    with pytest.raises(SystemExit, match="matches no row"):
        throughput.select_rows(["no-such-row"])


@pytest.mark.slow
def test_throughput_quick_rows_in_process(tmp_path: Path) -> None:
    """A GaNDLF baseline, a plugin row, and an unknown key (an error row, not a crash)."""
    unknown = throughput.Row("unknown", "dimlift_not_a_model", "classification")
    args = throughput.parse_args(["--quick", "--batch", "2"])
    results = [throughput.run_row(throughput.ROWS[[r.name for r in throughput.ROWS].index(name)], 32, args)
               for name in ("resnet18", "dimlift_slice_attention/mean")]
    results.append(throughput.run_row(unknown, 32, args))
    for result in results[:2]:
        assert "error" not in result, result
        assert result["params"] > 1e5 and result["train_s"] > 0 and result["infer_s"] > 0
        assert result["train_flops"] > result["infer_flops"] > 0
        assert result["output_shape"] == [2, 2]
    assert "dimlift_not_a_model" in results[2]["error"]
    text = throughput.table(results, 1e11, "resnet18", list(throughput.ROWS) + [unknown])
    assert text.count("\n") == 4 and "error:" in text and "| 1.00 |" in text


@pytest.mark.slow
def test_one_quick_comparison_row(quick_data: Path, tmp_path: Path) -> None:
    """resunet trained one epoch and tested with the real gandlf_run; Dice per class and the report come out."""
    settings = compare.Settings(**{**compare.QUICK_SETTINGS, "epochs": 1})
    csvs = data.task_csvs(quick_data, "segmentation")
    record = compare.train_and_test(compare.row_by_name("resunet"), "segmentation", csvs, (32, 32, 32), settings,
                                    tmp_path / "work", reuse=False, data_dir=quick_data)
    assert "error" not in record, record.get("error")
    assert len(record["dice"]) == 3 and all(0.0 <= d <= 1.0 for d in record["dice"])
    assert record["n_test"] == len(_rows(csvs["test"]))
    assert record["epoch_s"] > 0 and record["peak_mib"] > 100 and record["params"] > 1e5
    assert len(record["validation_log"]["val_dice"]) == 1
    meta = {"command": "test", "machine": "test", "wall_min": 0.0, "finished": "now",
            "data": json.loads((quick_data / "dataset.json").read_text()), "splits": "4/2/2",
            "settings": compare.asdict(settings)}
    text = compare.report(meta, {"segmentation": [record]}, tmp_path / "R.md", quick=True)
    assert "| resunet |" in text and (tmp_path / "R_segmentation.png").stat().st_size > 1000
    again = compare.train_and_test(compare.row_by_name("resunet"), "segmentation", csvs, (32, 32, 32), settings,
                                   tmp_path / "work", reuse=True, data_dir=quick_data)
    assert again.pop("reused") is True and again == json.loads(json.dumps(record))  # from result.json, not retrained


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
    volume = compare.read_image(rows[1]["Channel_0"])
    assert volume.shape == (28, 28, 28)
    assert np.allclose(volume, arrays["test_images"][1] / 255.0, atol=1e-6)  # same axis order as the array
    assert len(_rows(csvs["train"])) == 4 and len(_rows(csvs["validation"])) == 2
    text = medmnist.table({"nodulemnist3d": [{"name": "resnet18", "auc": 0.5, "accuracy": 0.6, "epoch_s": 1.0}]}, 28)
    assert "| nodulemnist3d | resnet18 | 0.500 | 0.600 |" in text and "reference: ResNet-18+3D" in text


def test_multiclass_detection_scores(tmp_path: Path) -> None:
    (tmp_path / "test.csv").write_text("SubjectID,Channel_0,Label,ValueToPredict\na,x,y,0\nb,x,y,1\nc,x,y,2\n")
    (tmp_path / "final_preds_and_avg_probs.csv").write_text(
        "SubjectID,PredictedClass,0,1,2\na,0,0.8,0.1,0.1\nb,1,0.1,0.8,0.1\nc,1,0.1,0.5,0.4\n")
    scores = compare.detection_scores(tmp_path, tmp_path / "test.csv")
    assert scores["accuracy"] == pytest.approx(2 / 3) and scores["auc"] == pytest.approx(1.0)


def test_estimate_from_measured_steps(tmp_path: Path) -> None:
    measured = {"results": [{"name": "resunet", "size": 32, "train_s": 2.0, "infer_s": 0.5},
                            {"name": "resnet18", "size": "48x64x48", "train_s": 3.0, "infer_s": 1.0}]}
    (tmp_path / "t.json").write_text(json.dumps(measured))
    meta = {"shape": [48, 64, 48], "splits": {"train": list(range(14)), "validation": list(range(5)),
                                              "test": list(range(5))}}
    settings = compare.Settings(epochs=4, batch=2, patch=32, samples_per_volume=1, detection_epochs=6)
    text, total = compare.estimate(tmp_path / "t.json", settings, meta, ["resunet"], ["resnet18", "densenet121"],
                                   transfer=False, overhead_s=10.0)
    # resunet: 4 epochs x (7 steps x 2 s + 5 volumes x 8 patches / 2 x 0.5 s) + 20 test passes x 0.5 s + 2 x 10 s
    seg = 4 * (7 * 2.0 + 20 * 0.5) + 20 * 0.5 + 20.0
    det = 6 * (7 * 3.0 + 2.5 * 1.0) + 2.5 * 1.0 + 20.0
    assert total == pytest.approx(seg + det)
    assert "| densenet121 | 48x64x48 | — | — | 7 | 2 | not measured |" in text


def test_detection_budget_and_logits() -> None:
    settings = compare.Settings(epochs=4, learning_rate=1e-3, detection_epochs=9, detection_learning_rate=1e-4)
    assert settings.budget("segmentation") == (4, 1e-3) and settings.budget("detection") == (9, 1e-4)
    assert settings.budget("transfer") == (4, 1e-3)  # the 2D transfer source is a segmentation row
    assert compare.Settings(epochs=4).budget("detection") == (4, 1e-3)
    row = compare.row_by_name("dimlift_slice_attention/attention")
    config = compare.make_config(row, (32, 32, 32), num_epochs=9, learning_rate=1e-4)
    # GaNDLF's cel is cross-entropy on the model output: a softmax final layer would apply softmax twice
    assert config["model"]["final_layer"] == "logits" and config["loss_function"] == "cel"
    assert (config["num_epochs"], config["learning_rate"]) == (9, 1e-4)


def test_committed_full_results_cover_every_row() -> None:
    """benchmarks/RESULTS.md is the full run (not --quick), and it reports every default row and experiment."""
    results = Path(compare.__file__).with_name("RESULTS.md")
    text = results.read_text()
    command = text.split("Command: `", 1)[1].split("`", 1)[0]
    assert command.startswith("python -m benchmarks.compare") and "--quick" not in command
    reported = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")}
    expected = {*compare.SEGMENTATION_ROWS, *compare.DETECTION_ROWS, compare.TRANSFER_FROM_2D}
    assert expected <= reported, f"rows missing from {results.name}: {sorted(expected - reported)}"
    for heading in ("## Tissue segmentation", "## Lesion detection", "## Explanation score", "## Dimensional transfer"):
        assert heading in text
    for image in ("segmentation", "detection", "transfer"):
        assert (results.parent / f"RESULTS_{image}.png").stat().st_size > 0
    # the README's reproduction command is the one that wrote the file
    readme = " ".join(Path(compare.__file__).parents[1].joinpath("README.md").read_text().replace("\\\n", " ").split())
    assert " ".join(command.split()) in readme
