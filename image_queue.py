"""The Redis queue protocol, shared by the web workers and the model workers: its keys, its message bytes,
and every step that touches Redis. This docstring is the one description of the protocol; the README
links here. Imports neither Flask nor a model runtime, and its tests run against a real Redis alone.

Keys (IMAGE_QUEUE = "image_queue"; each built by Keys, nowhere else):
    {image_queue}:queue                 list of messages waiting; the web LPUSHes, workers take from the
                                        right (oldest first)
    {image_queue}:processing:<worker>   list of the messages one worker has claimed and not yet answered, on
                                        its first lane; ...:processing:<worker>/1 and /2 are its other lanes
                                        (LANES): a pipelined worker holds one batch per lane (see claim())
    {image_queue}:workers               sorted set: worker id -> its last heartbeat (Redis TIME)
    {image_queue}:model                 hash: name, height, width, classes, runtime of the model served; the
                                        web resizes to its size
    {image_queue}:paused                set while an operator drains the queue (admin.py drain)
    {image_queue}:result:<request id>   list holding the one answer; expires after RESULT_TTL_S
    {image_queue}:stats                 hash of service-wide counters for /metrics: "size:<n>" batches of
                                        n images the model ran, "inference_s" their seconds, "requeued"
    Each model has a queue of its own: the workers of MODEL_ID "resnet50" serve the queue named
    "<IMAGE_QUEUE>.resnet50" (model_queue_name), so its keys are {image_queue.resnet50}:queue and so on.
    {image_queue}:models                sorted set: model id -> when a worker of it last registered (Redis
                                        TIME); the web learns the models served from it (ModelDirectory),
                                        and forgets a model none of whose workers spoke for MODEL_FORGET_S
    Every key of a queue carries the hash tag {IMAGE_QUEUE}, so they share one Redis Cluster slot; the
    scripts build processing-list keys from the workers set, so a queue needs one Redis (or one slot).
    That Redis may be a Sentinel-managed master (connect(): REDIS_SENTINELS) or one slot's master of a Redis
    Cluster (REDIS_CLUSTER). QUEUE_SHARDS > 1 spreads one queue over that many such queues, each under its
    own hash tag (ShardedQueue, shard_names): every step below then runs on one shard, as described.

Message (web -> model worker), never pickle: a one-line JSON header, UTF-8, "id" first (the purge and
the ack find a message by its first bytes), a newline, then the raw pixels (row-major height x width x RGB):
    {"id": "<32 hex>", "v": 1, "deadline": <Unix s, Redis clock>, "top": 5, "shape": [224, 224, 3],
     "dtype": "uint8"}\n<height * width * 3 bytes>
    "v" is the format version (MESSAGE_FORMAT). A worker that meets a version it cannot read answers 503
    "upgrade the model workers" at once, so the request does not wait for its deadline. A header without
    "v" is the same format from before versions, and a header with the pixels in base64 under "data" (no
    newline) the first one; workers still read both. A 224 x 224 image is 150,528 pixel bytes and the
    message ~150.6 KB (base64 inside JSON was a third larger and cost ~1 ms of CPU per message).

Answer (model worker -> web), one JSON object pushed on the request's own result key:
    {"predictions": [{"label": "tabby", "probability": 0.93}, ...], "batch_size": <images in the pass>,
     "inference_ms": <its duration>, "claimed": <Unix s, Redis clock, when the worker took the message>}
    {"error": "<for a person>", "status": <HTTP status>}        on failure
    Each prediction also gives the class "index". A message whose header has "probabilities": true (the
    v2 protocol's FP32 output) gets, after the JSON, a newline and every class's probability as float32.

Steps, each one round trip (scripts and MULTI blocks are atomic):
    status()    web, one script: Redis TIME, workers whose heartbeat is younger than WORKER_TTL_S, the
                model's input size, messages waiting and held, paused. No live worker: 503 at once.
                recent_status() reuses an open one for a moment (the web's STATUS_REUSE_S).
    enqueue()   web, one MULTI: LPUSH the request's messages (one per image: a v2 infer request may send
                several), then a script counts the messages held (waiting plus every worker's processing
                list); over QUEUE_MAX, while paused, or (need_worker: the web) with no live worker, it
                LTRIMs them off again, all of them (503). So once admin.py drain has seen nothing held,
                nothing more arrives, and a reused status never admits a request no worker will take.
                The deadline is the Redis clock plus what is left of REQUEST_TIMEOUT_S, so web and worker
                machines agree on it.
    answers()   web: BLMOVE of the request's own result key onto itself (a blocking read that leaves the
                answer there, so a reply lost on the way is read again), at most REDIS_BLOCK_S per
                call, until the deadline (then 504); then DEL. No sleeping, no polling of a shared key.
                A request of N images (v2) blocks on its first answer only, then deletes it and reads every
                later answer already written in one pipeline (LINDEX, which leaves each in place), and deletes
                those with one DEL: a batch's answers are written together, so N answers in one batch take 3
                round trips, N answers in N batches 2 N, as before. (wait_for(): one answer.)
    claim()     worker, one MULTI: a script registers the worker (ZADD workers) and reads TIME, then up to
                BATCH_SIZE LMOVEs queue -> processing list of one of the worker's lanes. On an empty queue
                the worker blocks in BLMOVE (REDIS_BLOCK_S), so a lone request starts at once;
                MAX_BATCH_WAIT_MS > 0 holds a partial batch that long once to let it fill. top_up() is the
                same MULTI without blocking: a pipelined worker fills its next batch while the model runs.
                Each batch in flight has a lane of its own, so its list is exactly that batch.
    (predict)   worker: messages past their deadline are dropped unrun; unreadable ones are logged and
                answered with a 500 when their id can be read (503 for a newer format version).
    ack()       worker, one script: release the messages from the lane's processing list (DEL when the list is
                exactly the batch, the usual case; else LREM each by its handle, its first ACK_PREFIX_BYTES
                and its length, so an ack never carries pixels back) and, for each message that was still
                there and whose deadline has not passed, RPUSH + EXPIRE its answer; count the batch in the
                stats hash, once, by whoever answered it.
    beat()      worker, every WORKER_HEARTBEAT_S (a thread per shard): ZADD workers <now>; HSET model. Then
                requeue_dead_workers(): the processing lists (every lane) of every worker silent for
                WORKER_TTL_S go back to the head of the queue (the script re-checks the silence). Workers
                do this all the time, not only at start-up, so a replacement that starts before a dead
                worker's heartbeat goes stale still rescues its batches. register_model(), from a thread of
                its own: the model id in the registry {IMAGE_QUEUE}:models, for the web to find.
    No message passes through a Lua script on the way in or out: a script copies every value it touches
    into a Lua string (~0.4 ms of Redis's one thread per 200 KB message). The small scripts inside a MULTI
    are sent as source (EVAL), so a MULTI is one round trip and cannot meet an empty script cache.

Why nothing is lost and nothing is answered twice: a message is always in exactly one list (the queue or
one processing list) until its ack, and the ack that removes it is the only thing that may write its
answer. A worker killed mid-batch leaves its batch on its processing list for a peer to requeue. A worker
that was stalled (SIGSTOP, a long GC, a partition) and wakes after its batch was requeued finds the
messages gone from its list, so its late answers are not written. Answers past their deadline are never
written, and result keys expire, so nothing leaks when a client goes away.

Redis errors are classified in one place (redis_trouble: transient, configuration, unexpected; see
TRANSIENT_REPLIES). Transient and unexpected ones are retried with backoff by the worker loop, its
heartbeat thread and the web's wait; the web answers 503 where it cannot wait, never 500; a configuration
error ends the worker (exit 2) and is a 503 on the web. redis-py's own retries are off, since the scripts
are not idempotent. A worker that recovers from a Redis error first hands back whatever its processing
list holds.
"""

import binascii
import hashlib
import itertools
import json
import logging
import random
import re
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from settings import (
    MAX_PIPELINE_DEPTH,
    MODEL_ID_PATTERN,
    WEB_SOCKET_MARGIN_S,  # noqa: F401  the web's margin (settings checks the timeouts with it)
    is_queue_name,
)

log = logging.getLogger(__name__)

# Every Redis error is one of three kinds (redis_trouble), decided here and nowhere else:
#   transient: the connection or a timeout, or a reply from a Redis that is restarting or loading its data,
#     running a long script, failing over, out of memory, or unable to write its disk (MISCONF). Both sides
#     back off and retry; the web answers 503 + Retry-After where it cannot wait.
#   configuration: a refused password or a missing ACL permission; only an operator's fix helps. The
#     worker exits 2 with one line; the web answers 503 and logs it once per process.
#   unexpected: any other reply. The worker logs it, backs off and hands its batch back; the web answers 503.
# A Redis condition is never a 500 and never ends a worker.
TRANSIENT_REPLIES = frozenset(
    "BUSY LOADING MASTERDOWN MISCONF NOREPLICAS TRYAGAIN CLUSTERDOWN UNBLOCKED READONLY OOM MOVED ASK".split()
)
CONFIGURATION_REPLIES = frozenset({"NOPERM", "NOAUTH", "WRONGPASS"})
CONFIGURATION_ERRORS = (
    redis.AuthenticationError,  # WRONGPASS, NOAUTH, "invalid password"
    redis.exceptions.AuthorizationError,
    redis.exceptions.NoPermissionError,  # NOPERM: the ACL user may not run this command or touch this key
    redis.exceptions.AuthenticationWrongNumberOfArgsError,
)
TRANSIENT_ERRORS = (
    redis.ConnectionError,  # also LOADING (BusyLoadingError)
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ClusterDownError,  # also MASTERDOWN
    redis.exceptions.TryAgainError,
    # the Cluster client's own, not RedisErrors: no node reachable to read the slots from, a slot no master covers
    redis.exceptions.RedisClusterException,
)
# the Cluster client's own that mean a mistake in a call (keys of several slots in one transaction), not an outage
CLUSTER_MISUSE = (redis.exceptions.CrossSlotTransactionError, redis.exceptions.InvalidPipelineStack)
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)  # what the callers catch (redis_trouble)
WORKER_SOCKET_MARGIN_S = 2.0  # worker: room to move a batch of messages over a slow link
REPLICAS_SHORT_S = 5.0  # REDIS_WAIT_REPLICAS: after a push the replicas lacked in time, pushes do not WAIT this long
# admin.py purge: messages per script call. Each is copied into Lua (~0.5 ms for a 150 KB image) while Redis
# serves no one else: purged in one call, thousands froze Redis for seconds, past its lua-time-limit (BUSY).
PURGE_CHUNK = 100
NO_DEADLINE = 1e18  # deadline for answers that must go out whatever the time (poison messages)
# web, QUEUE_SHARDS: a shard whose status read or push has gone unanswered this long is passed over (overdue).
# Those calls take about a millisecond (a thread waiting for the GIL under load, tens); one passed over by
# mistake is only left out of the round-robin until that call returns.
OVERDUE_S = 0.1


class QueueFull(Exception):
    """The queue holds QUEUE_MAX messages."""


class NoWorker(Exception):
    """No model worker has sent a heartbeat within WORKER_TTL_S."""

    def __init__(self, message: str = "no model worker is running"):
        super().__init__(message)


class Draining(Exception):
    """An operator paused the queue (admin.py drain): new requests are refused until it resumes."""

    def __init__(self, message: str = "the service is draining for maintenance; retry shortly"):
        super().__init__(message)


class QueueUnavailable(Exception):
    """Redis cannot be reached, or cannot serve now (a transient or unexpected reply)."""


class QueueMisconfigured(QueueUnavailable):
    """Redis refused our credentials or permissions: a setting to fix, not an outage."""


