"""settings.py reads the environment: defaults, overrides, and clear errors for bad values."""

import json
import os
import subprocess
import sys

from support import ROOT

NAMES = (
    "REDIS_URL", "REDIS_CONFIGURED", "IMAGE_QUEUE", "BATCH_SIZE", "MAX_BATCH_WAIT_MS", "QUEUE_MAX",
    "REQUEST_TIMEOUT_S", "RESULT_TTL_S", "MODEL_NAME", "MODEL_WEIGHTS", "MODEL_PATH", "LABELS_PATH",
    "MODEL_PREPROCESS", "MAX_UPLOAD_MB", "MAX_IMAGE_PIXELS", "TOP_K", "REDIS_BLOCK_S", "WORKER_TTL_S",
    "GUNICORN_TIMEOUT_S", "WEB_HOST", "MODEL_PRECISION", "BATCH_BUCKETS",
)  # fmt: skip


def load(**env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in NAMES and not k.startswith(("REDIS_", "MODEL_"))}
    code = f"import json, settings; print(json.dumps({{n: getattr(settings, n) for n in {NAMES!r}}}))"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=clean | env, capture_output=True, text=True, timeout=30
    )


def values(**env) -> dict:
    result = load(**env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_defaults_are_the_documented_ones():
    s = values()
    assert s["REDIS_URL"] == "redis://localhost:6379/0" and s["REDIS_CONFIGURED"] is False
    assert s["IMAGE_QUEUE"] == "image_queue" and s["BATCH_SIZE"] == 32 and s["MAX_BATCH_WAIT_MS"] == 0
    assert s["MODEL_NAME"] == "ResNet50" and s["MODEL_WEIGHTS"] == "imagenet" and s["TOP_K"] == 5
    assert s["WEB_HOST"] == "127.0.0.1" and s["MODEL_PRECISION"] == "float32" and s["BATCH_BUCKETS"] == "auto"


def test_timeouts_are_ordered_by_default():
    s = values()
    assert s["REDIS_BLOCK_S"] < s["REQUEST_TIMEOUT_S"] < s["GUNICORN_TIMEOUT_S"]
    assert s["REDIS_BLOCK_S"] < s["WORKER_TTL_S"]


def test_seed_redis_names_build_the_url():
    s = values(REDIS_HOST="cache.internal", REDIS_PORT="6380", REDIS_DB="2")
    assert s["REDIS_URL"] == "redis://cache.internal:6380/2" and s["REDIS_CONFIGURED"] is True


def test_redis_url_wins_over_host_and_port():
    s = values(REDIS_URL="rediss://:pw@example:6390/1", REDIS_HOST="ignored")
    assert s["REDIS_URL"] == "rediss://:pw@example:6390/1"


def test_every_setting_is_read_from_its_variable():
    s = values(
        IMAGE_QUEUE="cats", BATCH_SIZE="8", MAX_BATCH_WAIT_MS="2.5", QUEUE_MAX="10", REQUEST_TIMEOUT_S="3",
        RESULT_TTL_S="9", MODEL_NAME="MobileNetV2", MODEL_WEIGHTS="/w.h5", MODEL_PATH="/m.keras",
        LABELS_PATH="/l.json", MODEL_PREPROCESS="Torch", MAX_UPLOAD_MB="2", MAX_IMAGE_PIXELS="1000", TOP_K="3",
        MODEL_PRECISION="Mixed_BFloat16", BATCH_BUCKETS="on",
    )  # fmt: skip
    assert s["IMAGE_QUEUE"] == "cats" and s["BATCH_SIZE"] == 8 and s["MAX_BATCH_WAIT_MS"] == 2.5
    assert s["QUEUE_MAX"] == 10 and s["REQUEST_TIMEOUT_S"] == 3.0 and s["RESULT_TTL_S"] == 9
    assert s["MODEL_NAME"] == "MobileNetV2" and s["MODEL_WEIGHTS"] == "/w.h5" and s["MODEL_PATH"] == "/m.keras"
    assert s["LABELS_PATH"] == "/l.json" and s["MODEL_PREPROCESS"] == "torch"
    assert s["MAX_UPLOAD_MB"] == 2.0 and s["MAX_IMAGE_PIXELS"] == 1000 and s["TOP_K"] == 3
    assert s["MODEL_PRECISION"] == "mixed_bfloat16" and s["BATCH_BUCKETS"] == "on"


def test_bad_values_fail_at_start_with_the_setting_named():
    result = load(BATCH_SIZE="lots")
    assert result.returncode != 0 and "BATCH_SIZE must be a whole number" in result.stderr
    result = load(BATCH_SIZE="0")
    assert result.returncode != 0 and "BATCH_SIZE must be at least 1" in result.stderr
    result = load(MODEL_PRECISION="float16")
    assert result.returncode != 0 and "MODEL_PRECISION must be one of float32, mixed_bfloat16" in result.stderr
    result = load(BATCH_BUCKETS="yes")
    assert result.returncode != 0 and "BATCH_BUCKETS must be one of auto, on, off" in result.stderr
    result = load(REQUEST_TIMEOUT_S="soon")
    assert result.returncode != 0 and "REQUEST_TIMEOUT_S must be a number" in result.stderr
    for infinite in ("inf", "nan", "-inf"):
        result = load(REQUEST_TIMEOUT_S=infinite)
        assert result.returncode != 0 and "REQUEST_TIMEOUT_S must be finite" in result.stderr
