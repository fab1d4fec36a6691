"""nnssl_preprocess_unlabeled: same plans as nnU-Net, clear errors, nothing half-written, skip what is done."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DATASET, DATASET_ID, script
from nnssl.preprocessing.unlabeled import CaseError, check_case, discover_cases, preprocess_unlabeled
from nnssl.data.layout import UNLABELED_MANIFEST
from nnssl.utils import UserInputError


def _folders(root):
    pre = os.path.join(root, "pre", DATASET)
    return (os.path.join(root, "raw", DATASET, "imagesUnlabeled"),
            os.path.join(pre, "unlabeled", "nnUNetPlans_3d_fullres"), pre)


def _write(path, shape=(32, 32, 32), spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(np.random.rand(*shape).astype(np.float32))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, path)


def test_session_output_matches_nnunet_preprocessing(workspace):
    """An image preprocessed as unlabeled equals nnU-Net's own preprocessing of the same image."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    src, out, pre = _folders(workspace)
    manifest = load_json(os.path.join(out, UNLABELED_MANIFEST))
    assert sorted(manifest["cases"]) == [f"synthu_{i:03d}" for i in range(6)]
    assert manifest["plans_name"] == "nnUNetPlans" and manifest["data_identifier"] == "nnUNetPlans_3d_fullres"
    # put a labeled training image into the unlabeled pipeline and compare with nnU-Net's preprocessed copy
    shutil.copy(os.path.join(workspace, "raw", DATASET, "imagesTr", "synth_000_0000.nii.gz"),
                os.path.join(str(workspace), "probe_0000.nii.gz"))
    probe_dir = os.path.join(str(workspace), "probe")
    os.makedirs(probe_dir)
    shutil.move(os.path.join(str(workspace), "probe_0000.nii.gz"), probe_dir)
    preprocess_unlabeled(DATASET_ID, ["3d_fullres"], probe_dir, progress=False)
    ours, _, _, props = nnUNetDatasetBlosc2(out, ["probe"]).load_case("probe")
    theirs, _, _, _ = nnUNetDatasetBlosc2(os.path.join(pre, "nnUNetPlans_3d_fullres"), ["synth_000"]).load_case(
        "synth_000")
    assert np.allclose(np.asarray(ours), np.asarray(theirs))
    assert props["class_locations"] == {}


def test_skips_done_cases_and_overwrite_redoes(workspace, capsys):
    src, out, _ = _folders(workspace)
    mtime = os.path.getmtime(os.path.join(out, "synthu_000.b2nd"))
    result = preprocess_unlabeled(DATASET_ID, ["3d_fullres"], progress=False)
    assert result["nnUNetPlans_3d_fullres"]["skipped"] == 6 and result["nnUNetPlans_3d_fullres"]["done"] == 0
    assert os.path.getmtime(os.path.join(out, "synthu_000.b2nd")) == mtime
    assert "skipping" in capsys.readouterr().out
    result = preprocess_unlabeled(DATASET_ID, ["3d_fullres"], overwrite=True, progress=False)
    assert result["nnUNetPlans_3d_fullres"]["done"] == 6


def test_interrupted_case_is_not_trusted_and_redone(workspace):
    src, out, _ = _folders(workspace)
    manifest_path = os.path.join(out, UNLABELED_MANIFEST)
    manifest = json.load(open(manifest_path))
    del manifest["cases"]["synthu_003"]  # as if the run died after writing the files, before recording the case
    json.dump(manifest, open(manifest_path, "w"))
    result = preprocess_unlabeled(DATASET_ID, ["3d_fullres"], progress=False)
    assert result["nnUNetPlans_3d_fullres"]["done"] == 1
    assert "synthu_003" in json.load(open(manifest_path))["cases"]


def test_stale_plans_refused_then_overwritten(workspace):
    _, out, pre = _folders(workspace)
    plans_file = os.path.join(pre, "nnUNetPlans.json")
    plans = json.load(open(plans_file))
    plans["configurations"]["3d_fullres"]["spacing"] = [1.5, 1.5, 1.5]
    json.dump(plans, open(plans_file, "w"))
    with pytest.raises(UserInputError, match="other plans"):
        preprocess_unlabeled(DATASET_ID, ["3d_fullres"], progress=False)
    result = preprocess_unlabeled(DATASET_ID, ["3d_fullres"], overwrite=True, progress=False)
    assert result["nnUNetPlans_3d_fullres"]["done"] == 6


