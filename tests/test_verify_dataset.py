"""nnssl_verify_dataset and the checks nnssl_preprocess_unlabeled runs before writing: every bad input is made
here by damaging copies of the workspace's real files; each message names the file and the problem."""

import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DATASET, DATASET_ID, nnunet_env, run, script
from nnssl.data.layout import UNLABELED_MANIFEST
from nnssl.preprocessing.splits import write_splits
from nnssl.preprocessing.unlabeled import preprocess_unlabeled
from nnssl.preprocessing.verify import main as verify_main
from nnssl.utils import UserInputError


def _raw(root, *parts):
    return os.path.join(root, "raw", DATASET, *parts)


def _verify(capsys, *args):
    """Run nnssl_verify_dataset in this process: ``(exit code, {severity: {file: message}})``."""
    with pytest.raises(SystemExit) as exit_:
        verify_main(["-d", str(DATASET_ID), "-np", "1", "--no-progress", *args])
    found = {"error": {}, "warning": {}}
    for line in capsys.readouterr().out.splitlines():
        severity, _, rest = line.partition(": ")
        if severity in found:
            file, _, message = rest.partition(": ")
            found[severity][file] = message
    return exit_.value.code, found


def _truncate(path, keep=1000):
    with open(path, "rb") as f:
        head = f.read(keep)
    with open(path, "wb") as f:
        f.write(head)


def _rewrite(src, dst, change=lambda a: a, spacing=None, direction=None, **write_kwargs):
    """Write ``change(voxels of src)`` to ``dst`` with src's geometry (or the given spacing / direction)."""
    img = sitk.ReadImage(src)
    out = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(img)))
    if out.GetSize() == img.GetSize():
        out.CopyInformation(img)
    if spacing is not None:
        out.SetSpacing(spacing)
    if direction is not None:
        out.SetDirection(direction)
    sitk.WriteImage(out, dst, **{"useCompression": True, **write_kwargs})


def _set_pixdim(path, axis, value):
    """Write ``value`` into the NIfTI-1 header's pixdim[axis] (SimpleITK refuses to write such spacings)."""
    raw = bytearray(gzip.open(path).read())
    raw[76 + 4 * axis:80 + 4 * axis] = struct.pack("<f", value)
    with open(path, "wb") as f:
        f.write(gzip.compress(bytes(raw)))


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _set_voxel(value):
    def change(a):
        a = a.copy()
        a[3, 4, 5] = value
        return a
    return change


def test_clean_workspace_passes(session_workspace):
    """The real console script on the untouched synthetic dataset: no problem at all, exit code 0."""
    out = run([script("nnssl_verify_dataset"), "-d", DATASET_ID, "--no-progress"], nnunet_env(session_workspace))
    assert "0 error(s), 0 warning(s)" in out.stdout and "error:" not in out.stdout and "warning:" not in out.stdout
    # imagesTr, labelsTr, imagesUnlabeled, imagesTs and labelsTs: 16 + 16 + 6 + 3 + 3 files
    assert "reading 44 file(s)" in out.stdout


