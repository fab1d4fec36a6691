"""Ellipse geometry, head circumference and the HC18 converter (``nnssl_convert_hc18``).

Synthetic tests build a tiny HC18-layout folder in ``tmp_path``. The real-data test uses the HC18 release in
``$NNSSL_SHARED_DATA/HC18`` or, by default, ``../shared/data/HC18`` next to the repository, and is skipped when
it is absent.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from nnssl.dataset_conversion.hc18 import (REFERENCE_CSV, case_id_for, convert_hc18, head_mask_from_outline, main,
                                           mother_id)
from nnssl.evaluation.head_circumference import head_circumference_mm
from nnssl.ops.ellipse import Ellipse, boundary_points, ellipse_circumference, fit_ellipse, rasterize_ellipse

REPO = Path(__file__).resolve().parents[1]
REAL_HC18 = Path(os.environ.get("NNSSL_SHARED_DATA", REPO.parent / "shared" / "data")) / "HC18"


def ellipse_points(ellipse: Ellipse, t: np.ndarray) -> np.ndarray:
    """Points ``p(t)`` of an ellipse (the parametrisation documented in ``nnssl.ops.ellipse``)."""
    (c0, c1), (a, b), th = ellipse.center, ellipse.semi_axes, ellipse.angle
    return np.stack([c0 + a * np.cos(t) * np.cos(th) - b * np.sin(t) * np.sin(th),
                     c1 + a * np.cos(t) * np.sin(th) + b * np.sin(t) * np.cos(th)], axis=1)


def canonical(ellipse: Ellipse) -> tuple:
    """``(c0, c1, a, b, angle)`` with ``a >= b`` and the angle in ``[0, pi)``: the fit's a/b order is arbitrary."""
    (c0, c1), (a, b), th = ellipse.center, ellipse.semi_axes, ellipse.angle
    if a < b:
        a, b, th = b, a, th + math.pi / 2
    return c0, c1, a, b, th % math.pi


def exact_perimeter(a: float, b: float) -> float:
    """Ellipse perimeter by numerical integration of the arc length (independent of Ramanujan's formula)."""
    from scipy.integrate import quad

    value, _ = quad(lambda t: math.hypot(a * math.sin(t), b * math.cos(t)), 0, 2 * math.pi, epsabs=0,
                    epsrel=1e-13, limit=200)
    return value


def physical_ellipse_mask(shape, spacing, ellipse: Ellipse) -> np.ndarray:
    """Pixels whose centre ``(i * spacing[0], j * spacing[1])`` (mm) lies inside an ellipse given in mm."""
    r = np.arange(shape[0])[:, None] * spacing[0] - ellipse.center[0]
    c = np.arange(shape[1])[None, :] * spacing[1] - ellipse.center[1]
    (a, b), th = ellipse.semi_axes, ellipse.angle
    u = r * math.cos(th) + c * math.sin(th)
    v = -r * math.sin(th) + c * math.cos(th)
    return (u / a) ** 2 + (v / b) ** 2 < 1


# ----------------------------------------------------------------------------------------------------- ellipse ops

def test_fit_ellipse_recovers_exact_parameters():
    truth = Ellipse(center=(40.5, 70.25), semi_axes=(30.0, 12.0), angle=0.4)
    fitted = fit_ellipse(ellipse_points(truth, np.linspace(0, 2 * np.pi, 50, endpoint=False)))
    assert canonical(fitted) == pytest.approx(canonical(truth), abs=1e-6)
    assert fitted.circumference == pytest.approx(ellipse_circumference(30.0, 12.0), rel=1e-9)


def test_rasterize_then_fit_boundary_recovers_parameters():
    truth = Ellipse(center=(60.3, 80.7), semi_axes=(45.0, 28.0), angle=2.2)
    mask = rasterize_ellipse(truth, (130, 170))
    c0, c1, a, b, th = canonical(fit_ellipse(boundary_points(mask)))
    t0, t1, ta, tb, tth = canonical(truth)
    # sub-pixel boundary of a rasterised ellipse: parameters within a tenth of a pixel (and ~0.2 degree)
    assert (c0, c1, a, b) == pytest.approx((t0, t1, ta, tb), abs=0.1)
    assert th == pytest.approx(tth, abs=0.004)


