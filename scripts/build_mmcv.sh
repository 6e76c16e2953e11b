#!/usr/bin/env bash
# Install mmcv with its compiled ops (mmcv.ops, needed by mmdet for benchsuite's "coco" extra),
# compiled against the torch that is already installed. mmdet itself is not installed here: the
# extra (pip install -e ".[coco]") brings it once mmcv is in place.
#
# Why a script: PyPI ships mmcv 2.1.0 only as a source distribution whose setup.py imports
# torch, so a plain `pip install mmcv` fails in pip's isolated build environment (or would build
# against a different torch), and a wheel built for another torch release fails at import
# (C++ ABI). Two more things break the unmodified sdist with this stack, so the script patches
# the unpacked sdist's setup.py before building:
#   - it hard-codes `-std=c++17` (cxx and nvcc), which also stops torch from adding its own
#     standard flag, while torch 2.14's headers require C++20: the patch makes it `-std=c++20`;
#   - it imports pkg_resources, which setuptools 81 and later no longer ship: the patch falls
#     back to importlib.metadata and packaging.
#
#   - The source build takes about 31 minutes on 2 cores (CPU ops only); CUDA ops add much more.
#   - When a prebuilt wheel for this torch exists, installing it is instant:
#         pip install --find-links ../shared/wheels mmcv==2.1.0
#     This script tries the wheels folder first (WHEELS, below) when that folder exists, keeps
#     the wheel only if `import mmcv.ops` works with the installed torch, and builds from source
#     otherwise. Without the folder it goes straight to the source build.
#
# Usage: scripts/build_mmcv.sh [--dry-run]
#   --dry-run   print what would run, change nothing
#
# Environment (all optional):
#   PYTHON                 interpreter whose environment gets mmcv (default: python)
#   MMCV_VERSION           version to install (default: 2.1.0; mmdet 3.3.0 needs >=2.0.0rc4,<2.2.0)
#   WHEELS                 prebuilt wheels folder (default: <repo>/../shared/wheels)
#   MAX_JOBS               parallel compile jobs (ninja) (default: CPU cores, at most one per
#                          2 GiB of available memory)
#   FORCE_CUDA             1: build the CUDA ops too; 0: CPU ops only. Default: 1 when torch has
#                          CUDA, sees a GPU and nvcc is found, else 0.
#   TORCH_CUDA_ARCH_LIST   GPU architectures of a CUDA build (torch's default: the visible GPUs)
#   MMCV_CUDA_ARGS         extra nvcc flags of a CUDA build (read by mmcv's setup.py)
set -euo pipefail

PYTHON="${PYTHON:-python}"
VERSION="${MMCV_VERSION:-2.1.0}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${WHEELS:-$REPO_ROOT/../shared/wheels}"
# shellcheck source=scripts/compiled_extra.sh
source "$REPO_ROOT/scripts/compiled_extra.sh"

imports_ok() {
    # The compiled ops must load with *this* torch; a mismatched wheel (or mmcv-lite) fails here.
    "$PYTHON" -c "import torch, mmcv.ops, mmcv._ext" >/dev/null 2>&1
}

parse_args "$@"
require_torch
echo "mmcv $VERSION for torch $TORCH_VERSION ($PYTHON)"

# 1. A prebuilt wheel, when a wheels folder holds one.
if try_prebuilt_wheel "mmcv-$VERSION-*.whl" mmcv; then
    exit 0
fi

# 2. The source build, without build isolation so that setup.py sees the installed torch.
if ! "$PYTHON" -c "import setuptools, wheel, packaging" >/dev/null 2>&1; then
    echo "error: the source build needs setuptools, wheel and packaging in this environment (pip install setuptools wheel packaging)" >&2
    exit 1
fi
if ! command -v ninja >/dev/null 2>&1; then
    echo "warning: ninja not found; torch compiles the ops serially (pip install ninja for MAX_JOBS)" >&2
fi