def test_unreadable_image_reported_and_others_kept(workspace):
    src, out, _ = _folders(workspace)
    with open(os.path.join(src, "broken_0000.nii.gz"), "wb") as f:
        f.write(b"this is not a nifti file")
    with pytest.raises(UserInputError, match="case broken: broken_0000.nii.gz: corrupt gzip data"):
        preprocess_unlabeled(DATASET_ID, ["3d_fullres"], progress=False)
    manifest = json.load(open(os.path.join(out, UNLABELED_MANIFEST)))
    assert "broken" not in manifest["cases"] and len(manifest["cases"]) == 6


@pytest.mark.parametrize("name,message", [("extra_0000.nii", "file ending"),
                                          ("nochannel.nii.gz", "4-digit channel index"),
                                          ("twochan_0001.nii.gz", "missing channel(s) 0000")])
def test_naming_errors_before_anything_is_written(workspace, name, message):
    src, out, _ = _folders(workspace)
    shutil.rmtree(out)
    _write(os.path.join(src, name))
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preprocess_unlabeled(DATASET_ID, ["3d_fullres"], progress=False)
    assert not os.path.exists(out)


def test_channel_geometry_check(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    a, b, c = (str(tmp_path / f"case_000{i}.nii.gz") for i in range(3))
    _write(a)
    _write(b, shape=(32, 32, 30))
    _write(c, spacing=(1.0, 1.0, 2.0))
    check_case(SimpleITKIO(), "case", [a, a])
    with pytest.raises(CaseError, match="case case: case_0001.nii.gz: shape"):
        check_case(SimpleITKIO(), "case", [a, b])
    with pytest.raises(CaseError, match="case_0002.nii.gz: spacing"):
        check_case(SimpleITKIO(), "case", [a, c])


def test_discover_cases_multichannel(tmp_path):
    for case in ("a", "b"):
        for ch in range(2):
            open(tmp_path / f"{case}_{ch:04d}.nii.gz", "w").close()
    cases = discover_cases(str(tmp_path), ".nii.gz", 2)
    assert list(cases) == ["a", "b"] and [os.path.basename(f) for f in cases["a"]] == ["a_0000.nii.gz",
                                                                                    "a_0001.nii.gz"]
    with pytest.raises(UserInputError, match="unexpected channel"):
        discover_cases(str(tmp_path), ".nii.gz", 1)


def test_cli_errors_are_clear(workspace, tmp_path):
    env = dict(os.environ)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(["-d", "555"], "unknown dataset"),
             (["-d", str(DATASET_ID), "-i", str(tmp_path / "missing")], "does not exist"),
             (["-d", str(DATASET_ID), "-i", str(empty)], "contains no images"),
             (["-d", str(DATASET_ID), "-c", "3d_lowres"], "not in")]
    for args, message in cases:
        p = subprocess.run([script("nnssl_preprocess_unlabeled")] + args, env=env, capture_output=True, text=True)
        assert p.returncode == 2, (args, p.stderr)
        assert message in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
    os.remove(os.path.join(workspace, "pre", DATASET, "nnUNetPlans.json"))
    p = subprocess.run([script("nnssl_preprocess_unlabeled"), "-d", str(DATASET_ID)], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "nnUNetv2_plan_and_preprocess" in p.stderr


@pytest.mark.slow
def test_killed_while_writing_then_rerun_gives_a_complete_pool(workspace, tmp_path):
    """A real SIGKILL of nnssl_preprocess_unlabeled mid-run: the manifest never lists a half-written case, and a
    rerun completes the pool (every listed case loads)."""
    import signal
    import time

    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    _, out, _ = _folders(workspace)
    src = str(tmp_path / "many")
    os.makedirs(src)
    np.random.seed(0)
    for i in range(40):
        _write(os.path.join(src, f"many_{i:03d}_0000.nii.gz"), shape=(48, 48, 48))
    env = dict(os.environ)
    cmd = [script("nnssl_preprocess_unlabeled"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-i", src,
           "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(f.startswith("many_") and f.endswith(".b2nd") for f in os.listdir(out)):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    time.sleep(0.3)  # in the middle of the run
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    listed = load_json(os.path.join(out, UNLABELED_MANIFEST))["cases"]
    many_listed = [c for c in listed if c.startswith("many_")]
    assert len(many_listed) < 40  # killed before the end
    for case in many_listed:  # whatever the manifest lists was written completely
        nnUNetDatasetBlosc2(out, [case]).load_case(case)

    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    listed = load_json(os.path.join(out, UNLABELED_MANIFEST))["cases"]
    assert sorted(c for c in listed if c.startswith("many_")) == [f"many_{i:03d}" for i in range(40)]
    assert {f"synthu_{i:03d}" for i in range(6)} <= set(listed)  # the earlier pool is kept
    for case in listed:
        data, _, _, _ = nnUNetDatasetBlosc2(out, [case]).load_case(case)
        assert np.isfinite(np.asarray(data)).all()
