"""``nnssl_convert_hc18``: the HC18 fetal head circumference challenge data as an nnU-Net raw 2D dataset.

Input: the original release layout (van den Heuvel et al. 2018, PLoS ONE 13(8): e0200412; zenodo.org/record/1327317)::

    HC18/training_set/NNN_HC.png, NNN_HC_Annotation.png, NNN_2HC.png, NNN_2HC_Annotation.png, ...
    HC18/training_set_pixel_size_and_HC.csv      filename,pixel size(mm),head circumference (mm)
    HC18/test_set/NNN_HC.png                     (no annotations)
    HC18/test_set_pixel_size.csv                 filename,pixel size(mm)

``NNN`` is the mother (subject) number; ``NNN_kHC.png`` is her k-th image. The test set is optional (both the
folder and its CSV, or neither).

Output: ``$nnUNet_raw/Dataset{ID:03d}_{NAME}/`` with

- ``imagesTr/hc18_NNN_k_0000.nii.gz`` and ``labelsTr/hc18_NNN_k.nii.gz`` for ``training_set/NNN_kHC.png``
  (``k = 1`` for ``NNN_HC.png``), so the case name keeps the mother's number and ``--group-regex 'hc18_(\\d+)_'``
  of ``nnssl_make_split`` keeps all images of a mother on one side of a split (:func:`mother_id`);
- ``imagesUnlabeled/hc18test_NNN_k_0000.nii.gz`` for ``test_set/NNN_kHC.png`` (a prefix no training case has);
- ``dataset.json`` (channel ``{"0": "US"}``, which gives z-score normalisation; labels background 0, head 1;
  reader pinned to ``SimpleITKIO``);
- ``hc_reference.csv``: ``case_id,head_circumference_mm,pixel_size_mm,mother_id`` of the labeled cases, with
  the reference HC and pixel size copied verbatim from the challenge CSV.

Images are single-channel 2D NIfTI files written with SimpleITK, with spacing ``(px, px)`` from the CSV (PNG
cannot carry a spacing in nnU-Net: ``NaturalImage2DIO`` assumes 1). nnU-Net's ``SimpleITKIO`` reads such a file
as an array of shape ``(1, 1, H, W)`` with spacing ``(999 * px, px, px)`` (its convention for 2D data), so its
resampling and every metric in mm use the true pixel size; the tests check this. RGB images are converted to
grayscale (PIL's ``convert("L")``); pixel values are kept as they are.

The annotation is the head's ellipse *outline*, about one pixel wide and possibly with small gaps, so it is not
filled by hole filling. Instead an ellipse is fitted to the outline pixels (:func:`nnssl.ops.ellipse.fit_ellipse`)
and rasterised filled: that ellipse is what the annotation draws. The circumference of the fitted ellipse (in mm)
is compared with the CSV's reference HC and the agreement is printed; on the 798 HC18 training images it is
within 0.05 mm (the CSV gives HC to 0.01 or 0.1 mm).

The dataset is written into a hidden temporary sibling folder and renamed into place only once complete, so an
error or interruption never leaves a dataset folder that looks finished.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnssl.ops.ellipse import Ellipse, fit_ellipse, rasterize_ellipse
from nnssl.data.layout import UNLABELED_RAW_FOLDER
from nnssl.utils import UserInputError, require_env, run_command

TRAINING_FOLDER = "training_set"
TRAINING_CSV = "training_set_pixel_size_and_HC.csv"
TEST_FOLDER = "test_set"
TEST_CSV = "test_set_pixel_size.csv"
FILENAME_COLUMN = "filename"
PIXEL_SIZE_COLUMN = "pixel size(mm)"
HC_COLUMN = "head circumference (mm)"
REFERENCE_CSV = "hc_reference.csv"
LABELED_PREFIX = "hc18"
UNLABELED_PREFIX = "hc18test"
FILE_ENDING = ".nii.gz"
# The HC18 outlines have 2.3-2.6 foreground pixels per pixel of circumference; far more means the annotation is
# not an outline (e.g. a filled mask, ~radius/2 pixels per pixel) and fitting an ellipse to its pixels is wrong.
MAX_OUTLINE_PIXELS_PER_CIRCUMFERENCE = 5.0
HC_WARNING_MM = 1.0

_IMAGE_NAME = re.compile(r"^(\d+)_(\d*)HC\.png$")
_CASE_ID = re.compile(r"^(hc18|hc18test)_(\d+)_(\d+)$")


class CaseError(Exception):
    """A problem with one image or annotation (the message names the file)."""


@dataclass(frozen=True)
class Source:
    """One image of the release and where it goes."""

    case_id: str
    image: str
    pixel_size_mm: float
    annotation: Optional[str] = None  # None for unlabeled images


def case_id_for(filename: str, prefix: str = LABELED_PREFIX) -> str:
    """Case name of an HC18 image: ``NNN_HC.png`` -> ``{prefix}_NNN_1``, ``NNN_kHC.png`` -> ``{prefix}_NNN_k``.

    Args:
        filename: image file name of the release (no folder).
        prefix: ``"hc18"`` for the training set, ``"hc18test"`` for the (unlabeled) test set.

    Returns:
        The case id; the mother number keeps its leading zeros.

    Raises:
        ValueError: when the name is not ``<digits>_[<digits>]HC.png``.
    """
    m = _IMAGE_NAME.match(filename)
    if m is None:
        raise ValueError(f"{filename}: not an HC18 image name (NNN_HC.png or NNN_kHC.png)")
    return f"{prefix}_{m.group(1)}_{int(m.group(2)) if m.group(2) else 1}"


def mother_id(case_id: str) -> str:
    """The mother (subject) a case belongs to: ``hc18_010_2`` -> ``"010"``, ``hc18test_010_1`` -> ``"test_010"``.

    Test-set mothers get a ``test_`` prefix because the release numbers the test set independently, so test
    mother 010 is not training mother 010.

    Raises:
        ValueError: for a name that :func:`case_id_for` does not produce.
    """
    m = _CASE_ID.match(case_id)
    if m is None:
        raise ValueError(f"{case_id!r} is not an HC18 case id (hc18_NNN_k or hc18test_NNN_k)")
    return m.group(2) if m.group(1) == LABELED_PREFIX else f"test_{m.group(2)}"


def _read_csv(path: str, columns: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """Rows of an HC18 CSV by file name, values stripped; checks columns, duplicates and positive numbers."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise UserInputError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} (has "
                                 f"{', '.join(repr(c) for c in reader.fieldnames or [])})")
        rows: Dict[str, Dict[str, str]] = {}
        for line, row in enumerate(reader, start=2):
            values = {c: (row[c] or "").strip() for c in columns}
            name = values[FILENAME_COLUMN]
            if name in rows:
                raise UserInputError(f"{path}, line {line}: {name} is listed twice")
            for c in columns[1:]:
                try:
                    ok = np.isfinite(float(values[c])) and float(values[c]) > 0
                except ValueError:
                    ok = False
                if not ok:
                    raise UserInputError(f"{path}, line {line}: {c!r} must be a positive number, got "
                                         f"{values[c]!r}")
            rows[name] = values
    return rows