def reply_code(exc: redis.RedisError) -> str:
    """The error reply's code (BUSY, NOPERM, ...), also when a pipeline wrapped its message."""
    if code := getattr(exc, "status_code", None):  # redis-py strips the code it maps to a class
        return code
    found = re.search(r"(?:^|caused error: )([A-Z]{3,})\b", str(exc))
    return found.group(1) if found else ""


def redis_trouble(exc: redis.RedisError) -> str:
    """ "transient", "configuration" or "unexpected" (see TRANSIENT_REPLIES)."""
    exc = underlying(exc)
    if not_a_cluster(exc) or sentinels_refused(exc):
        return "configuration"
    code = reply_code(exc)
    if isinstance(exc, CONFIGURATION_ERRORS) or code in CONFIGURATION_REPLIES:
        return "configuration"
    if isinstance(exc, CLUSTER_MISUSE):
        return "unexpected"
    if isinstance(exc, TRANSIENT_ERRORS) or code in TRANSIENT_REPLIES:
        return "transient"
    return "unexpected"


def not_a_cluster(exc: redis.RedisError) -> bool:
    """REDIS_CLUSTER is set for a Redis that is not a cluster."""
    return isinstance(exc, redis.exceptions.RedisClusterException) and "Cluster mode is not enabled" in str(exc)


def sentinels_refused(exc: redis.RedisError) -> bool:
    """The sentinels refused the password or user (REDIS_SENTINEL_PASSWORD): redis-py's Sentinel client counts
    that as a sentinel it could not reach, and says only that it found no master, naming each one's error."""
    from redis.sentinel import MasterNotFoundError

    return isinstance(exc, MasterNotFoundError) and "AuthenticationError" in str(exc)  # its repr: auth:Auth...


def underlying(exc: redis.RedisError) -> redis.RedisError:
    """The Redis error behind a Cluster client's own: when it cannot read the slots from any node, redis-py
    raises RedisClusterException from the last node's error, which may be a refused password or ACL."""
    cause = exc.__cause__
    if isinstance(exc, redis.exceptions.RedisClusterException) and isinstance(cause, REDIS_ERRORS):
        return underlying(cause)
    return exc


def unavailable(exc: redis.RedisError) -> QueueUnavailable:
    """The web's 503 for a Redis error; one that refused our credentials says which setting to check."""
    kind = redis_trouble(exc)
    if isinstance(underlying(exc), redis.AuthenticationError):
        return QueueMisconfigured(f"Redis authentication failed ({exc}): check the password in REDIS_URL")
    if sentinels_refused(exc):
        return QueueMisconfigured(
            "the Redis sentinels refused the password: check REDIS_SENTINEL_PASSWORD and REDIS_SENTINEL_USERNAME"
        )
    if not_a_cluster(exc):
        return QueueMisconfigured(f"REDIS_CLUSTER is set, but {exc}: unset it, or name a cluster node in REDIS_URL")
    if kind == "configuration":
        return QueueMisconfigured(f"Redis refused a command ({exc}): the ACL of REDIS_URL's user must allow it")
    if kind == "unexpected":
        log.error("unexpected Redis reply: %r", exc)
    return QueueUnavailable(f"Redis is unavailable: {exc}")


def connect(
    url: str,
    block_s: float,
    margin_s: float = WORKER_SOCKET_MARGIN_S,
    sentinels: tuple[tuple[str, int], ...] = (),
    sentinel_master: str = "mymaster",
    cluster: bool = False,
    sentinel_auth: tuple[str, str] = ("", ""),
) -> redis.Redis:
    """A client whose socket timeout outlives the longest blocking call made through it by margin_s.

    No automatic retries: the scripts are not idempotent, and a retry after a lost reply could push a
    message twice or claim messages the worker never sees (redis-py's default retries 10 times, also on
    timeouts, which would hold a web request for seconds). Callers handle outages, with backoff.

    With sentinels, the client is redis-py's Sentinel client for sentinel_master: each new connection asks
    the sentinels where the master is, and a connection to a demoted master (READONLY) or a dead one
    fails, so the callers' backoff reconnects to the promoted one. url then gives only the password,
    the database and TLS; the sentinels themselves are reached with the same TLS and timeouts, and with
    sentinel_auth (user, password) when they have their own.
    """
    options = {
        "socket_timeout": block_s + margin_s,
        "socket_connect_timeout": block_s + margin_s,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 30,
    }
    if cluster:  # url names any node; the client learns the slots and follows MOVED after a failover
        return ClusterClient.from_url(url, **options)
    if not sentinels:
        base = redis.connection.parse_url(url).get("connection_class", redis.Connection)
        return redis.Redis.from_url(url, connection_class=FOLLOWING[base], **options)
    from redis.sentinel import Sentinel

    from_url = redis.connection.parse_url(url)
    tls = from_url.pop("connection_class", None) is redis.SSLConnection
    for ignored in ("host", "port"):
        from_url.pop(ignored, None)
    ssl_options = {k: v for k, v in from_url.items() if k.startswith("ssl")}
    sentinel_options = {k: v for k, v in options.items() if k != "health_check_interval"}
    sentinel_options |= {k: v for k, v in zip(("username", "password"), sentinel_auth, strict=True) if v}
    manager = Sentinel(
        sentinels, sentinel_kwargs=sentinel_options | ({"ssl": True} | ssl_options if tls else {}), **options
    )
    client = manager.master_for(sentinel_master, ssl=tls, **from_url)
    watch_the_master(client.connection_pool)
    return client


SENTINEL_CHECK_S = 0.5  # how often a Sentinel client asks where the master is (watch_the_master)


def watch_the_master(pool, every_s: float = SENTINEL_CHECK_S) -> None:
    """Ask the sentinels where the master is every every_s, from a thread of its own, for as long as the pool
    lives. redis-py asks only when it opens a connection: after a planned failover (SENTINEL FAILOVER) or a
    healed partition, the old master stays up and writable until the sentinels demote it (~10 s), and every
    pooled connection went on writing there, to be thrown away at the demotion (found by a review: 3 x 504
    and a web that answered 503 "no model worker" until then). When the address changes, redis-py closes the
    idle connections, and those in use as they come back (SentinelConnectionPool.owns_connection)."""
    pool_ref = weakref.ref(pool)

    def watch() -> None:
        while (watched := pool_ref()) is not None:
            try:
                watched.get_master_address()
            except Exception:  # no sentinel answers, or none knows a master: the calls themselves fail and say so
                pass
            del watched
            time.sleep(every_s)

    threading.Thread(target=watch, name="sentinel-watch", daemon=True).start()


class FollowsTheName:
    """A connection that a demoted master's READONLY (or UNBLOCKED, its blocked calls' reply) closes, so the
    next one goes wherever REDIS_URL's name points now: a managed Redis or a DNS failover keeps the name and
    moves it to the promoted replica, while the old master keeps its clients' connections open. redis-py does
    this for Sentinel's connections only; a plain client retried on the same connection for good (found by
    a review: every request 503 "no model worker" until the web and workers restarted)."""

    def read_response(self, *args, **kwargs):
        try:
            return super().read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            if not isinstance(exc, redis.exceptions.ReadOnlyError) and not str(exc).startswith("UNBLOCKED"):
                raise
            self.disconnect()
            raise redis.ConnectionError(f"the master is now a replica; reconnecting ({exc})") from exc


FOLLOWING = {  # REDIS_URL's connection class (redis://, rediss://, unix://) -> the same, following the name
    base: type(f"Following{base.__name__}", (FollowsTheName, base), {})
    for base in (redis.Connection, redis.SSLConnection, redis.UnixDomainSocketConnection)
}


class ClusterClient(redis.RedisCluster):
    """redis-py's Cluster client, which also follows an ASK to a master it has never met.

    Scaling a cluster out adds an empty master and reshards slots onto it: while a slot migrates, the old
    master answers ASK, naming the new one. CLUSTER SLOTS lists only masters that hold a slot, so neither the
    client's node cache nor a refresh of it knows that master: redis-py 8.1 looked the address up, got None
    and failed with an AttributeError (redis/redis-py#4015), a 500 for every read or write of a migrated key
    until the first slot had moved. A lookup by address that misses now adds a master of that address to the
    cache, as redis-py's own MOVED handling adds a new node; the next refresh of the slot table replaces the
    cache. This code looks up only addresses a node gave it; redis-py's checks that a node is known before it
    becomes the default node or a pub/sub's node (neither used here) would now pass for any address. Written
    against redis-py 8.1.0; drop it once a release follows such an ASK itself."""

    def get_node(self, host=None, port=None, node_name=None):
        node = super().get_node(host, port, node_name)
        if node is None and (node_name or (host and port)):
            from redis.cluster import PRIMARY, ClusterNode, get_node_name

            name = node_name or get_node_name(host, port)
            host, port = name.rsplit(":", 1)
            node = self.nodes_manager.nodes_cache.setdefault(name, ClusterNode(host, int(port), PRIMARY))
        return node


class Script:
    """A Lua script run by EVALSHA, and on NOSCRIPT by EVAL, which runs it and caches it on that node alone.
    redis-py's registered scripts load themselves with SCRIPT LOAD, which its Cluster client sends to every
    master: while one is down or hangs, a script's first run on any other master failed (a new queue's first
    requeue of a dead peer, or every script on a replica just promoted, which starts with none cached)."""

    def __init__(self, client: redis.Redis, source: str):
        self.client, self.source = client, source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, keys: list = (), args: list = ()):
        try:
            return self.client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return self.client.eval(self.source, len(keys), *keys, *args)


class Backoff:
    """Exponential backoff with jitter for Redis outages; reset() after a success."""

    def __init__(self, first_s: float = 0.05, cap_s: float = 2.0):
        self.first_s, self.cap_s, self.failures = first_s, cap_s, 0

    def next_delay(self) -> float:
        self.failures += 1
        delay = min(self.cap_s, self.first_s * 2 ** (self.failures - 1))
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.failures = 0


@dataclass(frozen=True)
class Keys:
    """Every key name of one queue, built in this one place."""

    name: str

    def __post_init__(self):
        if not is_queue_name(self.name):
            raise ValueError(f"queue name must be non-empty without braces, colons or spaces: {self.name!r}")

    @property
    def queue(self) -> str:
        return f"{{{self.name}}}:queue"

    @property
    def workers(self) -> str:
        return f"{{{self.name}}}:workers"

    @property
    def model(self) -> str:
        return f"{{{self.name}}}:model"

    @property
    def paused(self) -> str:
        return f"{{{self.name}}}:paused"

    def processing(self, worker_id: str, lane: int = 0) -> str:
        """The processing list of one of a worker's lanes (a batch in flight each; see LANES)."""
        return f"{{{self.name}}}:processing:{worker_id}" + (f"/{lane}" if lane else "")

    def lanes(self, worker_id: str) -> list[str]:
        """Every processing list a worker may hold messages on."""
        return [self.processing(worker_id, lane) for lane in range(LANES)]

    def result(self, request_id: str) -> str:
        return f"{{{self.name}}}:result:{request_id}"

    @property
    def stats(self) -> str:
        return f"{{{self.name}}}:stats"

    @property
    def models(self) -> str:
        return f"{{{self.name}}}:models"


LANES = MAX_PIPELINE_DEPTH  # processing lists per worker: a pipelined worker acks N-1 and claims N+1 while N runs
MODEL_FORGET_S = 24 * 3600  # a model none of whose workers registered for this long is unknown again (404)


