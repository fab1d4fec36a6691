"""The folder that ``nnUNet_extTrainer`` points at (see ``nnssl_trainer_path``).

nnU-Net imports every module of this folder as a top-level module and removes them from ``sys.modules``
afterwards, so the folder holds only a uniquely named module of re-exports; the classes themselves live in
``nnssl.trainers`` and keep their canonical module names.
"""

import os

EXT_TRAINER_DIR = os.path.dirname(os.path.abspath(__file__))