def test_damaged_unlabeled_files(workspace, capsys):
    """Per-file problems in the unlabeled folder, one line each; a constant image is only a warning."""
    src = _raw(workspace, "imagesUnlabeled", "synthu_000_0000.nii.gz")

    def put(name, change=lambda a: a):
        """A new unlabeled image of its own content (no duplicate of another one), made from ``src``."""
        path = _raw(workspace, "imagesUnlabeled", name + ".nii.gz")
        _rewrite(src, path, lambda a: change(a + len(os.listdir(os.path.dirname(path)))))
        return path

    truncated = put("truncated_0000")
    _truncate(truncated)
    # the bug being fixed: SimpleITK reads the first 1000 bytes as a mostly-zero image without complaint
    assert (sitk.GetArrayFromImage(sitk.ReadImage(truncated)) == 0).mean() > 0.9
    with open(put("notgzip_0000"), "wb") as f:
        f.write(b"this is not a nifti file")
    put("nan_0000", _set_voxel(np.nan))
    put("inf_0000", _set_voxel(np.inf))
    put("flat_0000", lambda a: a[16])  # one 2D slice among 3D images
    _set_pixdim(put("zerospacing_0000"), 2, 0.0)
    _set_pixdim(put("negspacing_0000"), 1, -1.5)
    put("constant_0000", lambda a: np.full_like(a, 3.0))
    put("synthu_001_0001")  # a second channel in a one-channel dataset
    code, found = _verify(capsys)
    expected = {"truncated": "truncated: the gzip stream ends", "notgzip": "corrupt gzip data",
                "nan": "1 NaN and 0 Inf voxel(s)", "inf": "0 NaN and 1 Inf voxel(s)",
                "flat": "2D image, but the dataset's training images are 3D",
                "zerospacing": "zero or negative spacing (1.0, 0.0, 1.0) in the NIfTI header",
                "negspacing": "zero or negative spacing (-1.5, 1.0, 1.0) in the NIfTI header"}
    for name, message in expected.items():
        assert message in found["error"][f"imagesUnlabeled/{name}_0000.nii.gz"], (name, found)
    assert "unexpected channel(s) 0001 (dataset.json has 1 channel(s))" in found["error"]["imagesUnlabeled/synthu_001"]
    assert len(found["error"]) == len(expected) + 1, found["error"]
    assert found["warning"] == {"imagesUnlabeled/constant_0000.nii.gz":
                                "constant image (every voxel is 3): nothing to learn from; remove it if it is a "
                                "failed export"}
    assert code == 1


