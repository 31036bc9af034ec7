"""Every setting of the service: the one place that reads the environment.

Each setting is an environment variable of the same name with the default shown in Settings.from_env.
They are read once, into one typed, frozen Settings object (`settings.current`); every other module takes
its values from there (`settings.BATCH_SIZE` reads `settings.current.BATCH_SIZE`). The checks between
settings (the timeouts' order) run when a Settings is built, so a bad combination fails at start. Tests
build their own with `Settings.from_env({...})`, no subprocess needed. The web workers and the model
workers of one queue must agree on the Redis, queue and heartbeat settings. The README's settings table
says how the timeouts are ordered.
"""

import math
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace


class SettingError(ValueError):
    """An environment variable holds a value the service cannot use, or two settings contradict each other."""


API_KEY_MIN_LENGTH = 16  # shorter keys are guessable: refused at start
TOP_K_MAX = 20  # the largest ?top=K accepted
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"  # one format for every process
MODEL_PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
MODEL_RUNTIMES = ("auto", "keras", "openvino")
LOG_LEVELS = ("debug", "info", "warning", "warn", "error", "critical")  # as logging names them (WARN: WARNING)
BATCH_BUCKET_MODES = ("auto", "on", "off")
BATCH_TUNE_TOLERANCE = 0.05  # BATCH_TUNE: a larger batch stays unless this much slower per image (timing noise)
MAX_PIPELINE_DEPTH = 3  # a model worker's lanes: the queue protocol's processing lists per worker (image_queue.LANES)
MODEL_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")  # a model id: lower case, safe in URLs and Redis keys
WEB_SOCKET_MARGIN_S = 0.5  # web: Redis socket timeout REDIS_BLOCK_S + this (a stalled Redis delays a 503 so much)
# REDIS_URL query options that would override what image_queue.connect sets (redis-py lets the URL win)
URL_TIMING_OPTIONS = frozenset({"socket_timeout", "socket_connect_timeout", "health_check_interval"})
LATE_DECODE_S = 2.0  # an image decode begun just before the deadline runs to its end (a 50-megapixel PNG: ~1 s)


def is_queue_name(name: str) -> bool:
    """Whether Redis keys can be built from name (IMAGE_QUEUE, and the queues made from it): non-empty, without
    braces (the keys' cluster hash tag is "{name}"), colons (the keys' separator) or spaces."""
    return bool(name) and not any(c in name for c in "{}: ")


def default_model_id(model_name: str, model_path: str) -> str:
    """MODEL_ID's default: the file stem of MODEL_PATH, else MODEL_NAME, lower-cased, other characters as "-"."""
    stem = os.path.basename(model_path).split(".")[0] if model_path else model_name
    return re.sub(r"[^a-z0-9_.-]", "-", stem.lower()).lstrip("_.-")[:64] or "model"