def model_queue_name(base: str, model_id: str) -> str:
    """The queue one model's workers serve: IMAGE_QUEUE "image_queue" and model "resnet50" -> "image_queue.resnet50"."""
    if not MODEL_ID_PATTERN.fullmatch(model_id):
        raise ValueError(
            f"a model id is 1-64 of a-z, 0-9, '_', '.', '-', starting with a letter or digit: {model_id!r}"
        )
    return f"{base}.{model_id}"


# --- Message bytes (format in the module docstring) ----------------------------------------------

MESSAGE_FORMAT = 1  # the "v" this code writes and the only one it reads; raise it when the bytes change


class MessageError(ValueError):
    """A queue message that cannot be used; request_id is set when it could be read, and status is the
    HTTP status its request is answered with (503 for a format this worker is too old to read)."""

    def __init__(self, reason: str, request_id: str | None = None, status: int = 500):
        super().__init__(reason)
        self.request_id = request_id
        self.status = status


@dataclass(frozen=True)
class Message:
    request_id: str
    deadline: float  # Unix seconds on the Redis server's clock
    top: int
    pixels: np.ndarray  # uint8 (height, width, 3)
    probabilities: bool = False  # answer with every class's probability too (the v2 protocol's FP32 output)


def encode_message(
    request_id: str, deadline: float, top: int, pixels: np.ndarray, probabilities: bool = False
) -> bytes:
    """The queue message for one prepared image (format in the module docstring)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"pixels must be uint8 (h, w, c), got {pixels.dtype} {pixels.shape}")
    header = {
        "id": request_id,
        "v": MESSAGE_FORMAT,
        "deadline": deadline,
        "top": top,
        "shape": list(pixels.shape),
        "dtype": "uint8",
    }
    if probabilities:
        header["probabilities"] = True
    return json.dumps(header, separators=(",", ":")).encode("utf-8") + b"\n" + np.ascontiguousarray(pixels).tobytes()


def decode_message(raw: bytes) -> Message:
    """Parse and check a queue message; MessageError says what is wrong with it.

    The pixels are a read-only view of raw, not a copy.
    """
    end = raw.find(b"\n")
    header = raw if end < 0 else raw[:end]  # no newline: the earlier all-JSON format, or no pixels
    try:
        body = json.loads(header)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        raise MessageError("the header is not JSON") from None
    if not isinstance(body, dict):
        raise MessageError("not a JSON object")
    request_id = body.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise MessageError("no request id")
    version = body.get("v", MESSAGE_FORMAT)  # no "v": the same format from before versions
    if version != MESSAGE_FORMAT:
        raise MessageError(
            f"the request was queued in message format v{version}, which this model worker (format "
            f"v{MESSAGE_FORMAT}) cannot read: upgrade the model workers",
            request_id,
            503,
        )
    try:
        deadline = float(body["deadline"])
        top = int(body["top"])
        shape = tuple(int(n) for n in body["shape"])
        dtype = body["dtype"]
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(inf)
        raise MessageError(f"bad or missing field ({exc})", request_id) from None
    if dtype != "uint8":
        raise MessageError(f"dtype must be uint8, got {dtype!r}", request_id)
    if len(shape) != 3 or shape[2] != 3 or min(shape) < 1:
        raise MessageError(f"shape must be [height, width, 3], got {list(shape)}", request_id)
    if end < 0 and "data" in body:  # the earlier format: base64 pixels inside the JSON
        try:
            raw, end = b"\n" + binascii.a2b_base64(body["data"], strict_mode=True), 0
        except (TypeError, ValueError, binascii.Error) as exc:
            raise MessageError(f"bad base64 pixels ({exc})", request_id) from None
    size = 0 if end < 0 else len(raw) - end - 1
    if size != shape[0] * shape[1] * shape[2]:
        raise MessageError(f"{size} pixel bytes do not fill shape {list(shape)}", request_id)
    if top < 1:
        raise MessageError(f"top must be at least 1, got {top}", request_id)
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=end + 1).reshape(shape)
    return Message(request_id, deadline, top, pixels, body.get("probabilities") is True)


def encode_answer(
    predictions: list[dict],
    batch_size: int,
    inference_ms: float,
    claimed: float | None = None,
    probabilities: np.ndarray | None = None,
) -> bytes:
    """claimed: when the worker took the message, Unix seconds on the Redis clock (the web derives queue wait).
    probabilities: every class's, when the message asked for them: after the JSON, a newline and float32 bytes."""
    body = {"predictions": predictions, "batch_size": batch_size, "inference_ms": round(inference_ms, 2)}
    if claimed is not None:
        body["claimed"] = round(claimed, 4)
    answer = json.dumps(body).encode("utf-8")
    if probabilities is not None:
        answer += b"\n" + np.ascontiguousarray(probabilities, dtype="<f4").tobytes()
    return answer


def encode_error(status: int, error: str) -> bytes:
    return json.dumps({"error": error, "status": status}).encode("utf-8")


def decode_answer(raw: bytes) -> dict:
    """The answer's JSON; "probabilities" (float32 array) when it carries them."""
    end = raw.find(b"\n")
    if end < 0:
        return json.loads(raw)
    answer = json.loads(raw[:end])
    answer["probabilities"] = np.frombuffer(raw, dtype="<f4", offset=end + 1)
    return answer


# --- Queue operations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    name: str
    height: int
    width: int
    classes: int = 0  # probabilities per answer (0: not said, from a worker older than the model registry)
    runtime: str = ""  # what runs it (keras, openvino)
    shards: int = 0  # the workers' QUEUE_SHARDS (0: not said, from a worker older than this field)


@dataclass(frozen=True)
class Status:
    server_time: float  # Unix seconds, Redis clock
    live_workers: int
    model: ModelInfo | None
    queue_depth: int  # messages waiting for a worker
    held: int  # messages in Redis for this queue: waiting plus being processed (QUEUE_MAX bounds it)
    paused: bool = False  # an operator is draining the queue: refuse new requests

    def refusal(self) -> "Draining | NoWorker | None":
        """Why the queue takes no requests now (draining, or no live worker serving a model), or None: open."""
        if self.paused:
            return Draining()
        if not self.live_workers or self.model is None:
            return NoWorker()
        return None


@dataclass(frozen=True)
class Stats:
    """What /metrics reads from Redis: the queue now, and counters shared by every worker of the queue."""

    server_time: float  # Unix seconds, Redis clock
    queue_depth: int  # messages waiting for a worker
    in_progress: int  # messages on workers' processing lists
    heartbeats: dict[str, float]  # worker id -> its last heartbeat (Redis clock), dead ones until requeued
    live_workers: int  # heartbeats younger than WORKER_TTL_S
    batch_sizes: dict[int, int]  # images in a batch -> batches of that size the model ran, all workers, ever
    inference_s: float  # seconds the model spent on those batches
    requeued: int  # messages ever put back on the queue (a dead worker's batch, a worker handing back)
    paused: bool  # an operator is draining the queue (admin.py drain)
    shards: dict[str, tuple[int, int]] = field(default_factory=dict)  # QUEUE_SHARDS: name -> (waiting, in progress)


@dataclass(frozen=True)
class Claim:
    server_time: float  # Unix seconds, Redis clock, read when the messages were taken
    messages: list[bytes]


@dataclass(frozen=True)
class Done:
    """What a worker hands back for one claimed message."""

    raw: bytes  # the message exactly as claimed
    request_id: str | None  # None when unreadable: the message is dropped unanswered
    answer: bytes | None  # None: drop without answering (e.g. already past its deadline)
    deadline: float = NO_DEADLINE


ACK_PREFIX_BYTES = 64  # how much of a claimed message its ack sends back to name it (see _ACK)

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000 "

# Messages held for the queue: waiting, plus on every processing list (each lane) of every registered worker.
# The processing keys are built from the workers set as Keys.processing builds them; the {name} hash tag
# keeps them in one slot.
# KEYS: queue, workers. ARGV: processing key prefix.
_HELD = """
local function held()
  local n = redis.call('LLEN', KEYS[1])
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    n = n + redis.call('LLEN', ARGV[1] .. id)
    for lane = 1, LANES - 1 do n = n + redis.call('LLEN', ARGV[1] .. id .. '/' .. lane) end
  end
  return n
end
""".replace("LANES", str(LANES))

# KEYS: queue, workers, model, paused. ARGV: processing prefix, ttl.
# -> {now sec, now usec, live workers, model hash, waiting, held, paused}
_STATUS = (
    _NOW
    + _HELD
    + """
local live = redis.call('ZCOUNT', KEYS[2], now - tonumber(ARGV[2]), '+inf')
local model, waiting = redis.call('HGETALL', KEYS[3]), redis.call('LLEN', KEYS[1])
return {t[1], t[2], live, model, waiting, held(), redis.call('EXISTS', KEYS[4])}
"""
)

# Up to ARGV[4] waiting messages are taken off the queue and each request answered at once with ARGV[2]
# (an error), under its own result key (ids are read from the head: '{"id":"...",').
# KEYS: queue. ARGV: result key prefix, answer, result ttl, most. -> messages purged
_PURGE = """
local n = 0
while n < tonumber(ARGV[4]) do
  local m = redis.call('RPOP', KEYS[1])
  if not m then return n end
  n = n + 1
  local id = string.match(string.sub(m, 1, 200), '^{"id":"([%w_%-]+)"')
  if id then
    redis.call('RPUSH', ARGV[1] .. id, ARGV[2])
    redis.call('EXPIRE', ARGV[1] .. id, ARGV[3])
  end
end
return n
"""

# Runs in one MULTI right after the LPUSH of a request's messages, so they are the queue's head: while an
# operator drains the queue, with no live worker (when asked) or over the bound, LTRIM drops them again, all
# together. These are checked here, atomically with the push, and not only before the upload is decoded: a
# drain that has seen nothing held can then never be followed by a message that passed the early check, and a
# request the web admitted on a status it read a moment before (ImageQueue.recent_status) is still refused
# when the last worker has just left. No message passes through Lua.
# KEYS: queue, workers, paused. ARGV: processing prefix, queue_max, messages pushed, worker ttl (0: no
# worker check). -> messages held, -1 when full, -2 when paused, -3 when no worker's heartbeat is fresh
_ADMIT = (
    _NOW
    + _HELD
    + """
local function refuse(code)
  redis.call('LTRIM', KEYS[1], tonumber(ARGV[3]), -1)
  return code
end
if redis.call('EXISTS', KEYS[3]) == 1 then return refuse(-2) end
local ttl = tonumber(ARGV[4])
if ttl > 0 and redis.call('ZCOUNT', KEYS[2], now - ttl, '+inf') == 0 then return refuse(-3) end
local n = held()
if n > tonumber(ARGV[2]) then return refuse(-1) end
return n
"""
)

# Taking a batch registers the worker (a worker that holds messages is always counted and watched), reads
# the clock and counts the messages waiting, in the MULTI that moves them by LMOVE; never through Lua: a
# script that touches a message copies its ~200 KB into a Lua string, ~0.4 ms of Redis's one thread per message.
# KEYS: workers, queue. ARGV: worker id. -> {now sec, now usec, messages waiting}
_REGISTER = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
return {t[1], t[2], redis.call('LLEN', KEYS[2])}
"""
)

# A claimed message is released by its handle: its first ACK_PREFIX_BYTES and its length. The request
# id is in the first 41 bytes of every message, so the handle names one message without the worker
# sending ~200 KB of pixels back per image; unreadable messages match by the same rule.
# The batch the model ran (its size, 0 if none, and seconds) is counted in the stats hash in the same
# step, and only if this ack released a message: a stalled worker whose batch a peer took over, or a
# retry of an ack that did run, counts nothing, so each batch is counted once, by whoever answered it.
# The usual case reads no message: a worker's list holds exactly the batch it took (only its own take
# adds to it), so when its length is the batch's, the whole list is released at once. Shorter means a
# peer requeued some while this worker was silent; then each message is found by its handle.
# KEYS: processing, stats, result key per answer. ARGV: result ttl, batch size, inference seconds,
# n unanswered, (prefix, length) per unanswered, then (prefix, length, answer, deadline) per result key.
# -> {positions answered, positions too late} (1-based)
_ACK = (
    _NOW
    + """
