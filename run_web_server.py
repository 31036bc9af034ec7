"""The web app: check an upload, queue its pixels for the model worker, wait for the answer.

Never imports TensorFlow or Keras. Serve it with `gunicorn -c gunicorn_conf.py run_web_server:app`;
`python run_web_server.py` starts Flask's development server instead.
"""

import ctypes
import dataclasses
import hashlib
import heapq
import hmac
import logging
import math
import socket
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path

import multipart
import numpy as np
import redis
from flask import Blueprint, Flask, current_app, g, jsonify, request
from flask_limiter import Limiter, RateLimitExceeded
from werkzeug.exceptions import (
    BadRequest,
    ClientDisconnected,
    HTTPException,
    NotFound,
    RequestEntityTooLarge,
    UnsupportedMediaType,
)
from werkzeug.middleware.proxy_fix import ProxyFix

try:  # gunicorn's chunked reader raises its own parse errors, neither OSError nor ValueError, which werkzeug passes on
    from gunicorn.http.errors import ParseException as ChunkedFramingError
except ImportError:  # served by another WSGI server (mod_wsgi, uWSGI)

    class ChunkedFramingError(Exception):
        """Never raised: only gunicorn's reader has framing errors of its own."""


import helpers
import image_queue
import logs
import metrics
import open_inference
import settings

log = logging.getLogger(__name__)

# The settings the app copies into app.config; create_app(config) overrides any of them.
CONFIG_KEYS = (
    "REDIS_URL", "REDIS_SENTINELS", "REDIS_SENTINEL_MASTER", "REDIS_WAIT_REPLICAS", "REDIS_CLUSTER", "REDIS_BLOCK_S",
    "IMAGE_QUEUE", "QUEUE_SHARDS", "DEFAULT_MODEL", "QUEUE_MAX", "REQUEST_TIMEOUT_S", "RESULT_TTL_S",
    "WORKER_TTL_S", "MAX_UPLOAD_MB", "MAX_IMAGE_PIXELS", "TOP_K", "TOP_K_MAX",
    "API_KEYS", "RATE_LIMIT", "TRUSTED_PROXIES", "DECODE_SLOTS", "DECODE_MEGAPIXELS_S",
)  # fmt: skip


class Busy(Exception):
    """Every decode slot of this web process stayed taken until the request's deadline."""


class Late(Exception):
    """The request's deadline passed: its upload and preparation, or its answer, took too long (504)."""


class Refused(Exception):
    """A model worker answered a request's image with an error (its status and message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# Domain errors -> (HTTP status, Retry-After seconds or None).
ERRORS = {
    helpers.NotAnImage: (400, None),
    helpers.ImageTooLarge: (413, None),
    helpers.UnsupportedImage: (415, None),
    image_queue.QueueFull: (503, 1),
    image_queue.NoWorker: (503, 5),
    image_queue.QueueUnavailable: (503, 5),
    image_queue.Draining: (503, 5),
    image_queue.UnknownModel: (404, None),
    image_queue.NoModelNamed: (400, None),
    Busy: (503, 1),
    Late: (504, None),
}
# /predict's 503s by cause, for predict_rejected_total{reason}; also "worker_503" (a 503 answered through the
# queue: an image prepared for another model size, or purged by an operator) and "rate_limit" (429).
REJECT_REASONS = {
    image_queue.QueueFull: "queue_full",
    image_queue.NoWorker: "no_worker",
    image_queue.QueueUnavailable: "redis",
    image_queue.Draining: "draining",
    Busy: "busy",
}

# A request reuses its queue's status read within this many seconds (live workers, the model's input size, the
# Redis clock): a round trip less per request in a burst. The push re-checks drain, bound and workers at once.
STATUS_REUSE_S = 0.25

# What anyone may call even when API_KEYS is set: the welcome text, health checks, the API description.
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/openapi.json", "/v2", "/v2/health/live", "/v2/health/ready"})
OPEN_PREFIX = "/static/"  # the web page's own files (static/: script and style sheet), open like the page

# What GET / sends a browser: plain HTML, CSS and JS from static/, no build step, nothing from elsewhere.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}

WELCOME = """Image classification service.

POST an image to /predict and get the top-{top} labels with probabilities as JSON:
    curl -X POST -F image=@photo.jpg {url}predict
    curl -X POST -H 'Content-Type: image/jpeg' --data-binary @photo.jpg '{url}predict?top=3'
