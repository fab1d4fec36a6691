"""Offline self-training: the pseudo-label store's maths and checks, the pool, and nnSSL_SelfTrainingTrainer's
pseudo-labeled term, in-process on stores written directly (no teacher needed). The console scripts end to end
are in test_pseudolabel_cli.py."""

import os

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json

from conftest import DATASET
from trainer_helpers import make_trainer, started
from nnssl.commands.pseudolabel import pool_cases
from nnssl.data.layout import preprocessing_fingerprint
from nnssl.data.pseudo_labels import (PseudoLabeledPool, PseudoLabelStore, case_files, confidence_levels,
                                      confidence_weight, epochs_seconds, identity, leak_problem, stores_folder,
                                      teacher_cost)
from nnssl.data.pool import find_unlabeled_pool
from nnssl.data.unlabeled import UnlabeledDataLoader
from nnssl.trainers.self_training import nnSSL_SelfTrainingTrainer

CFG = "3d_fullres"
PLANS = "nnUNetPlans_cpu"


def test_confidence_maths_hand_values():
    assert confidence_levels(np.array([0.0, 0.5, 0.79, 0.8, 0.97, 1.0])).tolist() == [0, 10, 16, 16, 19, 20]
    levels = torch.tensor([0.0, 10.0, 15.0, 16.0, 17.0, 20.0])
    assert torch.allclose(confidence_weight(levels, 0.8), torch.tensor([0, 0, 0, 0.8, 0.85, 1.0]))
    assert confidence_weight(levels, 0.8, weighted=False).tolist() == [0, 0, 0, 1, 1, 1]
    assert confidence_weight(levels, 0.0, weighted=False).tolist() == [1, 1, 1, 1, 1, 1]
    assert epochs_seconds({"epoch_start_timestamps": [1.0, 10.0], "epoch_end_timestamps": [4.0, 12.5]}) == 5.5
    manifest = {"teacher": {"trainer": "T", "folds": [0, 1], "training_seconds": {"0": 100.0, "1": 50.5},
                            "training_cases": {"0": ["a", "b"], "1": ["c"]}}, "prediction_seconds": 9.5}
    assert teacher_cost(manifest) == {"seconds": 160.0, "teacher_training_seconds": 150.5,
                                      "prediction_seconds": 9.5, "earlier_rounds_seconds": 0.0, "teacher_folds": 2}
    round_2 = {**manifest, "teacher": {**manifest["teacher"], "earlier_rounds_seconds": {"0": 40.0, "1": 0.5}}}
    assert teacher_cost(round_2)["seconds"] == 200.5
    # the identity a checkpoint keeps gives the same cost back
    ident = identity({**manifest, "preprocessing_fingerprint": "x", "cases": {}}, "/s/tag")
    assert teacher_cost(ident) == teacher_cost(manifest) and ident["tag"] == "tag"
    assert "validation" in leak_problem(manifest, 3, val_cases=["c", "z"], hidden_cases=[])
    assert "hidden-label" in leak_problem(manifest, 3, val_cases=[], hidden_cases=["a"])
    assert leak_problem(manifest, 3, val_cases=["z"], hidden_cases=["y"]) is None


def test_pool_never_holds_a_validation_case(session_workspace):
    pre = join(session_workspace, "pre", DATASET)
    splits = load_json(join(pre, "splits_final.json"))
    data_identifier = load_json(join(pre, PLANS + ".json"))["configurations"][CFG]["data_identifier"]
    for folds in ([0], [1], [0, 1, 2, 3, 4]):
        cases = pool_cases(pre, data_identifier, folds, splits)
        val = {c for f in folds for c in splits[f]["val"]}
        assert cases and not set(cases) & val
        assert {c for c, s in cases.items() if s == "unlabeled"} == {f"synthu_{i:03d}" for i in range(6)}
        if folds == [0]:
            assert {c for c, s in cases.items() if s == "hidden_label"} == set(splits[0]["unlabeled"])
    assert set(pool_cases(pre, data_identifier, ["all"], splits)) == {f"synthu_{i:03d}" for i in range(6)}


