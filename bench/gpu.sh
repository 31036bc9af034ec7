#!/usr/bin/env bash
# Issue 12, part 6: the benchmark suite on a lent GPU machine, prepared here so that the run fits one call.
#
#   bash bench/gpu.sh prepare   here, after scripts/setup-dev.sh (needs PyPI and Debian's archive): the wheels
#                               and the redis-server the GPU machine lacks, into .gpu/ (~5 MB, git-ignored)
#   bash bench/gpu.sh run       on the GPU machine, through the device tool, with .gpu carried:
#                                 run(command="bash bench/gpu.sh run", carry=[".gpu"], timeout_s=600)
#
# The GPU machine has Python 3.12 with JAX (CUDA), numpy, Pillow, h5py, requests, psutil and matplotlib, but no
# TensorFlow, Keras, Flask, gunicorn, redis-py or redis-server, and it cannot reach any network. So the run
# installs the carried wheels into /tmp/site, unpacks the carried redis-server into /tmp/redis (never into /),
# and runs Keras 3 on JAX. It writes to $OUT (the device tool brings back 8 files at most):
#   machine.txt   the GPU, cores, JAX's devices, redis-server's version
#   suite.log     the suite's output;  suite/benchmark.json, suite/benchmark.png  its figures
#   path.txt      bench.path_ceiling on the machine's cores: what the web + Redis + worker path carries
# Each step has its own time limit, so the whole run ends inside the device tool's 10 minutes per call.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DIR=.gpu
GPU_PYTHON=${GPU_PYTHON:-3.12}  # the GPU machine's python3 (the device tool's KINDS.md: 3.12.3)
# What the service and the suite import that the GPU image does not have, at the versions .venv holds (the image
# has werkzeug and prometheus-client too: these, first on PYTHONPATH, are the versions the service is tested with)
WHEELS="keras namex optree flask multipart werkzeug itsdangerous blinker gunicorn redis flask-limiter limits ordered-set
deprecated prometheus-client"
# What the GPU image already holds of their needs and the suite's (checked at the start of a run; a test checks
# that WHEELS and this cover requirements-web.txt, Keras and every requirement of each wheel)
ON_IMAGE="numpy pillow h5py requests psutil matplotlib rich absl-py ml-dtypes click jinja2 markupsafe wrapt packaging
typing-extensions jax"
DEBS="redis-server redis-tools libjemalloc2 liblzf1 libatomic1"  # Debian 12's redis-server: glibc 2.34, Ubuntu 24.04 has it

prepare() {
    local pins=() name version
    for name in $WHEELS; do
        version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
        [ -n "$version" ] || { echo "$name is not in .venv: run scripts/setup-dev.sh first" >&2; exit 1; }
        pins+=("$name==$version")
    done
    rm -rf "$DIR"
    mkdir -p "$DIR/wheels" "$DIR/debs"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DIR/wheels" "${pins[@]}"
    (cd "$DIR/debs" && apt-get download -q $DEBS)
    ls "$DIR/wheels" "$DIR/debs"
    du -sh "$DIR"
}

run() {
    : "${OUT:?run this on the GPU machine, where the device tool sets OUT}"
    [ -d "$DIR/wheels" ] || { echo "no $DIR: run 'bash bench/gpu.sh prepare' here and carry .gpu" >&2; exit 1; }
    python3 - $ON_IMAGE <<'EOF'
import importlib.metadata as metadata
import sys

missing = []
for name in sys.argv[1:]:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(name)
sys.exit(f"this machine's Python lacks {', '.join(missing)}: add them to WHEELS in bench/gpu.sh" if missing else 0)
EOF
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$DIR"/wheels/*.whl
    for deb in "$DIR"/debs/*.deb; do dpkg -x "$deb" /tmp/redis; done
    # redis-server alone sees the Debian libraries it came with: a wrapper first on PATH (stack.py finds it there)
    mkdir -p /tmp/redis/bin
    printf '#!/bin/sh\nLD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu exec /tmp/redis/usr/bin/redis-server "$@"\n' \
        >/tmp/redis/bin/redis-server
    chmod +x /tmp/redis/bin/redis-server
    export PYTHONPATH=/tmp/site PATH="/tmp/redis/bin:$PATH"
    export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
    # Web processes for the service and the in-process baseline alike: 4 x 32 threads, and the suite then starts
    # 10 model processes on the GPU (its own, the worker, the baseline's 4 and the 1-thread baseline's 4), each
    # compiling its batch sizes. The closed loops come from 4 load-generator processes: one Python process spends
    # ~1.4 ms of CPU per request, so alone it would cap the load near 700 requests/s, below the GPU's rate
    export WEB_WORKERS=${WEB_WORKERS:-4}
    local load=${LOAD_PROCESSES:-4}
    {
        nvidia-smi -L || true
        echo "cores: $(nproc); WEB_WORKERS=$WEB_WORKERS; load-generator processes: $load"
        python3 -c 'import jax, keras; print("jax", jax.__version__, jax.devices(), "keras", keras.__version__)'
        redis-server --version
    } 2>&1 | tee "$OUT/machine.txt"
    # SIGINT at the limit: Python stops its lab (the processes it started) before the next step begins
    local suite=0 path=0
    timeout -s INT -k 30 "${GPU_SUITE_S:-400}" python3 -m bench.benchmark --quick --load-processes "$load" \
        --out "$OUT/suite" >"$OUT/suite.log" 2>&1 || suite=$?
    grep -v "^[IWE]0000 " "$OUT/suite.log" | tail -40 || true
    # one JPEG per /predict request, and 8 images' pixels per v2 request (QUEUE_MAX: 128 clients x 8 all admitted)
    QUEUE_MAX=2048 timeout -s INT -k 15 "${GPU_PATH_S:-90}" python3 -m bench.path_ceiling --clients 32,128 --seconds 8 \
        --depths 3 --requests predict,pixels:8 --load-processes "$load" >"$OUT/path.txt" 2>&1 || path=$?
    tail -8 "$OUT/path.txt" || true
    # Never 124 (the device tool reads that as its own time limit): 0, or 3 when a step failed or ran out of time
    echo "suite exit $suite, path ceiling exit $path (124: its time limit; the suite exits 1 when an answer differs)"
    [ "$suite" = 0 ] && [ "$path" = 0 ] || return 3
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash bench/gpu.sh prepare|run" >&2; exit 2 ;;
esac
