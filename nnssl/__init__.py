"""nnssl: semi-supervised trainers for nnU-Net v2.

Importing this package does nothing but define the version; everything heavy lives in subpackages.
Not to be confused with MIC-DKFZ's self-supervised framework of the same import name: the two cannot share an
environment.
"""

__version__ = "0.1.0"