default_max_jobs  # mmcv's setup.py only sets its own default (4) when MAX_JOBS is unset
default_force_cuda
export MMCV_WITH_OPS=1  # the full mmcv with mmcv.ops (0 would build "mmcv-lite")
BUILD_ENV=()
if [ "$FORCE_CUDA" = 1 ]; then
    echo "building CPU and CUDA ops (MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-visible GPUs})"
else
    # mmcv's setup.py builds the CUDA ops whenever torch sees a GPU, whatever FORCE_CUDA says:
    # hide the GPUs from the build so that FORCE_CUDA=0 means CPU ops only.
    BUILD_ENV=(env CUDA_VISIBLE_DEVICES=)
    echo "building CPU ops with $MAX_JOBS parallel job(s); about 31 minutes on 2 cores"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/mmcv-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
SRC="$WORK/mmcv-$VERSION"

# pip prepares the sdist's metadata even for `pip download`, in an isolated environment with the
# newest setuptools, where mmcv's setup.py fails on `import pkg_resources`: constrain that
# environment to a setuptools that still has it (PIP_CONSTRAINT for pip < 25.3,
# PIP_BUILD_CONSTRAINT from 25.3 on; each pip ignores the other's variable).
printf 'setuptools<81\n' >"$WORK/build-constraints.txt"
run env PIP_CONSTRAINT="$WORK/build-constraints.txt" PIP_BUILD_CONSTRAINT="$WORK/build-constraints.txt" \
    "$PYTHON" -m pip download --no-deps --no-binary :all: --no-cache-dir -d "$WORK" "mmcv==$VERSION"
run tar -xzf "$WORK/mmcv-$VERSION.tar.gz" -C "$WORK"

# Patch setup.py: C++17 -> C++20 (cxx and nvcc flags), pkg_resources -> importlib.metadata/packaging.
echo "+ patch $SRC/setup.py: -std=c++17 -> -std=c++20; pkg_resources -> importlib.metadata + packaging"
if [ "$DRY_RUN" = 0 ]; then
    "$PYTHON" - "$SRC/setup.py" <<'EOF'
import sys

path = sys.argv[1]
with open(path, encoding="utf-8") as f:
    text = f.read()
old_import = "from pkg_resources import DistributionNotFound, get_distribution, parse_version\n"
new_import = (
    "try:\n"
    "    from pkg_resources import DistributionNotFound, get_distribution, parse_version\n"
    "except ImportError:  # setuptools >= 81 no longer ships pkg_resources\n"
    "    from importlib.metadata import PackageNotFoundError as DistributionNotFound\n"
    "    from importlib.metadata import distribution as get_distribution\n"
    "    from packaging.version import parse as parse_version\n"
)
if "-std=c++17" not in text or old_import not in text:
    sys.exit(f"error: {path} does not look like mmcv's setup.py; not patching")
text = text.replace(old_import, new_import).replace("-std=c++17", "-std=c++20")
with open(path, "w", encoding="utf-8") as f:
    f.write(text)
EOF
    if grep -q -- '-std=c++17' "$SRC/setup.py" || ! grep -q -- '-std=c++20' "$SRC/setup.py"; then
        echo "error: the C++20 patch did not apply to $SRC/setup.py" >&2
        exit 1
    fi
fi

# --no-build-isolation: build against the installed torch; --no-cache-dir: never reuse a wheel
# pip cached for another torch.
run "${BUILD_ENV[@]}" "$PYTHON" -m pip install --no-build-isolation --no-cache-dir "$SRC"

if [ "$DRY_RUN" = 0 ]; then
    if ! imports_ok; then
        echo "error: mmcv was built but mmcv.ops does not load with torch $TORCH_VERSION" >&2
        exit 1
    fi
    "$PYTHON" -c "import mmcv; from mmcv.ops import get_compiling_cuda_version as v; cuda = v(); print('mmcv', mmcv.__version__, 'installed', '(CPU ops)' if cuda == 'not available' else f'(CUDA {cuda} ops)')"
fi
