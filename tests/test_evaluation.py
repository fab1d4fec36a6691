"""Tests of nnssl.evaluation: the metrics against an independent brute-force implementation and hand-computed
cases, the empty-mask rule, and the nnssl_evaluate command on tiny synthetic datasets (3D NIfTI, 2D PNG, 2D NIfTI
for the head circumference). CPU only, small arrays."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from nnssl.evaluation import metrics
from nnssl.evaluation.evaluate import EvaluationInputError, evaluate_folders, main

# ----------------------------------------------------------------------------------------------------------------
# independent reference implementation: explicit surface point sets, exact nearest neighbours in physical space


def reference_surface_points(mask: np.ndarray, spacing) -> np.ndarray:
    """Physical coordinates (mm) of the voxels of ``mask`` with a face neighbour outside it (or outside the image).

    Written without scipy.ndimage: pad with background, then a voxel is interior when both face neighbours along
    every axis are foreground.
    """
    padded = np.pad(mask.astype(bool), 1)
    interior = padded.copy()
    for axis in range(mask.ndim):
        interior &= np.roll(padded, 1, axis) & np.roll(padded, -1, axis)
    surface = (padded & ~interior)[(slice(1, -1),) * mask.ndim]
    return np.argwhere(surface) * np.asarray(spacing, dtype=np.float64)


def reference_hd95_asd(a: np.ndarray, b: np.ndarray, spacing):
    pa, pb = reference_surface_points(a, spacing), reference_surface_points(b, spacing)
    d_ab = cKDTree(pb).query(pa)[0]
    d_ba = cKDTree(pa).query(pb)[0]
    return np.percentile(np.concatenate([d_ab, d_ba]), 95), (d_ab.mean() + d_ba.mean()) / 2


def random_blob(rng: np.random.RandomState, shape, fraction: float) -> np.ndarray:
    """Thresholded smoothed noise: irregular blobs, several components, often touching the image border."""
    noise = gaussian_filter(rng.normal(size=shape), sigma=2.0)
    return noise > np.quantile(noise, 1 - fraction)


@pytest.mark.parametrize("shape,spacing", [((48, 40), (0.7, 1.9)), ((20, 24, 18), (2.5, 0.8, 1.1))],
                         ids=["2d", "3d"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distances_match_brute_force(shape, spacing, seed):
    rng = np.random.RandomState(seed)
    a = random_blob(rng, shape, rng.uniform(0.1, 0.4))
    # an independent blob and a perturbed copy of a: large and small distances
    for b in (random_blob(rng, shape, rng.uniform(0.1, 0.4)),
              a ^ (rng.uniform(size=shape) < 0.02)):
        out = metrics.binary_metrics(a, b, spacing)
        hd95_mm, asd_mm = reference_hd95_asd(a, b, spacing)
        hd95_vox, asd_vox = reference_hd95_asd(a, b, (1.0,) * len(shape))
        assert out["hd95_mm"] == pytest.approx(hd95_mm, rel=1e-9, abs=1e-9)
        assert out["asd_mm"] == pytest.approx(asd_mm, rel=1e-9, abs=1e-9)
        assert out["hd95_vox"] == pytest.approx(hd95_vox, rel=1e-9, abs=1e-9)
        assert out["asd_vox"] == pytest.approx(asd_vox, rel=1e-9, abs=1e-9)
        assert metrics.hd95(a, b, spacing) == out["hd95_mm"]
        assert metrics.asd(a, b, spacing) == out["asd_mm"]
        # symmetric metrics
        assert metrics.hd95(b, a, spacing) == pytest.approx(out["hd95_mm"], rel=1e-12)
        assert metrics.asd(b, a, spacing) == pytest.approx(out["asd_mm"], rel=1e-12)
        # the directed distances are those of the full (uncropped) point sets
        d_ab, d_ba = metrics.surface_distances(a, b, spacing)
        assert len(d_ab) == len(reference_surface_points(a, spacing))
        assert len(d_ba) == len(reference_surface_points(b, spacing))


def test_single_voxels_at_known_offset():
    a, b = np.zeros((8, 10), bool), np.zeros((8, 10), bool)
    a[2, 3] = b[5, 7] = True
    out = metrics.binary_metrics(a, b, (0.5, 2.0))
    expected = math.hypot(3 * 0.5, 4 * 2.0)
    assert out["hd95_mm"] == pytest.approx(expected) and out["asd_mm"] == pytest.approx(expected)
    assert out["hd95_vox"] == pytest.approx(5.0) and out["asd_vox"] == pytest.approx(5.0)
    assert out["dice"] == 0.0 and out["iou"] == 0.0

    a3, b3 = np.zeros((4, 6, 7), bool), np.zeros((4, 6, 7), bool)
    a3[1, 1, 1] = b3[1, 4, 5] = True
    assert metrics.hd95(a3, b3, (3.0, 1.0, 0.5)) == pytest.approx(math.sqrt(3 ** 2 + 2 ** 2))
    assert metrics.asd(a3, b3) == pytest.approx(5.0)


def test_identical_masks_and_overlap_arithmetic():
    rng = np.random.RandomState(3)
    m = random_blob(rng, (16, 18, 12), 0.3)
    out = metrics.binary_metrics(m, m, (1.2, 0.7, 3.0))
    assert (out["dice"], out["iou"], out["hd95_mm"], out["asd_mm"], out["hd95_vox"], out["asd_vox"]) == \
        (1.0, 1.0, 0.0, 0.0, 0.0, 0.0)

    ref, pred = np.zeros((6, 6), bool), np.zeros((6, 6), bool)
    ref[1:3, 1:3] = True  # 4 voxels
    pred[1:3, 1:4] = True  # 6 voxels, 4 of them in ref
    assert metrics.dice(ref, pred) == pytest.approx(2 * 4 / (4 + 6))
    assert metrics.iou(ref, pred) == pytest.approx(4 / 6)
    out = metrics.binary_metrics(ref, pred)
    assert (out["n_ref_voxels"], out["n_pred_voxels"]) == (4, 6)
    assert out["dice"] == pytest.approx(0.8) and out["iou"] == pytest.approx(4 / 6)


def test_hd95_pools_both_directions_and_asd_averages_directed_means():
    """medpy's definitions, on a case where the alternatives differ.

    A = one voxel, B = a 1x3 bar starting on it: d(A->B) = [0], d(B->A) = [0, 1, 2].
    HD95 = percentile([0, 0, 1, 2], 95) = 1.85 (not max(p95([0]), p95([0, 1, 2])) = 1.9);
    ASD = (mean([0]) + mean([0, 1, 2])) / 2 = 0.5 (not the pooled mean 0.75).
    """
    a, b = np.zeros((3, 5), bool), np.zeros((3, 5), bool)
    a[1, 1] = True
    b[1, 1:4] = True
    assert metrics.hd95(a, b) == pytest.approx(1.85)
    assert metrics.asd(a, b) == pytest.approx(0.5)


def test_empty_rule():
    shape, spacing = (10, 20, 5), (1.5, 0.5, 3.0)
    penalty_mm = math.sqrt((9 * 1.5) ** 2 + (19 * 0.5) ** 2 + (4 * 3.0) ** 2)
    penalty_vox = math.sqrt(9 ** 2 + 19 ** 2 + 4 ** 2)
    assert metrics.max_distance(shape, spacing) == pytest.approx(penalty_mm)
    assert metrics.max_distance(shape) == pytest.approx(penalty_vox)

    assert metrics.empty_mask_metrics(False, False, shape, spacing) is None
    both = metrics.empty_mask_metrics(True, True, shape, spacing)
    assert all(math.isnan(v) for v in both.values()) and set(both) == {"dice", "iou", "hd95", "asd"}
    for ref_empty, pred_empty in ((True, False), (False, True)):
        assert metrics.empty_mask_metrics(ref_empty, pred_empty, shape, spacing) == \
            {"dice": 0.0, "iou": 0.0, "hd95": pytest.approx(penalty_mm), "asd": pytest.approx(penalty_mm)}

    empty, full = np.zeros(shape, bool), np.zeros(shape, bool)
    full[3:5, 4:9, 1:3] = True
    out = metrics.binary_metrics(empty, empty, spacing)
    assert all(math.isnan(out[k]) for k in ("dice", "iou", "hd95_mm", "asd_mm", "hd95_vox", "asd_vox"))
    assert out["ref_empty"] and out["pred_empty"]
    for ref, pred in ((empty, full), (full, empty)):
        out = metrics.binary_metrics(ref, pred, spacing)
        assert out["dice"] == 0.0 and out["iou"] == 0.0
        assert out["hd95_mm"] == pytest.approx(penalty_mm) and out["asd_mm"] == pytest.approx(penalty_mm)
        assert out["hd95_vox"] == pytest.approx(penalty_vox) and out["asd_vox"] == pytest.approx(penalty_vox)
        assert out["ref_empty"] == (ref is empty) and out["pred_empty"] == (pred is empty)
        assert metrics.dice(ref, pred) == 0.0 and metrics.iou(ref, pred) == 0.0
        assert metrics.hd95(ref, pred, spacing) == pytest.approx(penalty_mm)
        assert metrics.asd(ref, pred) == pytest.approx(penalty_vox)
    assert math.isnan(metrics.dice(empty, empty)) and math.isnan(metrics.hd95(empty, empty))
    with pytest.raises(ValueError, match="empty"):
        metrics.surface_distances(empty, full)
    # the penalty is never smaller than a real distance in that image
    corner_a, corner_b = np.zeros(shape, bool), np.zeros(shape, bool)
    corner_a[0, 0, 0] = corner_b[-1, -1, -1] = True
    assert metrics.hd95(corner_a, corner_b, spacing) == pytest.approx(penalty_mm)


def test_invalid_input_to_metrics():
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95(np.ones((3, 3)), np.ones((3, 3)), (1.0, 0.0))
    with pytest.raises(ValueError, match="spacing"):
        metrics.binary_metrics(np.ones((3, 3)), np.ones((3, 3)), (1.0, 1.0, 1.0))


def test_metrics_module_does_not_import_torch():
    code = "import sys, nnssl.evaluation.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ----------------------------------------------------------------------------------------------------------------
# the nnssl_evaluate command on tiny synthetic datasets

SPACING_XYZ = (0.8, 1.0, 2.5)  # SimpleITK order (x, y, z)
# numpy / nnU-Net order, as NIfTI stores it (float32)
SPACING_ZYX = tuple(float(np.float32(s)) for s in SPACING_XYZ[::-1])
SHAPE = (10, 12, 14)  # numpy (z, y, x)
LABELS = {"background": 0, "anterior": 1, "posterior": 2}
OUTPUTS = ("nnssl_evaluation_per_case.csv", "nnssl_evaluation_summary.json")


def write_nii(array: np.ndarray, path: str, spacing_xyz=SPACING_XYZ) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    sitk.WriteImage(image, path)


def write_dataset_json(folder: str, labels=LABELS, file_ending=".nii.gz", **extra) -> str:
    path = os.path.join(folder, "dataset.json")
    with open(path, "w") as f:
        json.dump({"channel_names": {"0": "x"}, "labels": labels, "file_ending": file_ending,
                   "numTraining": 4, **extra}, f)
    return path


def two_label_blob(rng: np.random.RandomState) -> np.ndarray:
    blob = random_blob(rng, SHAPE, 0.3)
    seg = np.zeros(SHAPE, np.uint8)
    seg[blob] = 1
    seg[blob & (np.arange(SHAPE[2]) >= SHAPE[2] // 2)] = 2
    return seg


def shifted(seg: np.ndarray, axis: int) -> np.ndarray:
    out = np.zeros_like(seg)
    src = [slice(None)] * seg.ndim
    dst = [slice(None)] * seg.ndim
    src[axis], dst[axis] = slice(0, -1), slice(1, None)
    out[tuple(dst)] = seg[tuple(src)]
    return out


@pytest.fixture
def dataset3d(tmp_path):
    """labelsTr/predictions of four 3D cases with labels 0/1/2, anisotropic spacing; returns the paths and
    arrays. case_a: perfect; case_b: shifted by one voxel along x; case_c: label 2 missed; case_d: no label 2 in
    reference nor prediction."""
    rng = np.random.RandomState(0)
    ref_dir, pred_dir = tmp_path / "labelsTr", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    refs, preds = {}, {}
    refs["case_a"] = two_label_blob(rng)
    preds["case_a"] = refs["case_a"].copy()
    refs["case_b"] = two_label_blob(rng)
    preds["case_b"] = shifted(refs["case_b"], 2)
    refs["case_c"] = two_label_blob(rng)
    preds["case_c"] = np.where(refs["case_c"] == 2, 0, refs["case_c"])
    refs["case_d"] = random_blob(rng, SHAPE, 0.3).astype(np.uint8)
    preds["case_d"] = shifted(refs["case_d"], 1)
    for case in refs:
        write_nii(refs[case], str(ref_dir / f"{case}.nii.gz"))
        write_nii(preds[case], str(pred_dir / f"{case}.nii.gz"))
    djfile = write_dataset_json(str(tmp_path))
    return {"ref": str(ref_dir), "pred": str(pred_dir), "djfile": djfile, "refs": refs, "preds": preds,
            "root": tmp_path}


def read_csv(path: str):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_3d(dataset3d, capsys):
    d = dataset3d
    assert main(["-ref", d["ref"], "-pred", d["pred"], "-djfile", d["djfile"]]) == 0
    printed = capsys.readouterr().out
    assert "anterior (1)" in printed and "posterior (2)" in printed and "mean over classes" in printed

    rows = read_csv(os.path.join(d["pred"], OUTPUTS[0]))
    assert [(r["case"], r["class_id"]) for r in rows] == [(c, k) for c in sorted(d["refs"]) for k in ("1", "2")]
    for r in rows:
        k = int(r["class_id"])
        expected = metrics.binary_metrics(d["refs"][r["case"]] == k, d["preds"][r["case"]] == k, SPACING_ZYX)
        assert r["class_name"] == ("anterior" if k == 1 else "posterior")
        for m in ("dice", "iou", "hd95_mm", "asd_mm", "hd95_vox", "asd_vox"):
            if math.isnan(expected[m]):
                assert r[m] == "nan"
            else:
                assert float(r[m]) == pytest.approx(expected[m], rel=1e-12), (r["case"], k, m)
        assert int(r["n_ref_voxels"]) == expected["n_ref_voxels"]
        assert int(r["n_pred_voxels"]) == expected["n_pred_voxels"]
        assert r["ref_empty"] == str(int(expected["ref_empty"]))
        assert r["pred_empty"] == str(int(expected["pred_empty"]))
    by_key = {(r["case"], r["class_id"]): r for r in rows}
    assert float(by_key["case_a", "1"]["dice"]) == 1.0 and float(by_key["case_a", "2"]["hd95_mm"]) == 0.0
    penalty = metrics.max_distance(SHAPE, SPACING_ZYX)
    assert float(by_key["case_c", "2"]["dice"]) == 0.0
    assert float(by_key["case_c", "2"]["hd95_mm"]) == pytest.approx(penalty)
    assert by_key["case_d", "2"]["dice"] == "nan"

    with open(os.path.join(d["pred"], OUTPUTS[1])) as f:
        summary = json.load(f)
    assert summary["command_line"] == f"nnssl_evaluate -ref {d['ref']} -pred {d['pred']} -djfile {d['djfile']}"
    assert summary["empty_rule"] == metrics.EMPTY_RULE
    assert summary["n_cases"] == 4 and summary["reader_writer"] == "SimpleITKIO"
    post = summary["per_class"]["2"]
    assert (post["name"], post["n_cases"], post["n_empty_both"], post["n_empty_pred_only"],
            post["n_empty_ref_only"]) == ("posterior", 4, 1, 1, 0)
    assert post["dice"]["n"] == 3 and post["dice"]["n_excluded"] == 1
    dice2 = [float(by_key[c, "2"]["dice"]) for c in ("case_a", "case_b", "case_c")]
    assert post["dice"]["mean"] == pytest.approx(np.mean(dice2))
    assert post["dice"]["std"] == pytest.approx(np.std(dice2))
    assert post["dice"]["median"] == pytest.approx(np.median(dice2))
    # over classes: each case's mean over its defined classes, then over cases
    per_case = [np.nanmean([float(by_key[c, k]["hd95_mm"]) for k in ("1", "2")]) for c in sorted(d["refs"])]
    assert summary["over_classes"]["hd95_mm"]["mean"] == pytest.approx(np.mean(per_case))
    assert summary["over_classes"]["dice"]["mean_of_class_means"] == pytest.approx(
        (summary["per_class"]["1"]["dice"]["mean"] + post["dice"]["mean"]) / 2)
    assert not [n for n in os.listdir(d["pred"]) if n.startswith(".tmp_")]


def test_library_entry_point_with_workers_and_dataset_id(dataset3d, monkeypatch):
    """evaluate_folders with two spawned workers gives the single-process numbers; -d finds dataset.json."""
    d = dataset3d
    with open(d["djfile"]) as f:
        dataset_json = json.load(f)
    serial = evaluate_folders(d["ref"], d["pred"], dataset_json, str(d["root"] / "out" / "serial"))
    parallel = evaluate_folders(d["ref"], d["pred"], dataset_json, str(d["root"] / "out" / "parallel"),
                                num_processes=2)
    assert serial["per_class"] == parallel["per_class"]
    assert read_csv(str(d["root"] / "out" / "serial_per_case.csv")) == \
        read_csv(str(d["root"] / "out" / "parallel_per_case.csv"))

    raw = d["root"] / "raw" / "Dataset123_Tiny"
    raw.mkdir(parents=True)
    shutil.copy(d["djfile"], raw / "dataset.json")
    monkeypatch.setenv("nnUNet_raw", str(d["root"] / "raw"))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    prefix = str(d["root"] / "out" / "by_id")
    assert main(["-ref", d["ref"], "-pred", d["pred"], "-d", "123", "-o", prefix]) == 0
    with open(prefix + "_summary.json") as f:
        assert json.load(f)["per_class"] == serial["per_class"]
    assert main(["-ref", d["ref"], "-pred", d["pred"], "-d", "124", "-o", prefix + "_missing"]) == 2
    assert not os.path.exists(prefix + "_missing_summary.json")


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    from nnssl import utils

    def fail(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(utils.os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        utils.atomic_write_text(str(tmp_path / "out.json"), "{}")
    assert os.listdir(tmp_path) == []


def test_regions_and_ignore_label(tmp_path):
    """Regions are unions of labels; voxels of the reference's ignore label count for neither mask."""
    ref = np.zeros(SHAPE, np.uint8)
    ref[2:6, 3:9, 4:10] = 1
    ref[3:5, 4:7, 5:8] = 2
    ref[7:9, 2:5, 2:5] = 3  # ignore label
    pred = ref.copy()
    pred[pred == 3] = 1  # a prediction inside the ignored area must not count
    for name, array in (("ref", ref), ("pred", pred)):
        (tmp_path / name).mkdir()
        write_nii(array, str(tmp_path / name / "case.nii.gz"))
    dataset_json = {"labels": {"background": 0, "whole": [1, 2], "core": 2, "ignore": 3},
                    "regions_class_order": [1, 2], "file_ending": ".nii.gz"}
    summary = evaluate_folders(str(tmp_path / "ref"), str(tmp_path / "pred"), dataset_json)
    assert list(summary["per_class"]) == ["(1, 2)", "2"]
    assert summary["per_class"]["(1, 2)"]["name"] == "whole" and summary["ignore_label"] == 3
    for entry in summary["per_class"].values():
        assert entry["dice"]["mean"] == 1.0 and entry["hd95_mm"]["mean"] == 0.0
    rows = read_csv(str(tmp_path / "pred" / OUTPUTS[0]))
    assert int(rows[0]["n_ref_voxels"]) == int(np.count_nonzero((ref == 1) | (ref == 2)))