Health: GET /healthz (process up), GET /readyz (Redis and a model worker ready).
Open {url} in a browser for a page that sends an image and shows the answer.
"""

# The API's OpenAPI description, kept in the repository beside this module and served as is.
OPENAPI = Path(__file__).with_name("openapi.json").read_bytes()

bp = Blueprint("api", __name__)


def create_app(config: dict | None = None) -> Flask:
    """The Flask app; config overrides settings (tests pass their Redis URL, queue name, ...)."""
    settings.current.check_web()
    app = Flask(__name__)
    app.config.from_mapping({key: getattr(settings, key) for key in CONFIG_KEYS})
    app.config.update(config or {})
    app.config["MAX_CONTENT_LENGTH"] = int(app.config["MAX_UPLOAD_MB"] * 1024 * 1024)
    helpers.configure_pillow(app.config["MAX_IMAGE_PIXELS"])
    return_large_blocks_to_the_os()
    app.extensions["models"] = image_queue.ModelDirectory(app.config, image_queue.WEB_SOCKET_MARGIN_S)
    app.extensions["decode_slots"] = threading.BoundedSemaphore(app.config["DECODE_SLOTS"])
    app.extensions["decode_budget"] = DecodeBudget(app.config["DECODE_MEGAPIXELS_S"], app.config["MAX_IMAGE_PIXELS"])
    app.extensions["api_keys"] = [hashlib.sha256(key.encode()).digest() for key in app.config["API_KEYS"]]
    app.before_request(require_api_key)  # registered first: runs before the rate limit, before any body is read
    if app.config["RATE_LIMIT"]:
        app.extensions["rate_limiter"] = rate_limiter(app)
    if app.config["TRUSTED_PROXIES"]:
        hops = app.config["TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)
    app.register_blueprint(bp)
    for error in ERRORS:
        app.register_error_handler(error, domain_error)
    app.register_error_handler(Refused, refused)
    app.register_error_handler(RequestEntityTooLarge, too_large)
    app.register_error_handler(RateLimitExceeded, too_many_requests)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected_error)
    app.after_request(add_request_id)
    app.after_request(drain_unread_body)
    app.after_request(count_request)
    app.teardown_request(lambda exc: logs.REQUEST_ID.set(None))  # threads serve many requests
    return app


def return_large_blocks_to_the_os() -> None:
    """Have glibc hand every allocation over 128 KiB straight back to the OS when it is freed.

    By default glibc raises that threshold after the first large free, and each thread's arena then
    keeps the memory of the huge images it decoded: 16 threads took 4.5 GB where 1.2 GB were ever in
    use at once (DECODE_SLOTS=2, 50-megapixel PNGs). The cost is one mmap per large buffer (decoded
    images, uploads, ~200 KB messages): microseconds against a decode. Process-wide; elsewhere than
    glibc, nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; setting it also stops glibc from raising it
    except (OSError, AttributeError):
        pass


def models() -> image_queue.ModelDirectory:
    return current_app.extensions["models"]


# --- API keys and rate limit --------------------------------------------------------------------


def require_api_key():
    """With API_KEYS set, every request but OPEN_PATHS needs a valid key: 401 before its body is read."""
    if request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIX):
        return None
    refusal = api_key_refusal()
    return unauthorized(refusal) if refusal else None


def api_key_refusal() -> str | None:
    """Why this request's API key is refused, or None when keys are off or it carries a valid one.

    The presented key is hashed like the configured ones, so every comparison is between equal
    lengths, and it is compared with every key (hmac.compare_digest, no early exit): the time taken
    tells neither which key matched nor how much of one. The key itself is never logged.
    """
    known = current_app.extensions["api_keys"]
    if not known:
        return None
    presented = presented_api_key()
    if presented is None:
        return "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    digest = hashlib.sha256(presented.encode()).digest()
    valid = False
    for key_digest in known:
        valid |= hmac.compare_digest(digest, key_digest)
    if not valid:
        # the path as repr: percent-decoded, it may hold a line break that would forge a log line
        log.info("%s %r: 401, an unknown API key from %s", request.method, request.path, request.remote_addr)
        return "the API key is not valid"
    g.client_id = f"key-{digest.hex()[:16]}"  # what the rate limit counts against: a hash, not the key
    return None


