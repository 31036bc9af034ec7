"""The Redis queue protocol, shared by the web workers and the model workers.

Imports neither Flask nor Keras. Every key of one queue carries the hash tag "{IMAGE_QUEUE}", so all
of them live in one Redis Cluster slot and each Lua script touches only keys it declares.

Keys (IMAGE_QUEUE = "image_queue"):
    {image_queue}:queue                 list of messages; web LPUSHes, workers take from the right
    {image_queue}:processing:<worker>   list of the messages one worker has claimed, until answered
    {image_queue}:workers               sorted set: worker id -> its last heartbeat (Redis TIME)
    {image_queue}:model                 hash: name, height, width of the model being served
    {image_queue}:result:<request id>   list holding the one answer; expires after RESULT_TTL_S
    {image_queue}:stats                 hash of service-wide counters for /metrics: "size:<n>" batches of
                                        n images the model ran, "inference_s" their seconds, "requeued"

Flow:
    web     status()   one script: server time, live workers, model input size (503 if none live)
            enqueue()  one MULTI: LPUSH, then a script that counts the messages held and, over
                       QUEUE_MAX, LTRIMs the message off again (503)
            wait_for() BLPOP on the request's own result key, at most REDIS_BLOCK_S per call,
                       until the request's deadline (then 504)
    worker  claim()    one MULTI: a script registers the worker and reads TIME, then LMOVEs up to
                       BATCH_SIZE onto the worker's processing list; when the queue is empty, BLMOVE
                       one (blocks up to REDIS_BLOCK_S)
            ack()      one script: release the batch from the processing list (DEL when the list is
                       exactly the batch, else LREM each by its handle) and, for each message that was
                       still there and whose deadline has not passed, RPUSH + EXPIRE its answer; count
                       the batch in the stats hash
    No message passes through a Lua script on the way in or out: a script copies every value it
    touches into a Lua string. The two small scripts inside a MULTI are sent as source (EVAL), so a
    MULTI is one round trip and cannot meet an empty script cache (NOSCRIPT) half-way.
            heartbeat() ZADD workers <now>; HSET model. requeue_dead_workers(): a worker silent for
                       WORKER_TTL_S has its processing list moved back to the head of the queue.

A message is always in exactly one list (queue or one processing list) until it is acknowledged, so a
worker killed mid-batch loses nothing; and since an answer is written only by the ack that removes the
message, a stalled worker that wakes after its batch was requeued cannot answer a second time.
"""

import json
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


class Draining(Exception):
    """An operator paused the queue (admin.py drain): new requests are refused until it resumes."""


class QueueUnavailable(Exception):
    """Redis cannot be reached."""


def unavailable(exc: Exception) -> QueueUnavailable:
    """The 503 for a Redis error; one that refused our password says so, since only a fix of REDIS_URL helps."""
    if isinstance(exc, redis.AuthenticationError):
        return QueueUnavailable(f"Redis authentication failed ({exc}): check the password in REDIS_URL")
    return QueueUnavailable(f"Redis is unavailable: {exc}")


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

    @property
    def paused(self) -> str:
        return f"{{{self.name}}}:paused"

    def processing(self, worker_id: str) -> str:
        return f"{{{self.name}}}:processing:{worker_id}"

    def result(self, request_id: str) -> str:
        return f"{{{self.name}}}:result:{request_id}"

    @property
    def stats(self) -> str:
        return f"{{{self.name}}}:stats"


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
    queue_depth: int  # messages waiting for a worker
    held: int  # messages in Redis for this queue: waiting plus being processed (QUEUE_MAX bounds it)
    paused: bool = False  # an operator is draining the queue: refuse new requests


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

# Messages held for the queue: waiting, plus on the processing list of every registered worker.
# The processing keys are built from the workers set; the {name} hash tag keeps them in one slot.
# KEYS: queue, workers. ARGV: processing key prefix.
_HELD = """
local function held()
  local n = redis.call('LLEN', KEYS[1])
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do n = n + redis.call('LLEN', ARGV[1] .. id) end
  return n
end
"""

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

# Every waiting message is taken off the queue and its request answered at once with ARGV[2]
# (an error), under its own result key (ids are read from the head: '{"id":"...",').
# KEYS: queue. ARGV: result key prefix, answer, result ttl. -> messages purged
_PURGE = """
local n = 0
while true do
  local m = redis.call('RPOP', KEYS[1])
  if not m then return n end
  n = n + 1
  local id = string.match(string.sub(m, 1, 200), '^{"id":"([%w_%-]+)"')
  if id then
    redis.call('RPUSH', ARGV[1] .. id, ARGV[2])
    redis.call('EXPIRE', ARGV[1] .. id, ARGV[3])
  end
end
"""

# Runs in one MULTI right after the LPUSH of a message, so that message is the queue's head: over the
# bound, LTRIM drops it again. The message itself never passes through Lua (see _REGISTER).
# KEYS: queue, workers. ARGV: processing prefix, queue_max. -> messages held, or -1 when full
_ADMIT = (
    _HELD
    + """
local n = held()
if n > tonumber(ARGV[2]) then
  redis.call('LTRIM', KEYS[1], 1, -1)
  return -1
end
return n
"""
)

# Taking a batch registers the worker (a worker that holds messages is always counted and watched) and
# reads the clock; the messages themselves move by LMOVE in the same MULTI, never through Lua: a script
# that touches a message copies its ~200 KB into a Lua string, ~0.4 ms of Redis's one thread per message.
# KEYS: workers. ARGV: worker id. -> {now sec, now usec}
_REGISTER = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
return {t[1], t[2]}
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

