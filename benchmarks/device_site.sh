#!/usr/bin/env bash
# Pack nnU-Net and the other packages that the lent GPU machine lacks into .device_site/site312.tar.xz.
#
# That machine (this workplace's device tool, nvidia-h200) has Python 3.12 with torch, numpy, scipy,
# scikit-image, timm, pandas, ... but not nnU-Net and its own dependencies, and it cannot download. This script,
# run here (where pip reaches PyPI), fetches CPython 3.12 manylinux wheels of exactly those (building the
# pure-Python ones that PyPI ships as sources only), installs them into a folder and packs it with xz (SimpleITK
# alone is a 53 MB wheel; the whole tar.xz is about 41 MB, within the 64 MiB a device call carries).
#
#     bash benchmarks/device_site.sh        # once per session (about 5 minutes on 2 cores, mostly xz)
#
# then one device call (run tool, carry [".device_site"], timeout_s 600):
#
#     mkdir -p /tmp/site && tar -xJf .device_site/site312.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site &&
#     PYTHONUNBUFFERED=1 python3 benchmarks/cuda_check.py --out $OUT 2>&1 | tail -n 60
#
# nnssl itself runs from the carried working tree (cuda_check.py puts it on PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.device_site
rm -rf "$dest" && mkdir -p "$dest/wheels"

platforms=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# binary wheels on PyPI (versions as tested here with nnunetv2 2.8.1)
python3 -m pip download -q --no-deps --only-binary=:all: "${platforms[@]}" -d "$dest/wheels" \
    dynamic-network-architectures==0.4.4 batchgeneratorsv2==0.3.6 blosc2==4.14.1 ndindex numexpr pydantic \
    pydantic-core annotated-types typing-inspection SimpleITK==2.5.7 nibabel==5.4.2 connected-components-3d==4.1.1 \
    segmentation-models-pytorch==0.6.0 future linecache2 traceback2
# source-only packages, all pure Python: build their wheels here
python3 -m pip wheel -q --no-deps -w "$dest/wheels" nnunetv2==2.8.1 acvl-utils==0.2.6 batchgenerators==0.25.5 \
    unittest2 yacs
python3 -m pip install -q --no-deps --no-compile --only-binary=:all: "${platforms[@]}" --target "$dest/site" \
    "$dest"/wheels/*.whl
tar -cJf "$dest/site312.tar.xz" -C "$dest/site" .
rm -rf "$dest/site" "$dest/wheels"
ls -la "$dest"