def presented_api_key() -> str | None:
    """The key from "Authorization: Bearer <key>", else from "X-API-Key: <key>"; None if neither is sent."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key", "").strip() or None


def unauthorized(message: str):
    response = error_response(401, message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="predict"'
    return response


def rate_limiter(app: Flask) -> Limiter:
    """Flask-Limiter applying RATE_LIMIT to /predict and v2 infer, per client, one budget for both (an
    application limit: a client cannot double it by switching protocols), counted in the queue's own Redis.

    The counters go through the queue's connection pool (same URL, password, TLS, timeouts, no
    retries) under "{IMAGE_QUEUE}:ratelimit:", so two services sharing a Redis count apart. When that
    Redis fails, counting falls back to this process's memory (same limits, per process) until it
    answers again, rechecked with backoff: a dead Redis must not turn requests into 500s, and
    /predict answers 503 on its own then. swallow_errors would let everything through unlimited and
    log a traceback per request instead.
    """
    prefix = f"{{{app.config['IMAGE_QUEUE']}}}:ratelimit"  # the queue's hash tag: its slot on a cluster too
    if app.config.get("REDIS_CLUSTER"):  # a cluster client has no one pool: limits' cluster storage, same node
        storage_uri, options = cluster_storage(app.config["REDIS_URL"])
        timeout = app.config["REDIS_BLOCK_S"] + image_queue.WEB_SOCKET_MARGIN_S
        storage_options = options | {"key_prefix": prefix, "socket_timeout": timeout, "socket_connect_timeout": timeout}
    else:  # limits' Redis storage, through the queue's own pool (also a Sentinel one)
        storage_uri = "redis://"
        storage_options = {"connection_pool": app.extensions["models"].client.connection_pool, "key_prefix": prefix}
    limiter = Limiter(
        client_id,
        app=app,
        application_limits=[app.config["RATE_LIMIT"]],
        strategy="fixed-window",
        storage_uri=storage_uri,
        storage_options=storage_options,
        in_memory_fallback_enabled=True,
    )
    limiter.request_filter(lambda: request.endpoint not in LIMITED)  # health checks are never limited
    return limiter


def cluster_storage(url: str) -> tuple[str, dict]:
    """limits' URI of REDIS_URL's cluster node, and the options that give its client what the queue's has from
    the same URL: the password and user percent-decoded as redis-py decodes them (limits would send them as
    written), TLS and its ssl_* options for rediss:// (a URI of host and port alone would drop them), port 6379
    when none is given (limits refuses a URI without one)."""
    from_url = redis.connection.parse_url(url)
    host, port = from_url.pop("host", "localhost"), from_url.pop("port", 6379)
    from_url.pop("db", None)  # a cluster has one database
    if from_url.pop("connection_class", None) is redis.SSLConnection:
        from_url["ssl"] = True
    return f"redis+cluster://{f'[{host}]' if ':' in host else host}:{port}", from_url


LIMITED = frozenset({"api.predict", "api.v2_infer"})  # what RATE_LIMIT counts: requests to classify images


def client_id() -> str:
    """Whom a request counts against: its API key (hashed) when keys are on, else its remote address."""
    return g.get("client_id") or request.remote_addr or "unknown"


def too_many_requests(exc: RateLimitExceeded):
    """429 with Retry-After: the seconds until this client's window resets (at least 1)."""
    try:
        reset_at = current_app.extensions["rate_limiter"].current_limit.reset_at
    except Exception:  # its storage failed since counting this request: a whole window is always enough
        reset_at = time.time() + exc.limit.limit.get_expiry()
    retry_after = max(1, math.ceil(reset_at - time.time()))
    message = f"too many requests: the limit is {exc.description}; retry in {retry_after} s"
    g.reject_reason = "rate_limit"
    return error_response(429, message, retry_after)


@bp.get("/")
def index():
    """The web page (static/index.html) for browsers, which prefer HTML; a short text on how to call
    /predict for curl and every other client (no Accept header, */*, text/plain)."""
    if request.accept_mimetypes.best_match(["text/plain", "text/html"]) == "text/html":
        response = current_app.send_static_file("index.html")
        response.headers.update(PAGE_HEADERS)
    else:
        text = WELCOME.format(top=current_app.config["TOP_K"], url=request.host_url)
        response = current_app.make_response((text, 200, {"Content-Type": "text/plain; charset=utf-8"}))
    response.vary.add("Accept")  # one URL, two bodies: caches must keep them apart
    return response


@bp.get("/openapi.json")
def openapi():
    """This API's OpenAPI description (openapi.json in the repository)."""
    return OPENAPI, 200, {"Content-Type": "application/json"}


@bp.get("/healthz")
def healthz():
    """The web process is up (it does not look at Redis or the workers)."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    """Ready when Redis answers and a model worker's heartbeat is fresh: of any model, or of ?model=<id>.

    Lists each model's readiness under "models"; the figures of the model a request naming none would go
    to (DEFAULT_MODEL, or the only one) are also at the top, as before models had names. Open to load
    balancers without a key; with API_KEYS set, the figures are shown only to a request with a valid key,
    as on /metrics.
    """
    wanted = query_arg("model")
    if wanted:
        try:
            models().queue(wanted)  # 404 for a model nobody serves
        except image_queue.UnknownModel:
            if api_key_refusal():  # the served models are not listed to a request without a valid key
                raise image_queue.UnknownModel(f"no model {wanted!r} is served") from None
            raise
    each = ready_statuses([wanted] if wanted else models().ids())
    if api_key_refusal():
        return jsonify(ready=True)
    body = {"ready": True, "models": {model_id: describe(status) for model_id, status in each.items()}}
    try:
        default = wanted or models().default_id()
    except image_queue.NoModelNamed:
        default = None
    if isinstance(each.get(default), image_queue.Status):
        body |= {k: v for k, v in body["models"][default].items() if k != "ready"}
    return jsonify(body)


def ready_statuses(model_ids: list[str]) -> dict[str, image_queue.Status | Exception]:
    """Each model's live status, or why it is not ready (no worker, draining, Redis failing); raises the first
    model's reason (503) when none is ready."""
    each: dict[str, image_queue.Status | Exception] = {}
    for model_id in model_ids:
        try:
            each[model_id] = live_status(models().queue(model_id))
        except (image_queue.NoWorker, image_queue.Draining, image_queue.QueueUnavailable) as exc:
            each[model_id] = exc
    if not any(isinstance(status, image_queue.Status) for status in each.values()):
        raise next(iter(each.values()), image_queue.NoWorker())
    return each