# KEYS: workers, processing, queue, stats. ARGV: worker id, min silence, forget (1: drop its heartbeat).
# -> messages requeued (also added to the stats hash's "requeued"), or -1 if the worker has spoken
# within min silence
_REQUEUE = (
    _NOW
    + """
local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
if beat and tonumber(beat) > now - tonumber(ARGV[2]) then return -1 end
local n = 0
while redis.call('LMOVE', KEYS[2], KEYS[3], 'LEFT', 'RIGHT') do n = n + 1 end
if ARGV[3] == '1' then redis.call('ZREM', KEYS[1], ARGV[1]) end
if n > 0 then redis.call('HINCRBY', KEYS[4], 'requeued', n) end
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
    ):
        self.redis = client
        self.keys = Keys(name)
        self.queue_max = queue_max
        self.block_s = block_s
        self.result_ttl_s = result_ttl_s
        self.worker_ttl_s = worker_ttl_s
        self._status = client.register_script(_STATUS)
        self._ack = client.register_script(_ACK)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._dead = client.register_script(_DEAD)
        self._requeue = client.register_script(_REQUEUE)
        self._stats = client.register_script(_STATS)
        self._purge = client.register_script(_PURGE)

    # --- web side -----------------------------------------------------------------------------

    def status(self) -> Status:
        """Server time, live workers, the served model's input size and queue depth, in one round trip."""
        keys = [self.keys.queue, self.keys.workers, self.keys.model, self.keys.paused]
        args = [self.keys.processing(""), self.worker_ttl_s]
        try:
            try:
                sec, usec, live, fields, depth, held, paused = self._status(keys=keys, args=args)
            except redis.ConnectionError:  # read-only, so safe to retry once: a pooled connection a restart killed
                sec, usec, live, fields, depth, held, paused = self._status(keys=keys, args=args)
        except REDIS_ERRORS as exc:
            raise unavailable(exc) from exc
        info = {k.decode(): v.decode() for k, v in zip(fields[::2], fields[1::2], strict=True)}
        model = ModelInfo(info["name"], int(info["height"]), int(info["width"])) if info else None
        return Status(int(sec) + int(usec) / 1e6, int(live), model, int(depth), int(held), bool(paused))

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

    def enqueue(self, message: bytes) -> int:
        """Push a message unless QUEUE_MAX messages are held already; returns how many are held now.

        Held counts the messages waiting and those on workers' processing lists, so Redis never
        holds more than queue_max images for this queue.
        """
        keys, args = [self.keys.queue, self.keys.workers], [self.keys.processing(""), self.queue_max]
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.lpush(self.keys.queue, message)
                pipe.eval(_ADMIT, len(keys), *keys, *args)
                _, held = pipe.execute()
        except REDIS_ERRORS as exc:
            raise unavailable(exc) from exc
        if held < 0:
            raise QueueFull(f"the queue holds {self.queue_max} images")
        return held

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
        return int(self._purge(keys=[self.keys.queue], args=[self.keys.result(""), answer, self.result_ttl_s]))

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
        now, messages = self._take_now(worker_id, max_n)
        blocked = False
        if not messages:
            first = self.redis.blmove(self.keys.queue, self.keys.processing(worker_id), self.block_s, "RIGHT", "LEFT")
            if first is None:
                return Claim(now, [])
            messages, blocked = [first], True
        if blocked or (wait_s > 0 and len(messages) < max_n):
            if wait_s > 0 and len(messages) < max_n:
                time.sleep(wait_s)  # one bounded hold, not a poll: filling a partial batch
            # After a block, always: it re-registers this worker (a peer may have written it off while
            # it blocked or was stalled) and reads the clock that expiry is judged by.
            now, more = self._take_now(worker_id, max_n - len(messages))
            messages += more
        return Claim(now, messages)

    def _take_now(self, worker_id: str, count: int) -> tuple[float, list[bytes]]:
        """Register, read the clock and move up to count messages, in one MULTI (one round trip)."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.eval(_REGISTER, 1, self.keys.workers, worker_id)
            for _ in range(count):
                pipe.lmove(self.keys.queue, self.keys.processing(worker_id), "RIGHT", "LEFT")
            (sec, usec), *moved = pipe.execute()
        return int(sec) + int(usec) / 1e6, [m for m in moved if m is not None]

    def ack(
        self, worker_id: str, done: list[Done], batch_size: int = 0, inference_s: float = 0.0
    ) -> tuple[list[str], list[str]]:
        """Write the answers and release the messages; returns the request ids (answered, too late).

        A message no longer on this worker's processing list (a peer requeued it while this worker
        was silent) is neither answered nor counted: its new holder answers it. batch_size images that
        the model ran in inference_s seconds are added to the stats hash in the same step (0: none ran).
        """
        dropped = [d.raw for d in done if d.request_id is None or d.answer is None]
        answering = [d for d in done if d.request_id is not None and d.answer is not None]
        keys = [self.keys.processing(worker_id), self.keys.stats] + [self.keys.result(d.request_id) for d in answering]
        args: list = [self.result_ttl_s, batch_size, repr(float(inference_s)), len(dropped)]
        for raw in dropped:
            args += [raw[:ACK_PREFIX_BYTES], len(raw)]
        for d in answering:
            args += [d.raw[:ACK_PREFIX_BYTES], len(d.raw), d.answer, repr(d.deadline)]
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
        keys = [self.keys.workers, self.keys.processing(worker_id), self.keys.queue, self.keys.stats]
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