class _Reader:
    """Typed reads of one environment mapping; each error names the variable."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def text(self, name: str, default: str) -> str:
        return self.env.get(name, default).strip()

    def _parse(self, name: str, default: float, minimum: float, kind: type, what: str):
        raw = self.text(name, str(default))
        try:
            value = kind(raw)
        except ValueError:
            raise SettingError(f"{name} must be {what}, got {raw!r}") from None
        if not math.isfinite(value):
            raise SettingError(f"{name} must be finite, got {raw!r}")
        if value < minimum:
            raise SettingError(f"{name} must be at least {minimum}, got {value}")
        return value

    def whole(self, name: str, default: int, minimum: int = 0) -> int:
        return self._parse(name, default, minimum, int, "a whole number")

    def whole_or_auto(self, name: str, minimum: int) -> int:
        """A whole number, or auto (the default), read as 0."""
        if self.text(name, "auto").lower() == "auto":
            return 0
        return self._parse(name, 0, minimum, int, "a whole number or auto")

    def number(self, name: str, default: float, minimum: float = 0.0) -> float:
        return self._parse(name, default, minimum, float, "a number")

    def flag(self, name: str, default: bool = False) -> bool:
        """On: 1, true, yes, on; off: 0, false, no, off (any case); unset or empty: the default."""
        raw = self.text(name, "").lower()
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        if raw:
            raise SettingError(f"{name} must be 1/true/yes/on or 0/false/no/off, got {raw!r}")
        return default

    def addresses(self, name: str) -> tuple[tuple[str, int], ...]:
        """Comma-separated host:port pairs ("10.0.0.1:26379,[::1]:26379"); empty: none."""
        pairs = []
        for item in (part.strip() for part in self.text(name, "").split(",")):
            host, _, port = item.rpartition(":")
            host = host.removeprefix("[").removesuffix("]")
            if not item:
                continue
            if not host or not port.isdecimal() or not 0 < int(port) < 65536:
                raise SettingError(f"{name} must be host:port pairs separated by commas, got {item!r}")
            pairs.append((host, int(port)))
        return tuple(pairs)

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.text(name, default).lower()
        if value not in allowed:
            raise SettingError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def api_keys(self, name: str) -> tuple[str, ...]:
        """Comma-separated keys, blanks ignored. Errors name a key's position, never the key (a secret)."""
        keys = tuple(key.strip() for key in self.text(name, "").split(",") if key.strip())
        for position, key in enumerate(keys, 1):
            if len(key) < API_KEY_MIN_LENGTH or not (key.isascii() and key.isprintable()) or " " in key:
                raise SettingError(
                    f"{name}: key {position} of {len(keys)} must be at least {API_KEY_MIN_LENGTH} printable ASCII "
                    "characters without spaces (e.g. the output of `openssl rand -hex 32`)"
                )
        return keys

    def rate_limit(self, name: str) -> str:
        """A Flask-Limiter limit string ("10/second;300/minute"), parsed now so that a typo fails at start."""
        value = self.text(name, "")
        if value:
            from limits import parse_many  # Flask-Limiter's parser; imported only when a limit is set

            try:
                items = parse_many(value)
            except ValueError:
                items = []
            if not items or any(item.amount < 1 for item in items):
                raise SettingError(
                    f"{name} must be limits like '10/second;300/minute' (at least 1 each), got {value!r}"
                )
        return value