def describe(status: image_queue.Status | Exception) -> dict:
    if isinstance(status, Exception):
        return {"ready": False, "error": str(status)}
    model = status.model
    return {
        "ready": True,
        "workers": status.live_workers,
        "model": {"name": model.name, "width": model.width, "height": model.height, "classes": model.classes},
        "queue_depth": status.queue_depth,
        "in_progress": status.held - status.queue_depth,
    }


@bp.get("/metrics")
def prometheus_metrics():
    """Prometheus metrics (metrics.py says which). With API_KEYS set it needs a key, as /predict does:
    request counts and queue depths tell traffic volumes, which are not for everyone to see."""
    body, content_type = metrics.exposition(models(), request.headers.get("Accept"))
    return body, 200, {"Content-Type": content_type}


@bp.post("/predict")
def predict():
    """Classify one image: multipart field "image", or the raw body with Content-Type image/*; ?model=<id>
    picks the model (default: DEFAULT_MODEL, or the only one served), ?top=K how many labels."""
    name_request()
    top = requested_top()
    trip = Trip(requested_model())
    image = trip.prepare(trip.read(read_upload))
    answer = trip.answer([image], top)[0]
    response = jsonify(success=True, predictions=answer["predictions"])
    response.headers["Server-Timing"] = trip.server_timing(answer)
    return response


# --- The Open Inference Protocol (v2), REST: open_inference.py reads and writes its bytes -------------------


@bp.get("/v2")
def v2_server_metadata():
    return jsonify(name="keras-rest-api", version=open_inference.PROTOCOL_VERSION, extensions=open_inference.EXTENSIONS)


@bp.get("/v2/health/live")
def v2_live():
    return jsonify(live=True)


@bp.get("/v2/health/ready")
def v2_ready():
    """Ready when a model worker of any model is, as /readyz."""
    ready_statuses(models().ids())
    return jsonify(ready=True)


@bp.get("/v2/models/<model_id>")
@bp.get("/v2/models/<model_id>/versions/<version>")
def v2_model_metadata(model_id: str, version: str | None = None):
    model = v2_status(model_id, version).model
    return jsonify(open_inference.model_metadata(model_id, model.height, model.width, model.classes, model.runtime))


@bp.get("/v2/models/<model_id>/ready")
@bp.get("/v2/models/<model_id>/versions/<version>/ready")
def v2_model_ready(model_id: str, version: str | None = None):
    v2_status(model_id, version)
    return jsonify(name=model_id, ready=True)


@bp.post("/v2/models/<model_id>/infer")
@bp.post("/v2/models/<model_id>/versions/<version>/infer")
def v2_infer(model_id: str, version: str | None = None):
    """Classify the request's images (BYTES, encoded) or pixels (UINT8), one queue message each, batched
    with /predict's; answered all together, or failed as a whole."""
    name_request()
    v2_version(version)
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise UnsupportedMediaType("send the request uncompressed (no Content-Encoding: gzip or deflate)")
    trip = Trip(model_id)
    body = trip.read(read_body)
    # One decode slot for the parse and every image's decode: a JSON body parses into ~11 x its size (bounded as
    # a decode is), and a request's images do not queue for a slot again between each other (which under load
    # kept some requests waiting turn after turn)
    with decode_slot(trip.deadline):
        try:
            infer = open_inference.parse_infer_request(
                body, request.headers.get(open_inference.HEADER_LENGTH), trip.size, trip.model.classes,
                trip.shard.queue_max,
            )  # fmt: skip
        except open_inference.ProtocolError as exc:
            raise BadRequest(str(exc)) from None
        if infer.images is not None:
            images = [trip.prepare(upload, slot_held=True) for upload in infer.images]
        else:
            images = list(infer.pixels)
    # The body and the encoded images are not needed while the request waits for its answers (up to
    # REQUEST_TIMEOUT_S): held, 8 waiting requests of 14 MB took 200 MB, against 2 MB on /predict
    del body
    infer = dataclasses.replace(infer, images=None)
    top = infer.classification or current_app.config["TOP_K"]
    answers = trip.answer(images, top, probabilities=not infer.classification)
    payload, headers = open_inference.infer_response(model_id, infer, answers)
    return payload, 200, headers | {"Server-Timing": trip.server_timing(answers[0])}


def v2_version(version: str | None) -> None:
    if version not in (None, open_inference.VERSION):
        raise NotFound(f"no version {version!r}: each model is served as version {open_inference.VERSION}")


def v2_status(model_id: str, version: str | None) -> image_queue.Status:
    """A served model's live status: 404 for an unknown model or version, 503 when it is not ready."""
    v2_version(version)
    return live_status(models().queue(model_id))


def name_request() -> None:
    """Give the request its id: in X-Request-ID, and on every line logged while serving it (LOG_JSON)."""
    g.request_id = uuid.uuid4().hex
    logs.REQUEST_ID.set(g.request_id)


