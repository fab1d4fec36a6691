"""``nnssl_trainer_path``: print the line that makes the stock nnU-Net commands find nnssl's trainers, or check
(``--check``) that ``nnUNet_extTrainer`` already does.

nnU-Net itself cannot tell a missing or stale ``nnUNet_extTrainer`` from a misspelled trainer: both end in its
"Could not find requested nnunet trainer". ``--check`` names the problem (unset, or no folder holding nnssl's
exports module: a folder that does not exist, e.g. after moving or recreating a virtual environment, or only
folders of other trainers) and prints the export line that fixes it.
"""

from __future__ import annotations

import argparse
import os
import shlex
from typing import Optional, Sequence

from nnssl.nnunet_ext import EXT_TRAINER_DIR

EXPORTS_MODULE = "nnssl_trainer_exports.py"  # the module nnU-Net imports from EXT_TRAINER_DIR


def ext_trainer_value(current: Optional[str]) -> str:
    """``nnUNet_extTrainer`` with nnssl's folder first and the user's other folders kept."""
    others = [p for p in (current or "").split(os.pathsep) if p and os.path.abspath(p) != EXT_TRAINER_DIR]
    return os.pathsep.join([EXT_TRAINER_DIR] + others)


def export_line(value: str) -> str:
    """The shell line that sets ``nnUNet_extTrainer`` to ``value``."""
    return f"export nnUNet_extTrainer={shlex.quote(value)}"


def ext_trainer_problem(current: Optional[str]) -> Optional[str]:
    """What keeps ``current`` (a value of ``nnUNet_extTrainer``) from making nnU-Net find nnssl's trainers (no
    folder in it holds nnssl's exports module), with the export line that fixes it (folders that do not exist
    dropped, the user's other folders kept); None when it works."""
    folders = [p for p in (current or "").split(os.pathsep) if p.strip()]
    if any(os.path.isfile(os.path.join(p, EXPORTS_MODULE)) for p in folders):
        return None
    if not folders:
        problem = "nnUNet_extTrainer is not set"
    else:
        reasons = [f"{p} does not exist" if not os.path.isdir(p) else f"{p} holds no {EXPORTS_MODULE}"
                   for p in folders]
        problem = f"nnUNet_extTrainer has no folder with nnssl's {EXPORTS_MODULE} ({'; '.join(reasons)})"
    fixed = ext_trainer_value(os.pathsep.join(p for p in folders if os.path.isdir(p)))
    return f"{problem}, so nnUNetv2_train and nnUNetv2_predict cannot find the nnSSL_* trainers; fix: " \
           f"{export_line(fixed)}"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnssl_trainer_path",
        description="Print the export line for your shell profile so that nnUNetv2_train and nnUNetv2_predict "
                    "find the nnSSL_* trainers (nnU-Net's nnUNet_extTrainer mechanism). Usage: "
                    "eval \"$(nnssl_trainer_path)\", or add its output to ~/.bashrc.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--path", action="store_true", help="print only the folder")
    group.add_argument("--check", action="store_true",
                       help="check that the current nnUNet_extTrainer finds nnssl's trainers; if it does not "
                            "(unset, stale), say why and print the export line that fixes it (exit code 1)")
    args = parser.parse_args(argv)
    current = os.environ.get("nnUNet_extTrainer")
    if args.path:
        print(EXT_TRAINER_DIR)
    elif args.check:
        problem = ext_trainer_problem(current)
        if problem is not None:
            raise SystemExit(f"nnssl_trainer_path: {problem}")
        print(f"nnUNet_extTrainer finds nnssl's trainers: {current}")
    else:
        print(export_line(ext_trainer_value(current)))


if __name__ == "__main__":
    main()
