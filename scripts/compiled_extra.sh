# Shared steps of the scripts that install a compiled extra against the installed torch
# (build_mmcv.sh, build_torch_cluster.sh). Sourced, not run. The caller sets PYTHON, VERSION
# and WHEELS, defines `imports_ok` (does the compiled package load with this torch?), then calls:
#
#   parse_args "$@"                    --dry-run / --help (help is the caller's header comment)
#   require_torch                      stops unless $PYTHON imports torch; sets TORCH_VERSION
#   try_prebuilt_wheel GLOB PACKAGE    installs $WHEELS/GLOB with pip if present and keeps it
#                                      only if imports_ok; returns 0 when it is installed
#   default_max_jobs                   exports MAX_JOBS: CPU cores, at most one per 2 GiB free
#   default_force_cuda                 exports FORCE_CUDA: 1 if torch has CUDA, sees a GPU and
#                                      nvcc exists, else 0 (unless already set)
#   run CMD...                         echoes CMD, runs it unless --dry-run

DRY_RUN=0

parse_args() {
    for arg in "$@"; do
        case "$arg" in
            --dry-run) DRY_RUN=1 ;;
            -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
            *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
        esac
    done
}

run() {
    echo "+ $*"
    if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

require_torch() {
    if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        echo "error: $PYTHON cannot import torch; install torch first (see README)" >&2
        exit 1
    fi
    TORCH_VERSION="$("$PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null)"
}

try_prebuilt_wheel() {
    local glob="$1" package="$2"
    if ! { [ -d "$WHEELS" ] && compgen -G "$WHEELS/$glob" >/dev/null; }; then
        echo "no prebuilt wheel folder or wheel ($WHEELS/$glob); building from source"
        return 1
    fi
    echo "trying the prebuilt wheel in $WHEELS"
    # --only-binary: never fall back to building the sdist in an isolated environment here.
    if ! run "$PYTHON" -m pip install --find-links "$WHEELS" --only-binary "$package" "$package==$VERSION"; then
        echo "no usable prebuilt wheel; building from source"
        return 1
    fi
    if [ "$DRY_RUN" = 1 ] || imports_ok; then
        echo "installed the prebuilt wheel"
        return 0
    fi
    echo "the prebuilt wheel does not load with torch $TORCH_VERSION; building from source instead"
    run "$PYTHON" -m pip uninstall -y "$package"
    return 1
}

default_max_jobs() {
    if [ -z "${MAX_JOBS:-}" ]; then
        local cores avail_kib by_memory
        cores="$(nproc 2>/dev/null || echo 1)"
        avail_kib="$(awk '/MemAvailable/ {print $2}' /proc/meminfo 2>/dev/null || echo 0)"
        by_memory=$(( avail_kib / (2 * 1024 * 1024) ))
        MAX_JOBS="$cores"
        if [ "$by_memory" -ge 1 ] && [ "$by_memory" -lt "$MAX_JOBS" ]; then MAX_JOBS="$by_memory"; fi
        if [ "$MAX_JOBS" -lt 1 ]; then MAX_JOBS=1; fi
    fi
    export MAX_JOBS
}

default_force_cuda() {
    if [ -z "${FORCE_CUDA:-}" ]; then
        FORCE_CUDA=0
        if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)" >/dev/null 2>&1 \
            && { command -v nvcc >/dev/null 2>&1 || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; }; then
            FORCE_CUDA=1
        fi
    fi
    export FORCE_CUDA
}
