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


def _flag(name: str, default: bool = False) -> bool:
    """On: 1, true, yes, on; off: 0, false, no, off or empty (any case)."""
    raw = _str(name, "").lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    if raw:
        raise SettingError(f"{name} must be 1/true/yes/on or 0/false/no/off, got {raw!r}")
    return default


API_KEY_MIN_LENGTH = 16  # shorter keys are guessable: refused at start


def _api_keys(name: str) -> tuple[str, ...]:
    """Comma-separated keys, blanks ignored. Errors name a key's position, never the key (a secret)."""
    keys = tuple(key.strip() for key in _str(name, "").split(",") if key.strip())
    for position, key in enumerate(keys, 1):
        if len(key) < API_KEY_MIN_LENGTH or not (key.isascii() and key.isprintable()) or " " in key:
            raise SettingError(
                f"{name}: key {position} of {len(keys)} must be at least {API_KEY_MIN_LENGTH} printable ASCII "
                "characters without spaces (e.g. the output of `openssl rand -hex 32`)"
            )
    return keys


def _rate_limit(name: str) -> str:
    """A Flask-Limiter limit string ("10/second;300/minute"), parsed now so that a typo fails at start."""
    value = _str(name, "")
    if value:
        from limits import parse_many  # Flask-Limiter's parser; imported only when a limit is set

        try:
            items = parse_many(value)
        except ValueError:
            items = []
        if not items or any(item.amount < 1 for item in items):
            raise SettingError(f"{name} must be limits like '10/second;300/minute' (at least 1 each), got {value!r}")
    return value


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
# Niceness the model worker runs at (0-19); 0: unchanged. On a CPU-only box whose cores the model shares
# with gunicorn and Redis, 10-19 lets their short work preempt the model, so 503s stay fast under
# overload (twice the capacity, 2 cores: 503 p99 21-51 ms at 0, 29 ms at 19; served rate unchanged).
# The cost: a flood of huge images decoding on every core can starve a niced worker past WORKER_TTL_S,
# and peers then count it dead. Not needed on a GPU box.
WORKER_NICE = _int("WORKER_NICE", 0)
if WORKER_NICE > 19:
    raise SettingError(f"WORKER_NICE must be 0 to 19, got {WORKER_NICE}")
# Model worker processes `python stack.py` starts: 0 = one per visible GPU (CUDA_VISIBLE_DEVICES=<that GPU>
# each), or 1 without a GPU; N = exactly N (spread over the GPUs in turn). `stack.py --workers N` overrides it.
MODEL_WORKERS = _int("MODEL_WORKERS", 0)
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
# Keras dtype policy of a keras.applications model: float32, or mixed_bfloat16 (on this project's CPU,
# AVX512-BF16: 1.4-1.5x the images/s, probabilities within ~0.03 of float32's) or mixed_float16 (GPUs with
# tensor cores). A MODEL_PATH model keeps the policy it was saved with.
MODEL_PRECISION = _str("MODEL_PRECISION", "float32").lower()
# Pad each batch to the next of 1, 2, 4, ..., BATCH_SIZE: auto (when Keras compiles the model with XLA:
# JAX, or TensorFlow on a GPU, where each new batch size would compile on a live request), on, or off.
BATCH_BUCKETS = _str("BATCH_BUCKETS", "auto").lower()
for _name, _value, _allowed in (
    ("MODEL_PRECISION", MODEL_PRECISION, ("float32", "mixed_bfloat16", "mixed_float16")),
    ("BATCH_BUCKETS", BATCH_BUCKETS, ("auto", "on", "off")),
):
    if _value not in _allowed:
        raise SettingError(f"{_name} must be one of {', '.join(_allowed)}, got {_value!r}")

# --- Web --------------------------------------------------------------------------------------
# Address the web server binds; 0.0.0.0 or :: to serve others. An IPv6 address may be in brackets ([::1]),
# as uWSGI needs it; the brackets are dropped here.
WEB_HOST = _str("WEB_HOST", "127.0.0.1").removeprefix("[").removesuffix("]")
WEB_PORT = _int("WEB_PORT", 5000, 1)  # TCP port gunicorn binds
WEB_WORKERS = _int("WEB_WORKERS", 2, 1)  # gunicorn worker processes
WEB_THREADS = _int("WEB_THREADS", 16, 1)  # threads per gunicorn worker: concurrent requests each
GUNICORN_TIMEOUT_S = _int("GUNICORN_TIMEOUT_S", 30, 1)  # seconds; must exceed REQUEST_TIMEOUT_S
MAX_UPLOAD_MB = _float("MAX_UPLOAD_MB", 16.0, 0.001)  # megabytes: larger bodies get 413 unread
# Images one web process decodes at once; more wait their turn (503 at the deadline). A decode takes up
# to ~12 bytes per pixel, so this x WEB_WORKERS x that is the web tier's worst case for image memory.
DECODE_SLOTS = _int("DECODE_SLOTS", 2, 1)
MAX_IMAGE_PIXELS = _int("MAX_IMAGE_PIXELS", 50_000_000, 1)  # width x height: more gets 413 undecoded
TOP_K = _int("TOP_K", 5, 1)  # predictions per answer unless the request asks ?top=K
TOP_K_MAX = 20  # the largest ?top=K accepted

# --- Security (web) ---------------------------------------------------------------------------
# API keys, comma-separated: empty (the default, for local use) leaves the service open; with keys set,
# every request but /, /healthz, /readyz and /openapi.json needs "Authorization: Bearer <key>" or
# "X-API-Key: <key>". Keys are secrets: set them from the environment or a secret store, never in code
# or a committed file. Each must be at least API_KEY_MIN_LENGTH characters, or the service refuses to start.
API_KEYS = _api_keys("API_KEYS")
# Per-client limit on /predict, in Flask-Limiter's syntax ("10/second;300/minute"); empty: no limit.
# Counted in the queue's Redis, per API key (or per remote address when API_KEYS is empty).
RATE_LIMIT = _rate_limit("RATE_LIMIT")
# Proxies in front of gunicorn (nginx: 1) whose X-Forwarded-For/-Proto are trusted; 0: none. Behind a
# proxy with 0, every client has the proxy's address, and so shares one rate-limit counter.
TRUSTED_PROXIES = _int("TRUSTED_PROXIES", 0)

LOG_LEVEL = _str("LOG_LEVEL", "INFO").upper()  # DEBUG logs every request id a worker answers
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"  # one format for every process
# One JSON object per log line (time, level, logger, pid, message, request_id where known) from the web
# app, gunicorn's own and access logs, and the model worker; off: the text format above. See logs.py.
LOG_JSON = _flag("LOG_JSON")
# prometheus-client's multiprocess mode: a directory for each web process's metric files. Under gunicorn,
# gunicorn_conf.py empties it at start (a private temporary one when unset). Apache mod_wsgi or uWSGI with
# several processes need it set, to an empty directory of their own. See metrics.py.
PROMETHEUS_MULTIPROC_DIR = _str("PROMETHEUS_MULTIPROC_DIR", "")
