#!/usr/bin/env bash
# Wheels the project's device check needs on a bare GPU machine (no network) beyond the shared
# ones (deepspeed, faiss, nvtx, pydantic, hjson): PyYAML for the run configs, pytest for the
# kernel and GPU tests, setuptools and wheel to build the extension. Run from the repository root on a machine with network, after the shared
# wheel script; they land in the same git-ignored .whl/ and its install line installs them too.
# matplotlib and TensorBoard stay optional there: without them a run skips curves.png and the
# TensorBoard events, with a warning.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl pyyaml pytest pluggy iniconfig packaging setuptools wheel
ls .whl