local n_drop = tonumber(ARGV[4])
local whole = redis.call('LLEN', KEYS[1]) == n_drop + #KEYS - 2
if whole then redis.call('DEL', KEYS[1]) end
local held = whole and {} or redis.call('LRANGE', KEYS[1], 0, -1)
local released = whole and (n_drop + #KEYS - 2) or 0
local function release(prefix, length)
  if whole then return true end
  for i, m in ipairs(held) do
    if m and #m == length and string.sub(m, 1, #prefix) == prefix then
      held[i] = false
      local gone = redis.call('LREM', KEYS[1], 1, m) == 1
      if gone then released = released + 1 end
      return gone
    end
  end
  return false
end
for i = 5, 4 + 2 * n_drop, 2 do release(ARGV[i], tonumber(ARGV[i + 1])) end
local answered, late = {}, {}
for k = 3, #KEYS do
  local a = 5 + 2 * n_drop + (k - 3) * 4
  if release(ARGV[a], tonumber(ARGV[a + 1])) then
    if now <= tonumber(ARGV[a + 3]) then
      redis.call('RPUSH', KEYS[k], ARGV[a + 2])
      redis.call('EXPIRE', KEYS[k], ARGV[1])
      table.insert(answered, k - 2)
    else
      table.insert(late, k - 2)
    end
  end
end
if tonumber(ARGV[2]) > 0 and released > 0 then
  redis.call('HINCRBY', KEYS[2], 'size:' .. ARGV[2], 1)
  redis.call('HINCRBYFLOAT', KEYS[2], 'inference_s', ARGV[3])
end
return {answered, late}
"""
)

# KEYS: workers, model. ARGV: worker id, model name, height, width, classes, runtime.
_HEARTBEAT = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], 'name', ARGV[2], 'height', ARGV[3], 'width', ARGV[4],
           'classes', ARGV[5], 'runtime', ARGV[6], 'shards', ARGV[7])
"""
)

# The model registry ({IMAGE_QUEUE}:models), a key of its own slot: not in the heartbeat's script.
# KEYS: models. ARGV: model id.
_REGISTER_MODEL = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[2])))
"""
)

# KEYS: models. ARGV: forget after (s). -> ids of the models registered within it (read-only: the workers'
# registrations prune the set)
_KNOWN_MODELS = _NOW + "return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')"

# KEYS: workers. ARGV: ttl. -> ids of workers silent for longer than ttl
_DEAD = _NOW + "return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[1])))"

# KEYS: workers, queue, stats, then the processing lists to requeue (every lane, or one). ARGV: worker id,
# min silence, forget (1: drop its heartbeat). -> messages requeued (also added to the stats hash's
# "requeued"), or -1 if the worker has spoken within min silence
_REQUEUE = (
    _NOW
    + """
local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
if beat and tonumber(beat) > now - tonumber(ARGV[2]) then return -1 end
local n = 0
for k = 4, #KEYS do
  while redis.call('LMOVE', KEYS[k], KEYS[2], 'LEFT', 'RIGHT') do n = n + 1 end
end
if ARGV[3] == '1' then redis.call('ZREM', KEYS[1], ARGV[1]) end
if n > 0 then redis.call('HINCRBY', KEYS[3], 'requeued', n) end
return n
"""
)

# Read-only. KEYS: queue, workers, stats, paused. ARGV: processing prefix.
# -> {now sec, now usec, waiting, held, {worker id, heartbeat, ...}, stats hash, paused}
_STATS = (
    _NOW
    + _HELD
    + """
