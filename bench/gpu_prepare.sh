#!/usr/bin/env bash
# Here (no GPU), before the one device call of bench/gpu_check.sh: the Python packages the
# device image lacks as wheels in .whl/ (Python 3.12, manylinux x86-64), and NeMo RL's sft.yaml
# in .gpu/ (../shared does not travel). Both folders are ignored by git; the call names them in
# `carry` and starts with:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && bash bench/gpu_check.sh
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
mkdir -p .whl .gpu
cp ../shared/reference/nemo-rl-configs/examples/configs/sft.yaml .gpu/sft.yaml
# What the image lacks (the device README's package list) and what those need that it lacks too.
PACKAGES="grain array-record datasets dill multiprocess ml-collections omegaconf antlr4-python3-runtime \
tensorboardX"
for p in $PACKAGES; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$p"
done
du -sh .whl .gpu
