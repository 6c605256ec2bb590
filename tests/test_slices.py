"""`gandlf-dimlift slices`: 3D volume CSV -> 2D slice images and the 2D CSV a 2D GaNDLF run trains on."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import BIN, gandlf_env

from gandlf_dimlift.slices import SlicesError, cut_slices

SHAPE = (6, 5, 4)  # X, Y, Z: distinct sizes catch a swapped axis
SPACING = (0.8, 0.9, 2.5)
ORIGIN = (10.0, -4.0, 3.0)


def _volume(path: Path, array: np.ndarray, spacing=SPACING) -> None:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))  # (X, Y, Z) array -> ITK index order
    image.SetSpacing(spacing)
    image.SetOrigin(ORIGIN)
    sitk.WriteImage(image, str(path))


def _dataset(folder: Path, rows: int = 2, relative: bool = False) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    """`rows` subjects with an image, a label that is empty except in slice z=1, and a ValueToPredict column."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, labels, lines = [], [], []
    for index in range(rows):
        image = rng.normal(size=SHAPE).astype(np.float32)
        label = np.zeros(SHAPE, dtype=np.uint8)
        label[2:4, 1:3, 1] = 1
        _volume(folder / f"s{index}_t1.nii.gz", image)
        _volume(folder / f"s{index}_seg.nii.gz", label)
        prefix = "" if relative else f"{folder}/"
        lines.append(f"s{index},{prefix}s{index}_t1.nii.gz,{prefix}s{index}_seg.nii.gz,{index}")
        images.append(image)
        labels.append(label)
    table = folder / "volumes.csv"
    table.write_text("SubjectID,Channel_0,Label,ValueToPredict\n" + "\n".join(lines) + "\n")
    return table, images, labels


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_volumes_are_cut_along_z_with_their_geometry_and_a_2d_csv(tmp_path):
    table, images, labels = _dataset(tmp_path / "data", relative=True)  # GaNDLF resolves against the CSV folder
    result = cut_slices(table, tmp_path / "slices", axis="z", progress=False)
    assert (result.subjects, result.slices, result.skipped) == (2, 2 * SHAPE[2], 0)
    rows = _rows(result.csv)
    assert list(rows[0]) == ["SubjectID", "Channel_0", "Label", "ValueToPredict"]
    assert [r["SubjectID"] for r in rows[:SHAPE[2]]] == [f"s0_z{k:03d}" for k in range(SHAPE[2])]
    for row in rows:
        subject, k = int(row["SubjectID"][1]), int(row["SubjectID"][-3:])
        assert row["ValueToPredict"] == str(subject)
        image, label = sitk.ReadImage(row["Channel_0"]), sitk.ReadImage(row["Label"])
        assert image.GetDimension() == 2 and image.GetSize() == SHAPE[:2]
        assert np.allclose(image.GetSpacing(), SPACING[:2])
        # The slice sits where it sits in the volume: its origin is the physical point of voxel (0, 0, k).
        assert np.allclose(image.GetOrigin(), (ORIGIN[0], ORIGIN[1]))
        assert np.array_equal(sitk.GetArrayFromImage(image).T, images[subject][..., k])
        assert np.array_equal(sitk.GetArrayFromImage(label).T, labels[subject][..., k])


@pytest.mark.parametrize("axis,size", [("x", (5, 4)), ("y", (6, 4))])
def test_other_axes_keep_the_remaining_two_in_order(axis, size, tmp_path):
    table, images, _ = _dataset(tmp_path / "data", rows=1)
    result = cut_slices(table, tmp_path / "slices", axis=axis, every=2, progress=False)
    rows = _rows(result.csv)
    count = SHAPE["xyz".index(axis)]
    assert [r["SubjectID"] for r in rows] == [f"s0_{axis}{k:03d}" for k in range(0, count, 2)]
    plane = sitk.ReadImage(rows[1]["Channel_0"])
    assert plane.GetSize() == size
    assert np.array_equal(sitk.GetArrayFromImage(plane).T, np.take(images[0], 2, axis="xyz".index(axis)))


def test_skip_empty_leaves_out_background_slices(tmp_path):
    table, _, _ = _dataset(tmp_path / "data")
    result = cut_slices(table, tmp_path / "slices", skip_empty=True, progress=False)
    assert (result.slices, result.skipped) == (2, 2 * (SHAPE[2] - 1))
    assert [r["SubjectID"] for r in _rows(result.csv)] == ["s0_z001", "s1_z001"]


