"""Every setting of the service: the one module that reads the environment.

Each setting is an environment variable of the same name with the default shown here. The web
workers and the model workers of one queue must agree on the Redis, queue and heartbeat settings.
See the README's settings table for how the timeouts are ordered.
"""

import math
import os


class SettingError(ValueError):
    """An environment variable holds a value the service cannot use."""


def _str(name: str, default: str) -> str:
    return os.environ.get(name, default).strip()


def _number(name: str, default: float, minimum: float, kind: type, what: str):
    raw = _str(name, str(default))
    try:
        value = kind(raw)
    except ValueError:
        raise SettingError(f"{name} must be {what}, got {raw!r}") from None
    if not math.isfinite(value):
        raise SettingError(f"{name} must be finite, got {raw!r}")
    if value < minimum:
        raise SettingError(f"{name} must be at least {minimum}, got {value}")
    return value


def _int(name: str, default: int, minimum: int = 0) -> int:
    return _number(name, default, minimum, int, "a whole number")


def _float(name: str, default: float, minimum: float = 0.0) -> float:
    return _number(name, default, minimum, float, "a number")


# --- Redis ------------------------------------------------------------------------------------
REDIS_HOST = _str("REDIS_HOST", "localhost")  # host name; ignored when REDIS_URL is set
REDIS_PORT = _int("REDIS_PORT", 6379, 1)  # TCP port; ignored when REDIS_URL is set
REDIS_DB = _int("REDIS_DB", 0)  # database number; ignored when REDIS_URL is set
# Full URL (redis://[:password@]host:port/db, rediss:// for TLS, unix:///path.sock); wins over the above.
REDIS_URL = _str("REDIS_URL", "") or f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
# True when the operator named a Redis; the stack launcher starts its own redis-server otherwise.
REDIS_CONFIGURED = any(name in os.environ for name in ("REDIS_URL", "REDIS_HOST", "REDIS_PORT"))
REDIS_BLOCK_S = _float("REDIS_BLOCK_S", 1.0, 0.1)  # seconds: the longest single blocking Redis call

# --- Queue ------------------------------------------------------------------------------------
IMAGE_QUEUE = _str("IMAGE_QUEUE", "image_queue")  # queue name; every key is "{IMAGE_QUEUE}:..."
BATCH_SIZE = _int("BATCH_SIZE", 32, 1)  # images: the most one forward pass takes
MAX_BATCH_WAIT_MS = _float("MAX_BATCH_WAIT_MS", 0.0)  # ms a worker holds a partial batch to fill it
QUEUE_MAX = _int("QUEUE_MAX", 128, 1)  # messages: /predict answers 503 once the queue holds this many
REQUEST_TIMEOUT_S = _float("REQUEST_TIMEOUT_S", 10.0, 0.5)  # seconds from arrival to 504
RESULT_TTL_S = _int("RESULT_TTL_S", 60, 1)  # seconds an unread answer stays in Redis
WORKER_HEARTBEAT_S = _float("WORKER_HEARTBEAT_S", 1.0, 0.1)  # seconds between a worker's heartbeats
# Seconds without a heartbeat before a worker counts as dead: /predict then answers 503 and peers
# requeue its claimed messages. Must exceed REDIS_BLOCK_S plus the longest batch's inference time.
WORKER_TTL_S = _float("WORKER_TTL_S", 10.0, 1.0)

# --- Model (the model worker only) -------------------------------------------------------------
MODEL_NAME = _str("MODEL_NAME", "ResNet50")  # a keras.applications model, e.g. MobileNetV2, VGG16
# "imagenet" (Keras downloads and caches it), a local weights file (.h5 or .weights.h5), or "none".
MODEL_WEIGHTS = _str("MODEL_WEIGHTS", "imagenet")
MODEL_PATH = _str("MODEL_PATH", "")  # your own saved Keras model (.keras or .h5); wins over MODEL_NAME
# Labels file: a JSON list, or the ImageNet index format {"0": [wnid, label], ...}. Required with
# MODEL_PATH; for keras.applications it replaces the ImageNet index Keras would download.
LABELS_PATH = _str("LABELS_PATH", "")
# How pixels are scaled before the model: caffe, tf, torch or none. Empty: the keras.applications
# model's own preprocess_input, or none for MODEL_PATH.
MODEL_PREPROCESS = _str("MODEL_PREPROCESS", "").lower()

# --- Web --------------------------------------------------------------------------------------
WEB_HOST = _str("WEB_HOST", "127.0.0.1")  # address gunicorn binds; 0.0.0.0 or :: to serve others
WEB_PORT = _int("WEB_PORT", 5000, 1)  # TCP port gunicorn binds
WEB_WORKERS = _int("WEB_WORKERS", 2, 1)  # gunicorn worker processes
WEB_THREADS = _int("WEB_THREADS", 16, 1)  # threads per gunicorn worker: concurrent requests each
GUNICORN_TIMEOUT_S = _int("GUNICORN_TIMEOUT_S", 30, 1)  # seconds; must exceed REQUEST_TIMEOUT_S
MAX_UPLOAD_MB = _float("MAX_UPLOAD_MB", 16.0, 0.001)  # megabytes: larger bodies get 413 unread
MAX_IMAGE_PIXELS = _int("MAX_IMAGE_PIXELS", 50_000_000, 1)  # width x height: more gets 413 undecoded
TOP_K = _int("TOP_K", 5, 1)  # predictions per answer unless the request asks ?top=K
TOP_K_MAX = 20  # the largest ?top=K accepted

LOG_LEVEL = _str("LOG_LEVEL", "INFO").upper()  # DEBUG logs every request id a worker answers
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"  # one format for every process