class Trip:
    """One request's trip through its model's queue: admitted (503 before the upload is read when nothing
    could answer it), its upload read and its images prepared by the deadline (else 504), one queue message
    per image, pushed together, and every answer waited for by the same deadline."""

    def __init__(self, model_id: str):
        self.model_id, self.arrived = model_id, time.monotonic()
        self.timeout = current_app.config["REQUEST_TIMEOUT_S"]
        self.deadline = self.arrived + self.timeout  # time.monotonic()
        # No worker, no Redis or a full queue: 503 before the upload is even read, so that refusing is cheap
        # when it matters most, under overload. enqueue() re-checks the queue atomically.
        self.shard, self.status = live_shard(models().queue(model_id))
        self.read_at = time.monotonic()  # when status.server_time was read: maps our clock onto Redis's
        self.model = self.status.model
        if self.status.held >= self.shard.queue_max:
            raise image_queue.QueueFull(f"the queue holds {self.status.held} images")

    @property
    def size(self) -> tuple[int, int]:
        return self.model.width, self.model.height

    def late(self) -> Late:
        return Late(f"the image took longer than {self.timeout:g} s to upload and prepare")

    def read(self, read_body) -> bytes:
        """read_body() under the upload deadline: a body still arriving at the deadline ends with 504."""
        with UPLOAD_DEADLINES.watch(request.environ.get("gunicorn.socket"), self.deadline) as watch:
            try:
                return read_body()
            except (BadRequest, OSError):
                if watch.fired:  # the body stopped at the deadline: the client was too slow, not wrong
                    raise self.late() from None
                raise

    def prepare(self, upload: bytes, slot_held: bool = False) -> np.ndarray:
        """An uploaded image's pixels at the model's input size, within the decode budget and slots. Reading
        the header is decoding work too (a PNG's or JPEG's metadata chunks, a TIFF's strips: seconds for a few
        MB crafted so), so it holds the slot as well. An upload that does not even start like a format we
        decode is refused at once instead (400, or 415 for a format Pillow knows), not after a wait for a slot."""
        if not helpers.has_accepted_signature(upload):
            helpers.open_image(upload, current_app.config["MAX_IMAGE_PIXELS"]).close()  # raises, unless Pillow finds
            # one of our formats after all: then it is decoded as any other
        with nullcontext() if slot_held else decode_slot(self.deadline):
            if time.monotonic() >= self.deadline:  # a slow upload, or a slot freed at the deadline
                raise self.late()
            image = helpers.open_image(upload, current_app.config["MAX_IMAGE_PIXELS"])
            try:
                current_app.extensions["decode_budget"].spend(helpers.decoded_pixels(image, self.size))
                return helpers.prepare_image(image, self.size)
            finally:
                image.close()  # frees the decoded upload (~200 MB for a 50-megapixel RGBA image) before the wait

    def answer(self, images: list[np.ndarray], top: int, probabilities: bool = False) -> list[dict]:
        """Queue the images (one message each, pushed together) and wait for every answer by the deadline;
        the first error any of them got fails the whole request."""
        if time.monotonic() >= self.deadline:
            raise self.late()
        # Each message's deadline on the Redis clock: the server time read, plus what is left of ours.
        deadline = self.status.server_time + self.timeout - (self.read_at - self.arrived)
        ids = [g.request_id] + [f"{g.request_id}-{n}" for n in range(1, len(images))]
        messages = [
            image_queue.encode_message(i, deadline, top, image, probabilities)
            for i, image in zip(ids, images, strict=True)
        ]
        self.shard.enqueue(*messages, need_worker=True, deadline=self.deadline)  # the status may be old: check again
        self.queued = time.monotonic()
        try:
            answers = [self.check(raw, probabilities) for raw in self.shard.answers(ids, self.deadline)]
        except (Late, Refused, image_queue.QueueUnavailable):
            if len(messages) > 1:  # the request fails as a whole: its other images need not run
                self.shard.withdraw(messages, ids)
            raise
        now = time.monotonic()
        metrics.observe_prediction(
            self.model_id, now - self.arrived, now - self.queued, answers[0]["inference_ms"] / 1000
        )
        return answers

    def check(self, raw: bytes | None, probabilities: bool) -> dict:
        """One message's answer (None: none by the deadline); Late, or Refused with the status the worker answered."""
        if raw is None:
            raise Late(f"no answer within {self.timeout:g} s; the model workers are overloaded or stalled")
        answer = image_queue.decode_answer(raw)
        if "error" in answer:
            if answer["status"] == 503:
                g.reject_reason = "worker_503"
            raise Refused(answer["status"], answer["error"])
        if probabilities and "probabilities" not in answer:  # a worker from before the v2 protocol
            raise Refused(503, "the model's workers are too old to answer with every probability; upgrade them")
        return answer

    def server_timing(self, answer: dict) -> str:
        queued_on_redis_clock = self.status.server_time + (self.queued - self.read_at)  # just after the push
        return server_timing(self.arrived, self.queued, queued_on_redis_clock, answer)