def _fake_store(tag="teacher__p__c__fold_0", labels=None, confidence=0.95, training_cases=None,
                fingerprint=None, complete=True):
    """A store for fold 0's pool of the 3d_fullres CPU plans written directly: ``labels(case, shape)`` gives each
    case's pseudo-label (default: a per-case random map of 0..2), confidence constant."""
    pre = join(os.environ["nnUNet_preprocessed"], DATASET)
    plans = load_json(join(pre, PLANS + ".json"))
    cfg = plans["configurations"][CFG]
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    pool = find_unlabeled_pool(pre, plans, cfg, CFG, 0, infer_dataset_class(join(pre, cfg["data_identifier"])))
    if training_cases is None:  # what a teacher of fold 0 trained on
        training_cases = load_json(join(pre, "splits_final.json"))[0]["train"]
    store = PseudoLabelStore(join(stores_folder(pre, cfg["data_identifier"]), tag))
    store.start({"dataset_name": DATASET, "data_identifier": cfg["data_identifier"], "configuration": CFG,
                 "preprocessing_fingerprint": fingerprint or preprocessing_fingerprint(plans, cfg),
                 "teacher": {"trainer": "T", "plans": PLANS, "configuration": CFG, "folds": [0],
                             "checkpoint": "checkpoint_final.pth", "model_folder": "/x", "mirroring": True,
                             "training_cases": {"0": list(training_cases)}, "training_seconds": {"0": 12.0}},
                 "expected_cases": {c: "unlabeled" for c in pool.identifiers}})
    for i, case in enumerate(pool.identifiers):
        shape = np.asarray(pool.load_case(case)[1]).shape[1:]
        pl = labels(case, shape) if labels else np.random.default_rng(i).integers(0, 3, shape)
        store.write_case(case, pl, np.full(shape, confidence, np.float32), "unlabeled")
    if complete:
        store.finish()
    return store


def _losses(trainer):
    """compute_loss and the pseudo-labeled term on one fixed labeled and unlabeled batch (same seeds each call)."""
    torch.manual_seed(1)
    np.random.seed(1)
    batch = next(trainer.dataloader_train)
    torch.manual_seed(2)
    np.random.seed(2)
    data_u = next(trainer.dataloader_unlabeled)["data"]
    with torch.no_grad():
        total, log = trainer.compute_loss(batch["data"], batch["target"], data_u)
    return float(total), float(log["unsup_loss"]), float(log["pseudo_label_kept_fraction"])


def test_loss_follows_stored_pseudo_labels_and_confidence_mask(workspace):
    store = _fake_store()
    t = started(make_trainer(nnSSL_SelfTrainingTrainer, plans_name=PLANS, epochs=1, iters=1))
    assert t.pseudo_label_identity["tag"] == store.tag
    assert t.pseudo_label_identity["cost"]["teacher_training_seconds"] == 12.0
    batch = next(t.dataloader_unlabeled)
    assert batch["target"].shape == (batch["data"].shape[0], 2, *batch["data"].shape[2:])
    assert torch.equal(batch["meta"][0]["pseudo_label"], batch["target"][0, 0])
    assert set(torch.unique(batch["target"][:, 1]).tolist()) <= {0, 19}  # 0.95 -> level 19; 0 = padding
    total_a, unsup_a, kept_a = _losses(t)
    assert unsup_a > 0 and kept_a > 0.5
    # other stored labels, same confidence: the term and the total change
    _fake_store(labels=lambda case, shape: np.ones(shape, np.int16))
    total_b, unsup_b, _ = _losses(t)
    assert abs(unsup_b - unsup_a) > 1e-3 and abs(total_b - total_a) > 1e-4
    # every voxel under the threshold: labels no longer matter, the term is 0
    _fake_store(confidence=0.5)
    total_c, unsup_c, kept_c = _losses(t)
    _fake_store(labels=lambda case, shape: np.ones(shape, np.int16), confidence=0.5)
    total_d, unsup_d, _ = _losses(t)
    assert kept_c == 0 and unsup_c == 0 and unsup_d == 0 and total_c == pytest.approx(total_d, abs=1e-6)
    t.pseudo_label_threshold = 0.4  # the threshold is the attribute's
    assert _losses(t)[1] > 0
    assert t.ssl_extra_state()["pseudo_labels"]["folder"] == store.folder


