#!/usr/bin/env bash
# Install torch-cluster (the optional FPS/kNN backend of benchsuite's "pointcloud" extra),
# compiled against the torch that is already installed.
#
# Why a script: PyPI ships torch-cluster only as a source distribution whose setup.py imports
# torch, so a plain `pip install torch-cluster` fails in pip's isolated build environment (or
# would build against a different torch), and a wheel built for another torch release fails at
# import (C++ ABI). benchsuite.pointcloud works without it (pure-torch FPS/kNN).
#
#   - The source build takes about 11 minutes on 2 cores (CPU kernels only); CUDA kernels add
#     much more.
#   - When a prebuilt wheel for this torch exists, installing it is instant:
#         pip install --find-links ../shared/wheels torch-cluster
#     This script tries the wheels folder first (WHEELS, below) when that folder exists, keeps
#     the wheel only if it imports with the installed torch, and builds from source otherwise.
#     Without the folder it goes straight to the source build.
#
# Usage: scripts/build_torch_cluster.sh [--dry-run]
#   --dry-run   print what would run, change nothing
#
# Environment (all optional):
#   PYTHON                 interpreter whose environment gets torch-cluster (default: python)
#   TORCH_CLUSTER_VERSION  version to install (default: 1.6.3)
#   WHEELS                 prebuilt wheels folder (default: <repo>/../shared/wheels)
#   MAX_JOBS               parallel compile jobs (default: CPU cores, at most one per 2 GiB of
#                          available memory). torch-cluster 1.6.3 turns ninja off, so MAX_JOBS is
#                          also passed to setuptools' parallel build_ext (CPU-only builds; a CUDA
#                          build compiles serially because torch switches compilers per file).
#   FORCE_CUDA             1: build the CUDA kernels too; 0: CPU kernels only. Default: 1 when
#                          torch has CUDA, sees a GPU and nvcc is found, else 0.
#   TORCH_CUDA_ARCH_LIST   GPU architectures of a CUDA build (torch's default: the visible GPUs)
set -euo pipefail

PYTHON="${PYTHON:-python}"
VERSION="${TORCH_CLUSTER_VERSION:-1.6.3}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${WHEELS:-$REPO_ROOT/../shared/wheels}"
# shellcheck source=scripts/compiled_extra.sh
source "$REPO_ROOT/scripts/compiled_extra.sh"

imports_ok() {
    # The compiled ops must load with *this* torch; a mismatched wheel fails here.
    "$PYTHON" -c "import torch, torch_cluster; torch.ops.torch_cluster.fps" >/dev/null 2>&1
}

parse_args "$@"
require_torch
echo "torch-cluster $VERSION for torch $TORCH_VERSION ($PYTHON)"

# 1. A prebuilt wheel, when a wheels folder holds one.
if try_prebuilt_wheel "torch_cluster-$VERSION-*.whl" torch-cluster; then
    exit 0
fi

# 2. The source build, without build isolation so that setup.py sees the installed torch.
if ! "$PYTHON" -c "import setuptools, wheel" >/dev/null 2>&1; then
    echo "error: the source build needs setuptools and wheel in this environment (pip install setuptools wheel)" >&2
    exit 1
fi

default_max_jobs
default_force_cuda
if [ "$FORCE_CUDA" = 1 ]; then
    unset FORCE_ONLY_CPU
    echo "building CPU and CUDA kernels (MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-visible GPUs})"
else
    export FORCE_ONLY_CPU=1  # setup.py's switch; FORCE_CUDA=0 alone does not stop a CUDA build on a GPU machine
    # Parallel build_ext through an extra setuptools config file (DIST_EXTRA_CONFIG).
    PARALLEL_CFG="$(mktemp "${TMPDIR:-/tmp}/torch-cluster-build.XXXXXX.cfg")"
    trap 'rm -f "$PARALLEL_CFG"' EXIT
    printf '[build_ext]\nparallel = %s\n' "$MAX_JOBS" >"$PARALLEL_CFG"
    export DIST_EXTRA_CONFIG="$PARALLEL_CFG"
    echo "building CPU kernels with $MAX_JOBS parallel job(s); about 11 minutes on 2 cores"
fi

# --no-binary: always compile; --no-cache-dir: never reuse a wheel pip cached for another torch.
run "$PYTHON" -m pip install --no-build-isolation --no-binary torch-cluster --no-cache-dir "torch-cluster==$VERSION"

if [ "$DRY_RUN" = 0 ]; then
    if ! imports_ok; then
        echo "error: torch-cluster was built but does not load with torch $TORCH_VERSION" >&2
        exit 1
    fi
    "$PYTHON" -c "import torch, torch_cluster; cuda = torch.ops.torch_cluster.cuda_version(); print('torch-cluster', torch_cluster.__version__, 'installed', '(CUDA kernels)' if cuda > 0 else '(CPU kernels)')"
fi