def _collect(folder: str, rows: Dict[str, Dict[str, str]], selected: Optional[Sequence[str]], prefix: str,
             labeled: bool, problems: List[str]) -> List[Source]:
    """The images to convert from one release folder; appends every problem found to ``problems``."""
    on_disk = {f for f in os.listdir(folder) if f.lower().endswith(".png") and not f.startswith(".")}
    annotations = {f for f in on_disk if f.endswith("_Annotation.png")}
    if selected is None:
        selected = sorted(rows)
        for f in sorted(on_disk - annotations - set(rows)):
            problems.append(f"{os.path.join(folder, f)}: not listed in the CSV (no pixel size)")
    sources, seen = [], {}
    for name in selected:
        try:
            case = case_id_for(name, prefix)
        except ValueError as e:
            problems.append(str(e))
            continue
        if case in seen:
            problems.append(f"{name} is listed twice" if seen[case] == name
                            else f"{name} and {seen[case]} would both become case {case}")
            continue
        seen[case] = name
        if name not in rows:
            problems.append(f"{name}: not listed in the CSV of {folder}")
            continue
        if name not in on_disk:
            problems.append(f"{os.path.join(folder, name)}: image missing")
            continue
        annotation = None
        if labeled:
            annotation = name[:-len(".png")] + "_Annotation.png"
            if annotation not in annotations:
                problems.append(f"{os.path.join(folder, name)}: annotation {annotation} missing")
                continue
            annotation = os.path.join(folder, annotation)
        sources.append(Source(case, os.path.join(folder, name), float(rows[name][PIXEL_SIZE_COLUMN]), annotation))
    return sources


