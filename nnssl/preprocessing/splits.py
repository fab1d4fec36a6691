"""``nnssl_make_split``: semi-supervised splits in nnU-Net's ``splits_final.json``.

Each fold is nnU-Net's ``{"train": [...], "val": [...]}`` plus ``"unlabeled": [...]``:

- ``val``: validation cases (labels used for nnU-Net's validation only). Without ``--val`` the folds are a
  K-fold partition (every case is validated exactly once, as nnU-Net's own split); with ``--val`` each fold
  draws its own seeded validation set of that size; with ``--val-cases`` every fold validates the listed cases.
- ``train``: the labeled cases, ``--labeled`` of the fold's remaining cases (N cases or P percent), or the fixed
  list of ``--labeled-cases`` (e.g. a paper's labeled patients).
- ``unlabeled``: the remaining training cases, whose labels nnssl trainers never use. Never a validation case.

Stock nnU-Net trainers read only ``train``/``val``, so ``nnUNetTrainer`` on this file is the labeled-only
baseline on exactly the same split. Cases listed with ``--exclude`` (e.g. a held-out test list) appear nowhere.
Groups (``--group-regex``) keep related cases (e.g. several images of one patient) on one side of every split.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnssl.utils import UserInputError, atomic_write_json, dataset_name, require_env, run_command


def parse_amount(text: str, what: str) -> tuple:
    """Parse ``"N"`` (a count) or ``"P%"`` (a percentage) into ``("count", N)`` or ``("percent", P)``."""
    text = str(text).strip()
    try:
        if text.endswith("%"):
            value = float(text[:-1])
            if not 0 < value <= 100:
                raise ValueError
            return "percent", value
        value = int(text)
        if value < 0:
            raise ValueError
        return "count", value
    except ValueError:
        raise UserInputError(f"{what} must be a number of cases (e.g. 8) or a percentage (e.g. 10%), "
                             f"got {text!r}") from None


def resolve_amount(amount: tuple, n: int) -> int:
    """Number of cases for ``amount`` out of ``n``: a count as is, a percentage rounded (at least 1)."""
    kind, value = amount
    if kind == "count":
        return int(value)
    return max(1, int(round(value / 100.0 * n)))


def _groups(cases: Sequence[str], group_regex: Optional[str]) -> Dict[str, List[str]]:
    groups: Dict[str, List[str]] = {}
    rx = re.compile(group_regex) if group_regex else None
    for c in cases:
        key = c
        if rx is not None:
            m = rx.search(c)
            if m is None:
                raise UserInputError(f"--group-regex {group_regex!r} does not match case {c}")
            key = m.group(1) if m.groups() else m.group(0)
        groups.setdefault(key, []).append(c)
    return groups


def _take(groups: Dict[str, List[str]], order: Sequence[str], n_cases: int) -> List[str]:
    """Take whole groups in ``order`` until at least ``n_cases`` cases are taken."""
    taken: List[str] = []
    count = 0
    for g in order:
        if count >= n_cases:
            break
        taken.append(g)
        count += len(groups[g])
    return taken


def _named_groups(names: Sequence[str], groups: Dict[str, List[str]], option: str) -> List[str]:
    """The groups that ``names`` (case ids or group names) denote, in order; a name that is neither is an error."""
    of_case = {c: g for g, cs in groups.items() for c in cs}
    out: List[str] = []
    unknown = []
    for n in names:
        g = n if n in groups else of_case.get(n)
        if g is None:
            unknown.append(n)
        elif g not in out:
            out.append(g)
    if unknown:
        raise UserInputError(f"{option} names {len(unknown)} case(s) or group(s) that are not among the dataset's "
                             f"usable cases (excluded cases do not count): {', '.join(unknown[:5])}"
                             + (f" ... ({len(unknown)} in all)" if len(unknown) > 5 else "")
                             + "; check the names against labelsTr (without the file ending) or the --group-regex "
                               "groups")
    return out


def make_semi_supervised_splits(cases: Sequence[str], labeled: Optional[str], val: Optional[str] = None,
                                folds: int = 5, seed: int = 12345, exclude: Sequence[str] = (),
                                group_regex: Optional[str] = None, labeled_cases: Optional[Sequence[str]] = None,
                                val_cases: Optional[Sequence[str]] = None) -> List[dict]:
    """Build the folds (pure: same inputs and seed, same output).

    Args:
        cases: all labeled case ids of the dataset.
        labeled: ``"N"`` or ``"P%"``; the percentage is of the fold's training pool (cases not in val). None when
            ``labeled_cases`` is given.
        val: ``"N"`` or ``"P%"`` per fold; ``None`` for a K-fold partition.
        folds: number of folds K.
        seed: RNG seed.
        exclude: case ids that must appear in no list (e.g. a test set).
        group_regex: regular expression whose first group (or whole match) names a case's group; a group is
            never split across train/val/unlabeled.
        labeled_cases: the labeled cases of every fold, as case ids or group names (a group name takes all of
            its cases, e.g. both frames of a patient); replaces ``labeled``. A fold whose validation cases would
            include one is an error.
        val_cases: the validation cases of every fold (case ids or group names); replaces ``val``. Every fold is
            then the same split (several folds serve as training seeds).

    Returns:
        A list of K dicts with sorted ``train``, ``val`` and ``unlabeled`` lists.

    Raises:
        UserInputError: impossible requests (more labeled cases than exist, too few cases for K folds, ...).
    """
    unknown = sorted(set(exclude) - set(cases))
    if unknown:
        raise UserInputError(f"--exclude names {len(unknown)} case(s) that are not in the dataset: "
                             f"{', '.join(unknown[:5])}")
    pool = sorted(set(cases) - set(exclude))
    groups = _groups(pool, group_regex)
    names = sorted(groups)
    if folds < 1:
        raise UserInputError("--folds must be at least 1")
    if val is None and val_cases is None and folds < 2:
        raise UserInputError("a K-fold partition needs --folds >= 2 (or give --val or --val-cases)")
    if len(names) < folds:
        raise UserInputError(f"{len(names)} case group(s) cannot make {folds} folds")
    if (labeled is None) == (labeled_cases is None):
        raise UserInputError("give either --labeled (an amount) or --labeled-cases (a list of cases), not "
                             + ("both" if labeled is not None else "neither"))
    if val is not None and val_cases is not None:
        raise UserInputError("give either --val (an amount) or --val-cases (a list of cases), not both")
    fixed_lab = _named_groups(labeled_cases, groups, "--labeled-cases") if labeled_cases is not None else None
    fixed_val = _named_groups(val_cases, groups, "--val-cases") if val_cases is not None else None
    if fixed_lab is not None and not fixed_lab:
        raise UserInputError("--labeled-cases lists no case: at least one labeled case is needed")
    if fixed_val is not None and not fixed_val:
        raise UserInputError("--val-cases lists no case: give at least one validation case, or leave the option "
                             "out for a K-fold partition")
    if fixed_lab is not None and fixed_val is not None:
        both = sorted(set(fixed_lab) & set(fixed_val))
        if both:
            raise UserInputError(f"{len(both)} case(s) or group(s) are in both --labeled-cases and --val-cases: "
                                 f"{', '.join(both[:5])}; a validation case must never be a training case")
    lab_amount = parse_amount(labeled, "--labeled") if fixed_lab is None else None
    val_amount = parse_amount(val, "--val") if val is not None else None
    rng = np.random.RandomState(seed)

    if fixed_val is not None:
        val_groups = [list(fixed_val) for _ in range(folds)]
    elif val_amount is None:
        # a K-fold partition; fixed labeled cases are never validated, so only the other groups are partitioned
        candidates = [g for g in names if fixed_lab is None or g not in set(fixed_lab)]
        if len(candidates) < folds:
            raise UserInputError(f"{len(candidates)} case group(s) outside --labeled-cases cannot make {folds} "
                                 f"validation folds")
        perm = list(rng.permutation(candidates))
        val_groups = [perm[k::folds] for k in range(folds)]
    else:
        val_groups = []
        for _ in range(folds):
            perm = list(rng.permutation([g for g in names if fixed_lab is None or g not in set(fixed_lab)]))
            n_val = resolve_amount(val_amount, len(pool))
            val_groups.append(_take(groups, perm, n_val))

    splits = []
    for k in range(folds):
        fold_val = sorted(c for g in val_groups[k] for c in groups[g])
        rest_groups = [g for g in names if g not in set(val_groups[k])]
        if fixed_lab is not None:
            train = sorted(c for g in fixed_lab for c in groups[g])
            unlabeled = sorted(c for g in rest_groups if g not in set(fixed_lab) for c in groups[g])
            splits.append({"train": train, "val": fold_val, "unlabeled": unlabeled})
            continue
        n_rest = sum(len(groups[g]) for g in rest_groups)
        n_lab = resolve_amount(lab_amount, n_rest)
        if n_lab > n_rest:
            raise UserInputError(f"fold {k}: asked for {n_lab} labeled cases but only {n_rest} training cases "
                                 f"remain after taking {len(fold_val)} validation cases")
        if n_lab < 1:
            raise UserInputError("--labeled must give at least one labeled case")
        order = list(rng.permutation(rest_groups))
        lab_groups = _take(groups, order, n_lab)
        train = sorted(c for g in lab_groups for c in groups[g])
        unlabeled = sorted(c for g in rest_groups if g not in set(lab_groups) for c in groups[g])
        splits.append({"train": train, "val": fold_val, "unlabeled": unlabeled})
    return splits


def labeled_case_ids(dataset: str) -> List[str]:
    """All labeled case ids of a dataset: nnU-Net's preprocessed ``gt_segmentations`` or the raw dataset."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    base = os.path.join(require_env("nnUNet_preprocessed"), dataset)
    dj_file = os.path.join(base, "dataset.json")
    gt = os.path.join(base, "gt_segmentations")
    if os.path.isfile(dj_file) and os.path.isdir(gt):
        ending = load_json(dj_file)["file_ending"]
        ids = sorted(f[:-len(ending)] for f in os.listdir(gt) if f.endswith(ending))
        if ids:
            return ids
    raw = os.environ.get("nnUNet_raw")
    if raw and os.path.isfile(os.path.join(raw, dataset, "dataset.json")):
        return sorted(get_filenames_of_train_images_and_targets(os.path.join(raw, dataset)).keys())
    raise UserInputError(f"no labeled cases found for {dataset}: run nnUNetv2_plan_and_preprocess -d {dataset} first")


