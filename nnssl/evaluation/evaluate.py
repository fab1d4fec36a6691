"""``nnssl_evaluate``: evaluate a folder of predictions against a folder of references, for any nnU-Net dataset.

Files are read with nnU-Net's own reader/writer for the dataset (``determine_reader_writer_from_dataset_json``),
and labels, regions and the ignore label follow nnU-Net's ``LabelManager`` and
``nnunetv2/evaluation/evaluate_predictions.py``: one mask per foreground label (or per region, the union of its
labels, when dataset.json defines regions), with the voxels of the ignore label in the *reference* removed from
both masks. Every (case, class) pair gets Dice, IoU, HD95 and ASD, the distances both in mm and in voxels; see
:mod:`nnssl.evaluation.metrics` for the definitions and the empty-mask rule.

Geometry: nnU-Net readers return ``(1, *spatial)`` arrays with the spacing in the same (numpy) axis order. 2D
data comes as a single slice (``(1, 1, H, W)``, e.g. PNG or 2D NIfTI); that pseudo axis is dropped, so 2D images
are evaluated as 2D (a 3D surface of a one-slice volume would make every voxel a surface voxel).

Outputs (each written to a temporary file first and moved into place with ``os.replace``, and only after every
case has been evaluated, so a failed or interrupted run never leaves a file that looks like a valid result):

* ``<prefix>_per_case.csv``: one row per case and class (``nan`` for undefined values, flags as 0/1);
* ``<prefix>_summary.json``: per class and over classes, the mean, std (population, ddof=0) and median of each
  metric with the number of cases used and excluded, the empty-mask rule, the metric definitions and the exact
  command line (JSON ``null`` where a value is undefined).

With ``--hc`` (2D binary datasets such as HC18) each case also gets the head circumference of the prediction
(:func:`nnssl.evaluation.head_circumference.head_circumference_mm`), the reference head circumference (from
``--hc-csv`` when given, else measured on the reference mask with the same function) and their difference.

Bad input (missing or extra cases, mismatched shapes or spacings, labels outside the dataset's label set) raises
:class:`EvaluationInputError` naming the case; the command prints the message and exits with code 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shlex
import sys
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from nnssl.evaluation.metrics import DISTANCE_DEFINITIONS, EMPTY_RULE, binary_metrics
from nnssl.utils import atomic_write_text

METRICS = ("dice", "iou", "hd95_mm", "asd_mm", "hd95_vox", "asd_vox")
HC_COLUMNS = ("hc_pred_mm", "hc_ref_mm", "hc_diff_mm", "hc_abs_diff_mm")
CSV_COLUMNS = ("case", "class_name", "class_id") + METRICS + (
    "n_ref_voxels", "n_pred_voxels", "ref_empty", "pred_empty")
SPACING_RTOL = 1e-4
"""Relative tolerance when comparing the spacing of a prediction with that of its reference."""

LabelOrRegion = Union[int, Tuple[int, ...]]


class EvaluationInputError(ValueError):
    """The evaluation input is invalid; the message says what is wrong and names the case(s)."""


def load_dataset_json(dataset: Optional[str] = None, djfile: Optional[str] = None) -> dict:
    """Read dataset.json from a file, or find it for a dataset name/ID.

    Args:
        dataset: dataset ID (``"4"``) or name (``"Dataset004_Hippocampus"``); dataset.json is then read from
            ``$nnUNet_preprocessed/<name>/dataset.json``, else ``$nnUNet_raw/<name>/dataset.json``.
        djfile: path of a dataset.json; takes precedence over ``dataset``.

    Returns:
        The parsed dataset.json.

    Raises:
        EvaluationInputError: when neither is given or no readable dataset.json is found.
    """
    if djfile is None:
        if dataset is None:
            raise EvaluationInputError("give the dataset (-d) or its dataset.json (-djfile)")
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        try:
            name = maybe_convert_to_dataset_name(dataset)
        except (RuntimeError, ValueError) as e:
            raise EvaluationInputError(f"cannot resolve dataset {dataset!r}: {e}") from None
        candidates = [os.path.join(os.environ[var], name, "dataset.json")
                      for var in ("nnUNet_preprocessed", "nnUNet_raw") if os.environ.get(var)]
        found = [c for c in candidates if os.path.isfile(c)]
        if not found:
            looked = ", ".join(candidates) or "nowhere: nnUNet_preprocessed and nnUNet_raw are unset"
            raise EvaluationInputError(f"no dataset.json for {name} (looked for: {looked})")
        djfile = found[0]
    try:
        with open(djfile) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise EvaluationInputError(f"cannot read dataset.json {djfile}: {e}") from None


def _case_files(folder: str, file_ending: str, what: str) -> Dict[str, str]:
    """``{case id: path}`` of the files in ``folder`` ending with ``file_ending``."""
    if not os.path.isdir(folder):
        raise EvaluationInputError(f"the {what} folder {folder} does not exist")
    return {name[:-len(file_ending)]: os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name.endswith(file_ending) and os.path.isfile(os.path.join(folder, name))}


def _name_cases(cases: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(cases[:limit])
    return shown + (f" ... and {len(cases) - limit} more" if len(cases) > limit else "")


def _match_cases(ref: Dict[str, str], pred: Dict[str, str], ref_folder: str, pred_folder: str,
                 file_ending: str) -> List[str]:
    """The sorted case ids, after checking that both folders hold exactly the same cases."""
    if not ref:
        raise EvaluationInputError(f"no reference files ending with {file_ending} in {ref_folder}")
    missing = sorted(set(ref) - set(pred))
    extra = sorted(set(pred) - set(ref))
    problems = []
    if missing:
        problems.append(f"{len(missing)} reference case(s) without prediction in {pred_folder}: "
                        f"{_name_cases(missing)}")
    if extra:
        problems.append(f"{len(extra)} prediction(s) without reference in {ref_folder}: {_name_cases(extra)}")
    if problems:
        raise EvaluationInputError("; ".join(problems))
    return sorted(ref)


def _normalised(value) -> LabelOrRegion:
    """A label (int) or region (tuple of ints) from dataset.json or the LabelManager; 1-tuples become ints."""
    if isinstance(value, (list, tuple)):
        value = tuple(int(v) for v in value)
        return value[0] if len(value) == 1 else value
    return int(value)


def _classes(dataset_json: dict) -> Tuple[List[Tuple[str, LabelOrRegion]], Optional[int], List[int]]:
    """The evaluated classes ``[(name, label or region)]``, the ignore label and all valid labels."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    try:
        lm = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    except (KeyError, AssertionError, RuntimeError) as e:
        raise EvaluationInputError(f"invalid labels in dataset.json: {e!r}") from None
    names = {}
    for name, value in dataset_json["labels"].items():
        names.setdefault(_normalised(value), name)
    keys = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    classes = [(names.get(_normalised(k), str(_normalised(k))), _normalised(k)) for k in keys]
    return classes, lm.ignore_label, [int(i) for i in lm.all_labels]