@dataclass(frozen=True)
class Settings:
    """The service's settings, typed; what each means and its default are in from_env."""

    REDIS_URL: str
    REDIS_CONFIGURED: bool
    REDIS_BLOCK_S: float
    REDIS_SENTINELS: tuple[tuple[str, int], ...]
    REDIS_SENTINEL_MASTER: str
    REDIS_SENTINEL_USERNAME: str
    REDIS_SENTINEL_PASSWORD: str
    REDIS_WAIT_REPLICAS: int
    REDIS_CLUSTER: bool
    IMAGE_QUEUE: str
    QUEUE_SHARDS: int
    BATCH_SIZE: int
    BATCH_TUNE: bool
    MAX_BATCH_WAIT_MS: float
    PIPELINE_DEPTH: int  # 1 to MAX_PIPELINE_DEPTH, or 0 for auto (pipeline_depth resolves it)
    QUEUE_MAX: int
    REQUEST_TIMEOUT_S: float
    RESULT_TTL_S: int
    WORKER_HEARTBEAT_S: float
    WORKER_TTL_S: float
    WORKER_NICE: int
    MODEL_WORKERS: int
    MODEL_NAME: str
    MODEL_ID: str
    DEFAULT_MODEL: str
    MODEL_WEIGHTS: str
    MODEL_PATH: str
    LABELS_PATH: str
    MODEL_PREPROCESS: str
    MODEL_PRECISION: str
    MODEL_RUNTIME: str
    MODEL_CACHE_DIR: str
    BATCH_BUCKETS: str
    WEB_HOST: str
    WEB_PORT: int
    WEB_WORKERS: int
    WEB_THREADS: int
    GUNICORN_TIMEOUT_S: int
    MAX_UPLOAD_MB: float
    DECODE_SLOTS: int
    DECODE_MEGAPIXELS_S: float
    MAX_IMAGE_PIXELS: int
    TOP_K: int
    API_KEYS: tuple[str, ...]
    RATE_LIMIT: str
    TRUSTED_PROXIES: int
    LOG_LEVEL: str
    LOG_JSON: bool
    PROMETHEUS_MULTIPROC_DIR: str

    def __post_init__(self):
        """The checks between settings, all here: a combination that breaks the timeouts' order fails at start."""
        if self.PIPELINE_DEPTH > MAX_PIPELINE_DEPTH:
            raise SettingError(
                f"PIPELINE_DEPTH must be 1 to {MAX_PIPELINE_DEPTH} (batches a worker holds at once), "
                f"got {self.PIPELINE_DEPTH}"
            )
        if self.REDIS_CLUSTER and self.REDIS_SENTINELS:
            raise SettingError("set REDIS_CLUSTER or REDIS_SENTINELS, not both: a cluster fails over by itself")
        if not is_queue_name(self.IMAGE_QUEUE):
            raise SettingError(
                f"IMAGE_QUEUE must be non-empty, without braces, colons or spaces (it names Redis keys and their "
                f"cluster hash tag), got {self.IMAGE_QUEUE!r}"
            )
        for name in ("MODEL_ID", "DEFAULT_MODEL"):
            value = getattr(self, name)
            if (value or name == "MODEL_ID") and not MODEL_ID_PATTERN.fullmatch(value):
                raise SettingError(
                    f"{name} must be 1-64 of a-z, 0-9, '_', '.', '-', starting with a letter or digit, got {value!r}"
                )
        timing = sorted(URL_TIMING_OPTIONS & set(urllib.parse.parse_qs(urllib.parse.urlsplit(self.REDIS_URL).query)))
        if timing:
            raise SettingError(
                f"REDIS_URL must not set {', '.join(timing)}: the service sets its connections' timeouts and "
                "retries from REDIS_BLOCK_S (a socket timeout shorter than a blocking call breaks every idle wait)"
            )
        if self.WORKER_NICE > 19:
            raise SettingError(f"WORKER_NICE must be 0 to 19, got {self.WORKER_NICE}")
        if self.REDIS_BLOCK_S >= self.REQUEST_TIMEOUT_S:
            raise SettingError(
                f"REDIS_BLOCK_S ({self.REDIS_BLOCK_S:g} s) must be shorter than REQUEST_TIMEOUT_S "
                f"({self.REQUEST_TIMEOUT_S:g} s): a request waits for its answer in calls of REDIS_BLOCK_S"
            )
        if self.GUNICORN_TIMEOUT_S <= self.REQUEST_TIMEOUT_S:
            raise SettingError(
                f"GUNICORN_TIMEOUT_S ({self.GUNICORN_TIMEOUT_S} s) must be longer than REQUEST_TIMEOUT_S "
                f"({self.REQUEST_TIMEOUT_S:g} s): under uWSGI it is harakiri, which kills a request still waiting"
            )
        if self.REDIS_BLOCK_S >= self.WORKER_TTL_S:
            raise SettingError(
                f"REDIS_BLOCK_S ({self.REDIS_BLOCK_S:g} s) must be shorter than WORKER_TTL_S "
                f"({self.WORKER_TTL_S:g} s): an idle worker blocks that long between heartbeats"
            )
        if self.WORKER_HEARTBEAT_S >= self.WORKER_TTL_S:
            raise SettingError(
                f"WORKER_HEARTBEAT_S ({self.WORKER_HEARTBEAT_S:g} s) must be shorter than WORKER_TTL_S "
                f"({self.WORKER_TTL_S:g} s), or live workers would count as dead between heartbeats"
            )

    def check_web(self) -> None:
        """The checks of settings only the web reads (gunicorn_conf.py and create_app run them; a model worker
        started with an environment these refuse still serves)."""
        if self.GUNICORN_TIMEOUT_S <= self.longest_request_s:
            raise SettingError(
                f"GUNICORN_TIMEOUT_S ({self.GUNICORN_TIMEOUT_S} s) must be longer than the longest a request can "
                f"take, {self.longest_request_s:g} s: REQUEST_TIMEOUT_S ({self.REQUEST_TIMEOUT_S:g} s), + 2 x a "
                f"hung Redis call (REDIS_BLOCK_S + {WEB_SOCKET_MARGIN_S:g} s), + {LATE_DECODE_S:g} s for a decode "
                "begun at the deadline: under uWSGI it is harakiri, which kills a request still running"
            )
        if self.TOP_K > TOP_K_MAX:
            raise SettingError(f"TOP_K must be at most {TOP_K_MAX} (as ?top=K), got {self.TOP_K}")

    @property
    def longest_request_s(self) -> float:
        """The longest a request can run, at worst: its 504 comes at REQUEST_TIMEOUT_S, later only by a Redis
        call that hangs to its socket timeout (the wait for its answer; then, for a request of several images,
        the withdrawal of the rest) and by an image decode that began just before the deadline."""
        return self.REQUEST_TIMEOUT_S + 2 * (self.REDIS_BLOCK_S + WEB_SOCKET_MARGIN_S) + LATE_DECODE_S

    def pipeline_depth(self, model_on_host_cpu: bool) -> int:
        """PIPELINE_DEPTH for a worker whose model runs on the host's own cores, or not (an accelerator). auto:
        pipelined (MAX_PIPELINE_DEPTH) for an accelerator, serial (1) on the host's cores, where the model
        already keeps every core busy and a pipeline only adds latency (the README's Performance section)."""
        if self.PIPELINE_DEPTH:
            return self.PIPELINE_DEPTH
        return 1 if model_on_host_cpu else MAX_PIPELINE_DEPTH

    @property
    def takeover_batches(self) -> int:
        """Batch times in the life of a dead worker's oldest request, at worst, besides WORKER_TTL_S and
        WORKER_HEARTBEAT_S (takeover_s): those it spent in the dead worker, and those a survivor runs first.

        Serial (PIPELINE_DEPTH=1): it waited on the queue while the dead worker ran its batch before, then ran
        in the next (2); a survivor finishes its own batch (1), then runs it (1): 4. Pipelined, depth d (auto
        unresolved counts as the deepest): it waited in the dead worker's next batch while the one before ran,
        then ran (2); a survivor finishes its own batch and runs the one it had claimed (2); the dead worker's d
        batches come back in lane order, not by age, so its may be the last of them (d): 4 + d. This assumes
        every worker of a queue runs at the same depth and speed: a fleet that mixes GPU and CPU workers on one
        queue should set PIPELINE_DEPTH and check the order with the slower worker's batch. (The older rule, 2
        and 3, counted from the death, not from the request's arrival, and one requeued batch only: a request
        could expire before a survivor ran it.)
        """
        depth = self.PIPELINE_DEPTH or MAX_PIPELINE_DEPTH
        return 4 if depth == 1 else 4 + depth

    def takeover_s(self, longest_batch_s: float) -> float:
        """Seconds from a request's arrival until a survivor has answered it, at worst, when the worker that
        took it dies: the batches of takeover_batches, plus the dead worker's silence. Its last heartbeat may
        have come just before it died; it counts as dead WORKER_TTL_S later; the next peer heartbeat (within
        WORKER_HEARTBEAT_S) requeues what it held. (Time waiting in the queue before any worker took it, under
        a load over the capacity, is not counted: that is what the deadline's 504 is for.)
        """
        return self.WORKER_TTL_S + self.WORKER_HEARTBEAT_S + self.takeover_batches * longest_batch_s

    def fits_takeover(self, longest_batch_s: float) -> bool:
        """Whether a killed worker's requests are answered by a survivor before their deadline, when its
        longest batch takes this long: otherwise a worker dying means 504s."""
        return self.takeover_s(longest_batch_s) < self.REQUEST_TIMEOUT_S

    def largest_batch_in_takeover(self, timings: dict[int, float]) -> int:
        """The largest batch size that keeps the takeover order, from timed batches (size -> seconds); 0 if
        even the smallest timed one breaks it.

        Between the largest timed size that fits and the next timed one, the size is interpolated linearly
        (a batch's time grows about linearly with its size); the caller times the result to be sure.
        """
        sizes = sorted(timings)
        fitting = [n for n in sizes if self.fits_takeover(timings[n])]
        if not fitting:
            return 0
        below = fitting[-1]
        above = next((n for n in sizes if n > below), None)
        if above is None or timings[above] <= timings[below]:
            return below
        budget_s = (self.REQUEST_TIMEOUT_S - self.WORKER_TTL_S - self.WORKER_HEARTBEAT_S) / self.takeover_batches
        per_image_s = (timings[above] - timings[below]) / (above - below)
        return min(above - 1, below + int((budget_s - timings[below]) / per_image_s))

    def check_takeover(self, longest_batch_s: float) -> None:
        """The model worker's start-up check, once it has timed its largest batch: a killed worker's requests
        must be answered by a survivor before their deadline, or a worker dying means 504s."""
        if not self.fits_takeover(longest_batch_s):
            raise SettingError(
                f"a dead worker's requests would expire before a survivor answers them: WORKER_TTL_S "
                f"({self.WORKER_TTL_S:g} s) + WORKER_HEARTBEAT_S ({self.WORKER_HEARTBEAT_S:g} s) + "
                f"{self.takeover_batches} x the largest "
                f"batch ({longest_batch_s:.2f} s here) must be under REQUEST_TIMEOUT_S ({self.REQUEST_TIMEOUT_S:g} s): "
                "lower WORKER_TTL_S or BATCH_SIZE, or raise REQUEST_TIMEOUT_S"
            )

    def as_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "Settings":
        """A copy with some values changed, checked again."""
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Read every setting from env (default: os.environ): its variable, or the default given here."""
        env = os.environ if env is None else env
        read = _Reader(env)
        redis_host = read.text("REDIS_HOST", "localhost")  # host name; ignored when REDIS_URL is set
        redis_port = read.whole("REDIS_PORT", 6379, 1)  # TCP port; ignored when REDIS_URL is set
        redis_db = read.whole("REDIS_DB", 0)  # database number; ignored when REDIS_URL is set
        return cls(
            # --- Redis ------------------------------------------------------------------------------------
            # Full URL (redis://[:password@]host:port/db, rediss:// for TLS, unix:///path.sock); wins over the above.
            REDIS_URL=read.text("REDIS_URL", "") or f"redis://{redis_host}:{redis_port}/{redis_db}",
            # True when the operator named a Redis (a variable set and not empty: scripts/setup.sh's test too); the
            # stack launcher starts its own redis-server otherwise. REDIS_CLUSTER needs REDIS_URL to name a node.
            REDIS_CONFIGURED=any(
                env.get(name) for name in ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_SENTINELS")
            ),
            REDIS_BLOCK_S=read.number("REDIS_BLOCK_S", 1.0, 0.1),  # seconds: the longest single blocking Redis call
            # Redis Sentinel: the sentinels' host:port pairs, comma-separated. Set, the web, the workers, admin.py
            # and /metrics ask them for the master of REDIS_SENTINEL_MASTER (redis-py's Sentinel client) and follow
            # it through a failover; REDIS_URL then gives only the password, the database and TLS (rediss://), and
            # its host is ignored. Empty: REDIS_URL names the one Redis.
            REDIS_SENTINELS=read.addresses("REDIS_SENTINELS"),
            REDIS_SENTINEL_MASTER=read.text("REDIS_SENTINEL_MASTER", "mymaster"),  # the name the sentinels monitor
            # The sentinels' own user and password (their requirepass, or an ACL user), when they have one: REDIS_URL's
            # are the master's. Empty: none.
            REDIS_SENTINEL_USERNAME=read.text("REDIS_SENTINEL_USERNAME", ""),
            REDIS_SENTINEL_PASSWORD=read.text("REDIS_SENTINEL_PASSWORD", ""),
            # Replicas that must have each queued image before the web waits for its answer (Redis WAIT, up to
            # REDIS_BLOCK_S; fewer in time is logged, and the request goes on). 0: none, Redis's asynchronous
            # replication, where a failover can lose what the master had not yet sent. See the README's HA section.
            REDIS_WAIT_REPLICAS=read.whole("REDIS_WAIT_REPLICAS", 0),
            # Redis Cluster: REDIS_URL names any node, and redis-py's cluster client finds the slot's master and
            # follows MOVED after a failover. One queue's keys share one hash tag, so one slot on one master;
            # QUEUE_SHARDS spreads it over several.
            REDIS_CLUSTER=read.flag("REDIS_CLUSTER"),
            # --- Queue ------------------------------------------------------------------------------------
            IMAGE_QUEUE=read.text("IMAGE_QUEUE", "image_queue"),  # the service's name in Redis: "{IMAGE_QUEUE...}:..."
            # Hash tags the queue is spread over: shard 0 is IMAGE_QUEUE, shard s IMAGE_QUEUE-s, each its own slot,
            # so on a Redis Cluster its own master. The web sends each request to one (round-robin), every worker
            # serves all; QUEUE_MAX is shared out among them. Web and model workers must agree on it.
            QUEUE_SHARDS=read.whole("QUEUE_SHARDS", 1, 1),
            BATCH_SIZE=read.whole("BATCH_SIZE", 32, 1),  # images: the most one forward pass takes
            # The worker times batches of 1, 2, 4, ..., BATCH_SIZE at warm-up and serves batches up to the largest
            # size within BATCH_TUNE_TOLERANCE of the fastest per image: a batch size that runs slower per image than
            # a smaller one (a CPU's caches, as on CPUs without AVX-512) is not used. off: up to BATCH_SIZE.
            BATCH_TUNE=read.flag("BATCH_TUNE", True),
            MAX_BATCH_WAIT_MS=read.number("MAX_BATCH_WAIT_MS", 0.0),  # ms a worker holds a partial batch to fill it
            # Batches a model worker holds at once (1-3): 3 claims and decodes batch N+1 and acks N-1 while the
            # model runs N, each on a processing list of its own; 1 is the serial loop (claim, run, ack). auto:
            # 3 where the model runs on an accelerator, 1 where it runs on the host's cores (OpenVINO, or Keras
            # without a GPU), which it already keeps busy.
            PIPELINE_DEPTH=read.whole_or_auto("PIPELINE_DEPTH", 1),
            QUEUE_MAX=read.whole("QUEUE_MAX", 128, 1),  # messages: /predict answers 503 once the queue holds this many
            REQUEST_TIMEOUT_S=read.number("REQUEST_TIMEOUT_S", 10.0, 0.5),  # seconds from arrival to 504
            RESULT_TTL_S=read.whole("RESULT_TTL_S", 60, 1),  # seconds an unread answer stays in Redis
            # Seconds between a worker's heartbeats, sent from a thread of their own (a batch in hand does not
            # delay them); each also requeues the batches of peers silent for WORKER_TTL_S.
            WORKER_HEARTBEAT_S=read.number("WORKER_HEARTBEAT_S", 0.5, 0.1),
            # Seconds without a heartbeat before a worker counts as dead: /predict then answers 503 and peers
            # requeue its claimed messages. A worker keeps WORKER_TTL_S + WORKER_HEARTBEAT_S + 4 x its largest
            # batch (4 + PIPELINE_DEPTH x when pipelined) < REQUEST_TIMEOUT_S (lowering its batch size where
            # needed; refusing to start if one image breaks it), so a dead worker's requests are answered in time.
            # Too short, and a worker starved of CPU for that long (a niced one under a decode flood) counts as
            # dead; its late answers are then dropped, never doubled.
            WORKER_TTL_S=read.number("WORKER_TTL_S", 3.0, 1.0),
            # --- Model (the model worker only) -------------------------------------------------------------
            # Niceness the model worker runs at (0-19); 0: unchanged. On a CPU-only box whose cores the model shares
            # with gunicorn and Redis, 10-19 lets their short work preempt the model, so 503s stay fast under
            # overload (twice the capacity, 2 cores: 503 p99 21-51 ms at 0, 29 ms at 19; served rate unchanged).
            # The cost: a flood of huge images decoding on every core can starve a niced worker past WORKER_TTL_S,
            # and peers then count it dead. Not needed on a GPU box.
            WORKER_NICE=read.whole("WORKER_NICE", 0),
            # Model worker processes `python stack.py` starts: 0 = one per visible GPU (each with
            # CUDA_VISIBLE_DEVICES=<that GPU>), or 1 without a GPU; N = exactly N (spread over the GPUs in turn).
            # `stack.py --workers N` overrides it.
            MODEL_WORKERS=read.whole("MODEL_WORKERS", 0),
            MODEL_NAME=read.text("MODEL_NAME", "ResNet50"),  # a keras.applications model, e.g. MobileNetV2, VGG16
            # The id the worker serves its model under: its own queue ("<IMAGE_QUEUE>.<MODEL_ID>"), /predict?model=,
            # /v2/models/<MODEL_ID>. Empty: MODEL_PATH's file stem, else MODEL_NAME, lower-cased ("resnet50").
            MODEL_ID=read.text("MODEL_ID", "")
            or default_model_id(read.text("MODEL_NAME", "ResNet50"), read.text("MODEL_PATH", "")),
            # The web's model for requests that name none: empty means the only model served (with several, such a
            # request gets 400 asking for ?model=). Models are found from the workers' registrations in Redis.
            DEFAULT_MODEL=read.text("DEFAULT_MODEL", ""),
            # "imagenet" (Keras downloads and caches it), a local weights file (.h5 or .weights.h5), or "none".
            # Empty (MODEL_WEIGHTS= in an env file) is the default, not random weights.
            MODEL_WEIGHTS=read.text("MODEL_WEIGHTS", "") or "imagenet",
            MODEL_PATH=read.text("MODEL_PATH", ""),  # your own saved Keras model (.keras or .h5); wins over MODEL_NAME
            # Labels file: a JSON list, or the ImageNet index format {"0": [wnid, label], ...}. Required with
            # MODEL_PATH; for keras.applications it replaces the ImageNet index Keras would download.
            LABELS_PATH=read.text("LABELS_PATH", ""),
            # How pixels are scaled before the model: caffe, tf, torch or none. Empty: the keras.applications
            # model's own preprocess_input, or none for MODEL_PATH.
            MODEL_PREPROCESS=read.text("MODEL_PREPROCESS", "").lower(),
            # What runs the model: keras (any Keras backend; GPUs), openvino (CPUs: the Keras model converted, its
            # preprocessing in the graph), or auto: OpenVINO on a machine without a GPU where it is installed.
            MODEL_RUNTIME=read.choice("MODEL_RUNTIME", "auto", MODEL_RUNTIMES),
            # Where OpenVINO keeps converted and compiled models, so a restart does neither again.
            # Empty: $XDG_CACHE_HOME/keras-rest-api, else ~/.cache/keras-rest-api.
            MODEL_CACHE_DIR=read.text("MODEL_CACHE_DIR", ""),
            # Precision. Keras: a dtype policy of a keras.applications model, float32 (auto), mixed_bfloat16 or
            # mixed_float16 (GPUs with tensor cores); a MODEL_PATH model keeps the policy it was saved with.
            # OpenVINO: auto is bf16 where the CPU has it (OpenVINO's own default there), else f32; float32 -> f32,
            # mixed_bfloat16 -> bf16, mixed_float16 -> f16.
            MODEL_PRECISION=read.choice("MODEL_PRECISION", "auto", MODEL_PRECISIONS),
            # Pad each batch to the next of 1, 2, 4, ..., BATCH_SIZE: auto (when Keras compiles the model with XLA:
            # JAX, or TensorFlow on a GPU, where each new batch size would compile on a live request), on, or off.
            BATCH_BUCKETS=read.choice("BATCH_BUCKETS", "auto", BATCH_BUCKET_MODES),
            # --- Web --------------------------------------------------------------------------------------
            # Address the web server binds; 0.0.0.0 or :: to serve others. An IPv6 address may be in brackets ([::1]),
            # as uWSGI needs it; the brackets are dropped here.
            WEB_HOST=read.text("WEB_HOST", "127.0.0.1").removeprefix("[").removesuffix("]"),
            WEB_PORT=read.whole("WEB_PORT", 5000, 1),  # TCP port gunicorn binds
            WEB_WORKERS=read.whole("WEB_WORKERS", 2, 1),  # gunicorn worker processes
            WEB_THREADS=read.whole("WEB_THREADS", 32, 1),  # per gunicorn worker: 2 x 32 = two full batches in flight
            # Seconds gunicorn lets a worker process go silent; uWSGI's harakiri and mod_wsgi's request-timeout in
            # the recipes, which kill a request running this long. Must exceed REQUEST_TIMEOUT_S: raise both together.
            GUNICORN_TIMEOUT_S=read.whole("GUNICORN_TIMEOUT_S", 30, 1),
            MAX_UPLOAD_MB=read.number("MAX_UPLOAD_MB", 16.0, 0.001),  # megabytes: larger bodies get 413 unread
            # Images one web process decodes at once; more wait their turn (503 at the deadline). A decode takes up
            # to ~12 bytes per pixel, so this x WEB_WORKERS x that is the web tier's worst case for image memory.
            DECODE_SLOTS=read.whole("DECODE_SLOTS", 2, 1),
            # Megapixels one web process decodes per second at most, on average: decode work per process, bounded
            # whatever the upload's size (a flat 50-megapixel PNG is a few KB and ~1 s of CPU to decode). An image
            # over the budget gets 503 + Retry-After at once, undecoded. Bursts up to MAX_IMAGE_PIXELS (or one
            # second's budget) pass. JPEGs count at the scale they decode at (a 12 MP photo for 224 x 224: ~0.2 MP).
            # 50 is about one core of decoding; 0: no budget.
            DECODE_MEGAPIXELS_S=read.number("DECODE_MEGAPIXELS_S", 50.0),
            MAX_IMAGE_PIXELS=read.whole("MAX_IMAGE_PIXELS", 50_000_000, 1),  # width x height: more gets 413 undecoded
            TOP_K=read.whole("TOP_K", 5, 1),  # predictions per answer unless the request asks ?top=K
            # --- Security (web) ---------------------------------------------------------------------------
            # API keys, comma-separated: empty (the default, for local use) leaves the service open; with keys set,
            # every request but /, /healthz, /readyz, /openapi.json and the v2 server checks (/v2, /v2/health/live,
            # /v2/health/ready; run_web_server.OPEN_PATHS) needs "Authorization: Bearer <key>" or
            # "X-API-Key: <key>". Keys are secrets: set them from the environment or a secret store, never in code
            # or a committed file. Each must be at least API_KEY_MIN_LENGTH characters, or the service refuses to start.
            API_KEYS=read.api_keys("API_KEYS"),
            # Per-client limit on /predict, in Flask-Limiter's syntax ("10/second;300/minute"); empty: no limit.
            # Counted in the queue's Redis, per API key (or per remote address when API_KEYS is empty).
            RATE_LIMIT=read.rate_limit("RATE_LIMIT"),
            # Proxies in front of gunicorn (nginx: 1) whose X-Forwarded-For/-Proto are trusted; 0: none. Behind a
            # proxy with 0, every client has the proxy's address, and so shares one rate-limit counter.
            TRUSTED_PROXIES=read.whole("TRUSTED_PROXIES", 0),
            LOG_LEVEL=read.choice("LOG_LEVEL", "info", LOG_LEVELS).upper(),  # DEBUG logs every request id answered
            # One JSON object per log line (time, level, logger, pid, message, request_id where known) from the web
            # app, gunicorn's own and access logs, and the model worker; off: the text format above. See logs.py.
            LOG_JSON=read.flag("LOG_JSON"),
            # prometheus-client's multiprocess mode: a directory for each web process's metric files. Under gunicorn,
            # gunicorn_conf.py empties it at start (a private temporary one when unset). Apache mod_wsgi or uWSGI with
            # several processes need it set, to an empty directory of their own. See metrics.py.
            PROMETHEUS_MULTIPROC_DIR=read.text("PROMETHEUS_MULTIPROC_DIR", ""),
        )


current = Settings.from_env()  # read once, at import: a bad value fails the process at start


def __getattr__(name: str):
    """settings.NAME is current.NAME."""
    try:
        return getattr(current, name)
    except AttributeError:
        raise AttributeError(f"module 'settings' has no attribute {name!r}") from None