local beats = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local counters = redis.call('HGETALL', KEYS[3])
return {t[1], t[2], redis.call('LLEN', KEYS[1]), held(), beats, counters, redis.call('EXISTS', KEYS[4])}
"""
)


class ImageQueue:
    """One named queue on one Redis: the calls the web and the model workers make."""

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        *,
        queue_max: int = 128,
        block_s: float = 1.0,
        result_ttl_s: int = 60,
        worker_ttl_s: float = 10.0,
        wait_replicas: int = 0,
        registry: tuple[str, str] | None = None,
    ):
        self.redis = client
        self.wait_replicas = wait_replicas
        self._replicas_short_until = 0.0  # time.monotonic() until which pushes do not WAIT (_wait)
        self.keys = Keys(name)
        self.registry = registry  # (registry key, model id) this queue's heartbeats register, if any
        self.queue_max = queue_max
        self.block_s = block_s
        self.result_ttl_s = result_ttl_s
        self.worker_ttl_s = worker_ttl_s
        self._status = Script(client, _STATUS)
        self._ack = Script(client, _ACK)
        self._heartbeat = Script(client, _HEARTBEAT)
        self._dead = Script(client, _DEAD)
        self._requeue = Script(client, _REQUEUE)
        self._stats = Script(client, _STATS)
        self._purge = Script(client, _PURGE)
        self._register_model = Script(client, _REGISTER_MODEL)
        self._waiting_seen = 0  # messages the last take saw waiting: how many moves the next take sends at once
        # The web's record of this queue's Redis failing (_failed): ShardedQueue.pick passes a shard over while
        # it is set, and after that time a probe of its own asks whether it answers again (answering)
        self.failed_until, self._failures = 0.0, Backoff(first_s=1.0, cap_s=5.0)
        self._probing = threading.Lock()  # held while that probe runs
        self._recent: tuple[float, Status] | None = None  # (time.monotonic() when read, an open status): recent_status
        self._calls: dict[int, float] = {}  # the web's status reads and pushes in flight -> when each started
        self._call_ids = itertools.count()

    # --- web side -----------------------------------------------------------------------------

    def pick(self) -> "ImageQueue":
        """The queue one request goes to: this one (a ShardedQueue picks one of its shards)."""
        return self

    def status(self) -> Status:
        """Server time, live workers, the served model's input size and queue depth, in one round trip."""
        keys = [self.keys.queue, self.keys.workers, self.keys.model, self.keys.paused]
        args = [self.keys.processing(""), self.worker_ttl_s]
        try:
            with self._in_flight():
                try:
                    sec, usec, live, fields, depth, held, paused = self._status(keys=keys, args=args)
                except redis.ConnectionError:  # read-only, so safe to retry once: a connection a restart killed
                    sec, usec, live, fields, depth, held, paused = self._status(keys=keys, args=args)
        except REDIS_ERRORS as exc:
            raise self._failed(exc) from exc
        if self.failed_until:
            self.failed_until = 0.0
            self._failures.reset()
        info = {k.decode(): v.decode() for k, v in zip(fields[::2], fields[1::2], strict=True)}
        model = None
        if info:
            size = int(info["height"]), int(info["width"])
            said = int(info.get("classes", 0)), info.get("runtime", ""), int(info.get("shards", 0))
            model = ModelInfo(info["name"], *size, *said)
        return Status(int(sec) + int(usec) / 1e6, int(live), model, int(depth), int(held), bool(paused))

    def recent_status(self, max_age_s: float) -> Status:
        """status(), or the last one read within max_age_s if it found the queue open (a live worker, a model,
        not paused): its clock moved on by the time since, its held count the last one enqueue() returned.

        The web reads a status before each upload, to refuse early and to know the model's input size; in a
        burst of requests most can reuse one read, a round trip less each. What it could miss is re-checked
        by enqueue(need_worker=True) atomically with the push: a drain, the bound, the last worker leaving.
        """
        recent, now = self._recent, time.monotonic()
        if recent is not None and now - recent[0] <= max_age_s:
            read_at, status = recent
            return replace(status, server_time=status.server_time + (now - read_at))
        status = self.status()
        self._recent = (time.monotonic(), status) if status.refusal() is None else None
        return status

    def stats(self) -> Stats:
        """The queue's depth, heartbeats and service-wide counters, in one read-only round trip (/metrics).

        Redis errors pass to the caller, which decides what an unreachable Redis means to it.
        """
        keys = [self.keys.queue, self.keys.workers, self.keys.stats, self.keys.paused]
        sec, usec, depth, held, beats, fields, paused = self._stats(keys=keys, args=[self.keys.processing("")])
        now = int(sec) + int(usec) / 1e6
        heartbeats = {w.decode(): float(t) for w, t in zip(beats[::2], beats[1::2], strict=True)}
        counters = {k.decode(): v.decode() for k, v in zip(fields[::2], fields[1::2], strict=True)}
        return Stats(
            server_time=now,
            queue_depth=int(depth),
            in_progress=int(held) - int(depth),
            heartbeats=heartbeats,
            live_workers=sum(now - beat <= self.worker_ttl_s for beat in heartbeats.values()),
            batch_sizes={int(k[5:]): int(v) for k, v in counters.items() if k.startswith("size:")},
            inference_s=float(counters.get("inference_s", 0)),
            requeued=int(counters.get("requeued", 0)),
            paused=bool(paused),
        )

    def enqueue(self, *messages: bytes, need_worker: bool = False, deadline: float | None = None) -> int:
        """Push a request's messages (one per image, taken in this order) unless that would hold more than
        QUEUE_MAX, the queue is draining, or (need_worker) no worker's heartbeat is fresh; all or none.
        Returns how many are held now. deadline (time.monotonic()): the request's, which bounds the wait for
        replicas (REDIS_WAIT_REPLICAS) as REDIS_BLOCK_S does.

        Held counts the messages waiting and those on workers' processing lists, so Redis never
        holds more than queue_max images for this queue.
        """
        keys = [self.keys.queue, self.keys.workers, self.keys.paused]
        args = [self.keys.processing(""), self.queue_max, len(messages), self.worker_ttl_s if need_worker else 0]
        try:
            if self.wait_replicas or isinstance(self.redis, redis.RedisCluster):
                held = self._push_on_master(messages, keys, args, deadline)
            else:
                with self.redis.pipeline(transaction=True) as pipe, self._in_flight():
                    pipe.lpush(self.keys.queue, *messages)
                    pipe.execute_command("EVAL", _ADMIT, len(keys), *keys, *args)  # cluster pipelines have no eval()
                    _, held = pipe.execute()
        except REDIS_ERRORS as exc:
            self._recent = None  # the next request reads a status afresh
            raise self._failed(exc) from exc
        recent = self._recent
        if recent is not None:  # the next recent_status() sees this count, or reads afresh after a refusal
            self._recent = (recent[0], replace(recent[1], held=held)) if held >= 0 else None
        if held == -2:
            raise Draining()
        if held == -3:
            raise NoWorker()
        if held < 0:
            raise QueueFull(f"the queue holds {self.queue_max} images")
        return held

    def failing(self, now: float) -> bool:
        """For ShardedQueue.pick: whether a call of the web's on this queue failed (_failed) and no probe has
        answered since: a PING from a thread of its own, once the backoff is due. Asked by a request instead, a
        Redis that hangs held that request, and each other request that picked it meanwhile, for a socket
        timeout at every retry."""
        if self.failed_until:
            if now >= self.failed_until and self._probing.acquire(blocking=False):
                try:
                    threading.Thread(target=self._probe, name="shard-probe", daemon=True).start()
                except BaseException:  # no thread to be had: try again after another backoff
                    self._back_off()
                    self._probing.release()
            return True
        return False

    def _probe(self) -> None:
        """failing's probe, in its own thread: a PING clears the failure, or the backoff starts again."""
        try:
            self.ping()
        except Exception:  # a Redis error (REDIS_ERRORS), or whatever else: this shard is not left due for ever
            self._back_off()
        else:
            log.info("queue %s answers again", self.keys.name)
            self.failed_until = 0.0
            self._failures.reset()
        finally:
            self._probing.release()

    def ping(self) -> None:
        """PING this queue's own master: on a Cluster every shard shares one client, whose plain PING goes to its
        default node, which answers for a shard whose master hangs. Through the cluster client, a failure also
        makes it read the slots afresh, so a promoted replica is found."""
        if isinstance(self.redis, redis.RedisCluster):
            self.redis.execute_command("PING", target_nodes=self.redis.get_node_from_key(self.keys.queue))
        else:
            self.redis.ping()

    @contextmanager
    def _in_flight(self):
        """Around a status read or a push of the web's (not a wait for replicas or an answer, which may block):
        while it runs, stalled_s() can tell it has gone unanswered too long."""
        call = next(self._call_ids)
        self._calls[call] = time.monotonic()
        try:
            yield
        finally:
            del self._calls[call]

    def stalled_s(self, now: float) -> float:
        """How long the oldest status read or push of the web's on this queue in flight has gone unanswered (0:
        none). Over OVERDUE_S its Redis may hang, and a thread on it waits out its socket timeout (REDIS_BLOCK_S +
        0.5 s) before _failed marks it: with QUEUE_SHARDS the web's other threads pass it over meanwhile
        (ShardedQueue.pick). Before, under load every web thread picked a hung shard in turn within a few
        requests and waited that timeout."""
        return max((now - started for started in self._calls.copy().values()), default=0.0)

    def _failed(self, exc: redis.RedisError) -> QueueUnavailable:
        """A web call found this queue's Redis failing: with QUEUE_SHARDS, the web's requests pass this shard
        over until a probe's PING answers (failing), first after a backoff of 0.5-1 s, doubling up to 2.5-5 s
        while probes fail, so a shard whose Redis hangs costs no request a socket timeout after the first."""
        self._back_off()
        return unavailable(exc)

    def _back_off(self) -> None:
        self.failed_until = time.monotonic() + self._failures.next_delay()

    def withdraw(self, messages: list[bytes], request_ids: list[str]) -> None:
        """Take a failed request's messages off the queue where they still wait, and drop answers already
        written: a v2 request one of whose images failed leaves nothing for the workers to run. Messages
        already claimed are answered as usual, their answers expiring unread after result_ttl_s. Best effort:
        a Redis failure here is logged, and the rest expires as any unread answer does."""
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for message in messages:
                    pipe.lrem(self.keys.queue, 1, message)
                pipe.delete(*(self.keys.result(request_id) for request_id in request_ids))
                pipe.execute()
        except REDIS_ERRORS as exc:
            log.warning("could not withdraw %d messages of a failed request (%s)", len(messages), exc)

    def _push_on_master(self, messages: tuple[bytes, ...], keys: list[str], args: list, deadline: float | None) -> int:
        """enqueue's push on the queue's master's own connection (a Cluster, or REDIS_WAIT_REPLICAS): MULTI,
        LPUSH, the admission script and EXEC in one round trip, then, if REDIS_WAIT_REPLICAS, WAIT (_wait).

        On a Cluster the connection is the master's that holds the queue's slot. While a resharding migrates
        that slot, the old master answers ASK and the push goes to the new one after ASKING, which answers
        TRYAGAIN until the migration ends (the admission reads keys that do not exist, such as the pause flag,
        and it cannot tell they are not still on the old master); then the old master answers MOVED and the
        client's slot table is corrected. Nothing of a refused MULTI runs (Redis discards the transaction), so
        it is sent again (after 50 ms from the third try on), until REDIS_BLOCK_S or the request's deadline;
        redis-py's cluster pipeline followed none of the three, and each request then got a 503. Returns the
        admission's held count."""
        client = self.redis
        if not isinstance(client, redis.RedisCluster):
            return self._push(client, messages, keys, args, deadline, asking=False)
        give_up = time.monotonic() + self.block_s
        give_up = give_up if deadline is None else min(give_up, deadline)
        node, asking = client.get_node_from_key(self.keys.queue), False
        for tries in itertools.count(1):
            try:
                return self._push(client.get_redis_connection(node), messages, keys, args, deadline, asking)
            except (redis.exceptions.AskError, redis.exceptions.TryAgainError) as exc:  # MovedError: an AskError
                if time.monotonic() >= give_up:
                    raise
                if isinstance(exc, redis.exceptions.MovedError):
                    client.nodes_manager.move_slot(exc)
                    node, asking = client.get_node_from_key(self.keys.queue), False
                elif isinstance(exc, redis.exceptions.AskError):
                    node, asking = client.get_node(host=exc.host, port=exc.port), True
                if tries >= 2 or isinstance(exc, redis.exceptions.TryAgainError):
                    time.sleep(0.05)  # nodes that disagree for a moment are not asked in a tight loop

    def _push(self, client: redis.Redis, messages, keys: list[str], args: list, deadline: float | None, asking: bool):
        """One push on one connection of client's pool (ASKING first when a migration redirected it), then the
        wait for replicas on that same connection. A refused push does not wait."""
        pool, connection = client.connection_pool, None
        push = [("ASKING",)] if asking else []
        push += [("MULTI",), ("LPUSH", self.keys.queue, *messages), ("EVAL", _ADMIT, len(keys), *keys, *args)]
        try:
            with self._in_flight():  # its connect too: a master that drops packets hangs there
                connection = pool.get_connection()
                try:
                    connection.send_packed_command(connection.pack_commands([*push, ("EXEC",)]))
                    pushed = [connection.read_response() for _ in range(len(push) + 1)][-1]  # EXEC's: [length, held]
                except BaseException:
                    connection.disconnect()  # replies may be left unread: the pool must not hand it out as it is
                    raise
            error = next((reply for reply in pushed if isinstance(reply, Exception)), None)
            if error is not None:
                raise error
            held = pushed[1]
            if held >= 0 and self.wait_replicas:  # refused: nothing stays queued for a replica to have
                self._wait(connection, deadline)
            return held
        finally:
            if connection is not None:
                pool.release(connection)

    def _wait(self, connection, deadline: float | None) -> None:
        """REDIS_WAIT_REPLICAS: Redis WAIT until that many replicas have the push (at most REDIS_BLOCK_S, and
        never past the request's deadline: a request with no time left does not wait). It must run on the
        push's own connection: WAIT counts the replicas that have the writes made on its connection, so on
        another pooled connection (another thread's older write, or none) it could answer at once, before any
        replica had the message. Fewer replicas in time, or a failed WAIT, is logged and the request goes on:
        the message is queued on the master either way, and refusing it now would not take it back.

        After a shortfall, pushes do not WAIT for REPLICAS_SHORT_S, then one tries again: a promoted replica has
        no replica of its own until another joins (hours, if the old master's machine died), and every push
        waited REDIS_BLOCK_S, a web thread each (16 threads: ~16 requests/s), just when the failover had made
        the service's capacity matter most (found by a review). One warning per shortfall, one line when the
        replicas have the messages again."""
        now = time.monotonic()
        if now < self._replicas_short_until:
            return
        wait_s = self.block_s if deadline is None else min(self.block_s, deadline - now)
        if wait_s < 0.001:  # WAIT 0 would wait for ever
            return
        try:
            connection.send_command("WAIT", self.wait_replicas, int(wait_s * 1000))
            acked = connection.read_response()
        except REDIS_ERRORS as exc:
            connection.disconnect()
            log.warning("WAIT for %d replicas failed (%s); the message is queued", self.wait_replicas, exc)
            return
        if acked >= self.wait_replicas:
            if self._replicas_short_until:
                self._replicas_short_until = 0.0
                log.info("%d replicas have the messages again: each push waits for them", self.wait_replicas)
            return
        if not self._replicas_short_until:
            log.warning(
                "only %d of %d replicas had the message within %.2g s; pushes do not wait for them for %g s at a "
                "time until they have the messages again",
                acked,
                self.wait_replicas,
                wait_s,
                REPLICAS_SHORT_S,
            )
        self._replicas_short_until = time.monotonic() + REPLICAS_SHORT_S

    def wait_for(self, request_id: str, deadline: float) -> bytes | None:
        """Block on the request's result key until an answer or the time.monotonic() deadline."""
        return next(self.answers([request_id], deadline))

    def answers(self, request_ids: list[str], deadline: float) -> Iterator[bytes | None]:
        """Each request's answer in order, by the time.monotonic() deadline: None for the first not answered in
        time, and nothing after it. Blocks only for the first answer not yet read; then, in one pipeline,
        deletes the answers read so far and reads every later one already written (LINDEX: left in place, so
        a reply lost on the way is read again); once all are read, one DEL. A batch's answers are written
        together, so a v2 request's N images answered in one batch cost 3 round trips, one in each of N
        batches 2 N, as a lone answer costs 2: never more than reading them one by one."""
        keys = [self.keys.result(request_id) for request_id in request_ids]
        ready: dict[str, bytes] = {}  # answers read, not yet given out
        undeleted: list[str] = []  # their keys still in Redis
        for i, (request_id, key) in enumerate(zip(request_ids, keys, strict=True)):
            if key not in ready:
                answer = self._block_for(request_id, key, deadline)
                if answer is None:
                    yield None
                    return
                ready[key] = answer
                undeleted.append(key)
                missing = [k for k in keys[i + 1 :] if k not in ready]
                found = self._delete_and_read(undeleted, missing, request_id)
                ready |= found
                undeleted = list(found)
                if found and len(found) == len(missing):  # every answer read: nothing to wait on with them
                    self._delete_and_read(undeleted, [], request_id)
                    undeleted = []
            yield ready.pop(key)

    def _block_for(self, request_id: str, key: str, deadline: float) -> bytes | None:
        """The answer under key, by a blocking read that leaves it there; None at the deadline."""
        backoff = Backoff()
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                # BLMOVE from the key onto itself: a blocking read that leaves the answer where it is, so
                # a reply lost on the way (the connection drops after Redis sent it) is read again.
                answer = self.redis.blmove(key, key, max(0.01, min(remaining, self.block_s)), "RIGHT", "LEFT")
            except REDIS_ERRORS as exc:
                if redis_trouble(exc) == "configuration":
                    raise unavailable(exc) from exc
                delay = min(backoff.next_delay(), max(0.0, deadline - time.monotonic()))
                log.warning("waiting for %s: Redis unavailable (%s); retrying in %.2f s", request_id, exc, delay)
                time.sleep(delay)
                continue
            if answer is not None:
                return answer
        return None

    def _delete_and_read(self, delete: list[str], read: list[str], request_id: str) -> dict[str, bytes]:
        """One round trip: DEL the answers already read, and LINDEX each key in read, giving the answers
        already written there. On a Redis error nothing is read (each is then waited for on its own) and
        what was to be deleted expires after RESULT_TTL_S instead."""
        try:
            if not read:
                self.redis.delete(*delete)
                return {}
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(*delete)
                for key in read:
                    pipe.lindex(key, -1)
                written = pipe.execute()[1:]
        except REDIS_ERRORS as exc:
            if read and redis_trouble(exc) == "configuration":
                raise unavailable(exc) from exc
            log.warning("could not delete the answer of %s (%s); it expires by itself", request_id, exc)
            return {}
        return {key: answer for key, answer in zip(read, written, strict=True) if answer is not None}

    # --- operators (admin.py) -----------------------------------------------------------------

    def pause(self) -> None:
        """Refuse new requests (503 + Retry-After) while workers finish what is held."""
        self.redis.set(self.keys.paused, 1)

    def resume(self) -> None:
        self.redis.delete(self.keys.paused)

    def purge(self, reason: str) -> int:
        """Drop every waiting message, answering each request at once with a 503 that gives the reason.

        Only this queue's waiting list is touched: messages being processed finish, other queues and
        other data in Redis stay (unlike FLUSHALL). Returns how many were purged.
        """
        answer = json.dumps({"error": f"purged from the queue by an operator: {reason}", "status": 503})
        args = [self.keys.result(""), answer, self.result_ttl_s, PURGE_CHUNK]
        waiting, purged = self.redis.llen(self.keys.queue), 0
        while purged < waiting:  # those waiting now: under load, new arrivals could keep it going for ever
            n = int(self._purge(keys=[self.keys.queue], args=args))
            purged += n
            if n < PURGE_CHUNK:
                break
        return purged

    # --- worker side --------------------------------------------------------------------------

    def heartbeat(self, worker_id: str, model: ModelInfo) -> None:
        """Say this worker is alive and which model it serves; register the model id, for the web to find."""
        self._say_alive(worker_id, model)
        self.register_model()

    def _say_alive(self, worker_id: str, model: ModelInfo) -> None:
        self._heartbeat(
            keys=[self.keys.workers, self.keys.model],
            args=[worker_id, model.name, model.height, model.width, model.classes, model.runtime, model.shards],
        )

    def register_model(self) -> None:
        """Register the model id in the registry, for the web to find (a queue made with one; else nothing)."""
        if self.registry:
            key, model_id = self.registry
            self._register_model(keys=[key], args=[model_id, MODEL_FORGET_S])

    def claim(self, worker_id: str, max_n: int, wait_s: float = 0.0, lane: int = 0) -> Claim:
        """Move up to max_n messages onto the processing list of this worker's lane, atomically.

        Takes what is queued at once; on an empty queue blocks up to REDIS_BLOCK_S for the first
        message. With wait_s > 0 a partial batch is held that long once to let it fill.
        """
        now, messages = self._take_now(worker_id, max_n, lane)
        blocked = False
        if not messages:
            processing = self.keys.processing(worker_id, lane)
            first = self.redis.blmove(self.keys.queue, processing, self.block_s, "RIGHT", "LEFT")
            if first is None:
                return Claim(now, [])
            messages, blocked = [first], True
        if blocked or (wait_s > 0 and len(messages) < max_n):
            if wait_s > 0 and len(messages) < max_n:
                time.sleep(wait_s)  # one bounded hold, not a poll: filling a partial batch
            # After a block, always: it re-registers this worker (a peer may have written it off while
            # it blocked or was stalled) and reads the clock that expiry is judged by.
            now, more = self._take_now(worker_id, max_n - len(messages), lane)
            messages += more
        return Claim(now, messages)

    def top_up(self, worker_id: str, count: int, lane: int = 0) -> Claim:
        """Add up to count messages to a lane's claimed batch, without blocking (a pipelined worker fills the
        next batch while the model runs this one). It looks first (LLEN): a look at an empty queue only reads,
        where a take also registers the worker (a write, replicated). Nothing waiting: Claim(0, [])."""
        waiting = self.redis.llen(self.keys.queue)
        return Claim(*self._take_now(worker_id, min(count, waiting), lane)) if waiting else Claim(0.0, [])

    def _take_now(self, worker_id: str, count: int, lane: int = 0) -> tuple[float, list[bytes]]:
        """Register, read the clock, count what waits and move up to count messages, in one MULTI of as many
        moves as the last take saw waiting; when more wait than that, a second MULTI moves the rest. So a
        busy queue takes its batch in one round trip, and a worker finding the queue empty, as between the
        lone requests of a quiet service, sends no moves that answer nil (bench.micro --only claim)."""
        guess = min(count, self._waiting_seen)
        now, waiting, moved = self._multi_take(worker_id, guess, lane, register=True)
        self._waiting_seen = waiting
        if (rest := min(count, waiting) - guess) > 0:  # the count comes before the moves, in the same MULTI
            moved += self._multi_take(worker_id, rest, lane, register=False)[2]  # (a peer may take some first)
        return now, moved

    def _multi_take(self, worker_id: str, count: int, lane: int, register: bool) -> tuple[float, int, list[bytes]]:
        """One MULTI: optionally _REGISTER (clock, messages waiting), then count moves; (now, waiting, moved)."""
        processing = self.keys.processing(worker_id, lane)
        with self.redis.pipeline(transaction=True) as pipe:
            if register:
                pipe.execute_command("EVAL", _REGISTER, 2, self.keys.workers, self.keys.queue, worker_id)
            for _ in range(count):
                pipe.lmove(self.keys.queue, processing, "RIGHT", "LEFT")
            replies = pipe.execute()
        if not register:
            return 0.0, 0, [m for m in replies if m is not None]
        (sec, usec, waiting), *moved = replies
        return int(sec) + int(usec) / 1e6, int(waiting), [m for m in moved if m is not None]

    def ack(
        self, worker_id: str, done: list[Done], batch_size: int = 0, inference_s: float = 0.0, lane: int = 0
    ) -> tuple[list[str], list[str]]:
        """Write the answers and release the messages from the lane's list; returns the request ids (answered,
        too late).

        A message no longer on this worker's processing list (a peer requeued it while this worker
        was silent) is neither answered nor counted: its new holder answers it. batch_size images that
        the model ran in inference_s seconds are added to the stats hash in the same step (0: none ran).
        """
        dropped = [d.raw for d in done if d.request_id is None or d.answer is None]
        answering = [d for d in done if d.request_id is not None and d.answer is not None]
        keys = [self.keys.processing(worker_id, lane), self.keys.stats]
        keys += [self.keys.result(d.request_id) for d in answering]
        args: list = [self.result_ttl_s, batch_size, repr(float(inference_s)), len(dropped)]
        for raw in dropped:
            args += [raw[:ACK_PREFIX_BYTES], len(raw)]
        for d in answering:
            args += [d.raw[:ACK_PREFIX_BYTES], len(d.raw), d.answer, repr(d.deadline)]
        answered, late = self._ack(keys=keys, args=args)
        return [answering[i - 1].request_id for i in answered], [answering[i - 1].request_id for i in late]

    def beat(self, worker_id: str, model: ModelInfo) -> None:
        """A heartbeat thread's round: the heartbeat, then the requeue of silent peers' batches. The model's
        registration is another thread's (run_model_server.Heartbeat): on a Cluster the registry
        ({IMAGE_QUEUE}:models) may live on another master than the queue, and one that hangs must not hold
        back this heartbeat (a socket timeout as long as WORKER_TTL_S) nor the requeue."""
        self._say_alive(worker_id, model)
        self.requeue_dead_workers()

    def requeue_dead_workers(self) -> int:
        """Put the claimed messages of workers silent for WORKER_TTL_S back at the queue's head."""
        requeued = 0
        for raw_id in self._dead(keys=[self.keys.workers], args=[self.worker_ttl_s]):
            worker_id = raw_id.decode()
            n = self._requeue_worker(worker_id, self.worker_ttl_s, forget=True)
            if n >= 0:
                log.warning("worker %s is silent for %.0f s: requeued its %d messages", worker_id, self.worker_ttl_s, n)
                requeued += n
        return requeued

    def requeue_own(self, worker_id: str, lane: int | None = None) -> int:
        """Put back what a failed call left on a lane's list (None: every lane) that holds no batch in hand.

        A claim whose reply was lost, or an ack that could not be written, leaves messages on the
        worker's processing list that it does not have in hand; no peer looks there while it lives.
        """
        return self._requeue_worker(worker_id, 0, forget=False, lanes=None if lane is None else [lane])

    def unregister(self, worker_id: str) -> int:
        """A worker leaving: requeue whatever it still holds and drop its heartbeat."""
        return self._requeue_worker(worker_id, 0, forget=True)

    def _requeue_worker(
        self, worker_id: str, min_silence_s: float, forget: bool, lanes: list[int] | None = None
    ) -> int:
        lists = self.keys.lanes(worker_id) if lanes is None else [self.keys.processing(worker_id, n) for n in lanes]
        keys = [self.keys.workers, self.keys.queue, self.keys.stats, *lists]
        return int(self._requeue(keys=keys, args=[worker_id, min_silence_s, int(forget)]))