def _read_segmentation(reader_writer, path: str, case: str, what: str, allowed: Sequence[int]
                       ) -> Tuple[np.ndarray, Tuple[float, ...]]:
    """Read one segmentation: ``(int32 array in numpy axis order, spacing in mm)``; 2D data comes back 2D."""
    try:
        seg, properties = reader_writer.read_seg(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
        raise EvaluationInputError(f"case {case}: cannot read the {what} {path}: {e}") from None
    seg, spacing = seg[0], tuple(float(s) for s in properties["spacing"])
    if seg.ndim == 3 and seg.shape[0] == 1:
        seg, spacing = seg[0], spacing[1:]
    values = np.unique(seg)
    bad = [int(v) if v == np.round(v) else v.item() for v in values if v != np.round(v) or int(v) not in allowed]
    if bad:
        raise EvaluationInputError(f"case {case}: the {what} {path} contains label(s) {bad} outside the "
                                   f"dataset's label set {sorted(allowed)}")
    return seg.astype(np.int32), spacing


def _class_mask(seg: np.ndarray, label_or_region: LabelOrRegion) -> np.ndarray:
    """Mask of a label, or of a region (the union of its labels); as nnU-Net's ``region_or_label_to_mask``."""
    return np.isin(seg, label_or_region)


def _evaluate_case(task: dict) -> List[dict]:
    """Evaluate one case (runs in a worker process): one row per class, see :data:`CSV_COLUMNS`."""
    case = task["case"]
    ref, ref_spacing = _read_segmentation(task["reader_writer"], task["ref_file"], case, "reference",
                                          task["allowed_ref"])
    pred, pred_spacing = _read_segmentation(task["reader_writer"], task["pred_file"], case, "prediction",
                                            task["allowed_pred"])
    if ref.shape != pred.shape:
        raise EvaluationInputError(f"case {case}: prediction shape {pred.shape} differs from reference shape "
                                   f"{ref.shape}")
    if len(ref_spacing) != len(pred_spacing) or not np.allclose(ref_spacing, pred_spacing, rtol=SPACING_RTOL,
                                                                atol=0):
        raise EvaluationInputError(f"case {case}: prediction spacing {pred_spacing} differs from reference "
                                   f"spacing {ref_spacing}")
    valid = None if task["ignore_label"] is None else ref != task["ignore_label"]
    rows = []
    for name, key in task["classes"]:
        mask_ref, mask_pred = _class_mask(ref, key), _class_mask(pred, key)
        if valid is not None:
            mask_ref &= valid
            mask_pred &= valid
        row = {"case": case, "class_name": name, "class_id": str(key)}
        row.update(binary_metrics(mask_ref, mask_pred, ref_spacing))
        if task["hc"]:
            row.update(_head_circumferences(case, mask_ref, mask_pred, ref_spacing, task["hc_ref_mm"]))
        rows.append(row)
    return rows


def _head_circumferences(case: str, mask_ref: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float],
                         hc_ref_mm: Optional[float]) -> Dict[str, float]:
    """HC of the prediction, of the reference (``hc_ref_mm`` when given, else measured) and their differences."""
    from nnssl.evaluation.head_circumference import head_circumference_mm

    if mask_pred.ndim != 2:
        raise EvaluationInputError(f"case {case}: --hc needs 2D images, this one has shape {mask_pred.shape}")
    hc_pred = head_circumference_mm(mask_pred, spacing)
    hc_ref = head_circumference_mm(mask_ref, spacing) if hc_ref_mm is None else hc_ref_mm
    return {"hc_pred_mm": hc_pred, "hc_ref_mm": hc_ref, "hc_diff_mm": hc_pred - hc_ref,
            "hc_abs_diff_mm": abs(hc_pred - hc_ref)}