def _bad_csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda t, d: t / "missing.csv", r"missing\.csv \(-i\) does not exist"),
        (lambda t, d: _bad_csv(t, "Name,Path\na,b\n"),
         r"needs a subject ID column .* its columns are \['Name', 'Path'\]"),
        (lambda t, d: _bad_csv(t, "SubjectID,Channel_0\n"), "has a header but no subjects"),
        (lambda t, d: _bad_csv(t, f"SubjectID,Channel_0\na,{d}/nope.nii.gz\n"),
         r"line 2 \(subject a\): the Channel_0 file .*nope\.nii\.gz does not exist"),
        (lambda t, d: _bad_csv(t, f"SubjectID,Channel_0\na,{d}/s0_t1.nii.gz\na,{d}/s1_t1.nii.gz\n"),
         "line 3: subject ID 'a' appears twice"),
        (lambda t, d: _bad_csv(t, f"SubjectID,Channel_0\na,{d}/plane.nii.gz\n"),
         r"plane\.nii\.gz \(Channel_0\) is 2D \[6, 5\]; slices are cut from 3D volumes"),
        (lambda t, d: _bad_csv(t, f"SubjectID,Channel_0,Label\na,{d}/s0_t1.nii.gz,{d}/small.nii.gz\n"),
         r"small\.nii\.gz \(Label\) is \[6, 5, 3\] voxels, the subject's first image \[6, 5, 4\]"),
        (lambda t, d: _bad_csv(t, f"SubjectID,Channel_0\na,{d}/volumes.csv\n"), "is not an image SimpleITK can read"),
    ],
    ids=["no-file", "no-columns", "no-rows", "missing-image", "duplicate-id", "2d-image", "size-mismatch",
         "not-an-image"],
)
def test_bad_csvs_are_named_before_anything_is_written(make, fragment, tmp_path):
    _, _, _ = _dataset(tmp_path / "data")
    _volume(tmp_path / "data" / "small.nii.gz", np.zeros((6, 5, 3), np.uint8))
    plane = sitk.GetImageFromArray(np.zeros((5, 6), np.float32))
    sitk.WriteImage(plane, str(tmp_path / "data" / "plane.nii.gz"))
    with pytest.raises(SlicesError, match=fragment):
        cut_slices(make(tmp_path, tmp_path / "data"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_refused(tmp_path):
    table, _, _ = _dataset(tmp_path / "data")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SlicesError, match="is a file; give a folder"):
        cut_slices(table, tmp_path / "a_file", progress=False)
    with pytest.raises(SlicesError, match="--every 0"):
        cut_slices(table, tmp_path / "out", every=0, progress=False)
    with pytest.raises(SlicesError, match="axis 'k' is not one of"):
        cut_slices(table, tmp_path / "out", axis="k", progress=False)
    unlabelled = _bad_csv(tmp_path, f"SubjectID,Channel_0\na,{tmp_path}/data/s0_t1.nii.gz\n")
    with pytest.raises(SlicesError, match="--skip-empty needs a label column"):
        cut_slices(unlabelled, tmp_path / "out", skip_empty=True, progress=False)


@pytest.mark.slow  # a fresh interpreter importing GaNDLF (about 10 s)
def test_cli_prints_the_2d_csv_and_fails_in_one_line(tmp_path):
    table, _, _ = _dataset(tmp_path / "data")
    command = [str(BIN / "gandlf-dimlift"), "slices", "-i", str(table), "-o", str(tmp_path / "slices")]
    result = subprocess.run(command, capture_output=True, text=True, env=gandlf_env(), timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"2D data CSV: {tmp_path / 'slices' / 'slices_2d.csv'}" in result.stdout
    assert len(_rows(tmp_path / "slices" / "slices_2d.csv")) == 2 * SHAPE[2]
    assert "Cutting slices" in result.stderr  # the progress bar

    missing = [str(BIN / "gandlf-dimlift"), "slices", "-i", str(tmp_path / "none.csv"), "-o", str(tmp_path / "o")]
    failed = subprocess.run(missing, capture_output=True, text=True, env=gandlf_env(), timeout=600)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines() == [
        f"gandlf-dimlift slices: error: The volume CSV {tmp_path / 'none.csv'} (-i) does not exist."]