def find_sources(input_folder: str, training_files: Optional[Sequence[str]] = None,
                 test_files: Optional[Sequence[str]] = None
                 ) -> Tuple[List[Source], List[Source], Dict[str, Dict[str, str]]]:
    """Check the release layout and list what to convert, before anything is written.

    Args:
        input_folder: the HC18 folder (with ``training_set/`` and its CSV).
        training_files: training image file names to convert (e.g. ``["010_HC.png"]``); None: all in the CSV.
        test_files: test image file names to convert as unlabeled images; None: all (if there is a test set).

    Returns:
        ``(labeled sources, unlabeled sources, training CSV rows by file name)``.

    Raises:
        UserInputError: listing every problem found (missing folder or CSV, malformed CSV, images not in the CSV
            or missing, missing annotations, unexpected names).
    """
    if not os.path.isdir(input_folder):
        raise UserInputError(f"input folder {input_folder} does not exist")
    missing = [p for p in (TRAINING_FOLDER, TRAINING_CSV) if not os.path.exists(os.path.join(input_folder, p))]
    if missing:
        raise UserInputError(f"{input_folder} is not the HC18 release layout: {' and '.join(missing)} missing "
                             f"(expected {TRAINING_FOLDER}/, {TRAINING_CSV} and optionally {TEST_FOLDER}/ with "
                             f"{TEST_CSV})")
    has_test = [os.path.exists(os.path.join(input_folder, p)) for p in (TEST_FOLDER, TEST_CSV)]
    if any(has_test) and not all(has_test):
        present, absent = (TEST_FOLDER, TEST_CSV) if has_test[0] else (TEST_CSV, TEST_FOLDER)
        raise UserInputError(f"{input_folder} has {present} but not {absent}: give both or neither")
    if test_files and not all(has_test):
        raise UserInputError(f"test images were requested but {input_folder} has no {TEST_FOLDER}/")

    problems: List[str] = []
    train_rows = _read_csv(os.path.join(input_folder, TRAINING_CSV),
                           (FILENAME_COLUMN, PIXEL_SIZE_COLUMN, HC_COLUMN))
    labeled = _collect(os.path.join(input_folder, TRAINING_FOLDER), train_rows, training_files, LABELED_PREFIX,
                       True, problems)
    unlabeled: List[Source] = []
    if all(has_test):
        test_rows = _read_csv(os.path.join(input_folder, TEST_CSV), (FILENAME_COLUMN, PIXEL_SIZE_COLUMN))
        unlabeled = _collect(os.path.join(input_folder, TEST_FOLDER), test_rows, test_files, UNLABELED_PREFIX,
                             False, problems)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise UserInputError(f"{len(problems)} problem(s) in {input_folder}:\n  " + "\n  ".join(shown))
    if not labeled:
        raise UserInputError(f"no labeled images to convert in {os.path.join(input_folder, TRAINING_FOLDER)}")
    return labeled, unlabeled, train_rows


def _read_gray(path: str) -> np.ndarray:
    """A PNG as a 2D array (RGB, palette etc. converted to 8-bit grayscale)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "I", "I;16", "F"):
                im = im.convert("L")
            array = np.asarray(im)
    except Exception as e:  # PIL raises anything from OSError to SyntaxError on a broken file
        raise CaseError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    if array.ndim != 2 or array.size == 0:
        raise CaseError(f"{path}: not a 2D image (shape {array.shape})")
    return array


def _write_nifti(array: np.ndarray, pixel_size_mm: float, path: str) -> None:
    """Write a 2D array as a 2D NIfTI with isotropic spacing ``pixel_size_mm``."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing((pixel_size_mm, pixel_size_mm))
    sitk.WriteImage(image, path, useCompression=True)


def head_mask_from_outline(outline: np.ndarray) -> Tuple[np.ndarray, Ellipse]:
    """Fit an ellipse to an outline annotation and rasterise it filled.

    Args:
        outline: 2D array, nonzero on the drawn ellipse outline (gaps allowed).

    Returns:
        ``(mask, ellipse)``: the filled head mask (uint8, 1 = head, same shape as ``outline``) and the fitted
        :class:`nnssl.ops.ellipse.Ellipse` in pixel coordinates.

    Raises:
        ValueError: when no ellipse can be fitted, or the annotation has far more pixels than an outline of
            the fitted ellipse would (it is not an outline).
    """
    points = np.argwhere(outline != 0)
    ellipse = fit_ellipse(points)
    if len(points) > MAX_OUTLINE_PIXELS_PER_CIRCUMFERENCE * ellipse.circumference:
        raise ValueError(f"{len(points)} annotated pixels for an ellipse of circumference "
                         f"{ellipse.circumference:.0f} pixels: the annotation is not an outline")
    return rasterize_ellipse(ellipse, outline.shape).astype(np.uint8), ellipse