def server_timing(arrived: float, queued: float, queued_on_redis_clock: float, answer: dict) -> str:
    """Where the request's time went (ms): prepare (upload, decode, resize) then wait for the answer, which is
    queue (until a worker took it, on the Redis clock) + inference (its batch's forward pass) + return (the
    rest: the worker's decoding and answer, Redis, waking this thread). Older workers send no claim time."""
    now = time.monotonic()
    wait_ms, inference_ms = (now - queued) * 1000, answer["inference_ms"]
    inference = f'inference;dur={inference_ms:.1f};desc="batch of {answer["batch_size"]}"'
    parts = [f"prepare;dur={(queued - arrived) * 1000:.1f}", f"wait;dur={wait_ms:.1f}", inference]
    if "claimed" in answer:
        queue_ms = min(max(0.0, (answer["claimed"] - queued_on_redis_clock) * 1000), max(0.0, wait_ms - inference_ms))
        return_ms = max(0.0, wait_ms - queue_ms - inference_ms)
        parts[2:] = [f"queue;dur={queue_ms:.1f}", inference, f"return;dur={return_ms:.1f}"]
    parts.append(f"total;dur={(now - arrived) * 1000:.1f}")
    return ", ".join(parts)


class DecodeBudget:
    """DECODE_MEGAPIXELS_S: a token bucket of decoded pixels for this process. Decode slots bound how many
    images decode at once, not how much: a few KB of flat PNG can be 50 megapixels and ~1 s of CPU, so a
    client sending them could keep every slot busy. An image that would overdraw the budget is refused
    before it is decoded (503 + Retry-After): its header is read (under a decode slot), its pixels are not."""

    def __init__(self, megapixels_s: float, burst_pixels: int):
        self.rate = megapixels_s * 1e6
        self.capacity = max(float(burst_pixels), self.rate)
        self.tokens, self.updated = self.capacity, time.monotonic()
        self.lock = threading.Lock()

    def spend(self, pixels: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if pixels > self.tokens:
                wait_s = (pixels - self.tokens) / self.rate
                raise Busy(
                    f"this server is decoding its budget of {self.rate / 1e6:g} megapixels a second "
                    f"(DECODE_MEGAPIXELS_S); this image ({pixels / 1e6:.1f} MP) can be decoded in {wait_s:.1f} s"
                )
            self.tokens -= pixels


@contextmanager
def decode_slot(deadline: float):
    """Hold one of this process's DECODE_SLOTS while an image is decoded.

    A decode can take ~12 bytes per pixel (a 50-megapixel RGBA PNG: ~600 MB), so a flood of huge
    images would otherwise take WEB_THREADS times that. Waits its turn until the deadline, then 503.
    """
    slots = current_app.extensions["decode_slots"]
    if not slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise Busy(f"all {current_app.config['DECODE_SLOTS']} image decoders stayed busy until the deadline")
    try:
        yield
    finally:
        slots.release()


def live_shard(queue) -> tuple[image_queue.ImageQueue, image_queue.Status]:
    """The queue this request goes to, and its status (read at most STATUS_REUSE_S ago). With QUEUE_SHARDS, the
    next shard in turn (round-robin), passing over shards whose Redis fails (a Cluster master failing over) to
    the others."""
    tries = len(getattr(queue, "shards", ())) or 1
    for attempt in range(tries):
        shard = queue.pick()
        try:
            return shard, check_live(shard.recent_status(STATUS_REUSE_S))
        except image_queue.QueueUnavailable:
            if attempt == tries - 1:
                raise


def live_status(queue) -> image_queue.Status:
    """A model's queue's status (or one shard's), or NoWorker (503) when no model worker's heartbeat is fresh."""
    return check_live(queue.status())


def check_live(status: image_queue.Status) -> image_queue.Status:
    """The status, or Draining / NoWorker (503) when it says the queue takes no requests now."""
    refusal = status.refusal()
    if refusal is not None:
        raise refusal
    return status


def query_arg(name: str) -> str | None:
    """A query string parameter; 400 for a raw byte that is not UTF-8 (gunicorn refuses one itself, mod_wsgi
    passes it on and werkzeug raises UnicodeDecodeError)."""
    try:
        return request.args.get(name)
    except UnicodeDecodeError:
        raise BadRequest("the query string is not valid UTF-8 (percent-encode it)") from None


def requested_model() -> str:
    """The model a request names (?model=<id>), else DEFAULT_MODEL, else the only one served."""
    return query_arg("model") or models().default_id()  # ?model= (empty) names none


def requested_top() -> int:
    raw, most = query_arg("top"), current_app.config["TOP_K_MAX"]
    if raw is None:
        return current_app.config["TOP_K"]
    if not (raw.isascii() and raw.isdecimal() and len(raw) <= 3 and 1 <= int(raw) <= most):
        raise BadRequest(f"top must be a whole number from 1 to {most}, got {raw!r}")
    return int(raw)


def read_upload() -> bytes:
    """The image bytes from a multipart form or a raw image body; 400 says how to send one."""
    if request.mimetype == "multipart/form-data":
        parts = parse_form()
        files = [data for name, is_file, data in parts if name == "image" and is_file]
        if len(files) > 1:
            raise BadRequest(f"send one image per request, not {len(files)} 'image' fields")
        if not files and any(name == "image" for name, _, _ in parts):
            raise BadRequest("the 'image' field is text, not a file: send the file itself (curl -F image=@photo.jpg)")
        if not files:
            sent = sorted({name or "(no name)" for name, _, _ in parts})  # a part may have none
            raise BadRequest(f"no 'image' field in the form (fields sent: {', '.join(sent) or 'none'})")
        return files[0]
    if request.mimetype.startswith("image/") or request.mimetype == "application/octet-stream":
        return read_body()
    raise BadRequest(
        "no image: send it as the multipart form field 'image' (curl -F image=@photo.jpg) "
        "or as the request body with Content-Type image/*"
    )


def parse_form() -> list[tuple[str | None, bool, bytes]]:
    """The parts of a multipart form as (field name, whether it is a file, its bytes); the bytes of the
    'image' fields only, the others' are dropped. 400 for a malformed or cut-short form.

    The body is read as a raw one is (read_body: one read when its length is known), and parsed in one piece
    by multipart's push parser (the parser Python's docs name in place of the cgi module), which finds the
    boundary with bytes.find. Fed in 1 MB pieces, it copies what it keeps from one to the next: a 3.6 MB form
    took 5 ms of CPU that way, 0.4 ms whole. werkzeug's parser, which Flask's request.files uses, compiles
    regular expressions for each request's boundary, and every client makes a new one, so Python's regex cache
    never helps: 0.5-1.1 ms of CPU per /predict form against 0.14-0.27 ms now (BENCHMARKS.md).
    """
    boundary = request.mimetype_params.get("boundary")
    if not boundary:
        raise BadRequest("the multipart form is malformed: its Content-Type has no boundary parameter")
    body, parts = read_body(), []
    try:
        with multipart.PushMultipartParser(boundary, len(body), max_segment_count=FORM_PARTS_MAX) as parser:
            for chunk in (body, b""):  # b"": the end, where the parser checks that the form was whole
                for event in parser.parse(chunk):
                    if isinstance(event, multipart.MultipartSegment):
                        data = [] if event.name == "image" else None
                        parts.append((event.name, event.filename is not None, data))
                    elif event and data is not None:
                        data.append(event)
    except multipart.ParserLimitReached as exc:
        raise BadRequest(f"the multipart form is over a limit ({exc})") from None
    except multipart.MultipartError as exc:
        if any(isinstance(arg, UnicodeDecodeError) for arg in exc.args):
            raise BadRequest("a form part's headers are not UTF-8: send the file name in UTF-8") from None
        raise BadRequest(f"the multipart form is malformed or cut short ({exc})") from None
    return [(name, is_file, b"".join(data) if data is not None else b"") for name, is_file, data in parts]


FORM_PARTS_MAX = 1000  # parts in one form (Flask's own MAX_FORM_PARTS)


CUT_SHORT = "the upload was cut short: the body ended before the length its Content-Length header gave"
BAD_CHUNKS = "the chunked upload is malformed or cut short"


def read_body() -> bytes:
    """The request body, a raw image's or a form's. werkzeug quietly stops a chunked body at MAX_CONTENT_LENGTH
    and returns what arrived of a body cut short: the first is refused with 413, the second with 400.

    A body of known length is read in one call: werkzeug's get_data() reads 64 KB at a time, and gunicorn
    (27) answers each of those from a read-ahead buffer of up to 1 MB that it copies whole every time, so a
    1.2 MB body arriving faster than it was read cost the web most of its CPU (BENCHMARKS.md)."""
    declared = request.content_length
    try:
        if declared is not None:
            data = read_exactly(request.stream, declared)
        else:
            data = request.get_data(cache=False)
            if len(data) >= request.max_content_length and request.input_stream.read(1):
                raise RequestEntityTooLarge()
    except ClientDisconnected:
        raise BadRequest(CUT_SHORT if declared is not None else BAD_CHUNKS) from None
    except ChunkedFramingError:  # a chunk size that is not hex, a chunk without its end
        raise BadRequest(BAD_CHUNKS) from None
    except OSError as exc:  # gunicorn: a chunked body cut short (NoMoreData); mod_wsgi, uWSGI: their read failed
        log.warning("the upload could not be read: %s", exc)
        raise BadRequest(f"the upload could not be read ({exc}): it was cut short or sent too slowly") from None
    if declared is not None and len(data) < declared:
        raise BadRequest(CUT_SHORT)
    g.body_read = True
    return data


def read_exactly(stream, size: int) -> bytes:
    """size bytes from stream, fewer only if it ends first: in as few reads as the server gives (one under
    gunicorn; a WSGI server may return less than asked)."""
    chunks, got = [], 0
    while got < size and (chunk := stream.read(size - got)):
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def error_response(status: int, message: str, retry_after: int | None = None):
    """{"success": false, "error": ...}; on the v2 protocol's paths, its own {"error": ...}."""
    v2 = request.path == "/v2" or request.path.startswith("/v2/")
    response = jsonify(error=message) if v2 else jsonify(success=False, error=message)
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def domain_error(exc: Exception):
    status, retry_after = next(v for cls, v in ERRORS.items() if isinstance(exc, cls))
    reason = next((r for cls, r in REJECT_REASONS.items() if isinstance(exc, cls)), None)
    if reason:
        g.reject_reason = reason
    if isinstance(exc, image_queue.QueueMisconfigured):  # the same refusal for every request until fixed: once
        if str(exc) not in _SAID:
            _SAID.add(str(exc))
            log.error("%s (logged once per web process)", exc)
    elif status >= 500 and not isinstance(exc, Late):  # a 504 is counted (predict_timeouts_total), not logged
        log.warning("%s %s: %d %s", request.method, request.path, status, exc)
    return error_response(status, str(exc), retry_after)


_SAID: set[str] = set()  # configuration errors this process has logged


def refused(exc: Refused):
    return error_response(exc.status, str(exc), retry_after=1 if exc.status == 503 else None)


def too_large(exc: RequestEntityTooLarge):
    return error_response(413, f"the upload is larger than {current_app.config['MAX_UPLOAD_MB']:g} MB")


def http_error(exc: HTTPException):
    response = error_response(exc.code or 500, exc.description or exc.name)
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def unexpected_error(exc: Exception):
    log.exception("%s %s failed", request.method, request.path)
    return error_response(500, "internal error; the service log has the details")


def add_request_id(response):
    if "request_id" in g:
        response.headers["X-Request-ID"] = g.request_id
    return response


class UploadDeadlines:
    """Ends the upload of a request still being read at its deadline, so slow clients cannot hold every
    thread of a box (one trickling a byte a second would otherwise keep its thread for as long as it likes).

    Under gunicorn, one watcher thread per process keeps the deadlines of the uploads being read and, at
    one's deadline, shuts the reading side of that request's socket: the blocked read returns at once, the
    request gets its 504, and gunicorn closes the connection instead of reading the rest. A per-read socket
    timeout would not do: a trickle of one byte per read never times out. Other servers bound a request's
    reads themselves (mod_wsgi's socket-timeout, uWSGI's harakiri), and there watch() does nothing.
    """

    class Watch:
        fired = False

    def __init__(self):
        self.heap: list[tuple[float, int, socket.socket, UploadDeadlines.Watch]] = []
        self.wake = threading.Condition()
        self.count = 0
        self.thread: threading.Thread | None = None

    @contextmanager
    def watch(self, sock: socket.socket | None, deadline: float):
        watch = self.Watch()
        if sock is None:
            yield watch
            return
        with self.wake:
            self.count += 1
            entry = (deadline, self.count, sock, watch)
            if self.thread is None or not self.thread.is_alive():  # started lazily: a forked worker has none
                self.thread = threading.Thread(target=self._run, name="upload-deadlines", daemon=True)
                self.thread.start()
            heapq.heappush(self.heap, entry)
            self.wake.notify()
        try:
            yield watch
        finally:
            with self.wake:
                if entry in self.heap:
                    self.heap.remove(entry)
                    heapq.heapify(self.heap)

    def _run(self) -> None:
        with self.wake:
            while True:
                if not self.heap:
                    self.wake.wait()
                    continue
                deadline, _, sock, watch = self.heap[0]
                if (left := deadline - time.monotonic()) > 0:
                    self.wake.wait(left)
                    continue
                heapq.heappop(self.heap)
                watch.fired = True
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass  # already closed


UPLOAD_DEADLINES = UploadDeadlines()

DRAIN_S = 5.0  # the longest drain_unread_body reads a refused upload (gunicorn drains 64 KB for as long)


def drain_unread_body(response):
    """Under gunicorn, read and drop what is left of an upload answered without being read (a 503 before
    the upload is read, 401, 429, a bad ?top=), up to the upload limit and for at most DRAIN_S.

    gunicorn drains at most 64 KB of a body left unread before it reuses the connection; past that it
    closes the socket with the rest unread, so the kernel resets the connection and the client never sees
    the answer ("Connection aborted" instead of the 503): a photo over 64 KB lost its refusal. The time
    bound (gunicorn's own for its drain) keeps a refusal cheap for a client that trickles its body: it
    then gets the connection closed, as before. A body declared over the limit (413) or chunked is never
    read. Other servers keep their own handling (Apache reads and drops an unread body itself).
    """
    sock = request.environ.get("gunicorn.socket")
    length = request.content_length
    if sock is None or not length or length > request.max_content_length:
        return response
    if g.get("body_read"):
        return response  # read to its end already: the usual case, and no socket call (each releases the GIL)
    deadline = time.monotonic() + DRAIN_S
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not request.stream.read(64 * 1024):
                break
    except (ClientDisconnected, OSError):
        pass  # gone, stalled or too slow: gunicorn finds the body unread and closes the connection
    finally:
        sock.settimeout(None)  # gunicorn's threads use blocking sockets
    return response


def count_request(response):
    """Count every answer by route, method and status; /predict's refusals by cause and its timeouts."""
    metrics.count_request(request.url_rule.rule if request.url_rule else None, request.method, response.status_code)
    if request.endpoint in LIMITED:
        if "reject_reason" in g:
            metrics.PREDICT_REJECTED.labels(g.reject_reason).inc()
        elif response.status_code == 504:
            metrics.PREDICT_TIMEOUTS.inc()
    return response


app = create_app()

if __name__ == "__main__":
    logs.configure()
    app.run(host=settings.WEB_HOST, port=settings.WEB_PORT, threaded=True)
