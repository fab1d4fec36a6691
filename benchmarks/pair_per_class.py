"""Per-class Dice of each network of a trained network pair (MEDL, CAD) and of the deployed pair, on the fold's
validation cases, at the preprocessed grid (whole images, no sliding window, no test-time mirroring); 3d or 2d (a
volume's slices as one batch, Dice per volume).

    python benchmarks/pair_per_class.py RESULTS_FOLD_DIR --preprocessed DIR [--cases 12]

RESULTS_FOLD_DIR is a finished training's ``fold_X`` folder (its checkpoint holds the plans and dataset.json);
``--preprocessed`` is the dataset's nnU-Net preprocessed folder
(``$nnUNet_preprocessed/DatasetXXX_Name``, with ``splits_final.json``). The online validation logs each
network's pseudo-Dice averaged over classes only; this says which class a network missed. Validation cases only:
nothing here reads test data.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch


def dice(pred: np.ndarray, target: np.ndarray, c: int) -> float:
    a, b = pred == c, target == c
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("fold_dir")
    p.add_argument("--preprocessed", required=True)
    p.add_argument("--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--cases", type=int, default=12, help="first N validation cases of the fold (default 12)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    import nnssl.trainers

    ck = torch.load(os.path.join(args.fold_dir, args.checkpoint), map_location="cpu", weights_only=False)
    trainer_name, cfg, fold = ck["trainer_name"], ck["init_args"]["configuration"], ck["init_args"]["fold"]
    trainer = recursive_find_python_class(os.path.dirname(nnssl.trainers.__file__), trainer_name, "nnssl.trainers")
    if trainer is None:
        raise SystemExit(f"{trainer_name} is not an nnssl trainer")
    pm = PlansManager(ck["init_args"]["plans"])
    cm = pm.get_configuration(cfg)
    labels = [int(v) for k, v in ck["init_args"]["dataset_json"]["labels"].items() if k != "background"]
    net = trainer.build_network_architecture(pm, cm, 1, len(labels) + 1, False)
    net.load_state_dict(ck["network_weights"])
    net.eval()
    if not hasattr(net, "both_outputs"):
        raise SystemExit(f"{trainer_name} does not deploy a network pair")
    val = json.load(open(os.path.join(args.preprocessed, "splits_final.json")))[fold]["val"][:args.cases]
    folder = os.path.join(args.preprocessed, cm.data_identifier)
    ds = infer_dataset_class(folder)(folder, val)
    from nnssl.losses.evidential import expected_log_probs  # MEDL's evidential heads; plain softmax otherwise
    evidential = trainer_name.startswith("nnSSL_MEDL")
    res = {"net_a": [], "net_b": [], "pair": []}
    strides = np.prod(np.array(cm.pool_op_kernel_sizes), axis=0)
    for k in val:
        x, seg, *_ = ds.load_case(k)
        x = torch.from_numpy(np.asarray(x)).float()
        # 3d: one volume as a batch of 1; 2d: the volume's slices as the batch (Dice stays per volume, as evaluated)
        x = x[None] if len(cm.patch_size) == 3 else x.transpose(0, 1)
        t = np.asarray(seg)[0]
        pad = [(-s) % int(st) for s, st in zip(x.shape[2:], strides)]
        xp = torch.nn.functional.pad(x, sum([[0, q] for q in reversed(pad)], []))
        with torch.no_grad():
            pair_out = net(xp)
            with net.both_outputs():
                oa, ob = net(xp)
        crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in x.shape[2:])
        for name, o in (("net_a", expected_log_probs(oa[crop]) if evidential else oa[crop]),
                        ("net_b", expected_log_probs(ob[crop]) if evidential else ob[crop]),
                        ("pair", pair_out[crop])):
            pred = o.argmax(1).numpy()
            pred = pred[0] if len(cm.patch_size) == 3 else pred
            res[name].append([dice(pred, t, c) for c in labels] + [float((pred == c).mean()) for c in labels])
    n = len(labels)
    print(f"{trainer_name}, {args.checkpoint}, {len(val)} validation cases of fold {fold}; classes {labels}")
    for name, v in res.items():
        v = np.array(v)
        print(f"{name:6s} Dice per class {np.round(v[:, :n].mean(0), 3).tolist()}  predicted voxel fraction "
              f"{np.round(v[:, n:].mean(0), 4).tolist()}")


if __name__ == "__main__":
    main()