def convert_case(source: Source, output_folder: str) -> Optional[float]:
    """Convert one image (and its annotation) into the dataset folder being written.

    Args:
        source: the image; ``source.annotation`` None for an unlabeled image.
        output_folder: the dataset folder (with ``imagesTr``, ``labelsTr``, ``imagesUnlabeled``).

    Returns:
        The circumference in mm of the ellipse fitted to the annotation; None for an unlabeled image.

    Raises:
        CaseError: unreadable image or annotation, shapes that differ, or no ellipse fits the annotation.
    """
    image = _read_gray(source.image)
    if source.annotation is None:
        _write_nifti(image, source.pixel_size_mm,
                     os.path.join(output_folder, UNLABELED_RAW_FOLDER, f"{source.case_id}_0000{FILE_ENDING}"))
        return None
    outline = _read_gray(source.annotation)
    if outline.shape != image.shape:
        raise CaseError(f"{source.annotation}: shape {outline.shape} differs from the image's {image.shape}")
    try:
        mask, ellipse = head_mask_from_outline(outline)
    except ValueError as e:
        raise CaseError(f"{source.annotation}: {e}") from None
    _write_nifti(image, source.pixel_size_mm,
                 os.path.join(output_folder, "imagesTr", f"{source.case_id}_0000{FILE_ENDING}"))
    _write_nifti(mask, source.pixel_size_mm, os.path.join(output_folder, "labelsTr", f"{source.case_id}{FILE_ENDING}"))
    return ellipse.circumference * source.pixel_size_mm


def _convert_case_worker(args: Tuple[Source, str]) -> Tuple[str, Optional[float], Optional[str]]:
    source, output_folder = args
    try:
        return source.case_id, convert_case(source, output_folder), None
    except CaseError as e:
        return source.case_id, None, str(e)


def _convert_all(sources: List[Source], output_folder: str, num_processes: int, progress: bool
                 ) -> Tuple[Dict[str, Optional[float]], List[str]]:
    from tqdm import tqdm

    results: Dict[str, Optional[float]] = {}
    errors: List[str] = []
    jobs = [(s, output_folder) for s in sources]
    with tqdm(total=len(jobs), desc="HC18", unit="image", disable=not progress) as bar:
        def record(case: str, hc: Optional[float], error: Optional[str]) -> None:
            results[case] = hc
            if error is not None:
                errors.append(error)
            bar.update(1)

        if num_processes <= 1 or len(jobs) <= 1:
            for job in jobs:
                record(*_convert_case_worker(job))
        else:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(num_processes, len(jobs))) as pool:
                for outcome in pool.imap_unordered(_convert_case_worker, jobs, chunksize=4):
                    record(*outcome)
    return results, errors