def _bad_missing(d):
    os.remove(os.path.join(d["pred"], "case_b.nii.gz"))
    return "case_b"


def _bad_extra(d):
    write_nii(d["preds"]["case_a"], os.path.join(d["pred"], "case_zz.nii.gz"))
    return "case_zz"


def _bad_shape(d):
    write_nii(d["preds"]["case_b"][:, :, :-1], os.path.join(d["pred"], "case_b.nii.gz"))
    return "case_b"


def _bad_spacing(d):
    write_nii(d["preds"]["case_c"], os.path.join(d["pred"], "case_c.nii.gz"), (0.8, 1.0, 3.0))
    return "case_c"


def _bad_label_pred(d):
    pred = d["preds"]["case_c"].copy()
    pred[0, 0, 0] = 3
    write_nii(pred, os.path.join(d["pred"], "case_c.nii.gz"))
    return "case_c"


def _bad_label_ref(d):
    ref = d["refs"]["case_d"].copy()
    ref[0, 0, 0] = 7
    write_nii(ref, os.path.join(d["ref"], "case_d.nii.gz"))
    return "case_d"


@pytest.mark.parametrize("make_bad", [_bad_missing, _bad_extra, _bad_shape, _bad_spacing, _bad_label_pred,
                                      _bad_label_ref], ids=lambda f: f.__name__[5:])
