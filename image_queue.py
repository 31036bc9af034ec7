"""The Redis queue protocol, shared by the web workers and the model workers.

Imports neither Flask nor Keras. Every key of one queue carries the hash tag "{IMAGE_QUEUE}", so all
of them live in one Redis Cluster slot and each Lua script touches only keys it declares.

Keys (IMAGE_QUEUE = "image_queue"):
    {image_queue}:queue                 list of messages; web LPUSHes, workers take from the right
    {image_queue}:processing:<worker>   list of the messages one worker has claimed, until answered
    {image_queue}:workers               sorted set: worker id -> its last heartbeat (Redis TIME)
    {image_queue}:model                 hash: name, height, width of the model being served
    {image_queue}:result:<request id>   list holding the one answer; expires after RESULT_TTL_S

Flow:
    web     status()   one script: server time, live workers, model input size (503 if none live)
            enqueue()  one script: LLEN >= QUEUE_MAX ? refuse (503) : LPUSH
            wait_for() BLPOP on the request's own result key, at most REDIS_BLOCK_S per call,
                       until the request's deadline (then 504)
    worker  claim()    one script: RPOP up to BATCH_SIZE and push them on the worker's processing
                       list; when the queue is empty, BLMOVE one (blocks up to REDIS_BLOCK_S)
            ack()      one script: per message, LREM it from the processing list and, only if it was
                       still there and its deadline has not passed, RPUSH + EXPIRE its answer
            heartbeat() ZADD workers <now>; HSET model. requeue_dead_workers(): a worker silent for
                       WORKER_TTL_S has its processing list moved back to the head of the queue.

A message is always in exactly one list (queue or one processing list) until it is acknowledged, so a
worker killed mid-batch loses nothing; and since an answer is written only by the ack that removes the
message, a stalled worker that wakes after its batch was requeued cannot answer a second time.
"""

import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

# What a lost, restarting, stalled, read-only (after a failover) or full Redis raises: transient,
# so both sides retry them with backoff (the web answers 503 where it cannot wait).
REDIS_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
)
WEB_SOCKET_MARGIN_S = 0.5  # web: a stalled Redis delays a 503/504 by at most REDIS_BLOCK_S + this
WORKER_SOCKET_MARGIN_S = 2.0  # worker: room to move a batch of messages over a slow link
NO_DEADLINE = 1e18  # deadline for answers that must go out whatever the time (poison messages)


class QueueFull(Exception):
    """The queue holds QUEUE_MAX messages."""


class NoWorker(Exception):
    """No model worker has sent a heartbeat within WORKER_TTL_S."""


class QueueUnavailable(Exception):
    """Redis cannot be reached."""


def connect(url: str, block_s: float, margin_s: float = WORKER_SOCKET_MARGIN_S) -> redis.Redis:
    """A client whose socket timeout outlives the longest blocking call made through it by margin_s.

    No automatic retries: the scripts are not idempotent, and a retry after a lost reply could push a
    message twice or claim messages the worker never sees (redis-py's default retries 10 times, also on
    timeouts, which would hold a web request for seconds). Callers handle outages, with backoff.
    """
    return redis.Redis.from_url(
        url,
        socket_timeout=block_s + margin_s,
        socket_connect_timeout=block_s + margin_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )


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
        if not self.name or any(c in self.name for c in "{}: "):
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

    def processing(self, worker_id: str) -> str:
        return f"{{{self.name}}}:processing:{worker_id}"

    def result(self, request_id: str) -> str:
        return f"{{{self.name}}}:result:{request_id}"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    height: int
    width: int


@dataclass(frozen=True)
class Status:
    server_time: float  # Unix seconds, Redis clock
    live_workers: int
    model: ModelInfo | None
    queue_depth: int


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


_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000 "

# KEYS: workers, model, queue. ARGV: ttl. -> {now sec, now usec, live workers, model hash, depth}
_STATUS = (
    _NOW
    + """
local live = redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), '+inf')
return {t[1], t[2], live, redis.call('HGETALL', KEYS[2]), redis.call('LLEN', KEYS[3])}
"""
)

# KEYS: queue. ARGV: message, queue_max. -> new length, or -1 when full
_ENQUEUE = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
return redis.call('LPUSH', KEYS[1], ARGV[1])
"""

# KEYS: queue, processing. ARGV: count. -> {now sec, now usec, messages (oldest first)}
_TAKE = (
    _NOW
    + """
