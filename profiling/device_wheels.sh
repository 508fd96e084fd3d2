#!/usr/bin/env bash
# Wheels the project's device check may need on a bare GPU machine (no network) beyond the shared
# ones (deepspeed, faiss, nvtx, pydantic, hjson): PyYAML for the run configs, pytest for the kernel
# and GPU tests, setuptools and wheel to build the extension, and what DeepSpeed imports beyond
# its listed shared wheels (py-cpuinfo, msgpack, einops, nvidia-ml-py). Run from the repository
# root on a machine with network, after the shared wheel script. They land in .whl/fallback/, out
# of reach of the shared install line (which installs .whl/*.whl onto PYTHONPATH, where a carried
# pytest would shadow the machine's own): the check's install step installs from there only what
# does not import already (profiling/gpu_check.sh, install_missing).
# matplotlib and TensorBoard stay optional there: without them a run skips curves.png and the
# TensorBoard events, with a warning.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl/fallback
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl/fallback pyyaml pytest pluggy iniconfig packaging pygments setuptools wheel py-cpuinfo msgpack einops nvidia-ml-py
ls .whl/fallback