def read_case_list(path: str) -> List[str]:
    """Case ids from a text file (one per line, ``#`` comments) or a JSON list."""
    if not os.path.isfile(path):
        raise UserInputError(f"case list {path} does not exist")
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        import json
        return [str(c) for c in json.loads(text)]
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def write_splits(dataset: str | int, labeled: Optional[str], val: Optional[str] = None, folds: Optional[int] = None,
                 seed: int = 12345, exclude_file: Optional[str] = None, group_regex: Optional[str] = None,
                 force: bool = False, labeled_cases_file: Optional[str] = None,
                 val_cases_file: Optional[str] = None) -> str:
    """Make the splits of a dataset and write ``$nnUNet_preprocessed/DatasetXXX/splits_final.json``.

    ``folds`` defaults to 5, or to 1 with ``val_cases_file`` (every fold would be the same split; more folds serve
    as training seeds). An existing file is kept unless ``force``; when forced, it is first copied to
    ``splits_final.json.bak_<timestamp>``.

    Returns:
        The path written.
    """
    name = dataset_name(dataset)
    out = os.path.join(require_env("nnUNet_preprocessed"), name, "splits_final.json")
    if os.path.isfile(out) and not force:
        raise UserInputError(f"{out} exists; nnU-Net trainings may depend on it. Use --force to replace it "
                             f"(a backup is kept)")
    if folds is None:
        folds = 1 if val_cases_file else 5
    exclude = read_case_list(exclude_file) if exclude_file else []
    labeled_cases = read_case_list(labeled_cases_file) if labeled_cases_file else None
    val_cases = read_case_list(val_cases_file) if val_cases_file else None
    splits = make_semi_supervised_splits(labeled_case_ids(name), labeled, val, folds, seed, exclude, group_regex,
                                         labeled_cases, val_cases)
    if os.path.isfile(out):
        backup = f"{out}.bak_{time.strftime('%Y%m%d_%H%M%S')}"
        shutil.copy2(out, backup)
        print(f"kept the previous split as {backup}")
    atomic_write_json(splits, out)
    s = splits[0]
    print(f"wrote {out}: {folds} fold(s); fold 0 has {len(s['train'])} labeled, {len(s['unlabeled'])} unlabeled "
          f"and {len(s['val'])} validation case(s)" + (f"; {len(exclude)} case(s) excluded" if exclude else ""))
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnssl_make_split",
        description="Write a semi-supervised splits_final.json: per fold 'train' (labeled), 'val' and "
                    "'unlabeled' (training cases whose labels nnssl trainers never use).")
    parser.add_argument("-d", required=True, help="dataset id or name")
    lab = parser.add_mutually_exclusive_group(required=True)
    lab.add_argument("--labeled", default=None,
                     help="labeled cases per fold: a number (8) or a percentage of the fold's training cases (10%%)")
    lab.add_argument("--labeled-cases", default=None, metavar="FILE",
                     help="file listing the labeled cases of every fold (text, one per line, or JSON list); case ids "
                          "or, with --group-regex, group names (e.g. patient038 takes all of its frames)")
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--val", default=None,
                     help="validation cases per fold (number or percentage of all cases); "
                          "default: K-fold partition")
    val.add_argument("--val-cases", default=None, metavar="FILE",
                     help="file listing the validation cases of every fold (case ids or group names); every fold "
                          "is then the same split (default 1 fold)")
    parser.add_argument("--folds", type=int, default=None,
                        help="number of folds (default 5; 1 with --val-cases, where more folds repeat the split, "
                             "e.g. as training seeds)")
    parser.add_argument("--seed", type=int, default=12345, help="random seed (default 12345, nnU-Net's)")
    parser.add_argument("--exclude", default=None,
                        help="file listing cases to leave out of every fold (text, one per line, or JSON list)")
    parser.add_argument("--group-regex", default=None,
                        help="regex whose first group names a case's group (e.g. 'patient(\\d+)_'); groups are "
                             "never split")
    parser.add_argument("--force", action="store_true", help="replace an existing splits_final.json (keeps a backup)")
    args = parser.parse_args(argv)
    run_command(lambda: write_splits(args.d, args.labeled, args.val, args.folds, args.seed, args.exclude,
                                     args.group_regex, args.force, args.labeled_cases, args.val_cases))


if __name__ == "__main__":
    main()