def test_bad_input_exits_2_naming_the_case(dataset3d, make_bad, capsys):
    d = dataset3d
    case = make_bad(d)
    assert main(["-ref", d["ref"], "-pred", d["pred"], "-djfile", d["djfile"]]) == 2
    captured = capsys.readouterr()
    assert case in captured.err and "nnssl_evaluate: error:" in captured.err
    assert "Traceback" not in captured.err
    assert [n for n in os.listdir(d["pred"]) if not n.endswith(".nii.gz")] == []
    with open(d["djfile"]) as f:
        with pytest.raises(EvaluationInputError, match=case):
            evaluate_folders(d["ref"], d["pred"], json.load(f))


def test_console_script_exit_code(dataset3d):
    d = dataset3d
    script = os.path.join(os.path.dirname(sys.executable), "nnssl_evaluate")
    if not os.path.isfile(script):
        pytest.skip(f"console script not installed next to {sys.executable}")
    os.remove(os.path.join(d["pred"], "case_a.nii.gz"))
    p = subprocess.run([script, "-ref", d["ref"], "-pred", d["pred"], "-djfile", d["djfile"]],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "case_a" in p.stderr and "Traceback" not in p.stderr
    assert all(n.endswith(".nii.gz") for n in os.listdir(d["pred"]))


def test_2d_png(tmp_path):
    """A 2D dataset in nnU-Net's NaturalImage2DIO format: surfaces and distances are 2D."""
    from PIL import Image

    rng = np.random.RandomState(5)
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    refs, preds = {}, {}
    for i in range(2):
        refs[i] = random_blob(rng, (40, 56), 0.3).astype(np.uint8)
        preds[i] = shifted(refs[i], 0) | random_blob(rng, (40, 56), 0.02).astype(np.uint8)
        Image.fromarray(refs[i]).save(tmp_path / "ref" / f"img_{i}.png")
        Image.fromarray(preds[i]).save(tmp_path / "pred" / f"img_{i}.png")
    dataset_json = {"labels": {"background": 0, "object": 1}, "file_ending": ".png"}
    summary = evaluate_folders(str(tmp_path / "ref"), str(tmp_path / "pred"), dataset_json)
    assert summary["reader_writer"] == "NaturalImage2DIO"
    rows = read_csv(str(tmp_path / "pred" / OUTPUTS[0]))
    for i, r in enumerate(rows):
        expected = metrics.binary_metrics(refs[i] == 1, preds[i] == 1, (1.0, 1.0))
        for m in ("dice", "hd95_mm", "asd_mm", "hd95_vox"):
            assert float(r[m]) == pytest.approx(expected[m], rel=1e-12)
        hd95_2d, _ = reference_hd95_asd(refs[i] == 1, preds[i] == 1, (1.0, 1.0))
        assert float(r["hd95_vox"]) == pytest.approx(hd95_2d, rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# --hc (needs nnssl.evaluation.head_circumference, written separately)


def ellipse_mask(shape, centre, radii) -> np.ndarray:
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1


@pytest.fixture
def hc_dataset(tmp_path):
    pytest.importorskip("nnssl.evaluation.head_circumference",
                        reason="nnssl/evaluation/head_circumference.py (head_circumference_mm) does not exist yet")
    spacing_xy = (0.15, 0.2)  # SimpleITK (x, y) -> numpy (row, col) spacing (0.2, 0.15)
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    refs, preds = {}, {}
    for i, (centre, radii) in enumerate((((30, 40), (18, 25)), ((32, 36), (20, 22)))):
        refs[f"hc_{i}"] = ellipse_mask((64, 80), centre, radii)
        preds[f"hc_{i}"] = ellipse_mask((64, 80), centre, (radii[0] + 1, radii[1] + 2))
    for case in refs:
        write_nii(refs[case], str(tmp_path / "ref" / f"{case}.nii.gz"), spacing_xy)
        write_nii(preds[case], str(tmp_path / "pred" / f"{case}.nii.gz"), spacing_xy)
    djfile = write_dataset_json(str(tmp_path), {"background": 0, "head": 1})
    return {"ref": str(tmp_path / "ref"), "pred": str(tmp_path / "pred"), "djfile": djfile, "refs": refs,
            "preds": preds, "spacing": (float(np.float32(0.2)), float(np.float32(0.15))), "root": tmp_path}


def test_hc_from_reference_masks(hc_dataset, capsys):
    from nnssl.evaluation.head_circumference import head_circumference_mm

    d = hc_dataset
    assert main(["-ref", d["ref"], "-pred", d["pred"], "-djfile", d["djfile"], "--hc"]) == 0
    assert "head circumference" in capsys.readouterr().out
    rows = read_csv(os.path.join(d["pred"], OUTPUTS[0]))
    diffs = []
    for r in rows:
        hc_pred = head_circumference_mm(d["preds"][r["case"]], d["spacing"])
        hc_ref = head_circumference_mm(d["refs"][r["case"]], d["spacing"])
        assert float(r["hc_pred_mm"]) == pytest.approx(hc_pred)
        assert float(r["hc_ref_mm"]) == pytest.approx(hc_ref)
        assert float(r["hc_diff_mm"]) == pytest.approx(hc_pred - hc_ref)
        assert float(r["hc_abs_diff_mm"]) == pytest.approx(abs(hc_pred - hc_ref))
        # the metrics are 2D, with the (row, col) spacing
        expected = metrics.binary_metrics(d["refs"][r["case"]], d["preds"][r["case"]], d["spacing"])
        assert float(r["hd95_mm"]) == pytest.approx(expected["hd95_mm"], rel=1e-12)
        diffs.append(hc_pred - hc_ref)
    with open(os.path.join(d["pred"], OUTPUTS[1])) as f:
        hc = json.load(f)["head_circumference"]
    assert hc["diff_mm"]["mean"] == pytest.approx(np.mean(diffs))
    assert hc["abs_diff_mm"]["median"] == pytest.approx(np.median(np.abs(diffs)))
    assert hc["reference"] == "measured on the reference masks"


def test_hc_from_csv(hc_dataset, capsys):
    d = hc_dataset
    hc_csv = d["root"] / "hc.csv"
    hc_csv.write_text("case_id,head_circumference_mm\nhc_0,100.5\nhc_1,120.0\nnot_evaluated,1.0\n")
    prefix = str(d["root"] / "eval")
    assert main(["-ref", d["ref"], "-pred", d["pred"], "-djfile", d["djfile"], "--hc", "--hc-csv",
                 str(hc_csv), "-o", prefix]) == 0
    rows = {r["case"]: r for r in read_csv(prefix + "_per_case.csv")}
    assert float(rows["hc_0"]["hc_ref_mm"]) == 100.5 and float(rows["hc_1"]["hc_ref_mm"]) == 120.0
    assert float(rows["hc_1"]["hc_diff_mm"]) == pytest.approx(float(rows["hc_1"]["hc_pred_mm"]) - 120.0)

    hc_csv.write_text("case_id,head_circumference_mm\nhc_0,100.5\n")
    os.remove(prefix + "_per_case.csv")
    os.remove(prefix + "_summary.json")
    assert main(["-ref", d["ref"], "-pred", d["pred"], "-djfile", d["djfile"], "--hc", "--hc-csv",
                 str(hc_csv), "-o", prefix]) == 2
    assert "hc_1" in capsys.readouterr().err
    assert not os.path.exists(prefix + "_per_case.csv") and not os.path.exists(prefix + "_summary.json")


def test_hc_needs_a_binary_dataset(dataset3d, capsys):
    d = dataset3d
    assert main(["-ref", d["ref"], "-pred", d["pred"], "-djfile", d["djfile"], "--hc"]) == 2
    assert "--hc needs a binary dataset" in capsys.readouterr().err