def test_rasterize_orientation_convention():
    # angle pi/2: the long semi-axis a = 40 lies along axis 1 (columns)
    mask = rasterize_ellipse(Ellipse(center=(50.0, 50.0), semi_axes=(40.0, 10.0), angle=math.pi / 2), (101, 101))
    assert mask[50, 85] and not mask[85, 50]
    assert mask.sum() == pytest.approx(math.pi * 40 * 10, rel=0.02)


def test_fit_ellipse_errors():
    with pytest.raises(ValueError, match="at least 5 points"):
        fit_ellipse(np.array([[0, 0], [1, 0], [0, 1], [1, 1]]))
    with pytest.raises(ValueError, match="ellipse fit"):
        fit_ellipse(np.stack([np.arange(10.0), 2 * np.arange(10.0)], axis=1))  # collinear
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        fit_ellipse(np.zeros((10, 3)))


def test_circumference_of_circle_is_exact():
    for r in (0.5, 1.0, 7.3, 123.456):
        assert ellipse_circumference(r, r) == pytest.approx(2 * math.pi * r, rel=1e-15)


def test_ramanujan_matches_integrated_perimeter():
    for a, b in ((3.0, 1.0), (1.0, 2.5), (80.0, 61.0)):  # b/a down to 1/3; fetal heads are rounder
        assert ellipse_circumference(a, b) == pytest.approx(exact_perimeter(a, b), rel=1e-6)
    with pytest.raises(ValueError):
        ellipse_circumference(-1.0, 2.0)


def test_boundary_points_lie_between_pixel_centres():
    mask = np.zeros((7, 8), bool)
    mask[2:5, 3:6] = True
    points = boundary_points(mask)
    assert points[:, 0].min() == 1.5 and points[:, 0].max() == 4.5
    assert points[:, 1].min() == 2.5 and points[:, 1].max() == 5.5
    assert boundary_points(np.zeros((4, 4))).shape == (0, 2)


# ------------------------------------------------------------------------------------------- head circumference

SPACING = (0.2, 0.5)  # mm per pixel along (rows, cols): strongly anisotropic
HEAD = Ellipse(center=(30.0, 40.0), semi_axes=(25.0, 15.0), angle=0.3)  # in mm
# The outline taken half-way between inside and outside pixel centres is off the true ellipse by at most half a
# pixel along each axis, i.e. within d = max(spacing) / 2 of it; the curve at distance d from an ellipse has a
# circumference 2 * pi * d larger (or smaller), so pi * max(spacing) bounds the error of a fit to that outline.
HC_TOLERANCE_MM = math.pi * max(SPACING)


def test_head_circumference_anisotropic_spacing():
    mask = physical_ellipse_mask((300, 160), SPACING, HEAD)
    expected = exact_perimeter(25.0, 15.0)
    assert head_circumference_mm(mask, SPACING) == pytest.approx(expected, abs=HC_TOLERANCE_MM)
    # ignoring the spacing order is far off: the physical fit matters
    assert abs(head_circumference_mm(mask, SPACING[::-1]) - expected) > 10 * HC_TOLERANCE_MM


def test_head_circumference_largest_component_holes_and_border():
    mask = physical_ellipse_mask((300, 160), SPACING, HEAD)
    reference = head_circumference_mm(mask, SPACING)
    noisy = mask.copy()
    noisy[5:15, 140:150] = True  # a false positive elsewhere
    noisy[150, 80] = False  # a hole
    assert head_circumference_mm(noisy, SPACING) == pytest.approx(reference, abs=1e-9)
    # the head cut by the image border (8 % of it outside): only the visible outline is fitted, not the border
    cropped = mask[60:, 50:]
    assert cropped[0].any() and cropped[:, 0].any()
    assert head_circumference_mm(cropped, SPACING) == pytest.approx(exact_perimeter(25.0, 15.0),
                                                                    abs=HC_TOLERANCE_MM)