local taken = redis.call('RPOP', KEYS[1], ARGV[1])
if not taken then return {t[1], t[2], {}} end
for _, message in ipairs(taken) do redis.call('LPUSH', KEYS[2], message) end
return {t[1], t[2], taken}
"""
)

# KEYS: processing, result key per answer. ARGV: result ttl, n unanswered, unanswered raws...,
# then (raw, answer, deadline) per result key. -> {positions answered, positions too late} (1-based)
_ACK = (
    _NOW
    + """
local n_drop = tonumber(ARGV[2])
for i = 3, 2 + n_drop do redis.call('LREM', KEYS[1], 1, ARGV[i]) end
local answered, late = {}, {}
for k = 2, #KEYS do
  local a = 3 + n_drop + (k - 2) * 3
  if redis.call('LREM', KEYS[1], 1, ARGV[a]) == 1 then
    if now <= tonumber(ARGV[a + 2]) then
      redis.call('RPUSH', KEYS[k], ARGV[a + 1])
      redis.call('EXPIRE', KEYS[k], ARGV[1])
      table.insert(answered, k - 1)
    else
      table.insert(late, k - 1)
    end
  end
end
return {answered, late}
"""
)

# KEYS: workers, model. ARGV: worker id, model name, height, width.
_HEARTBEAT = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], 'name', ARGV[2], 'height', ARGV[3], 'width', ARGV[4])
"""
)

# KEYS: workers. ARGV: ttl. -> ids of workers silent for longer than ttl
_DEAD = _NOW + "return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[1])))"