def _read_hc_csv(path: str, cases: Sequence[str]) -> Dict[str, float]:
    """Reference head circumferences ``{case id: mm}`` from a CSV with columns case_id,head_circumference_mm."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not {"case_id", "head_circumference_mm"} <= set(reader.fieldnames or ()):
                raise EvaluationInputError(f"{path} needs the columns case_id,head_circumference_mm, it has "
                                           f"{reader.fieldnames}")
            table = {}
            for row in reader:
                try:
                    table[row["case_id"]] = float(row["head_circumference_mm"])
                except (TypeError, ValueError):
                    raise EvaluationInputError(f"case {row['case_id']}: head_circumference_mm "
                                               f"{row['head_circumference_mm']!r} in {path} is not a number"
                                               ) from None
    except OSError as e:
        raise EvaluationInputError(f"cannot read --hc-csv {path}: {e}") from None
    missing = [c for c in cases if c not in table]
    if missing:
        raise EvaluationInputError(f"{len(missing)} case(s) without head circumference in {path}: "
                                   f"{_name_cases(missing)}")
    return {c: table[c] for c in cases}


def _stats(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """mean, std (ddof=0), median of the finite values; n = their count, n_excluded = the NaN count."""
    values = np.asarray(values, dtype=np.float64)
    used = values[~np.isnan(values)]
    if used.size == 0:
        return {"mean": None, "std": None, "median": None, "n": 0, "n_excluded": int(values.size)}
    return {"mean": float(used.mean()), "std": float(used.std()), "median": float(np.median(used)),
            "n": int(used.size), "n_excluded": int(values.size - used.size)}


def _summarise(rows: List[dict], classes: List[Tuple[str, LabelOrRegion]], cases: List[str]) -> dict:
    """Per-class and over-class statistics of the per-case rows."""
    per_class = {}
    for name, key in classes:
        class_rows = [r for r in rows if r["class_id"] == str(key)]
        entry = {"name": name, "class_id": str(key), "n_cases": len(class_rows),
                 "n_empty_both": sum(r["ref_empty"] and r["pred_empty"] for r in class_rows),
                 "n_empty_ref_only": sum(r["ref_empty"] and not r["pred_empty"] for r in class_rows),
                 "n_empty_pred_only": sum(r["pred_empty"] and not r["ref_empty"] for r in class_rows)}
        entry.update({m: _stats([r[m] for r in class_rows]) for m in METRICS})
        per_class[str(key)] = entry
    over_classes = {}
    for m in METRICS:
        # rows come case by case, each case with one row per class in the order of ``classes``
        table = np.array([r[m] for r in rows], dtype=np.float64).reshape(len(cases), len(classes))
        has_value = ~np.all(np.isnan(table), axis=1)
        per_case = np.full(len(cases), np.nan)
        per_case[has_value] = np.nanmean(table[has_value], axis=1)
        class_means = [per_class[str(k)][m]["mean"] for _, k in classes]
        over_classes[m] = _stats(per_case)
        over_classes[m]["mean_of_class_means"] = (None if None in class_means else float(np.mean(class_means)))
    return {"per_class": per_class, "over_classes": over_classes}


def _summarise_hc(rows: List[dict], hc_csv: Optional[str]) -> dict:
    """Statistics of the head circumferences and of their differences (one row per case)."""
    return {"reference": f"--hc-csv {hc_csv}" if hc_csv else "measured on the reference masks",
            "n_cases": len(rows), "hc_pred_mm": _stats([r["hc_pred_mm"] for r in rows]),
            "hc_ref_mm": _stats([r["hc_ref_mm"] for r in rows]),
            "diff_mm": _stats([r["hc_diff_mm"] for r in rows]),
            "abs_diff_mm": _stats([r["hc_abs_diff_mm"] for r in rows]),
            "note": "diff = prediction - reference; cases where either HC is undefined (empty mask or no ellipse "
                    "fit) are excluded and counted in n_excluded"}


def _json_ready(obj):
    """Replace NaN/inf floats by None (JSON null) and numpy scalars by Python ones, recursively."""
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _csv_text(rows: List[dict], columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow([int(r[c]) if isinstance(r[c], (bool, np.bool_)) else r[c] for c in columns])
    return out.getvalue()


def evaluate_folders(ref_folder: str, pred_folder: str, dataset_json: dict, output_prefix: Optional[str] = None,
                     num_processes: int = 1, hc: bool = False, hc_csv: Optional[str] = None, *,
                     command_line: Optional[str] = None) -> dict:
    """Evaluate every prediction in ``pred_folder`` against its reference in ``ref_folder``.

    Args:
        ref_folder: folder of reference segmentations ``<case><file_ending>``.
        pred_folder: folder of predictions with exactly the same case names (other files are ignored).
        dataset_json: the dataset's dataset.json (``labels``, ``file_ending``, optionally
            ``regions_class_order`` and ``overwrite_image_reader_writer``).
        output_prefix: outputs go to ``<prefix>_per_case.csv`` and ``<prefix>_summary.json``; default
            ``<pred_folder>/nnssl_evaluation``.
        num_processes: worker processes (spawn context) when > 1; 1 evaluates in this process.
        hc: also measure head circumferences (2D datasets with one foreground class only).
        hc_csv: reference head circumferences (columns ``case_id,head_circumference_mm``); without it the
            reference HC is measured on the reference masks. Only used with ``hc``.
        command_line: recorded in the summary; default: the equivalent Python call.

    Returns:
        The summary, as written to ``<prefix>_summary.json`` (``None`` where a value is undefined).

    Raises:
        EvaluationInputError: missing or extra cases, mismatched shapes or spacings, labels outside the label
            set, ``--hc`` on a dataset that is not 2D binary, a bad HC CSV. Nothing is written then.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    if "file_ending" not in dataset_json or "labels" not in dataset_json:
        raise EvaluationInputError("dataset.json needs the keys 'labels' and 'file_ending'")
    file_ending = dataset_json["file_ending"]
    ref_files = _case_files(ref_folder, file_ending, "reference")
    pred_files = _case_files(pred_folder, file_ending, "prediction")
    cases = _match_cases(ref_files, pred_files, ref_folder, pred_folder, file_ending)
    classes, ignore_label, all_labels = _classes(dataset_json)
    if hc and len(classes) != 1:
        raise EvaluationInputError(f"--hc needs a binary dataset (one foreground class), this one has "
                                   f"{len(classes)}: {[n for n, _ in classes]}")
    hc_ref = _read_hc_csv(hc_csv, cases) if hc and hc_csv else {}
    try:
        reader_writer = determine_reader_writer_from_dataset_json(dataset_json, ref_files[cases[0]],
                                                                  verbose=False)()
    except RuntimeError as e:
        raise EvaluationInputError(f"case {cases[0]}: {e}") from None
    tasks = [{"case": c, "ref_file": ref_files[c], "pred_file": pred_files[c], "reader_writer": reader_writer,
              "classes": classes, "ignore_label": ignore_label,
              "allowed_ref": all_labels + ([ignore_label] if ignore_label is not None else []),
              "allowed_pred": all_labels, "hc": hc, "hc_ref_mm": hc_ref.get(c)} for c in cases]
    if num_processes > 1 and len(tasks) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(tasks))) as pool:
            per_case = pool.map(_evaluate_case, tasks, chunksize=1)
    else:
        per_case = [_evaluate_case(t) for t in tasks]
    rows = [row for case_rows in per_case for row in case_rows]

    if output_prefix is None:
        output_prefix = os.path.join(pred_folder, "nnssl_evaluation")
    csv_file, json_file = f"{output_prefix}_per_case.csv", f"{output_prefix}_summary.json"
    if command_line is None:
        command_line = (f"evaluate_folders(ref_folder={ref_folder!r}, pred_folder={pred_folder!r}, "
                        f"dataset_json=<dict>, output_prefix={output_prefix!r}, num_processes={num_processes}, "
                        f"hc={hc}, hc_csv={hc_csv!r})")
    summary = {"command_line": command_line, "ref_folder": os.path.abspath(ref_folder),
               "pred_folder": os.path.abspath(pred_folder), "file_ending": file_ending,
               "reader_writer": type(reader_writer).__name__, "ignore_label": ignore_label,
               "n_cases": len(cases), "empty_rule": EMPTY_RULE,
               "definitions": {**DISTANCE_DEFINITIONS,
                               "std": "population standard deviation (ddof=0) over the cases used",
                               "excluded": "NaN values (both masks empty, or an undefined head circumference) "
                                           "are left out of mean/std/median and counted in n_excluded",
                               "over_classes": "mean/std/median over cases of each case's mean over its defined "
                                               "classes; mean_of_class_means is the mean of the per-class "
                                               "means (nnU-Net's foreground_mean)"},
               **_summarise(rows, classes, cases)}
    if hc:
        summary["head_circumference"] = _summarise_hc(rows, hc_csv)
    summary["outputs"] = {"per_case_csv": os.path.abspath(csv_file), "summary_json": os.path.abspath(json_file)}
    summary = _json_ready(summary)
    atomic_write_text(csv_file, _csv_text(rows, CSV_COLUMNS + (HC_COLUMNS if hc else ())))
    atomic_write_text(json_file, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


def format_table(summary: dict) -> str:
    """A short aligned table: one line per class and one over classes, with mean Dice, HD95 mm and ASD mm."""

    def fmt(stats: dict) -> str:
        return "-" if stats["mean"] is None else f"{stats['mean']:.4f}"

    lines = [("class", "n", "Dice", "HD95 mm", "ASD mm")]
    for entry in summary["per_class"].values():
        lines.append((f"{entry['name']} ({entry['class_id']})", str(entry["dice"]["n"]), fmt(entry["dice"]),
                      fmt(entry["hd95_mm"]), fmt(entry["asd_mm"])))
    over = summary["over_classes"]
    lines.append(("mean over classes", str(over["dice"]["n"]), fmt(over["dice"]), fmt(over["hd95_mm"]),
                  fmt(over["asd_mm"])))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
            for line in lines]
    if "head_circumference" in summary:
        h = summary["head_circumference"]
        text.append(f"head circumference |pred - ref| mm: mean {fmt(h['abs_diff_mm'])}, "
                    f"n {h['abs_diff_mm']['n']} (reference: {h['reference']})")
    return "\n".join(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnssl_evaluate",
        description="Evaluate predictions against references for any nnU-Net dataset (2D or 3D, labels or "
                    "regions): Dice, IoU, HD95 and ASD (mm and voxels) per case and class, and their summary.")
    p.add_argument("-ref", required=True, help="folder of reference segmentations")
    p.add_argument("-pred", required=True, help="folder of predictions (same case names)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-d", help="dataset ID or name: dataset.json is read from $nnUNet_preprocessed/<name>/ "
                                   "(else $nnUNet_raw/<name>/)")
    source.add_argument("-djfile", help="path of the dataset.json")
    p.add_argument("-o", default=None, help="output prefix: writes <prefix>_per_case.csv and "
                                            "<prefix>_summary.json (default: <PRED>/nnssl_evaluation)")
    p.add_argument("-np", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--hc", action="store_true", help="also measure head circumference (2D binary datasets)")
    p.add_argument("--hc-csv", default=None,
                   help="reference head circumferences, columns case_id,head_circumference_mm (default: measured "
                        "on the reference masks)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``nnssl_evaluate``; returns the exit code (2 for bad input, message on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.hc_csv and not args.hc:
        print("nnssl_evaluate: error: --hc-csv needs --hc", file=sys.stderr)
        return 2
    try:
        dataset_json = load_dataset_json(args.d, args.djfile)
        summary = evaluate_folders(args.ref, args.pred, dataset_json, args.o, max(args.np, 1), args.hc,
                                   args.hc_csv, command_line=shlex.join(["nnssl_evaluate"] + argv))
    except EvaluationInputError as e:
        print(f"nnssl_evaluate: error: {e}", file=sys.stderr)
        return 2
    print(format_table(summary))
    print(f"wrote {summary['outputs']['per_case_csv']} and {summary['outputs']['summary_json']}")
    return 0