def shard_names(name: str, shards: int) -> list[str]:
    """The queue names (so hash tags) of a queue's shards: the queue itself, then names "name-k".

    Each name falls in its own one of `shards` equal ranges of the 16384 Cluster slots: the first shard's
    range is wherever the queue's own name falls, and each other range takes the first "name-k" (k = 1, 2,
    ...) whose slot lies in it. A cluster made by `redis-cli --cluster create` gives its masters equal
    ranges in order, so N shards on N masters put one shard on each master (plain "name-1", "name-2" would
    put two of three on one master). Web and workers compute the same names from IMAGE_QUEUE alone.
    """
    from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

    def span(tag: str) -> int:
        return key_slot(tag.encode()) * shards // REDIS_CLUSTER_HASH_SLOTS

    names, free = [name], [r for r in range(shards) if r != span(name)]
    for k in itertools.count(1):
        if not free:
            return names
        if (r := span(f"{name}-{k}")) in free:
            free.remove(r)
            names.append(f"{name}-{k}")


class ShardedQueue:
    """One queue spread over QUEUE_SHARDS hash tags, so over as many Redis Cluster slots (and masters).

    Shard 0 is the queue IMAGE_QUEUE itself ({image_queue}:...), shard s the queue IMAGE_QUEUE-s
    ({image_queue-1}:...): each a whole ImageQueue with every key of its own, so each script and MULTI
    still touches one slot, and each shard bounds its own held messages at QUEUE_MAX / shards.
    The web sends each request to one shard, round-robin per process (pick): choosing costs no round trip
    (the shortest shard would cost one per shard, and be stale by the push), and it spreads requests evenly,
    since every worker serves every shard. Workers register, heartbeat and requeue dead peers on every
    shard. A claim takes what waits on each shard, starting from the next shard each time, so no shard
    waits behind another's backlog; when every shard is empty it blocks on all of them at once (one BLMOVE
    per shard, each from its own thread), so an idle worker polls nothing and a lone request on any shard
    starts at once. A blocked move still running when the claim returns keeps its message on this worker's
    processing list of that shard (of the lane it was started for), and the next claim takes it; a claim
    for another lane first moves it onto its own lane's list (_RELANE: the rare case that passes a message
    through Lua), so a batch's messages all lie on its lane's lists. unregister waits for the blocking
    takes, so nothing is stranded. Status, stats, drain, purge and requeues act on every shard and add up.
    """

    def __init__(self, shards: list[ImageQueue]):
        from concurrent.futures import ThreadPoolExecutor

        self.shards = shards
        self.redis, self.keys = shards[0].redis, shards[0].keys
        self.block_s, self.worker_ttl_s = shards[0].block_s, shards[0].worker_ttl_s
        self.queue_max = sum(shard.queue_max for shard in shards)
        self._turn = itertools.count()  # the web's round-robin
        self._first = itertools.count()  # the shard a worker's next take starts from
        self._pool = ThreadPoolExecutor(2 * len(shards), thread_name_prefix="blocking-take")  # and probes
        self._blocked: dict[int, tuple[int, object]] = {}  # shard -> (lane, its blocking take: a Future) running
        # id() of each claimed message not yet acked -> (its shard, lane, the message: so the id stays its own)
        self._origin: dict[int, tuple[int, int, bytes]] = {}
        self._relane = [Script(shard.redis, _RELANE) for shard in shards]
        self._down: dict[int, tuple[Backoff, float]] = {}  # shards whose Redis failed -> backoff, next try
        self._probes: dict[int, object] = {}  # shard that failed -> its PING (a Future) running: _answers_again
        self._passed_by: set[tuple[int, int]] = set()  # (shard, lane) a recovery could not hand back yet

    def pick(self) -> ImageQueue:
        """The next shard in turn, passing over those whose Redis failed lately or is overdue (_answering)."""
        shards = self._answering()
        return shards[next(self._turn) % len(shards)]

    def _answering(self) -> list[ImageQueue]:
        """The shards the web may send requests to: not those whose Redis failed and has not answered a probe
        since (ImageQueue.failing), nor those with a call of the web's unanswered for OVERDUE_S (stalled_s).
        When every shard that has not failed is overdue (a busy moment: threads waiting for the GIL), the least
        stalled of them: a hung one's stall only grows, so it is never preferred to one merely slow. When every
        shard has failed, all of them."""
        now = time.monotonic()
        working = [shard for shard in self.shards if not shard.failing(now)]
        if not working:
            return self.shards
        stalled = {shard: shard.stalled_s(now) for shard in working}
        return [shard for shard in working if stalled[shard] <= OVERDUE_S] or [min(working, key=stalled.get)]

    def status(self) -> Status:
        """The shards' statuses added up, of those whose Redis answers: one master failing over leaves the web
        serving through the others (live_shard), so /readyz stays ready too. QueueUnavailable when none answers.
        Shards the web passes over (pick) are not asked, unless every shard is: a hung one would hold up each
        /readyz for its socket timeout."""
        each, error = [], None
        for shard in self._answering():
            try:
                each.append(shard.status())
            except QueueMisconfigured:  # a setting to fix, not one shard's outage
                raise
            except QueueUnavailable as exc:
                error = error or exc
        if not each:
            raise error
        return Status(
            server_time=each[0].server_time,
            live_workers=max(s.live_workers for s in each),  # every worker registers on every shard
            model=next((s.model for s in each if s.model), None),
            queue_depth=sum(s.queue_depth for s in each),
            held=sum(s.held for s in each),
            paused=any(s.paused for s in each),
        )

    def stats(self) -> Stats:
        each = [shard.stats() for shard in self.shards]
        heartbeats: dict[str, float] = {}
        for s in each:
            for worker, beat in s.heartbeats.items():
                heartbeats[worker] = max(beat, heartbeats.get(worker, beat))
        sizes: dict[int, int] = {}
        for s in each:
            for size, n in s.batch_sizes.items():
                sizes[size] = sizes.get(size, 0) + n
        now = each[0].server_time
        return Stats(
            server_time=now,
            queue_depth=sum(s.queue_depth for s in each),
            in_progress=sum(s.in_progress for s in each),
            heartbeats=heartbeats,
            live_workers=sum(now - beat <= self.worker_ttl_s for beat in heartbeats.values()),
            batch_sizes=sizes,
            inference_s=sum(s.inference_s for s in each),
            requeued=sum(s.requeued for s in each),
            paused=any(s.paused for s in each),
            shards={q.keys.name: (s.queue_depth, s.in_progress) for q, s in zip(self.shards, each, strict=True)},
        )

    def pause(self) -> None:
        for shard in self.shards:
            shard.pause()

    def resume(self) -> None:
        for shard in self.shards:
            shard.resume()

    def purge(self, reason: str) -> int:
        return sum(shard.purge(reason) for shard in self.shards)

    def heartbeat(self, worker_id: str, model: ModelInfo) -> None:
        self._on_each(lambda shard: shard.heartbeat(worker_id, model))

    def requeue_dead_workers(self) -> int:
        return sum(n or 0 for n in self._on_each(lambda shard: shard.requeue_dead_workers()))

    def beat(self, worker_id: str, model: ModelInfo) -> None:
        """Every answering shard's beat once, in turn (the worker loop's, after an outage; its Heartbeat beats
        each shard from a thread of its own): see _on_answering."""
        self._on_answering(lambda shard: shard.beat(worker_id, model))

    def requeue_own(self, worker_id: str, lane: int | None = None) -> int:
        """See ImageQueue.requeue_own; a shard that is down is handed back when it answers again (_hand_back)."""
        for key, (_, origin_lane, _) in list(self._origin.items()):  # those messages are not in hand any more
            if lane is None or origin_lane == lane:
                self._origin.pop(key, None)
        return sum(self._on_answering(lambda shard: shard.requeue_own(worker_id, lane)))

    def unregister(self, worker_id: str) -> int:
        """Requeue what this worker holds on every shard, once its blocking takes have ended (they end
        within REDIS_BLOCK_S), so a message one of them moves cannot be left on an unwatched list."""
        for _, future in self._blocked.values():
            try:
                future.result()
            except REDIS_ERRORS:
                pass
        self._blocked.clear()
        return sum(n or 0 for n in self._on_each(lambda shard: shard.unregister(worker_id)))

    def claim(self, worker_id: str, max_n: int, wait_s: float = 0.0, lane: int = 0) -> Claim:
        """Up to max_n messages from the shards, each shard first in turn; see the class docstring."""
        taken = self._finished_blocking_takes(worker_id, lane)
        now, more = self._take_round(worker_id, max_n - len(taken), lane)
        taken += more
        if not taken:
            self._block_on_every_shard(worker_id, lane)
            taken = self._finished_blocking_takes(worker_id, lane)
            if not taken and not any(probe.done() for probe in self._probes.values()):
                return Claim(now, [])
            later, more = self._take_round(worker_id, max_n - len(taken), lane)  # re-registers, reads the clock
            now, taken = later or now, taken + more  # (and takes from a shard whose probe has just answered)
        elif wait_s > 0 and len(taken) < max_n:
            time.sleep(wait_s)  # one bounded hold, not a poll: filling a partial batch
            later, more = self._take_round(worker_id, max_n - len(taken), lane)
            now, taken = later or now, taken + more  # later is 0 when no shard was asked
        return self._claimed(now, taken)

    def top_up(self, worker_id: str, count: int, lane: int = 0) -> Claim:
        return self._claimed(*self._take_round(worker_id, count, lane))

    def _claimed(self, now: float, taken: list[tuple[int, int, bytes]]) -> Claim:
        self._origin.update((id(raw), (s, lane, raw)) for s, lane, raw in taken)
        return Claim(now, [raw for _, _, raw in taken])

    def ack(
        self, worker_id: str, done: list[Done], batch_size: int = 0, inference_s: float = 0.0, lane: int = 0
    ) -> tuple[list[str], list[str]]:
        """Each part of the batch acked on the shard and lane it was claimed on (Done.raw is the claimed message
        itself); the batch is counted once, in the stats of the shard that held most of it. A shard that fails
        does not keep the others' answers back; the worker's retry then acks every part again, and a part
        already acked finds its messages gone and writes nothing twice."""
        parts: dict[tuple[int, int], list[Done]] = {}
        for d in done:
            part = self._origin.get(id(d.raw), (0, lane, b""))[:2]
            parts.setdefault(part, []).append(d)
        counted = max(parts, key=lambda part: len(parts[part]), default=None)

        def ack_parts(shard: ImageQueue):
            s, results = self.shards.index(shard), []
            for (part_shard, part_lane), part in parts.items():
                if part_shard == s:
                    counts = (batch_size, inference_s) if (s, part_lane) == counted else (0, 0.0)
                    results.append(shard.ack(worker_id, part, *counts, lane=part_lane))
            return results

        answered, late = [], []
        for results in self._on_each(ack_parts):
            for result in results or ():
                answered += result[0]
                late += result[1]
        for d in done:  # acked (a failed ack raised above, and its retry needs the origins)
            self._origin.pop(id(d.raw), None)
        self._hand_back_passed_by(worker_id)
        return answered, late

    def _hand_back_passed_by(self, worker_id: str) -> None:
        """The lanes a shard's recovery passed by (_hand_back: a batch was in flight on them), once nothing of that
        shard is in hand there: what a failed call left on them goes back to the queue. Tried after each ack."""
        for s, lane in list(self._passed_by):
            if s in self._down:  # its recovery (_hand_back) sees to it; tried here, a hung shard stalled each ack
                continue
            if any(shard == s and held_on == lane for shard, held_on, _ in list(self._origin.values())):
                continue
            try:
                self.shards[s]._requeue_worker(worker_id, 0, forget=False, lanes=[lane])
            except REDIS_ERRORS:
                continue  # tried again after the next ack
            self._passed_by.discard((s, lane))

    def _on_each(self, call) -> list:
        """call(shard) for every shard, also when some fail: one master failing over must not hold back the
        others' heartbeats, answers or requeues. Then the first Redis error, if any, is raised."""
        results, error = [], None
        for shard in self.shards:
            try:
                results.append(call(shard))
            except REDIS_ERRORS as exc:
                error = error or exc
                results.append(None)
        if error is not None:
            raise error
        return results

    def _on_answering(self, call) -> list:
        """call(shard) on the shards that are not down (_down), or, when all are, on those with no probe in
        flight (a probe still running may be waiting on a hung Redis). A shard that fails is marked down, and
        what the call would have done there is done when it answers again (_hand_back); the first error is
        raised only when no shard answered, for the worker loop's outage handling. Raised for one shard, a
        failed ack's lane kept the worker from claiming on any shard until that one came back."""
        shards = range(len(self.shards))
        up = [s for s in shards if s not in self._down] or [s for s in shards if s not in self._probes]
        if not up:
            raise redis.ConnectionError("every queue shard is down, each probed now")
        results, error = [], None
        for s in up:
            try:
                results.append(call(self.shards[s]))
            except REDIS_ERRORS as exc:
                self._shard_failed(s, exc)
                error = error or exc
        if not results:
            raise error
        return results

    def _take_round(self, worker_id: str, count: int, lane: int) -> tuple[float, list[tuple[int, int, bytes]]]:
        """One take on every shard (each registers this worker there), the next shard first each time.

        A shard whose Redis fails is skipped for a backoff while the others go on serving (a Cluster master
        failing over takes seconds), then until a probe from another thread finds it answering
        (_answers_again); then what a failed call may have left on this worker's list there is handed back
        first. Only when no shard answers and one has failed does the error go to the worker loop. The
        server time returned is 0 when no shard was asked.
        """
        first, taken, now, error = next(self._first), [], 0.0, None
        for i in range(len(self.shards)):
            s = (first + i) % len(self.shards)
            if s in self._down:
                try:
                    if not self._answers_again(s):
                        continue
                except REDIS_ERRORS as exc:
                    error = exc
                    continue
            try:
                if s in self._down:
                    self._hand_back(s, worker_id)
                now, messages = self.shards[s]._take_now(worker_id, max(0, count - len(taken)), lane)
            except REDIS_ERRORS as exc:
                self._shard_failed(s, exc)
                error = exc
                continue
            if s in self._down:
                log.info("queue shard %s answers again", self.shards[s].keys.name)
                del self._down[s]
            taken += [(s, lane, m) for m in messages]
        if not now and error is not None:  # no shard answered
            raise error
        return now, taken

    def _answers_again(self, s: int) -> bool:
        """Whether a shard that failed answers again: once its backoff is due, a PING from another thread (the
        probe) asks; claims go back to the shard only after it answered. Asked by the claim itself, a shard whose
        Redis hangs would stall every shard's claims for a socket timeout at each retry. A failed probe raises
        its error once the shard is marked down again."""
        probe = self._probes.get(s)
        if probe is None:
            if time.monotonic() >= self._down[s][1]:
                self._probes[s] = self._pool.submit(self.shards[s].ping)
            return False
        if not probe.done():
            return False
        del self._probes[s]
        try:
            probe.result()
        except REDIS_ERRORS as exc:
            self._shard_failed(s, exc)
            raise
        return True

    def _hand_back(self, s: int, worker_id: str) -> int:
        """A shard answering again: requeue what failed calls may have left on this worker's lists there, on
        every lane with none of that shard's messages in hand and no blocking take into it running. A batch in
        flight keeps its messages (requeued, they would run twice and its ack would drop their answers); its
        lane is handed back after that ack (_hand_back_passed_by)."""
        in_flight = {lane for shard, lane, _ in list(self._origin.values()) if shard == s}
        self._passed_by |= {(s, lane) for lane in in_flight}  # handed back once their batches are acked
        busy = in_flight | ({self._blocked[s][0]} if s in self._blocked else set())
        lanes = [lane for lane in range(LANES) if lane not in busy]
        return self.shards[s]._requeue_worker(worker_id, 0, forget=False, lanes=lanes) if lanes else 0

    def _shard_failed(self, s: int, exc: redis.RedisError) -> None:
        if redis_trouble(exc) == "configuration":  # the same for every shard: the worker loop exits
            raise exc
        backoff = self._down[s][0] if s in self._down else Backoff()
        delay = backoff.next_delay()
        if backoff.failures == 1:
            log.warning("queue shard %s: Redis unavailable (%s); serving the others", self.shards[s].keys.name, exc)
        self._down[s] = (backoff, time.monotonic() + delay)

    def _block_on_every_shard(self, worker_id: str, lane: int) -> None:
        """Wait until a blocking take on some shard has moved a message, a probe of a shard that failed has
        answered, or REDIS_BLOCK_S has passed."""
        from concurrent.futures import FIRST_COMPLETED, wait

        for s, shard in enumerate(self.shards):
            if s not in self._blocked and s not in self._down:
                move = shard.redis.blmove
                args = (shard.keys.queue, shard.keys.processing(worker_id, lane), shard.block_s, "RIGHT", "LEFT")
                self._blocked[s] = (lane, self._pool.submit(move, *args))
        futures = [future for _, future in self._blocked.values()] + list(self._probes.values())
        if futures:
            wait(futures, return_when=FIRST_COMPLETED)  # takes end within block_s, probes within a socket timeout
        else:  # every shard is backing off: wait for the first to be due
            time.sleep(max(0.0, min(due for _, due in self._down.values()) - time.monotonic()))

    def _finished_blocking_takes(self, worker_id: str, lane: int) -> list[tuple[int, int, bytes]]:
        """The messages the blocking takes moved, each on this lane's list of its shard."""
        taken = []
        for s, (took_on, future) in list(self._blocked.items()):
            if future.done():
                del self._blocked[s]
                try:
                    message = future.result()
                except REDIS_ERRORS as exc:
                    self._shard_failed(s, exc)
                    continue
                if message is not None and took_on != lane:
                    keys = self.shards[s].keys
                    lists = [keys.processing(worker_id, took_on), keys.processing(worker_id, lane)]
                    try:
                        if not self._relane[s](keys=lists, args=[message]):
                            continue  # requeued meanwhile (this worker recovering): not ours to answer
                    except REDIS_ERRORS as exc:
                        self._shard_failed(s, exc)
                        continue  # left on its list: the recovery's requeue_own hands it back
                if message is not None:
                    taken.append((s, lane, message))
                    self._origin[id(message)] = (s, lane, message)  # in hand now: a hand-back must pass its lane by
        return taken