def _write_reference_csv(path: str, labeled: List[Source], train_rows: Dict[str, Dict[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "head_circumference_mm", "pixel_size_mm", "mother_id"])
        for s in sorted(labeled, key=lambda s: s.case_id):
            row = train_rows[os.path.basename(s.image)]
            writer.writerow([s.case_id, row[HC_COLUMN], row[PIXEL_SIZE_COLUMN], mother_id(s.case_id)])


def _write_dataset_json(folder: str, dataset_folder_name: str, num_training: int, num_unlabeled: int) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(
        folder, channel_names={0: "US"}, labels={"background": 0, "head": 1}, num_training_cases=num_training,
        file_ending=FILE_ENDING, dataset_name=dataset_folder_name,
        # the citation goes into "reference": nnU-Net 2.8.1's generate_dataset_json stores `release` under
        # "citation" instead of the citation it is given
        reference="van den Heuvel TLA, de Bruijn D, de Korte CL, van Ginneken B (2018) Automated measurement of "
                  "fetal head circumference using 2D ultrasound images. PLoS ONE 13(8): e0200412. "
                  "https://hc18.grand-challenge.org/, https://zenodo.org/record/1327317",
        license="see https://zenodo.org/record/1327317",
        description=f"HC18 fetal head ultrasound, 2D. Labels: ellipse fitted to the annotated head outline, "
                    f"filled. {num_unlabeled} unlabeled test-set images in {UNLABELED_RAW_FOLDER}/. Reference "
                    f"head circumferences in {REFERENCE_CSV}.",
        overwrite_image_reader_writer="SimpleITKIO", converted_by="nnssl_convert_hc18")


def _check_name(dataset_id: int, name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise UserInputError(f"dataset id must be between 1 and 999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise UserInputError(f"dataset name must be letters, digits, '_' or '-', got {name!r}")
    return f"Dataset{dataset_id:03d}_{name}"


def convert_hc18(input_folder: str, dataset_id: int, name: str = "HC18", overwrite: bool = False,
                 num_processes: int = 1, progress: bool = True, training_files: Optional[Sequence[str]] = None,
                 test_files: Optional[Sequence[str]] = None) -> str:
    """Convert the HC18 release into ``$nnUNet_raw/Dataset{dataset_id:03d}_{name}`` (see the module docstring).

    Args:
        input_folder: the HC18 folder.
        dataset_id: nnU-Net dataset id, 1-999.
        name: dataset name after the id.
        overwrite: replace an existing dataset folder of that name (only once the new one is complete).
        num_processes: worker processes (spawn); 1 converts in this process.
        progress: show a progress bar.
        training_files: only these training images (file names such as ``"010_2HC.png"``); None: all.
        test_files: only these test images as unlabeled images; None: all; an empty list: none.

    Returns:
        The dataset folder.

    Raises:
        UserInputError: for a bad input folder, ``nnUNet_raw`` not set, an existing dataset (without
            ``overwrite``) or another dataset with the same id, and for images that cannot be converted; nothing
            is left behind in ``nnUNet_raw`` then.
    """
    folder_name = _check_name(dataset_id, name)
    raw = require_env("nnUNet_raw")
    labeled, unlabeled, train_rows = find_sources(input_folder, training_files, test_files)
    os.makedirs(raw, exist_ok=True)
    target = os.path.join(raw, folder_name)
    same_id = [d for d in os.listdir(raw) if d.startswith(f"Dataset{dataset_id:03d}_") and d != folder_name
               and os.path.isdir(os.path.join(raw, d))]
    if same_id:
        raise UserInputError(f"dataset id {dataset_id} is already used by {os.path.join(raw, same_id[0])}; "
                             f"choose another -d (nnU-Net needs ids to be unique)")
    if os.path.exists(target) and not overwrite:
        raise UserInputError(f"{target} already exists: pass --overwrite to replace it")

    start = time.monotonic()
    tmp = tempfile.mkdtemp(prefix=f".{folder_name}.tmp-", dir=raw)
    try:
        for sub in ("imagesTr", "labelsTr", UNLABELED_RAW_FOLDER):
            os.makedirs(os.path.join(tmp, sub))
        results, errors = _convert_all(labeled + unlabeled, tmp, num_processes, progress)
        if errors:
            raise UserInputError(f"{len(errors)} image(s) could not be converted (nothing was written):\n  "
                                 + "\n  ".join(sorted(errors)))
        _write_dataset_json(tmp, folder_name, len(labeled), len(unlabeled))
        _write_reference_csv(os.path.join(tmp, REFERENCE_CSV), labeled, train_rows)
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{folder_name}.old-", dir=raw)
            os.replace(target, os.path.join(old, folder_name))
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)

    diffs = np.array([results[s.case_id] - float(train_rows[os.path.basename(s.image)][HC_COLUMN])
                      for s in labeled])
    print(f"{target}: {len(labeled)} labeled and {len(unlabeled)} unlabeled images in "
          f"{time.monotonic() - start:.1f} s")
    print(f"fitted ellipse HC vs the CSV's reference HC: median |diff| {np.median(np.abs(diffs)):.3f} mm, "
          f"max {np.abs(diffs).max():.3f} mm")
    far = [(s.case_id, d) for s, d in zip(labeled, diffs) if abs(d) > HC_WARNING_MM]
    for case, d in far:
        print(f"warning: {case}: the ellipse fitted to the annotation differs from the reference HC by "
              f"{d:+.2f} mm")
    return target


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnssl_convert_hc18",
        description="Convert the HC18 challenge release (training_set/, test_set/ and their CSVs) into an nnU-Net "
                    "raw 2D dataset $nnUNet_raw/DatasetXXX_NAME with filled head masks, the test set as "
                    f"unlabeled images ({UNLABELED_RAW_FOLDER}/) and {REFERENCE_CSV}.")
    parser.add_argument("-i", required=True, help="the HC18 folder")
    parser.add_argument("-d", required=True, type=int, help="dataset id (1-999)")
    parser.add_argument("-n", default="HC18", help="dataset name (default: HC18)")
    parser.add_argument("-np", type=int, default=1, help="number of worker processes (default: 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    run_command(lambda: convert_hc18(args.i, args.d, args.n, args.overwrite, args.np, not args.no_progress))


if __name__ == "__main__":
    main()
