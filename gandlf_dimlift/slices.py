"""`gandlf-dimlift slices`: cut the 3D volumes of a GaNDLF data CSV into 2D slices, with the 2D CSV to train on.

The first step of the DX-Net walk-through trains the 2D Omnia-Net on slices of the same data the 3D DX-Net trains
on later. This reads the volume CSV with GaNDLF's own parser (its column rules: subject ID, `Channel`/`Image`/
`Modality` columns, one `Label`/`Mask`/`Segmentation` column, `ValueToPredict` columns; relative paths resolved
against the CSV's folder), checks every image before writing anything, and writes per subject and slice one 2D
NIfTI per image column (`<out>/<subject>/<subject>_<axis><index>_<column>.nii.gz`) plus `<out>/slices_2d.csv`,
whose columns are the input's: the subject ID becomes `<subject>_<axis><index>`, image and label columns point to
the slice files, other columns are copied.

Axes follow GaNDLF's layout `(X, Y, Z)` of the image's voxel grid: `z` (default) cuts along the last axis.
A slice keeps the in-plane spacing, and its origin is the slice's position in space.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AXES = ("x", "y", "z")
CSV_NAME = "slices_2d.csv"


class SlicesError(ValueError):
    """The volume CSV, its images or the output folder cannot be used; the message says which and the fix."""


@dataclass(frozen=True)
class SliceTable:
    """What `cut_slices` wrote.

    Attributes:
        csv: The 2D data CSV.
        subjects: Volumes cut.
        slices: Rows of the 2D CSV (slices kept).
        skipped: Slices left out by `skip_empty`.
    """

    csv: Path
    subjects: int
    slices: int
    skipped: int


@dataclass(frozen=True)
class _Volume:
    subject: str
    row: dict[str, str]
    images: dict[str, Path]  # column -> file, channels first, label last
    size: tuple[int, int, int]


@dataclass(frozen=True)
class _Table:
    columns: list[str]
    id_column: str
    label_column: str | None
    volumes: list[_Volume]


def _read_csv(csv_path: Path) -> _Table:
    """Parses the volume CSV with GaNDLF's rules and checks every image file."""
    if not csv_path.is_file():
        raise SlicesError(f"The volume CSV {csv_path} (-i) {'is a folder' if csv_path.is_dir() else 'does not exist'}.")
    import SimpleITK as sitk
    from GANDLF.utils.write_parse import parseTrainingCSV

    try:
        data, headers = parseTrainingCSV(str(csv_path), train=False)
    except Exception as error:  # noqa: BLE001 - pandas reports an unreadable CSV in many ways
        raise SlicesError(f"{csv_path} is not a readable CSV: {type(error).__name__}: {error}") from None
    columns = [str(c) for c in data.columns]
    if headers["subjectIDHeader"] is None or not headers["channelHeaders"]:
        raise SlicesError(
            f"{csv_path} needs a subject ID column (a name containing 'Subject', 'Patient' or 'PID') and at least one "
            f"image column (a name containing 'Channel', 'Image' or 'Modality'), as GaNDLF reads it; its columns are "
            f"{columns}."
        )
    if data.empty:
        raise SlicesError(f"{csv_path} has a header but no subjects.")
    id_column = columns[headers["subjectIDHeader"]]
    image_columns = [columns[i] for i in headers["channelHeaders"]]
    label_column = columns[headers["labelHeader"]] if headers["labelHeader"] is not None else None
    path_columns = image_columns + ([label_column] if label_column else [])
    volumes, seen = [], set()
    for number, (_, record) in enumerate(data.iterrows(), start=2):  # line 1 is the header
        row = {column: "" if _missing(record[column]) else str(record[column]) for column in columns}
        subject = row[id_column]
        if not subject:
            raise SlicesError(f"{csv_path} line {number}: the subject ID ({id_column}) is empty.")
        if subject in seen:
            raise SlicesError(f"{csv_path} line {number}: subject ID {subject!r} appears twice; IDs must be unique.")
        seen.add(subject)
        images, size = {}, None
        for column in path_columns:
            path = Path(row[column])
            if not row[column] or not path.is_file():
                raise SlicesError(f"{csv_path} line {number} (subject {subject}): the {column} file "
                                  f"{row[column] or '(empty)'} does not exist.")
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            try:
                reader.ReadImageInformation()
            except RuntimeError:
                raise SlicesError(f"{csv_path} line {number} (subject {subject}): {path} ({column}) is not an image "
                                  "SimpleITK can read.") from None
            this_size = tuple(int(s) for s in reader.GetSize())
            if len(this_size) != 3 or min(this_size) < 1:
                raise SlicesError(f"{csv_path} line {number} (subject {subject}): {path} ({column}) is "
                                  f"{len(this_size)}D {list(this_size)}; slices are cut from 3D volumes.")
            if size is not None and this_size != size:
                raise SlicesError(f"{csv_path} line {number} (subject {subject}): {path} ({column}) is "
                                  f"{list(this_size)} voxels, the subject's first image {list(size)}; all images of a "
                                  "subject must share one grid.")
            size = this_size
            images[column] = path
        volumes.append(_Volume(subject, row, images, size))
    return _Table(columns, id_column, label_column, volumes)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _slice(image: Any, axis: int, index: int) -> Any:
    """The 2D slice `index` along `axis` of a 3D SimpleITK image, with its in-plane geometry."""
    import SimpleITK as sitk

    size = list(image.GetSize())
    size[axis] = 0  # Extract drops a zero-size axis
    start = [0, 0, 0]
    start[axis] = index
    return sitk.Extract(image, size, start, sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOGUESS)


