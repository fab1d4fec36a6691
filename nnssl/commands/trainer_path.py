"""``nnssl_trainer_path``: print the line that makes the stock nnU-Net commands find nnssl's trainers."""

from __future__ import annotations

import argparse
import os
import shlex
from typing import Optional, Sequence

from nnssl.nnunet_ext import EXT_TRAINER_DIR


def ext_trainer_value(current: Optional[str]) -> str:
    """``nnUNet_extTrainer`` with nnssl's folder first and the user's other folders kept."""
    others = [p for p in (current or "").split(os.pathsep) if p and os.path.abspath(p) != EXT_TRAINER_DIR]
    return os.pathsep.join([EXT_TRAINER_DIR] + others)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnssl_trainer_path",
        description="Print the export line for your shell profile so that nnUNetv2_train and nnUNetv2_predict "
                    "find the nnSSL_* trainers (nnU-Net's nnUNet_extTrainer mechanism). Usage: "
                    "eval \"$(nnssl_trainer_path)\", or add its output to ~/.bashrc.")
    parser.add_argument("--path", action="store_true", help="print only the folder")
    args = parser.parse_args(argv)
    if args.path:
        print(EXT_TRAINER_DIR)
    else:
        print(f"export nnUNet_extTrainer={shlex.quote(ext_trainer_value(os.environ.get('nnUNet_extTrainer')))}")


if __name__ == "__main__":
    main()