def test_refuses_missing_leaky_stale_and_incomplete_pseudo_labels(workspace):
    def refusal():
        with pytest.raises(RuntimeError) as e:
            started(make_trainer(nnSSL_SelfTrainingTrainer, plans_name=PLANS, epochs=1, iters=1))
        return str(e.value)

    msg = refusal()
    assert "no pseudo-labels" in msg and "nnssl_pseudolabel -d" in msg and f"-c {CFG} -f 0" in msg
    splits = load_json(join(os.environ["nnUNet_preprocessed"], DATASET, "splits_final.json"))
    leaky = _fake_store(training_cases=[splits[0]["val"][0]])
    msg = refusal()
    assert leaky.tag in msg and "validation" in msg and splits[0]["val"][0] in msg and "nnssl_pseudolabel" in msg
    import shutil
    shutil.rmtree(leaky.folder)
    stale = _fake_store(fingerprint="0123456789abcdef")
    assert "other preprocessing" in refusal()
    shutil.rmtree(stale.folder)
    _fake_store(complete=False)
    msg = refusal()
    assert "incomplete" in msg and "rerun" in msg


def test_pool_reads_stored_pseudo_labels_as_memory_maps_and_crops_them_unchanged(workspace):
    """The pool opens the stored files as memory maps (a large 3D store is not read whole into memory first) and
    nnU-Net's cropping (no augmentation here) still yields exactly the stored values: pseudo-label (-1 outside the
    preprocessed crop mask and in padding) and confidence levels, at the crop the loader reports."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    store = _fake_store()
    # other confidences per voxel than _fake_store's constant, so the levels channel is checked too
    for i, case in enumerate(store.manifest["cases"]):
        pl = np.load(case_files(store.folder, case)[0])
        store.write_case(case, pl, np.random.default_rng(i).uniform(0.3, 1.0, pl.shape), "unlabeled")
    pre = join(os.environ["nnUNet_preprocessed"], DATASET)
    plans = load_json(join(pre, PLANS + ".json"))
    cfg = plans["configurations"][CFG]
    pool = find_unlabeled_pool(pre, plans, cfg, CFG, 0, infer_dataset_class(join(pre, cfg["data_identifier"])))
    reads = []
    eager_load_case = store.load_case

    def recording_load_case(case, mmap=False):
        reads.append(eager_load_case(case, mmap=mmap))
        return reads[-1]

    store.load_case = recording_load_case
    patch = [max(4, s // 2) for s in cfg["patch_size"]]  # smaller than the images: crops at varying places
    loader = UnlabeledDataLoader(PseudoLabeledPool(pool, store), 4, patch, patch,
                                 PlansManager(plans).get_label_manager(load_json(join(pre, "dataset.json"))))
    np.random.seed(0)
    batch = next(loader)
    assert reads and all(isinstance(a, np.memmap) for pair in reads for a in pair)
    for j, meta in enumerate(batch["meta"]):
        seg = np.asarray(pool.load_case(meta["case"])[1])[0]
        pl, conf = (np.load(f) for f in case_files(store.folder, meta["case"]))  # read whole, no memory map
        full = np.stack([np.where(seg < 0, -1, pl), confidence_levels(conf)]).astype(np.int16)
        start = meta["crop_start"]
        pad = [(max(0, -s), max(0, s + p - n)) for s, p, n in zip(start, patch, full.shape[1:])]
        padded = np.pad(full, [(0, 0)] + pad, constant_values=-1)
        expected = padded[(slice(None),) + tuple(slice(s + b, s + b + p) for s, (b, _), p in zip(start, pad, patch))]
        assert np.array_equal(batch["target"][j].numpy(), expected), meta["case"]
        assert torch.equal(meta["pseudo_label"], batch["target"][j, 0])