def cut_slices(
    csv_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    axis: str = "z",
    every: int = 1,
    skip_empty: bool = False,
    progress: bool = True,
) -> SliceTable:
    """Cuts every volume of a GaNDLF CSV into 2D slices and writes `slices_2d.csv` beside them.

    Args:
        csv_path: GaNDLF data CSV of 3D volumes.
        output_dir: Folder for the slice images and the 2D CSV (created; an existing `slices_2d.csv` is replaced).
        axis: x, y or z: the axis of GaNDLF's `(X, Y, Z)` layout the slices are cut across.
        every: Keep every n-th slice (1 keeps all).
        skip_empty: Leave out slices whose label is all background (needs a label column).
        progress: Show a progress bar.

    Raises:
        SlicesError: A bad argument, CSV row or image, before anything is written.
    """
    import SimpleITK as sitk
    from tqdm import tqdm

    if axis not in AXES:
        raise SlicesError(f"axis {axis!r} is not one of {list(AXES)}; z is GaNDLF's last (slice) axis.")
    if every < 1:
        raise SlicesError(f"--every {every}: keep every n-th slice with n >= 1.")
    csv_path, output_dir = Path(csv_path), Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise SlicesError(f"The output path {output_dir} (-o) is a file; give a folder (it is created if needed).")
    table = _read_csv(csv_path)
    if skip_empty and table.label_column is None:
        raise SlicesError(f"--skip-empty needs a label column; {csv_path} has none (columns {table.columns}).")

    axis_index = AXES.index(axis)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], 0
    bar = tqdm(table.volumes, desc="Cutting slices", unit="volume", disable=not progress)
    for volume in bar:
        folder = output_dir / safe_file_name(volume.subject)
        folder.mkdir(exist_ok=True)
        images = {column: sitk.ReadImage(str(path)) for column, path in volume.images.items()}
        for index in range(0, volume.size[axis_index], every):
            planes = {column: _slice(image, axis_index, index) for column, image in images.items()}
            if skip_empty and not sitk.GetArrayViewFromImage(planes[table.label_column]).any():
                skipped += 1
                continue
            name = f"{volume.subject}_{axis}{index:03d}"
            row = dict(volume.row)
            row[table.id_column] = name
            for column, plane in planes.items():
                path = folder / f"{safe_file_name(name)}_{safe_file_name(column)}.nii.gz"
                sitk.WriteImage(plane, str(path))
                row[column] = str(path.resolve())
            rows.append(row)
        bar.set_postfix_str(f"{len(rows)} slices")
    bar.close()
    if not rows:
        raise SlicesError(f"No slice kept: every label slice of {csv_path} is background; drop --skip-empty.")
    csv_file = output_dir / CSV_NAME
    with open(csv_file, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=table.columns)
        writer.writeheader()
        writer.writerows(rows)
    return SliceTable(csv_file, len(table.volumes), len(rows), skipped)


def safe_file_name(text: str) -> str:
    """`text` with every character but letters, digits and `-_.` replaced by `_`: a file name on every system."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "subject"


def describe(table: SliceTable, axis: str) -> str:
    """What `cut_slices` wrote, for the console, with the next step of the transfer walk-through."""
    left_out = f" ({table.skipped} background-only slices left out)" if table.skipped else ""
    return (
        f"Cut {table.subjects} volume(s) across {axis} into {table.slices} 2D slices{left_out}.\n"
        f"  2D data CSV: {table.csv}\n"
        f"  slices:      {table.csv.parent}/<subject>/<subject>_{axis}<index>_<column>.nii.gz\n"
        f"Next: gandlf_run -c <2D config, dimension: 2> -i {table.csv} -m <model dir> -t True"
    )
