"""``nnssl_verify_dataset``: check a dataset's raw images before nnU-Net or an unlabeled pool uses them.

Every image of ``imagesTr``, ``labelsTr``, the unlabeled images and a test folder is read once, to its end
(:func:`inspect_file`):

- the file can be read completely: a ``.gz`` file is decompressed to its end with Python's ``gzip`` (a stream
  that stops early is an error even when an image reader returned something for it), a NIfTI file holds as many
  voxel bytes as its header announces;
- no NaN or Inf voxels (error); an image of one constant value (warning);
- positive spacing, also in the NIfTI header (readers silently turn a zero ``pixdim`` into 1);
- the dimensionality of the dataset's training images (a 2D slice or a 4D file among 3D images is an error) and
  the channels of ``dataset.json`` (``case_0000``, ``case_0001``, ... and nothing else);
- the channels of a case, and a label and its image, share shape, spacing and direction;
- label values are in ``dataset.json``'s ``labels``;
- **the same image content in two places** (:func:`image_fingerprint`, a hash of the voxel values and the shape,
  so a renamed or recompressed copy is found). An unlabeled image equal to a validation or test image is an
  error: validation cases are those in any fold's ``val`` of ``$nnUNet_preprocessed/DatasetXXX/splits_final.json``
  plus the ``imagesTr`` cases that no fold lists (held out, e.g. with ``nnssl_make_split --exclude``); without a
  split every ``imagesTr`` case counts, since any of them may end up in validation. Other duplicates (two
  training cases, a test image that is also a training case) are warnings; a held-out ``imagesTr`` case copied
  into the test folder is the expected layout of a held-out test set and is not reported.

nnU-Net's own ``verify_dataset_integrity`` then checks ``imagesTr``/``labelsTr`` for what only it knows
(``dataset.json``'s required keys and ``numTraining``, a label file for every case, consecutive labels); it stops
at its first failing stage, and what it reports about a file that already has an error here is left out.

The unlabeled images are ``$nnUNet_raw/DatasetXXX/imagesUnlabeled`` (or ``-i``) plus the source images of the
preprocessed unlabeled pools (``-c``: only that configuration's), which are what the trainers actually use. The
test folder (``--test-folder``, default ``$nnUNet_raw/DatasetXXX/imagesTs`` when it exists) holds images with
nnU-Net's channel naming; its labels are in the sibling folder whose name has ``labels`` for ``images``
(``imagesTs`` -> ``labelsTs``, ``images`` -> ``labels``, ``imagesTr`` -> ``labelsTr``).

One line per problem (``error: <file>: <problem>``, ``warning: ...``), then a summary. Exit code 0 without errors
(warnings allowed), 1 with errors, 2 when the command cannot run (unknown dataset, missing folder).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import multiprocessing
import os
import re
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnssl.data.layout import UNLABELED_MANIFEST, UNLABELED_PREPROCESSED_FOLDER, UNLABELED_RAW_FOLDER
from nnssl.utils import UserInputError, dataset_name, load_json_or_none, require_env, run_command

ERROR, WARNING = "error", "warning"
READ_CHUNK = 1 << 20
# roles of an image in the duplicate check: an unlabeled image must not equal one of PROTECTED
UNLABELED, TRAINING, VALIDATION, HELD_OUT, TEST = "unlabeled", "training", "validation", "held-out", "test"
PROTECTED = (VALIDATION, HELD_OUT, TEST)


@dataclass(frozen=True)
class Problem:
    """One problem with one file (or case): ``severity`` is :data:`ERROR` or :data:`WARNING`."""
    severity: str
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.file}: {self.message}"


@dataclass
class FileReport:
    """What one complete read of a file found: its problems and, when it could be read, its geometry and content.

    ``shape`` is the spatial shape as nnU-Net's reader returns it, ``spacing`` and ``direction`` those of the file's
    header (``direction`` None when the reader does not expose it), ``dim`` the file's dimensionality,
    ``fingerprint`` the :func:`image_fingerprint` (None for unreadable, non-finite or constant images) and
    ``values`` the distinct voxel values of a label file.
    """
    path: str
    problems: List[Problem] = field(default_factory=list)
    shape: Optional[Tuple[int, ...]] = None
    spacing: Optional[Tuple[float, ...]] = None
    direction: Optional[Tuple[float, ...]] = None
    dim: Optional[int] = None
    fingerprint: Optional[str] = None
    values: Optional[List[float]] = None

    def add(self, severity: str, message: str) -> None:
        self.problems.append(Problem(severity, self.path, message))


def image_fingerprint(data: np.ndarray) -> str:
    """sha256 of an image's voxel values (as float64, plane by plane) and its shape.

    Equal for a renamed copy, a copy written with other compression or another file format, or stored with
    another numeric type holding the same values; different as soon as one voxel differs."""
    h = hashlib.sha256(repr(tuple(int(s) for s in data.shape)).encode())
    for plane in data.reshape(-1, *data.shape[-2:]):
        h.update(np.ascontiguousarray(plane, dtype=np.float64).tobytes())
    return h.hexdigest()


@dataclass
class _NiftiHeader:
    """What a NIfTI-1/2 header says about the file: spatial ``pixdim``, where the voxels start, how many bytes
    they take and their type when it is a float type (else None)."""
    pixdim: Tuple[float, ...]
    vox_offset: int
    data_bytes: int
    float_dtype: Optional[np.dtype]


def _nifti_header(head: bytes) -> Optional[_NiftiHeader]:
    """Parse a NIfTI-1 or NIfTI-2 header from the file's first bytes; None if they are not one."""
    for e in "<>":
        if len(head) >= 348 and struct.unpack(e + "i", head[:4])[0] == 348:
            datatype, bitpix = struct.unpack(e + "2h", head[70:74])
            dims = struct.unpack(e + "8h", head[40:56])
            pixdim = struct.unpack(e + "8f", head[76:108])
            vox_offset = int(struct.unpack(e + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(e + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(e + "2h", head[12:16])
            dims = struct.unpack(e + "8q", head[16:80])
            pixdim = struct.unpack(e + "8d", head[104:168])
            vox_offset = struct.unpack(e + "q", head[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7:
        return None
    float_dtype = {16: np.dtype(e + "f4"), 64: np.dtype(e + "f8")}.get(datatype)  # NIfTI's FLOAT32, FLOAT64
    return _NiftiHeader(tuple(pixdim[1:1 + min(dims[0], 3)]), vox_offset,
                        int(np.prod(dims[1:1 + dims[0]])) * bitpix // 8, float_dtype)


@dataclass
class _Scan:
    """A complete read of a file's bytes: a problem that stopped it, the NIfTI header, the content size and the
    non-finite voxels found in a NIfTI file's float data."""
    problem: Optional[str] = None
    header: Optional[_NiftiHeader] = None
    size: int = 0
    nan: int = 0
    inf: int = 0


def _scan_file(path: str) -> _Scan:
    """Read a file to its end (decompressing ``.gz``), counting NaN/Inf in a NIfTI file's float voxels on the way
    (SimpleITK reads them as 0)."""
    scan, pending = _Scan(), b""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                if scan.size == 0 and path.endswith((".nii", ".nii.gz")):
                    scan.header = _nifti_header(chunk)
                start, scan.size = scan.size, scan.size + len(chunk)
                h = scan.header
                if h is None or h.float_dtype is None:
                    continue
                data = pending + chunk[max(h.vox_offset - start, 0):max(h.vox_offset + h.data_bytes - start, 0)]
                usable = len(data) - len(data) % h.float_dtype.itemsize
                values = np.frombuffer(data[:usable], h.float_dtype)
                scan.nan += int(np.isnan(values).sum())
                scan.inf += int(np.isinf(values).sum())
                pending = data[usable:]
    except EOFError:
        scan.problem = ("truncated: the gzip stream ends before its end marker (an interrupted download or copy, "
                        "a full disk?); replace the file with a complete copy")
    except (gzip.BadGzipFile, zlib.error) as e:
        scan.problem = f"corrupt gzip data ({e}); replace the file with a good copy"
    except OSError as e:
        scan.problem = f"cannot be read ({e})"
    return scan


def _dimensionality(properties: dict, shape: Tuple[int, ...]) -> int:
    """The file's dimensionality: SimpleITK's when it read the file, else nnU-Net's convention for 2D data
    (a first axis of size 1 with the placeholder spacing 999)."""
    if "sitk_stuff" in properties:
        return len(properties["sitk_stuff"]["spacing"])
    return 2 if shape[1] == 1 and properties["spacing"][0] >= 999 else 3


def _direction(properties: dict) -> Optional[Tuple[float, ...]]:
    """The file's direction cosines (SimpleITK's, or the column-normalised affine of nibabel), else None."""
    if "sitk_stuff" in properties:
        return tuple(float(d) for d in properties["sitk_stuff"]["direction"])
    if "nibabel_stuff" in properties:
        a = np.asarray(properties["nibabel_stuff"]["original_affine"], dtype=float)[:3, :3]
        norms = np.linalg.norm(a, axis=0)
        return tuple((a / np.where(norms > 0, norms, 1)).ravel().tolist())
    return None


def check_dimensionality(report: FileReport, expected_dim: Optional[int]) -> List[Problem]:
    """An error when a readable file's dimensionality differs from the dataset's (``expected_dim``)."""
    if expected_dim is None or report.dim is None or report.dim == expected_dim:
        return []
    return [Problem(ERROR, report.path, f"{report.dim}D image, but the dataset's training images are "
                                        f"{expected_dim}D: convert it (or remove it from this folder)")]


def inspect_file(path: str, reader_writer, expected_dim: Optional[int] = None, is_label: bool = False
                 ) -> FileReport:
    """Read one image or label file completely and check what a single file can show.

    Args:
        path: the file.
        reader_writer: an instance of the dataset's nnU-Net reader/writer (``SimpleITKIO()`` etc.).
        expected_dim: the dataset's dimensionality (2 or 3); None: not checked.
        is_label: read with ``read_seg``, record the label values, no fingerprint.

    Returns:
        The :class:`FileReport`; its problems name the file and what to do.
    """
    report = FileReport(path)
    scan = _scan_file(path)
    if scan.problem is not None:
        report.add(ERROR, scan.problem)
        return report
    if scan.header is not None:
        if scan.size < scan.header.vox_offset + scan.header.data_bytes:
            report.add(ERROR, f"truncated: {scan.size} bytes where the NIfTI header needs "
                              f"{scan.header.vox_offset + scan.header.data_bytes}; replace the file with a complete "
                              f"copy")
            return report
        if not all(s > 0 for s in scan.header.pixdim):
            report.add(ERROR, f"zero or negative spacing {scan.header.pixdim} in the NIfTI header (readers silently "
                              f"use 1 or the absolute value instead): write the correct voxel size into the header")
    try:
        data, properties = reader_writer.read_seg(path) if is_label else reader_writer.read_images([path])
    except Exception as e:  # readers raise anything from RuntimeError to OSError
        report.add(ERROR, f"cannot be read by {type(reader_writer).__name__} ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'})")
        return report
    spacing = properties["sitk_stuff"]["spacing"] if "sitk_stuff" in properties else properties["spacing"]
    report.shape = tuple(int(s) for s in data.shape[1:])
    report.spacing = tuple(float(s) for s in spacing)
    report.direction = _direction(properties)
    report.dim = _dimensionality(properties, data.shape)
    if scan.header is None and not all(np.isfinite(s) and s > 0 for s in report.spacing):
        report.add(ERROR, f"zero, negative or non-finite spacing {report.spacing}: write the correct voxel size "
                          f"into the header")
    report.problems += check_dimensionality(report, expected_dim)
    n_nan, n_inf = max(scan.nan, int(np.isnan(data).sum())), max(scan.inf, int(np.isinf(data).sum()))
    if n_nan or n_inf:
        report.add(ERROR, f"{n_nan} NaN and {n_inf} Inf voxel(s) of {data.size}: replace them with finite values "
                          f"(e.g. the image's minimum)")
        return report
    if is_label:
        report.values = np.unique(data).tolist()
    elif data.min() == data.max():
        report.add(WARNING, f"constant image (every voxel is {float(data.flat[0]):g}): nothing to learn from; "
                            f"remove it if it is a failed export")
    else:
        report.fingerprint = image_fingerprint(data)
    return report


def check_same_grid(reports: Sequence[FileReport]) -> List[Problem]:
    """Errors for readable files of one case (channels, or a label and its image) whose shape, spacing or
    direction differ from the first file's."""
    readable = [r for r in reports if r.shape is not None]
    problems: List[Problem] = []
    for r in readable[1:]:
        ref = readable[0]
        for what, a, b in (("shape", r.shape, ref.shape), ("spacing", r.spacing, ref.spacing),
                           ("direction", r.direction, ref.direction)):
            if a is None or b is None:
                continue
            if len(a) != len(b) or (a != b if what == "shape" else not np.allclose(a, b, rtol=1e-5, atol=1e-6)):
                a, b = (tuple(round(v, 6) for v in x) for x in (a, b))
                problems.append(Problem(ERROR, r.path, f"{what} {a} differs from {os.path.basename(ref.path)}'s "
                                                       f"{b}: the files of one case must share one voxel grid"))
                break
    return problems


def list_cases(folder: str, file_ending: str, num_channels: int) -> Tuple[Dict[str, List[str]], List[Problem]]:
    """Map each case id of an image folder to its channel files, with the problems of nnU-Net's naming.

    Args:
        folder: folder with ``<case>_<XXXX><file_ending>`` files (hidden files and folders are ignored).
        file_ending: the dataset's file ending, e.g. ``.nii.gz``.
        num_channels: number of input channels in dataset.json (``channel_names``).

    Returns:
        ``({case: [file of channel 0, file of channel 1, ...]}, problems)``, cases sorted; a case with missing or
        unexpected channels is reported and left out.
    """
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    problems: List[Problem] = []
    channels: Dict[str, Dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        if not name.endswith(file_ending):
            problems.append(Problem(ERROR, path, f"does not have the dataset's file ending {file_ending}"))
            continue
        m = pattern.match(name)
        if m is None:
            problems.append(Problem(ERROR, path, f"name must be <case>_XXXX{file_ending} with a 4-digit channel "
                                                 f"index"))
            continue
        channels.setdefault(m.group(1), {})[int(m.group(2))] = path
    expected = set(range(num_channels))
    cases = {}
    for case, chans in sorted(channels.items()):
        missing, extra = sorted(expected - set(chans)), sorted(set(chans) - expected)
        for kind, which in (("missing", missing), ("unexpected", extra)):
            if which:
                problems.append(Problem(ERROR, os.path.join(folder, case),
                                        f"{kind} channel(s) " + ", ".join(f"{c:04d}" for c in which) +
                                        f" (dataset.json has {num_channels} channel(s))"))
        if not missing and not extra:
            cases[case] = [chans[c] for c in range(num_channels)]
    return cases, problems


def allowed_label_values(dataset_json: dict) -> List[int]:
    """The label values a label file may hold: nnU-Net's labels of dataset.json, plus its ignore label."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    lm = LabelManager(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))
    return sorted(set(int(v) for v in lm.all_labels) | ({int(lm.ignore_label)} if lm.has_ignore_label else set()))


def check_label_values(report: FileReport, allowed: Sequence[int]) -> List[Problem]:
    """An error when a label file holds values outside ``allowed`` (or values that are not integers)."""
    bad = [v for v in report.values or [] if v != round(v) or int(v) not in allowed]
    if not bad:
        return []
    return [Problem(ERROR, report.path, f"label value(s) {[int(v) if v == round(v) else v for v in bad]} are not "
                                        f"in dataset.json's labels {list(allowed)}: fix the label map or add the "
                                        f"label to dataset.json")]


def labels_folder_of(images: str) -> Optional[str]:
    """The labels of a test image folder: its sibling with ``labels`` for ``images`` in the name (``imagesTs`` ->
    ``labelsTs``, ``images`` -> ``labels``, ``imagesTr`` -> ``labelsTr``); None if there is no such folder."""
    parent, base = os.path.split(os.path.normpath(images))
    labels = os.path.join(parent, base.replace("images", "labels", 1))
    return labels if "images" in base and os.path.isdir(labels) else None


@dataclass
class _Case:
    """One case to check: its images, its label file (or None), its role for duplicates and a note on it."""
    folder: str
    case: str
    images: List[str]
    label: Optional[str]
    role: str
    note: str


def _inspect_job(job: tuple) -> FileReport:
    path, is_label, reader_writer_class = job
    return inspect_file(path, reader_writer_class(), is_label=is_label)


def _inspect_all(paths: Sequence[Tuple[str, bool]], reader_writer_class, num_processes: int, progress: bool
                 ) -> Dict[str, FileReport]:
    """:func:`inspect_file` on every ``(path, is_label)``, in ``num_processes`` worker processes."""
    from tqdm import tqdm

    jobs = [(p, is_label, reader_writer_class) for p, is_label in paths]
    reports = {}
    with tqdm(total=len(jobs), desc="reading", unit="file", disable=not progress) as bar, \
            contextlib.ExitStack() as stack:
        if num_processes <= 1 or len(jobs) <= 1:
            results = map(_inspect_job, jobs)
        else:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))))
            results = pool.imap(_inspect_job, jobs, chunksize=4)
        for report in results:
            reports[report.path] = report
            bar.update(1)
    return reports


def _split_roles(preprocessed_base: Optional[str], cases: Sequence[str]) -> Dict[str, Tuple[str, str]]:
    """``{imagesTr case: (role, note)}`` from ``splits_final.json`` (every case a validation case without it)."""
    splits = load_json_or_none(os.path.join(preprocessed_base, "splits_final.json")) if preprocessed_base else None
    if splits is None:
        return {c: (VALIDATION, "a training case, and there is no splits_final.json yet, so any training case may "
                                "become a validation case") for c in cases}
    roles = {}
    for c in cases:
        val_folds = [str(i) for i, s in enumerate(splits) if c in s.get("val", [])]
        if val_folds:
            roles[c] = (VALIDATION, f"a validation case of fold(s) {', '.join(val_folds)} of splits_final.json")
        elif any(c in s.get("train", []) or c in s.get("unlabeled", []) for s in splits):
            roles[c] = (TRAINING, "a training case")
        else:
            roles[c] = (HELD_OUT, "held out of every fold of splits_final.json (a test case)")
    return roles


def _pool_sources(preprocessed_base: Optional[str], configuration: Optional[str]
                  ) -> Dict[str, Dict[str, List[str]]]:
    """``{pool folder: {case: source files}}`` of the preprocessed unlabeled pools (of ``configuration``)."""
    root = os.path.join(preprocessed_base, UNLABELED_PREPROCESSED_FOLDER) if preprocessed_base else None
    pools = {}
    for name in sorted(os.listdir(root)) if root and os.path.isdir(root) else []:
        manifest = load_json_or_none(os.path.join(root, name, UNLABELED_MANIFEST))
        if manifest is not None and configuration in (None, manifest.get("configuration")):
            pools[os.path.join(root, name)] = {c: e["source_files"] for c, e in manifest.get("cases", {}).items()}
    if configuration is not None and not pools:
        raise UserInputError(f"no preprocessed unlabeled pool of configuration {configuration} under {root}: run "
                             f"nnssl_preprocess_unlabeled -c {configuration} first, or leave out -c")
    return pools


def _duplicate_problems(cases: Sequence[_Case], reports: Dict[str, FileReport], pooled: set) -> List[Problem]:
    """Problems for images with the same :func:`image_fingerprint` (see the module docstring for the rules);
    ``pooled``: the case ids of the preprocessed unlabeled pools."""
    groups: Dict[str, List[Tuple[str, _Case]]] = {}
    for c in cases:
        for f in c.images:
            if reports[f].fingerprint is not None:
                groups.setdefault(reports[f].fingerprint, []).append((f, c))
    problems = []
    for members in groups.values():
        protected = [(f, c) for f, c in members if c.role in PROTECTED]
        leaked = [(f, c) for f, c in members if c.role == UNLABELED] if protected else []
        for f, c in leaked:
            other, oc = protected[0]
            again = " and rerun nnssl_preprocess_unlabeled with --overwrite" if c.case in pooled else ""
            problems.append(Problem(ERROR, f, f"same voxels as {other} ({oc.note}): an unlabeled image must "
                                              f"not be a validation or test image; remove it{again}"))
        rest = [m for m in members if m not in leaked]
        if len(rest) == 2 and {rest[0][1].role, rest[1][1].role} == {HELD_OUT, TEST}:
            continue  # a held-out imagesTr case copied into the test folder: the held-out test set's layout
        for f, c in rest[1:]:
            problems.append(Problem(WARNING, f, f"same voxels as {rest[0][0]} ({rest[0][1].note}): a "
                                                f"duplicate image; remove one copy unless that is intended"))
    return problems


@contextlib.contextmanager
def _captured_stdout():
    """Capture what this process and its child processes print to stdout (file descriptor 1); the text is in
    ``captured[0]`` after the block."""
    captured = [""]
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile("w+b") as tmp, contextlib.redirect_stdout(io.StringIO()) as here:
        os.dup2(tmp.fileno(), 1)
        try:
            yield captured
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            captured[0] = here.getvalue() + tmp.read().decode(errors="replace")


_NNUNET_REPORT = re.compile(r"^(Error|ERROR|Warning|WARNING|Images contain|Segmentation contains)\W*")


def nnunet_integrity_problems(raw_folder: str, num_processes: int, file_ending: str, known_bad: set
                              ) -> List[Problem]:
    """Run nnU-Net's ``verify_dataset_integrity`` on ``raw_folder`` and turn what it prints into problems.

    Each report it prints becomes one :class:`Problem`, named by the first file it mentions; a report that
    mentions a file of ``known_bad`` (absolute paths with an error already) is left out. A failure without a
    report (an assertion on dataset.json, the number of cases, missing label files) becomes one error."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    failure = None
    with _captured_stdout() as out:
        try:
            verify_dataset_integrity(raw_folder, max(1, num_processes))
        except Exception as e:  # it asserts or raises on its first failing stage
            failure = e
    blocks: List[List[str]] = []
    current = None
    for line in out[0].splitlines():
        if _NNUNET_REPORT.match(line):
            current = [line]
            blocks.append(current)
        elif current is not None and line.strip() and not line.startswith("#"):
            current.append(line.strip())
        else:
            current = None
    reports = [(WARNING if b[0].lower().startswith("warning") else ERROR,
                "nnU-Net: " + _NNUNET_REPORT.sub("", " ".join(" ".join(b).split()))) for b in blocks]
    if failure is not None and not blocks:
        reports.append((ERROR, "nnU-Net's verify_dataset_integrity: " +
                        (" ".join(str(failure).split()) or type(failure).__name__)))
    prefix = os.path.abspath(raw_folder) + os.sep
    problems = []
    for severity, text in reports:
        files = [os.path.abspath(f) for f in re.findall(r"[^\s'\"\[\],]+" + re.escape(file_ending), text)]
        if not set(files) & known_bad:
            problems.append(Problem(severity, files[0] if files else raw_folder, text.replace(prefix, "")))
    return problems


def verify_dataset(dataset: str | int, test_folder: Optional[str] = None, unlabeled_folder: Optional[str] = None,
                   configuration: Optional[str] = None, num_processes: int = 1, progress: bool = True
                   ) -> List[Problem]:
    """Check a dataset's raw images; see the module docstring for what is checked.

    Args:
        dataset: dataset id or name.
        test_folder: test images (labels in the sibling ``labels...`` folder); default ``imagesTs`` if present.
        unlabeled_folder: default ``$nnUNet_raw/DatasetXXX/imagesUnlabeled`` (skipped when absent).
        configuration: check only this configuration's preprocessed unlabeled pool (default: every pool).
        num_processes: worker processes for reading.
        progress: show a progress bar.

    Returns:
        Every problem found, errors and warnings; files are named relative to the raw dataset folder.

    Raises:
        UserInputError: when the dataset, a given folder or a requested pool does not exist.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    name = dataset_name(dataset)
    raw = os.path.abspath(os.path.join(require_env("nnUNet_raw"), name))
    dataset_json = load_json_or_none(os.path.join(raw, "dataset.json"))
    missing_keys = [k for k in ("labels", "file_ending") if k not in (dataset_json or {})]
    if dataset_json is None or missing_keys:
        raise UserInputError(f"{raw} has no dataset.json with labels and file_ending (missing: "
                             f"{', '.join(missing_keys or ['dataset.json'])}): is it an nnU-Net raw dataset?")
    ending = dataset_json["file_ending"]
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    preprocessed_root = os.environ.get("nnUNet_preprocessed")
    preprocessed_base = os.path.join(preprocessed_root, name) if preprocessed_root else None
    problems: List[Problem] = []
    cases: List[_Case] = []

    def add_folder(images: str, labels: Optional[str], roles_of, report_missing_labels: bool) -> None:
        found, naming = list_cases(images, ending, num_channels)
        problems.extend(naming)
        roles = roles_of(list(found))
        for case, files in found.items():
            label = os.path.join(labels, case + ending) if labels else None
            if label is not None and not os.path.isfile(label):
                if report_missing_labels:
                    problems.append(Problem(ERROR, label, f"does not exist: case {case} of {images} has no label "
                                                                f"file (add it, or remove the case)"))
                label = None
            cases.append(_Case(images, case, files, label, *roles[case]))

    train_images = os.path.join(raw, "imagesTr")
    if os.path.isdir(train_images):  # nnU-Net's check below reports a missing imagesTr, labelsTr or label file
        add_folder(train_images, os.path.join(raw, "labelsTr"), lambda ids: _split_roles(preprocessed_base, ids),
                   report_missing_labels=False)

    if unlabeled_folder is not None and not os.path.isdir(unlabeled_folder):
        raise UserInputError(f"unlabeled image folder {unlabeled_folder} does not exist")
    unlabeled_folder = os.path.abspath(unlabeled_folder or os.path.join(raw, UNLABELED_RAW_FOLDER))
    if os.path.isdir(unlabeled_folder):
        add_folder(unlabeled_folder, None, lambda ids: dict.fromkeys(ids, (UNLABELED, "an unlabeled image")), False)
    pooled = set()  # case ids in a pool; a pool's cases that are not in the unlabeled folder are checked too
    for pool, sources in _pool_sources(preprocessed_base, configuration).items():
        pooled.update(sources)
        known = {c.case for c in cases if c.role == UNLABELED}
        for case, files in sources.items():
            if case in known:
                continue
            missing = [f for f in files if not os.path.isfile(f)]
            for f in missing:
                problems.append(Problem(WARNING, f, f"a source image of the unlabeled pool {pool} no longer exists, "
                                                    f"so what the pool holds cannot be checked: rebuild the pool with "
                                                    f"nnssl_preprocess_unlabeled --overwrite"))
            if not missing:
                cases.append(_Case(os.path.dirname(files[0]), case, list(files), None, UNLABELED,
                                   f"an image of the unlabeled pool {pool}"))

    explicit_test = test_folder is not None
    test_folder = os.path.abspath(test_folder or os.path.join(raw, "imagesTs"))
    if explicit_test and not os.path.isdir(test_folder):
        raise UserInputError(f"test folder {test_folder} does not exist")
    if os.path.isdir(test_folder):
        labels = labels_folder_of(test_folder)
        if labels is None and explicit_test:
            problems.append(Problem(WARNING, test_folder, "no labels folder next to it (imagesTs -> labelsTs, images "
                                                          "-> labels): the test labels were not checked"))
        add_folder(test_folder, labels, lambda ids: dict.fromkeys(ids, (TEST, f"a test image of {test_folder}")),
                   report_missing_labels=True)

    paths = [(f, False) for c in cases for f in c.images] + [(c.label, True) for c in cases if c.label]
    print(f"nnssl_verify_dataset: {name}: reading {len(paths)} file(s)", flush=True)
    rw_class = determine_reader_writer_from_dataset_json(dataset_json, verbose=False)
    reports = _inspect_all(paths, rw_class, num_processes, progress)
    for r in reports.values():
        problems.extend(r.problems)

    train_dims = [reports[f].dim for c in cases if c.folder == train_images for f in c.images
                  if reports[f].dim is not None]
    expected_dim = max(set(train_dims), key=train_dims.count) if train_dims else None
    allowed = allowed_label_values(dataset_json)
    for c in cases:
        images = [reports[f] for f in c.images]
        for r in images:
            problems.extend(check_dimensionality(r, expected_dim))
        problems.extend(check_same_grid(images))
        if c.label is not None:
            problems.extend(check_label_values(reports[c.label], allowed))
            problems.extend(check_same_grid([images[0], reports[c.label]]))
    problems.extend(_duplicate_problems(cases, reports, pooled))
    known_bad = {os.path.abspath(p.file) for p in problems if p.severity == ERROR}
    problems.extend(nnunet_integrity_problems(raw, num_processes, ending, known_bad))

    def shown(path: str) -> str:
        path = os.path.abspath(path)
        return name if path == raw else os.path.relpath(path, raw) if path.startswith(raw + os.sep) else path

    return [Problem(p.severity, shown(p.file), p.message.replace(raw + os.sep, "")) for p in problems]


def main(argv: Optional[Sequence[str]] = None) -> None:
    from nnunetv2.configuration import default_num_processes

    parser = argparse.ArgumentParser(
        prog="nnssl_verify_dataset",
        description="Check every image of imagesTr, labelsTr, the unlabeled images (and the sources of the "
                    "preprocessed unlabeled pools) and a test folder: complete files, finite voxels, spacing, "
                    "dimensionality, channels, label values, and the same image in two places (an unlabeled "
                    "image that is also a validation or test image is an error). Exit code 1 on any error.")
    parser.add_argument("-d", required=True, help="dataset id or name")
    parser.add_argument("-c", default=None,
                        help="check the sources of this configuration's preprocessed unlabeled pool only "
                             "(default: of every pool)")
    parser.add_argument("-i", default=None,
                        help=f"folder of unlabeled images (default: $nnUNet_raw/DatasetXXX/{UNLABELED_RAW_FOLDER})")
    parser.add_argument("--test-folder", default=None,
                        help="test images with nnU-Net's channel naming; labels in the sibling folder named with "
                             "'labels' for 'images' (imagesTs -> labelsTs, images -> labels). Default: "
                             "$nnUNet_raw/DatasetXXX/imagesTs if it exists")
    parser.add_argument("-np", type=int, default=default_num_processes,
                        help=f"worker processes for reading (default: nnUNet_def_n_proc, here {default_num_processes})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    problems = run_command(lambda: verify_dataset(args.d, args.test_folder, args.i, args.c, args.np,
                                                  not args.no_progress))
    for p in problems:
        print(p)
    errors = sum(p.severity == ERROR for p in problems)
    warnings = len(problems) - errors
    print(f"nnssl_verify_dataset: {errors} error(s), {warnings} warning(s)"
          + (": fix the errors above before training" if errors else ""))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