def test_head_circumference_empty_degenerate_and_bad_input():
    assert math.isnan(head_circumference_mm(np.zeros((20, 30), np.uint8), (0.1, 0.1)))
    single = np.zeros((20, 30), bool)
    single[10, 10] = True
    assert math.isnan(head_circumference_mm(single, (0.1, 0.1)))
    with pytest.raises(ValueError, match="2D"):
        head_circumference_mm(np.ones((2, 3, 4)), (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        head_circumference_mm(np.ones((3, 4)), (1.0, 0.0))


# -------------------------------------------------------------------------------------------- converter: synthetic

# training images: file name -> (pixel size mm, ellipse in pixels); mothers 001 (two images) and 002
SYNTH_TRAIN = {
    "001_HC.png": (0.1, Ellipse((30.0, 42.0), (22.0, 15.0), 0.5)),
    "001_2HC.png": (0.15, Ellipse((33.0, 38.0), (18.0, 25.0), -0.3)),
    "002_HC.png": (0.2, Ellipse((29.0, 41.0), (20.0, 19.0), 1.2)),
}
SYNTH_TEST = {"000_HC.png": 0.12, "001_HC.png": 0.3}
SHAPE = (60, 80)


def outline_with_gap(ellipse: Ellipse, shape) -> np.ndarray:
    """A one-pixel ellipse outline (like HC18's annotations) with a gap of about 0.3 rad (5-7 pixels)."""
    points = np.rint(ellipse_points(ellipse, np.linspace(0.3, 2 * np.pi, 2000))).astype(int)
    out = np.zeros(shape, np.uint8)
    out[points[:, 0], points[:, 1]] = 255
    return out


def make_release(root: Path) -> Path:
    """A tiny HC18 release: training_set with outline annotations, test_set, both CSVs."""
    rng = np.random.RandomState(0)
    (root / "training_set").mkdir(parents=True)
    (root / "test_set").mkdir()
    with open(root / "training_set_pixel_size_and_HC.csv", "w") as f:
        f.write("filename,pixel size(mm),head circumference (mm)\n")
        for name, (px, ellipse) in SYNTH_TRAIN.items():
            image = (rng.randint(0, 60, SHAPE) + 120 * rasterize_ellipse(ellipse, SHAPE)).astype(np.uint8)
            if name == "001_2HC.png":  # an RGB image: the converter makes it grayscale
                Image.fromarray(np.repeat(image[..., None], 3, axis=2), "RGB").save(root / "training_set" / name)
            else:
                Image.fromarray(image).save(root / "training_set" / name)
            Image.fromarray(outline_with_gap(ellipse, SHAPE)).save(
                root / "training_set" / name.replace(".png", "_Annotation.png"))
            f.write(f"{name},{px},{round(ellipse.circumference * px, 2)}\n")
    with open(root / "test_set_pixel_size.csv", "w") as f:
        f.write("filename,pixel size(mm)\n")
        for name, px in SYNTH_TEST.items():
            Image.fromarray(rng.randint(0, 255, SHAPE).astype(np.uint8)).save(root / "test_set" / name)
            f.write(f"{name},{px}\n")
    return root


@pytest.fixture
def release(tmp_path) -> Path:
    return make_release(tmp_path / "HC18")


@pytest.fixture
def raw(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "nnUNet_raw"
    folder.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(folder))
    return folder


def read_nifti(path: Path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    return SimpleITKIO().read_images([str(path)])


def test_case_names_and_mother_ids():
    assert case_id_for("010_HC.png") == "hc18_010_1"
    assert case_id_for("010_2HC.png") == "hc18_010_2"
    assert case_id_for("000_HC.png", "hc18test") == "hc18test_000_1"
    assert mother_id("hc18_010_2") == "010"
    assert mother_id("hc18test_000_1") == "test_000"
    with pytest.raises(ValueError):
        case_id_for("010_HC_Annotation.png")
    with pytest.raises(ValueError):
        mother_id("case_010")


def test_convert_synthetic_release(release, raw, capsys):
    main(["-i", str(release), "-d", "901", "--no-progress"])
    assert "median |diff|" in capsys.readouterr().out
    assert sorted(os.listdir(raw)) == ["Dataset901_HC18"]  # no temporary folder left
    ds = raw / "Dataset901_HC18"
    cases = ["hc18_001_1", "hc18_001_2", "hc18_002_1"]
    assert sorted(os.listdir(ds / "imagesTr")) == [f"{c}_0000.nii.gz" for c in cases]
    assert sorted(os.listdir(ds / "labelsTr")) == [f"{c}.nii.gz" for c in cases]
    assert sorted(os.listdir(ds / "imagesUnlabeled")) == ["hc18test_000_1_0000.nii.gz", "hc18test_001_1_0000.nii.gz"]

    dataset_json = json.loads((ds / "dataset.json").read_text())
    assert dataset_json["numTraining"] == 3 and dataset_json["file_ending"] == ".nii.gz"
    assert dataset_json["channel_names"] == {"0": "US"} and dataset_json["labels"] == {"background": 0, "head": 1}

    for case, (name, (px, ellipse)) in zip(cases, SYNTH_TRAIN.items()):
        image, props = read_nifti(ds / "imagesTr" / f"{case}_0000.nii.gz")
        label, label_props = read_nifti(ds / "labelsTr" / f"{case}.nii.gz")
        # nnU-Net reads a 2D NIfTI as (channels, 1, H, W) with spacing (999 * max spacing, row, col)
        assert image.shape == label.shape == (1, 1) + SHAPE
        assert props["spacing"] == label_props["spacing"] == pytest.approx([999 * px, px, px])
        source = np.asarray(Image.open(release / "training_set" / name).convert("L"))
        np.testing.assert_array_equal(image[0, 0], source)
        # the label is the filled ellipse the outline draws (gap closed): it differs from the true ellipse only
        # in pixels next to its outline, and measures the same HC
        outline = np.asarray(Image.open(release / "training_set" / name.replace(".png", "_Annotation.png")))
        assert ndimage.binary_fill_holes(outline).sum() == np.count_nonzero(outline)  # the gap is real: no fill
        mask = label[0, 0].astype(bool)
        truth = rasterize_ellipse(ellipse, SHAPE)
        assert set(np.unique(label)) == {0, 1}
        assert (mask ^ truth).sum() < 0.1 * ellipse.circumference
        assert head_circumference_mm(mask, (px, px)) == pytest.approx(ellipse.circumference * px, abs=math.pi * px)

    for name, px in SYNTH_TEST.items():
        image, props = read_nifti(ds / "imagesUnlabeled" / f"hc18test_{name[:3]}_1_0000.nii.gz")
        assert image.shape == (1, 1) + SHAPE and props["spacing"] == pytest.approx([999 * px, px, px])

    with open(ds / REFERENCE_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == cases
    assert [r["mother_id"] for r in rows] == ["001", "001", "002"]
    for row, (px, ellipse) in zip(rows, SYNTH_TRAIN.values()):
        assert float(row["pixel_size_mm"]) == px
        assert float(row["head_circumference_mm"]) == round(ellipse.circumference * px, 2)


def test_missing_annotation_fails_and_writes_nothing(release, raw, capsys):
    (release / "training_set" / "002_HC_Annotation.png").unlink()
    with pytest.raises(SystemExit) as e:
        main(["-i", str(release), "-d", "902", "--no-progress"])
    assert e.value.code == 2
    assert "002_HC_Annotation.png missing" in capsys.readouterr().err
    assert os.listdir(raw) == []


def test_unreadable_image_fails_and_writes_nothing(release, raw, capsys):
    (release / "test_set" / "001_HC.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as e:
        main(["-i", str(release), "-d", "903", "--no-progress"])
    assert e.value.code == 2
    assert "cannot read image" in capsys.readouterr().err
    assert os.listdir(raw) == []


def test_existing_dataset_needs_overwrite(release, raw, capsys):
    existing = raw / "Dataset904_HC18"
    existing.mkdir()
    (existing / "marker").write_text("old")
    with pytest.raises(SystemExit) as e:
        main(["-i", str(release), "-d", "904", "--no-progress"])
    assert e.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert os.listdir(raw) == ["Dataset904_HC18"] and os.listdir(existing) == ["marker"]
    # with --overwrite (and two spawned workers) the old folder is replaced by a complete new one
    main(["-i", str(release), "-d", "904", "--overwrite", "-np", "2", "--no-progress"])
    assert os.listdir(raw) == ["Dataset904_HC18"]
    assert not (existing / "marker").exists() and len(os.listdir(existing / "labelsTr")) == 3


@pytest.mark.parametrize("problem", ["no_env", "no_folder", "not_layout"])
def test_input_and_environment_errors(release, raw, tmp_path, monkeypatch, capsys, problem):
    folder = str(release)
    if problem == "no_env":
        monkeypatch.delenv("nnUNet_raw")
    elif problem == "no_folder":
        folder = str(tmp_path / "nowhere")
    else:
        (release / "training_set_pixel_size_and_HC.csv").unlink()
    with pytest.raises(SystemExit) as e:
        main(["-i", folder, "-d", "905", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert os.listdir(raw) == []


# -------------------------------------------------------------------------------------------- converter: real data

REAL_CASES = ["010_HC.png", "010_2HC.png", "014_HC.png", "014_2HC.png", "014_3HC.png", "022_HC.png",
              "133_4HC.png", "186_HC.png", "637_HC.png", "677_HC.png"]  # smallest/largest pixel, head cut by border


@pytest.mark.skipif(not REAL_HC18.is_dir(), reason=f"HC18 release not found at {REAL_HC18} (set NNSSL_SHARED_DATA "
                                                   f"to the folder that holds HC18/)")
def test_convert_real_subset(raw, capsys):
    """Ten real cases: the ellipse fitted to the outline and the written mask both reproduce the reference HC.

    Over all 798 training images the fitted ellipse's HC differs from the CSV by at most 0.046 mm (median
    0.004 mm): the CSV rounds HC to 0.01 or 0.1 mm, so 0.06 mm covers it. HC measured back from the rasterised
    mask (``head_circumference_mm``) differs by at most 0.082 mm, i.e. at most 0.32 pixels of circumference plus
    the CSV rounding: 0.06 mm + 0.5 pixel is a safe per-case bound.
    """
    ds = Path(convert_hc18(str(REAL_HC18), 906, training_files=REAL_CASES, test_files=["000_HC.png"],
                           progress=False))
    capsys.readouterr()
    with open(ds / REFERENCE_CSV) as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted(case_id_for(n) for n in REAL_CASES)
    assert os.listdir(ds / "imagesUnlabeled") == ["hc18test_000_1_0000.nii.gz"]
    for name in REAL_CASES:
        row = rows[case_id_for(name)]
        px, hc = float(row["pixel_size_mm"]), float(row["head_circumference_mm"])
        assert row["mother_id"] == name[:3]
        outline = np.asarray(Image.open(REAL_HC18 / "training_set" / name.replace(".png", "_Annotation.png")))
        _, ellipse = head_mask_from_outline(outline)
        assert ellipse.circumference * px == pytest.approx(hc, abs=0.06)
        label, props = read_nifti(ds / "labelsTr" / f"{case_id_for(name)}.nii.gz")
        assert props["spacing"][1:] == pytest.approx([px, px])
        assert head_circumference_mm(label[0, 0], props["spacing"][1:]) == pytest.approx(hc, abs=0.06 + 0.5 * px)