# A message a blocking take moved onto one lane's list, moved onto another's (ShardedQueue: rare, so it may
# pass through Lua). KEYS: from, to. ARGV: the message. -> 1 moved, 0 no longer there
_RELANE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


def queue_from_config(
    config: Mapping,
    margin_s: float = WORKER_SOCKET_MARGIN_S,
    model_id: str | None = None,
    client: redis.Redis | None = None,
) -> ImageQueue | ShardedQueue:
    """The queue that settings (or a Flask app's config, which copies them) describe: model_id's own queue,
    whose heartbeats register the model in the registry; without one, the queue named IMAGE_QUEUE itself."""
    client = client or client_from_config(config, margin_s)
    base, n = config["IMAGE_QUEUE"], config.get("QUEUE_SHARDS", 1)
    name = model_queue_name(base, model_id) if model_id else base
    shards = [
        ImageQueue(
            client,
            shard_name,
            queue_max=-(-config["QUEUE_MAX"] // n),  # the whole queue holds QUEUE_MAX at most (rounded up)
            block_s=config["REDIS_BLOCK_S"],
            result_ttl_s=config["RESULT_TTL_S"],
            worker_ttl_s=config["WORKER_TTL_S"],
            wait_replicas=config.get("REDIS_WAIT_REPLICAS", 0),
            registry=(Keys(base).models, model_id) if model_id and k == 0 else None,  # once per heartbeat
        )
        for k, shard_name in enumerate(shard_names(name, n))
    ]
    return shards[0] if n == 1 else ShardedQueue(shards)


def client_from_config(config: Mapping, margin_s: float = WORKER_SOCKET_MARGIN_S) -> redis.Redis:
    return connect(
        config["REDIS_URL"],
        config["REDIS_BLOCK_S"],
        margin_s,
        sentinels=tuple(config.get("REDIS_SENTINELS", ())),
        sentinel_master=config.get("REDIS_SENTINEL_MASTER", "mymaster"),
        cluster=config.get("REDIS_CLUSTER", False),
        sentinel_auth=(config.get("REDIS_SENTINEL_USERNAME", ""), config.get("REDIS_SENTINEL_PASSWORD", "")),
    )


class UnknownModel(LookupError):
    """No worker of this model id has registered (within MODEL_FORGET_S)."""


class NoModelNamed(ValueError):
    """Several models are served, no DEFAULT_MODEL is set and the request named none."""


class ModelDirectory:
    """The models served on a queue's Redis and each one's queue, as the web and admin.py see them.

    The models are the ids the workers registered in {IMAGE_QUEUE}:models (every heartbeat), read again
    at most every refresh_s, and at once when a request names one not in the last list (such reads at most
    every FORCED_S, so that made-up ids cannot drive Redis): starting a new model's workers is all it takes
    to serve it, with no web configuration or restart. One thread reads while the others go on with the
    last list, so a stalled Redis holds up one request, not all of them; requests naming an id not in the
    list wait for that read instead. When Redis fails, the last list
    read is kept (requests then fail on their model's queue, with 503) until the next refresh.
    """

    FORCED_S = 0.1  # the fewest seconds between reads forced by an id not in the list (made-up ids cost this)

    def __init__(self, config: Mapping, margin_s: float = WORKER_SOCKET_MARGIN_S, refresh_s: float = 1.0):
        self.config = config
        self.client = client_from_config(config, margin_s)
        self.margin_s, self.refresh_s = margin_s, refresh_s
        self.default = config.get("DEFAULT_MODEL", "")
        self.registry = Keys(config["IMAGE_QUEUE"]).models
        self._read_known = Script(self.client, _KNOWN_MODELS)
        self._ids: list[str] = []
        self._read_at = -float("inf")  # when the last read began (time.monotonic()), whether or not it worked
        self._done_at = -float("inf")  # when the last read ended, whether or not it worked
        self._forced_at = -float("inf")  # when the last read forced by an id not in the list began
        self._ever_read = False
        self._reading = threading.Lock()  # held by the one thread reading; waited on only while the list is empty
        self.first_wait_s = config["REDIS_BLOCK_S"] + margin_s
        self._queues: dict[str, ImageQueue | ShardedQueue] = {}
        self._lock = threading.Lock()  # guards _queues

    def ids(self, fresh: bool = False) -> list[str]:
        """The model ids served, sorted: the last list read, read again when it is older than refresh_s (or
        FORCED_S when fresh) unless another thread is reading it. While the list is empty, every call reads
        it, waiting for another thread's read (up to a Redis call's timeout), and so does a call for an id not
        in the list (fresh) while a read is in flight: its list, not the one it replaces. QueueUnavailable when
        the first read fails."""
        due, asked = self._due(fresh), time.monotonic()
        if due and self._take_read(fresh):
            try:
                if self._done_at < asked and self._due(fresh):  # no read ended while this one waited for it
                    self._read(fresh)
            finally:
                self._reading.release()
        elif fresh and not due and self._reading.acquire(timeout=self.first_wait_s):
            self._reading.release()  # a forced read began within FORCED_S: waited for, in case it is still running
        if not self._ever_read:
            raise QueueUnavailable("the model registry could not be read yet")
        return list(self._ids)

    def _take_read(self, fresh: bool) -> bool:
        """The reading lock: at once or not at all while there is a list to go on; waited for while it is empty,
        and by a request naming an id not in the list (fresh), which would otherwise get a 404 for a model whose
        first worker registered while another thread was reading; after the wait the list is that thread's read."""
        if self._ids and not fresh:
            return self._reading.acquire(blocking=False)
        return self._reading.acquire(timeout=self.first_wait_s)

    def _due(self, fresh: bool) -> bool:
        now = time.monotonic()
        stale = now - self._read_at >= self.refresh_s
        # An empty list is read again at every call: nothing is served until a worker registers, and the first
        # one must be seen at once (a web that read the registry just before would say "no worker" for 1 s).
        return not self._ids or stale or (fresh and now - self._forced_at >= self.FORCED_S)

    def _read(self, fresh: bool) -> None:
        self._read_at = time.monotonic()
        if fresh:
            self._forced_at = self._read_at
        try:
            self._ids = sorted(m.decode() for m in self._read_known(keys=[self.registry], args=[MODEL_FORGET_S]))
            self._ever_read = True
        except REDIS_ERRORS as exc:
            if not self._ever_read:
                raise unavailable(exc) from exc
            log.warning("could not read the model registry (%s); keeping the last list", exc)
        finally:
            self._done_at = time.monotonic()

    def queue(self, model_id: str) -> ImageQueue | ShardedQueue:
        """The queue of a served model; UnknownModel when no worker of it registered within MODEL_FORGET_S
        (NoWorker for DEFAULT_MODEL: the model this web is configured for has no worker yet, a 503)."""
        if model_id not in self.ids() and model_id not in self.ids(fresh=True):
            if self.default and model_id == self.default:
                raise NoWorker(f"no worker of the default model {model_id!r} is running")
            served = ", ".join(self.ids()) or "none yet"
            raise UnknownModel(f"no model {model_id!r} is served (models: {served})")
        return self.queue_for(model_id)

    def queue_for(self, model_id: str) -> ImageQueue | ShardedQueue:
        """The queue model_id's workers serve, registered or not (admin.py, and tests playing a worker)."""
        with self._lock:
            if model_id not in self._queues:
                self._queues[model_id] = queue_from_config(self.config, self.margin_s, model_id, self.client)
            return self._queues[model_id]

    def default_id(self) -> str:
        """The model a request that names none goes to: DEFAULT_MODEL, else the only one served.
        NoWorker when none is served yet; NoModelNamed when several are and no default is set."""
        if self.default:
            return self.default
        ids = self.ids()  # an empty list is read again on every call
        if not ids:
            raise NoWorker()
        if len(ids) > 1:
            raise NoModelNamed(f"several models are served ({', '.join(ids)}): name one, e.g. ?model={ids[0]}")
        return ids[0]