def test_channels_of_a_case_disagree(workspace, capsys):
    """A two-channel dataset: channels with another shape, spacing or direction, and a missing channel."""
    dataset_json = _raw(workspace, "dataset.json")
    meta = json.load(open(dataset_json))
    meta["channel_names"] = {"0": "MRI", "1": "MRI2"}
    json.dump(meta, open(dataset_json, "w"))
    for folder in ("imagesTr", "imagesUnlabeled", "imagesTs"):
        for name in os.listdir(_raw(workspace, folder)):
            first = _raw(workspace, folder, name)
            _rewrite(first, first.replace("_0000.", "_0001."), lambda a: a + 1)  # not a duplicate of channel 0
    unl = _raw(workspace, "imagesUnlabeled")

    def channel(case, c):
        return os.path.join(unl, f"synthu_{case:03d}_{c:04d}.nii.gz")

    _rewrite(channel(0, 0), channel(0, 1), lambda a: a[:, :, :30])
    _rewrite(channel(1, 0), channel(1, 1), lambda a: a + 1, spacing=(1.0, 1.0, 2.0))
    _rewrite(channel(2, 0), channel(2, 1), lambda a: a + 1, direction=(-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    os.remove(os.path.join(unl, "synthu_003_0001.nii.gz"))
    code, found = _verify(capsys)
    errors = found["error"]
    assert "shape (32, 32, 30) differs from synthu_000_0000.nii.gz's (32, 32, 32)" in \
        errors["imagesUnlabeled/synthu_000_0001.nii.gz"]
    assert "spacing (1.0, 1.0, 2.0) differs from synthu_001_0000.nii.gz's (1.0, 1.0, 1.0)" in \
        errors["imagesUnlabeled/synthu_001_0001.nii.gz"]
    assert "direction (-1.0, 0.0, 0.0" in errors["imagesUnlabeled/synthu_002_0001.nii.gz"]
    assert "missing channel(s) 0001 (dataset.json has 2 channel(s))" in errors["imagesUnlabeled/synthu_003"]
    assert len(errors) == 4 and not found["warning"] and code == 1, found


def test_training_files(workspace, capsys):
    """imagesTr/labelsTr: a truncated image, a label outside dataset.json, two identical cases (a warning);
    nnU-Net's own report on the label file is not repeated."""
    _truncate(_raw(workspace, "imagesTr", "synth_001_0000.nii.gz"))
    label = _raw(workspace, "labelsTr", "synth_003.nii.gz")
    _rewrite(label, label, _set_voxel(7))
    shutil.copy(_raw(workspace, "imagesTr", "synth_004_0000.nii.gz"),
                _raw(workspace, "imagesTr", "synth_005_0000.nii.gz"))
    code, found = _verify(capsys)
    assert "truncated" in found["error"]["imagesTr/synth_001_0000.nii.gz"]
    assert found["error"]["labelsTr/synth_003.nii.gz"].startswith(
        "label value(s) [7] are not in dataset.json's labels [0, 1, 2]")
    assert len(found["error"]) == 2 and code == 1, found
    assert found["warning"]["imagesTr/synth_005_0000.nii.gz"].startswith(
        "same voxels as imagesTr/synth_004_0000.nii.gz (a validation case of fold(s) ")
    assert len(found["warning"]) == 1, found


def test_unreadable_training_image_reported_once(workspace, capsys):
    """nnU-Net's check fails on the same file: only nnssl's line is shown."""
    with open(_raw(workspace, "imagesTr", "synth_002_0000.nii.gz"), "wb") as f:
        f.write(b"garbage")
    code, found = _verify(capsys)
    assert found["error"] == {"imagesTr/synth_002_0000.nii.gz": "corrupt gzip data (Not a gzipped file (b'ga')); "
                                                                "replace the file with a good copy"}
    assert code == 1


@pytest.mark.parametrize("damage,severity,file,message", [
    ("numTraining", "error", DATASET,
     "nnU-Net's verify_dataset_integrity: Did not find the expected number of training cases (17). Found 16"),
    ("label", "error", DATASET,
     "nnU-Net's verify_dataset_integrity: not all training cases have a label file in labelsTr. Fix that. Missing:"),
    ("origin", "warning", "imagesTr/synth_008_0000.nii.gz",
     "nnU-Net: Origin mismatch between segmentation and corresponding images. Origin images: (0.0, 0.0, 0.0). "
     "Origin seg: (5.0, 0.0, 0.0). Image files: ['imagesTr/synth_008_0000.nii.gz']. Seg file: "
     "labelsTr/synth_008.nii.gz")])
def test_what_only_nnunet_checks(workspace, capsys, damage, severity, file, message):
    """dataset.json's numTraining, a missing training label, a label with another origin than its image:
    nnU-Net's verify_dataset_integrity reports them, one line each."""
    if damage == "numTraining":
        meta = json.load(open(_raw(workspace, "dataset.json")))
        meta["numTraining"] = 17
        json.dump(meta, open(_raw(workspace, "dataset.json"), "w"))
    elif damage == "label":
        os.remove(_raw(workspace, "labelsTr", "synth_006.nii.gz"))
    else:
        label = _raw(workspace, "labelsTr", "synth_008.nii.gz")
        img = sitk.ReadImage(label)
        img.SetOrigin((5.0, 0.0, 0.0))
        sitk.WriteImage(img, label, useCompression=True)
    code, found = _verify(capsys)
    assert found[severity][file].startswith(message), found
    assert len(found[severity]) == 1 and not found["error" if severity == "warning" else "warning"], found
    assert damage != "label" or "synth_006" in found[severity][file]
    assert code == (1 if severity == "error" else 0)


def test_test_folder(workspace, capsys):
    """A test folder (images with nnU-Net's naming, labels in the sibling labels folder)."""
    ts, ls = _raw(workspace, "imagesTs"), _raw(workspace, "labelsTs")
    _rewrite(os.path.join(ls, "synthtest_000.nii.gz"), os.path.join(ls, "synthtest_000.nii.gz"), lambda a: a[:30])
    os.remove(os.path.join(ls, "synthtest_001.nii.gz"))
    _rewrite(os.path.join(ls, "synthtest_002.nii.gz"), os.path.join(ls, "synthtest_002.nii.gz"), _set_voxel(7))
    _rewrite(os.path.join(ts, "synthtest_000_0000.nii.gz"), os.path.join(ts, "inf_0000.nii.gz"),
             _set_voxel(-np.inf))
    shutil.copy(os.path.join(ls, "synthtest_002.nii.gz"), os.path.join(ls, "inf.nii.gz"))
    shutil.copy(os.path.join(ts, "synthtest_000_0000.nii.gz"), os.path.join(ts, "nochannel.nii.gz"))
    code, found = _verify(capsys, "--test-folder", ts)
    errors = found["error"]
    assert "shape (30, 32, 32) differs from synthtest_000_0000.nii.gz's (32, 32, 32)" in \
        errors["labelsTs/synthtest_000.nii.gz"]
    assert errors["labelsTs/synthtest_001.nii.gz"].startswith("does not exist: case synthtest_001 of")
    assert errors["labelsTs/synthtest_002.nii.gz"].startswith("label value(s) [7]")
    assert errors["labelsTs/inf.nii.gz"].startswith("label value(s) [7]")
    assert errors["imagesTs/inf_0000.nii.gz"].startswith("0 NaN and 1 Inf voxel(s)")
    assert errors["imagesTs/nochannel.nii.gz"].startswith("name must be <case>_XXXX.nii.gz")
    assert len(errors) == 6 and code == 1, found


def test_unlabeled_copies_of_validation_and_test_images(workspace, capsys):
    """A renamed copy of a validation image and a recompressed copy of a test image in the unlabeled folder."""
    val_case = json.load(open(os.path.join(workspace, "pre", DATASET, "splits_final.json")))[0]["val"][0]
    shutil.copy(_raw(workspace, "imagesTr", f"{val_case}_0000.nii.gz"),
                _raw(workspace, "imagesUnlabeled", "renamed_0000.nii.gz"))
    test_image = _raw(workspace, "imagesTs", "synthtest_001_0000.nii.gz")
    copy = _raw(workspace, "imagesUnlabeled", "recompressed_0000.nii.gz")
    # SimpleITK's NIfTI writer ignores compressionLevel: recompress the voxels with Python's gzip instead
    with open(copy, "wb") as f:
        f.write(gzip.compress(gzip.open(test_image).read(), compresslevel=1))
    assert _digest(copy) != _digest(test_image)
    code, found = _verify(capsys)
    assert found["error"]["imagesUnlabeled/renamed_0000.nii.gz"].startswith(
        f"same voxels as imagesTr/{val_case}_0000.nii.gz (a validation case of fold(s) 0 of splits_final.json): "
        f"an unlabeled image must not be a validation or test image; remove it")
    assert found["error"]["imagesUnlabeled/recompressed_0000.nii.gz"].startswith(
        "same voxels as imagesTs/synthtest_001_0000.nii.gz (a test image of imagesTs)")
    assert len(found["error"]) == 2 and not found["warning"] and code == 1, found


def test_without_split_any_training_case_counts(workspace, capsys):
    os.remove(os.path.join(workspace, "pre", DATASET, "splits_final.json"))
    shutil.copy(_raw(workspace, "imagesTr", "synth_007_0000.nii.gz"),
                _raw(workspace, "imagesUnlabeled", "copy_0000.nii.gz"))
    code, found = _verify(capsys)
    assert "there is no splits_final.json yet" in found["error"]["imagesUnlabeled/copy_0000.nii.gz"]
    assert code == 1


def test_held_out_test_set(workspace, tmp_path, capsys):
    """The benchmark's layout: test cases held out of the split (--exclude) and copied into a test folder
    (images/ + labels/) are not reported; an unlabeled copy of one is an error, of a training-only case a warning."""
    (tmp_path / "exclude.txt").write_text("synth_000\nsynth_001\n")
    write_splits(DATASET_ID, "25%", val="3", folds=2, exclude_file=str(tmp_path / "exclude.txt"), force=True)
    splits = json.load(open(os.path.join(workspace, "pre", DATASET, "splits_final.json")))
    never_validated = sorted(set(splits[0]["train"] + splits[0]["unlabeled"]) - set(splits[1]["val"]))[0]
    for sub in ("images", "labels"):
        (tmp_path / "test" / sub).mkdir(parents=True)
    for case in ("synth_000", "synth_001"):
        shutil.copy(_raw(workspace, "imagesTr", f"{case}_0000.nii.gz"), tmp_path / "test" / "images")
        shutil.copy(_raw(workspace, "labelsTr", f"{case}.nii.gz"), tmp_path / "test" / "labels")
    shutil.copy(_raw(workspace, "imagesTr", "synth_001_0000.nii.gz"), _raw(workspace, "imagesUnlabeled",
                                                                         "heldout_0000.nii.gz"))
    shutil.copy(_raw(workspace, "imagesTr", f"{never_validated}_0000.nii.gz"),
                _raw(workspace, "imagesUnlabeled", "trainonly_0000.nii.gz"))
    code, found = _verify(capsys, "--test-folder", str(tmp_path / "test" / "images"))
    assert found["error"]["imagesUnlabeled/heldout_0000.nii.gz"].startswith(
        "same voxels as imagesTr/synth_001_0000.nii.gz (held out of every fold of splits_final.json")
    assert found["warning"]["imagesUnlabeled/trainonly_0000.nii.gz"].startswith(
        f"same voxels as imagesTr/{never_validated}_0000.nii.gz (a training case)")
    assert len(found["error"]) == 1 and len(found["warning"]) == 1 and code == 1, found


def test_pool_sources_are_checked(workspace, tmp_path, capsys):
    """-c: the images a pool was made from (here with -i from another folder) are checked like imagesUnlabeled."""
    val_case = json.load(open(os.path.join(workspace, "pre", DATASET, "splits_final.json")))[1]["val"][0]
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(_raw(workspace, "imagesTr", f"{val_case}_0000.nii.gz"), extra / "other_0000.nii.gz")
    preprocess_unlabeled(DATASET_ID, ["3d_fullres"], str(extra), progress=False)
    code, found = _verify(capsys, "-c", "3d_fullres")
    assert found["error"][str(extra / "other_0000.nii.gz")].endswith(
        "remove it and rerun nnssl_preprocess_unlabeled with --overwrite")
    assert code == 1


def test_cli_errors(workspace):
    env = dict(os.environ)
    for args, message in [(["-d", "555"], "unknown dataset"),
                          (["-d", str(DATASET_ID), "--test-folder", "/nonexistent"], "does not exist"),
                          (["-d", str(DATASET_ID), "-c", "3d_lowres"], "no preprocessed unlabeled pool")]:
        p = subprocess.run([script("nnssl_verify_dataset"), "--no-progress", *args], env=env, capture_output=True,
                           text=True)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)


def test_preprocess_unlabeled_skips_bad_files(workspace):
    """A truncated file and a NaN image among good ones: named with their problems at the end (exit code 2),
    never written into the pool nor listed in its manifest; the good images are written; a constant image is
    written with a warning."""
    unl = _raw(workspace, "imagesUnlabeled")
    out = os.path.join(workspace, "pre", DATASET, "unlabeled", "nnUNetPlans_3d_fullres")
    shutil.rmtree(out)
    src = os.path.join(unl, "synthu_000_0000.nii.gz")
    shutil.copy(src, os.path.join(unl, "cut_0000.nii.gz"))
    _truncate(os.path.join(unl, "cut_0000.nii.gz"))
    _rewrite(src, os.path.join(unl, "nan_0000.nii.gz"), _set_voxel(np.nan))
    _rewrite(_raw(workspace, "imagesTr", "synth_000_0000.nii.gz"), os.path.join(unl, "flat_0000.nii.gz"),
             lambda a: a[16])
    _rewrite(src, os.path.join(unl, "const_0000.nii.gz"), lambda a: np.zeros_like(a))
    p = subprocess.run([script("nnssl_preprocess_unlabeled"), "-d", str(DATASET_ID), "-c", "3d_fullres",
                        "--no-progress"], env=dict(os.environ), capture_output=True, text=True)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "3 unlabeled case(s) could not be preprocessed (the others were written)" in p.stderr
    assert "case cut: cut_0000.nii.gz: truncated: the gzip stream ends" in p.stderr
    assert "case nan: nan_0000.nii.gz: 1 NaN and 0 Inf voxel(s)" in p.stderr
    assert "case flat: flat_0000.nii.gz: 2D image, but the dataset's training images are 3D" in p.stderr
    assert "warning: case const: const_0000.nii.gz: constant image (every voxel is 0)" in p.stdout
    good = sorted([f"synthu_{i:03d}" for i in range(6)] + ["const"])
    assert sorted(json.load(open(os.path.join(out, UNLABELED_MANIFEST)))["cases"]) == good
    assert sorted(f[:-len(".pkl")] for f in os.listdir(out) if f.endswith(".pkl")) == good
    assert not [f for f in os.listdir(out) if f.startswith(("cut", "nan", "flat"))]
    with pytest.raises(UserInputError, match="3 unlabeled case"):  # a rerun reports them again, writes nothing
        preprocess_unlabeled(DATASET_ID, ["3d_fullres"], progress=False)