# KEYS: workers, processing, queue. ARGV: worker id, min silence, forget (1: drop its heartbeat).
# -> messages requeued, or -1 if the worker has spoken within min silence
_REQUEUE = (
    _NOW
    + """
local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
if beat and tonumber(beat) > now - tonumber(ARGV[2]) then return -1 end
local n = 0
while redis.call('LMOVE', KEYS[2], KEYS[3], 'LEFT', 'RIGHT') do n = n + 1 end
if ARGV[3] == '1' then redis.call('ZREM', KEYS[1], ARGV[1]) end
return n
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
    ):
        self.redis = client
        self.keys = Keys(name)
        self.queue_max = queue_max
        self.block_s = block_s
        self.result_ttl_s = result_ttl_s
        self.worker_ttl_s = worker_ttl_s
        self._status = client.register_script(_STATUS)
        self._enqueue = client.register_script(_ENQUEUE)
        self._take = client.register_script(_TAKE)
        self._ack = client.register_script(_ACK)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._dead = client.register_script(_DEAD)
        self._requeue = client.register_script(_REQUEUE)

    # --- web side -----------------------------------------------------------------------------

    def status(self) -> Status:
        """Server time, live workers, the served model's input size and queue depth, in one round trip."""
        keys = [self.keys.workers, self.keys.model, self.keys.queue]
        try:
            try:
                sec, usec, live, fields, depth = self._status(keys=keys, args=[self.worker_ttl_s])
            except redis.ConnectionError:  # read-only, so safe to retry once: a pooled connection a restart killed
                sec, usec, live, fields, depth = self._status(keys=keys, args=[self.worker_ttl_s])
        except REDIS_ERRORS as exc:
            raise QueueUnavailable(f"Redis is unavailable: {exc}") from exc
        info = {k.decode(): v.decode() for k, v in zip(fields[::2], fields[1::2], strict=True)}
        model = ModelInfo(info["name"], int(info["height"]), int(info["width"])) if info else None
        return Status(int(sec) + int(usec) / 1e6, int(live), model, int(depth))

    def enqueue(self, message: bytes) -> int:
        """Push a message unless the queue is full; returns the queue's new length."""
        try:
            length = self._enqueue(keys=[self.keys.queue], args=[message, self.queue_max])
        except REDIS_ERRORS as exc:
            raise QueueUnavailable(f"Redis is unavailable: {exc}") from exc
        if length < 0:
            raise QueueFull(f"the queue holds {self.queue_max} images")
        return length

    def wait_for(self, request_id: str, deadline: float) -> bytes | None:
        """Block on the request's result key until an answer or the time.monotonic() deadline."""
        key, backoff = self.keys.result(request_id), Backoff()
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                reply = self.redis.blpop([key], timeout=max(0.01, min(remaining, self.block_s)))
            except REDIS_ERRORS as exc:
                delay = min(backoff.next_delay(), max(0.0, deadline - time.monotonic()))
                log.warning("waiting for %s: Redis unavailable (%s); retrying in %.2f s", request_id, exc, delay)
                time.sleep(delay)
                continue
            if reply is not None:
                return reply[1]
        return None

    # --- worker side --------------------------------------------------------------------------

    def heartbeat(self, worker_id: str, model: ModelInfo) -> None:
        """Say this worker is alive and which model it serves."""
        self._heartbeat(
            keys=[self.keys.workers, self.keys.model], args=[worker_id, model.name, model.height, model.width]
        )

    def claim(self, worker_id: str, max_n: int, wait_s: float = 0.0) -> Claim:
        """Move up to max_n messages onto this worker's processing list, atomically.

        Takes what is queued at once; on an empty queue blocks up to REDIS_BLOCK_S for the first
        message. With wait_s > 0 a partial batch is held that long once to let it fill.
        """
        processing = self.keys.processing(worker_id)
        now, messages = self._take_now(processing, max_n)
        blocked = False
        if not messages:
            first = self.redis.blmove(self.keys.queue, processing, self.block_s, "RIGHT", "LEFT")
            if first is None:
                return Claim(now, [])
            messages, blocked = [first], True
        if len(messages) < max_n and (blocked or wait_s > 0):
            if wait_s > 0:
                time.sleep(wait_s)  # one bounded hold, not a poll: filling a partial batch
            now, more = self._take_now(processing, max_n - len(messages))
            messages += more
        return Claim(now, messages)

    def _take_now(self, processing: str, count: int) -> tuple[float, list[bytes]]:
        sec, usec, messages = self._take(keys=[self.keys.queue, processing], args=[count])
        return int(sec) + int(usec) / 1e6, list(messages)

    def ack(self, worker_id: str, done: list[Done]) -> tuple[list[str], list[str]]:
        """Write the answers and release the messages; returns the request ids (answered, too late).

        A message no longer on this worker's processing list (a peer requeued it while this worker
        was silent) is neither answered nor counted: its new holder answers it.
        """
        dropped = [d.raw for d in done if d.request_id is None or d.answer is None]
        answering = [d for d in done if d.request_id is not None and d.answer is not None]
        keys = [self.keys.processing(worker_id)] + [self.keys.result(d.request_id) for d in answering]
        args: list = [self.result_ttl_s, len(dropped), *dropped]
        for d in answering:
            args += [d.raw, d.answer, repr(d.deadline)]
        answered, late = self._ack(keys=keys, args=args)
        return [answering[i - 1].request_id for i in answered], [answering[i - 1].request_id for i in late]

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

    def requeue_own(self, worker_id: str) -> int:
        """Between batches a worker holds nothing: put back what a failed call left on its list.

        A claim whose reply was lost, or an ack that could not be written, leaves messages on the
        worker's processing list that it does not have in hand; no peer looks there while it lives.
        """
        return self._requeue_worker(worker_id, 0, forget=False)

    def unregister(self, worker_id: str) -> int:
        """A worker leaving: requeue whatever it still holds and drop its heartbeat."""
        return self._requeue_worker(worker_id, 0, forget=True)

    def _requeue_worker(self, worker_id: str, min_silence_s: float, forget: bool) -> int:
        keys = [self.keys.workers, self.keys.processing(worker_id), self.keys.queue]
        return int(self._requeue(keys=keys, args=[worker_id, min_silence_s, int(forget)]))


def queue_from_config(config: Mapping, margin_s: float = WORKER_SOCKET_MARGIN_S) -> ImageQueue:
    """The queue that settings (or a Flask app's config, which copies them) describe."""
    return ImageQueue(
        connect(config["REDIS_URL"], config["REDIS_BLOCK_S"], margin_s),
        config["IMAGE_QUEUE"],
        queue_max=config["QUEUE_MAX"],
        block_s=config["REDIS_BLOCK_S"],
        result_ttl_s=config["RESULT_TTL_S"],
        worker_ttl_s=config["WORKER_TTL_S"],
    )
