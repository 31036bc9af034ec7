"""The model worker: load and warm the model, then claim a batch -> predict -> answer, until SIGTERM.

One process per GPU (CUDA_VISIBLE_DEVICES picks it); on CPU one per machine is usually best.
SIGTERM or SIGINT: finish the batch in hand, write its answers, leave, exit 0. A second signal: now.
"""

import logging
import os
import queue as stdlib_queue
import signal
import socket
import sys
import threading
import time
import uuid
from typing import NamedTuple

import numpy as np

try:  # settings reads the environment as it is imported
    import logs
    import settings
    from image_queue import (
        CONFIGURATION_ERRORS,
        LANES,
        REDIS_ERRORS,
        Backoff,
        Claim,
        Done,
        ImageQueue,
        Message,
        MessageError,
        ModelInfo,
        decode_message,
        encode_answer,
        encode_error,
        queue_from_config,
        redis_trouble,
        unavailable,
    )
except ValueError as exc:  # a bad setting (settings.SettingError): one line and exit 2, which systemd does not restart
    if __name__ != "__main__" or type(exc).__name__ != "SettingError":
        raise
    print(f"run_model_server: {exc}", file=sys.stderr)
    sys.exit(2)

log = logging.getLogger("model_server")


EXIT_HUNG = 3  # the model hung in a batch (ModelWorker._watch); 2: Redis refused the worker; 1: anything else
FEEDER_STOP_S = 5.0  # the watchdog waits this long at most for the feeder's blocking claim to end


def runqueue_wait_s(thread_id: int) -> float:
    """Seconds a thread of this process has spent runnable but waiting for a core (Linux schedstat); 0 where
    that cannot be read."""
    try:
        with open(f"/proc/self/task/{thread_id}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


class Answered(NamedTuple):
    """What a batch came to once run: an answer (or a drop) for each claimed message."""

    done: list[Done]  # one per claimed message
    batch_size: int  # images the model ran (0: it ran none, or failed)
    inference_s: float  # seconds the model took for them


class Batch:
    """One batch in flight on one lane: its messages as claimed (and topped up), decoded and sorted into
    those answered without the model (unreadable, expired, the wrong size) and those to run."""

    def __init__(self, classifier, lane: int = 0):
        self.classifier, self.lane = classifier, lane
        self.claimed = 0  # messages taken onto the lane's list
        self.done: list[Done] = []  # answered without the model
        self.runs: list[tuple[bytes, Message, float]] = []  # for the model, each with when it was claimed
        self.dirty = False  # a call on its lane failed: the lane's list may hold messages not in hand

    def add(self, messages: list[bytes], now: float) -> None:
        """Decode claimed messages; expiry is judged by now, the Redis clock read when they were taken."""
        height, width = self.classifier.input_size
        self.claimed += len(messages)
        for raw in messages:
            try:
                message = decode_message(raw)
            except MessageError as exc:
                log.error("dropping an unusable queue message (%s), request id %s", exc, exc.request_id)
                reason = str(exc) if exc.status == 503 else f"the queued request was unusable: {exc}"
                answer = encode_error(exc.status, reason) if exc.request_id else None
                self.done.append(Done(raw, exc.request_id, answer))
                continue
            if message.deadline < now:
                self.done.append(Done(raw, message.request_id, None, message.deadline))  # nobody is waiting
            elif message.pixels.shape[:2] != (height, width):
                got_height, got_width, _ = message.pixels.shape
                error = f"the image was prepared as {got_width}x{got_height} but the model takes {width}x{height}"
                error += "; retry"
                self.done.append(Done(raw, message.request_id, encode_error(503, error), message.deadline))
            else:
                self.runs.append((raw, message, now))

    def run(self) -> Answered:
        """Predict every image to run at once; a batch that raises yields error answers for its requests only."""
        if not self.runs:
            return Answered(self.done, 0, 0.0)
        try:
            started = time.perf_counter()
            probabilities = self.classifier.predict(np.stack([m.pixels for _, m, _ in self.runs]))
            took_s, ran = time.perf_counter() - started, len(self.runs)
            answers = [
                encode_answer(self.classifier.top_k(p, m.top), ran, took_s * 1000, at, p if m.probabilities else None)
                for (_, m, at), p in zip(self.runs, probabilities, strict=True)
            ]
        except Exception:
            log.exception("the model failed on a batch of %d; answering 500 for each", len(self.runs))
            failed = encode_error(500, "the model failed on this request's batch")
            answers, ran, took_s = [failed] * len(self.runs), 0, 0
        done = [Done(raw, m.request_id, a, m.deadline) for (raw, m, _), a in zip(self.runs, answers, strict=True)]
        return Answered(self.done + done, ran, took_s)


def answer_batch(classifier, messages: list[bytes], now: float) -> Answered:
    """Turn claimed messages into answers: drop the unreadable and expired, predict the rest at once.

    One bad message, or one batch that raises, yields error answers for those requests only.
    """
    batch = Batch(classifier)
    batch.add(messages, now)
    return batch.run()


class Heartbeat:
    """Threads that say the worker is alive every heartbeat_s and requeue the batches of silent peers: one per
    queue shard (QUEUE_SHARDS), so a shard whose Redis hangs costs its own thread a socket timeout (as long as
    WORKER_TTL_S by default) while the others' heartbeats stay fresh; beaten in turn, this live worker would
    have looked dead on every shard. One more thread registers the model for the web to find: on a Cluster
    the registry may live on another master than the queue.

    They do not wait for the batch in hand, so a dead worker's last heartbeat is at most heartbeat_s before
    its death, whatever its batch takes (settings.Settings.takeover_s). A stalled process (SIGSTOP) stalls
    these threads too, so a stalled worker is still written off, and its late answers dropped by the ack.
    """

    def __init__(self, queue: ImageQueue, worker_id: str, model_info: ModelInfo, every_s: float):
        self.queue, self.worker_id, self.model_info, self.every_s = queue, worker_id, model_info, every_s
        self._stop = threading.Event()
        self._alive = threading.Event()  # a beat has gone through: the registry threads wait for it
        shards = getattr(queue, "shards", [queue])
        self._registries = [shard for shard in shards if shard.registry]
        named = len(shards) > 1
        rounds = [(f" on shard {shard.keys.name}" if named else "", self._beat_on(shard), False) for shard in shards]
        rounds += [(" in the model registry", shard.register_model, True) for shard in self._registries]
        self._threads = [
            threading.Thread(target=self._run, args=round_, name=f"heartbeat-{n}", daemon=True)
            for n, round_ in enumerate(rounds)
        ]

    def _beat_on(self, shard: ImageQueue):
        def beat():
            shard.beat(self.worker_id, self.model_info)
            self._alive.set()

        return beat

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop beating; after this returns, nothing re-registers the worker (unregister may follow)."""
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def beat(self) -> None:
        """Beat every shard once now, then requeue dead peers' batches (the beat also rewrites the model hash a
        restart lost); a shard that fails holds back neither the others' beats nor their requeues. Then
        register the model: a registry that fails is logged, not raised (its thread retries), so the worker
        loop's recovery goes on after it (one socket timeout, when the registry's Redis hangs)."""
        self.queue.beat(self.worker_id, self.model_info)
        for shard in self._registries:
            try:
                shard.register_model()
            except REDIS_ERRORS as exc:
                log.warning("worker %s: could not register the model (%s); retrying", self.worker_id, exc)

    def _run(self, where: str, call, after_a_beat: bool) -> None:
        """call() every heartbeat_s. after_a_beat (the model's registration): only once this worker has beaten
        somewhere, since the web lists a model only when a worker's heartbeat is there to answer for it (else,
        for a moment at start, a 503 "no worker")."""
        while after_a_beat and not self._alive.wait(0.05):
            if self._stop.is_set():
                return
        backoff, delay = Backoff(), 0.0
        while not self._stop.wait(delay):
            try:
                call()
                backoff.reset()
                delay = self.every_s
            except Exception as exc:  # a Redis error, or anything else: a heartbeat thread must never die silently
                delay = min(backoff.next_delay(), self.every_s)
                if backoff.failures == 1:  # the main loop logs the outage too: once per outage and thread here
                    redis = isinstance(exc, REDIS_ERRORS)
                    log.warning(
                        "worker %s: heartbeat%s failed (%s: %s); retrying",
                        self.worker_id,
                        where,
                        redis_trouble(exc) if redis else "unexpected",
                        exc,
                        exc_info=not redis,  # a bug: its traceback
                    )


class Handoff:
    """The next batch, passed from the feeder thread to the model thread: the feeder keeps topping it up
    from the queue while the model runs the batch before it, and hands it over the moment the model asks."""

    def __init__(self):
        self._cond = threading.Condition()
        self._batch: Batch | None = None
        self._asked = False
        self._closed = False

    def take(self, poll_s: float) -> Batch | None:
        """The model thread: the next batch, or None once the feeder has closed (it waits poll_s at a time,
        so a signal handler runs between waits)."""
        with self._cond:
            self._asked = True
            self._cond.notify_all()
            while self._batch is None and not self._closed:
                self._cond.wait(poll_s)
            batch, self._batch, self._asked = self._batch, None, False
            self._cond.notify_all()
            return batch

    def waiting(self) -> bool:
        """The model thread: is the next batch already handed over (so answering this one inline would delay it)?"""
        with self._cond:
            return self._batch is not None

    def asked(self, wait_s: float = 0.0) -> bool:
        """The feeder: has the model asked for the next batch (waiting up to wait_s for it to)?"""
        with self._cond:
            if not self._asked and wait_s > 0:
                self._cond.wait(wait_s)
            return self._asked

    def give(self, batch: Batch) -> None:
        """The feeder: hand the batch over, and return once the model has taken it (so the feeder holds one
        batch at most: a dead peer's requeued messages wait behind two batches of a survivor, not more)."""
        with self._cond:
            self._batch = batch
            self._cond.notify_all()
            while self._batch is not None and not self._closed:  # closed: the model thread has stopped
                self._cond.wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class ModelWorker:
    """The worker: a pipeline of three threads around the model, and a Heartbeat thread beside them.

    feeder  claims batch N+1 onto a free lane (its own processing list) and decodes it, topping it up from
            the queue while the model runs batch N, until the model asks for it;
    model   (the thread that calls run()) runs batch N;
    acker   writes batch N-1's answers and releases its lane.
    With depth lanes (PIPELINE_DEPTH, at most image_queue.LANES) a worker holds at most that many batches;
    depth 1 is the serial loop: claim, run, ack, one after another. Every lane's list is a processing list
    of this worker id, so the whole-list ack and a dead worker's requeue cover each batch it held.
    """

    def __init__(
        self,
        queue: ImageQueue,
        classifier,
        *,
        batch_size: int,
        max_wait_s: float,
        heartbeat_s: float,
        depth: int = LANES,
        hung_after_s: float | None = None,
    ):
        self.queue = queue
        self.classifier = classifier
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.heartbeat_s = heartbeat_s
        self.depth = max(1, min(depth, LANES))
        self.hung_after_s = hung_after_s  # a batch running this long means a hung model: the worker exits (_watch)
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        height, width = classifier.input_size
        runtime = getattr(classifier, "runtime", "")
        shards = len(getattr(queue, "shards", [queue]))  # for admin.py to check its QUEUE_SHARDS against
        self.model_info = ModelInfo(classifier.name, height, width, len(classifier.labels), runtime, shards)
        self.stopping = False
        self.exit_code = 0  # 2: Redis refused this worker's credentials or permissions
        self._lanes: stdlib_queue.Queue[tuple[int, bool]] = stdlib_queue.Queue()  # free lanes: (lane, dirty)
        self._handoff = Handoff()
        self._acks: stdlib_queue.Queue[tuple[Batch, Answered, float] | None] = stdlib_queue.Queue()
        self._batch_s = 0.0  # how long the model's last batch took: the feeder tops up a few times per batch
        self._failure: BaseException | None = None  # what ended the feeder or the acker unexpectedly
        self._running_since: float | None = None  # monotonic start of the batch the model is running, if any
        self._ran = threading.Event()  # the model loop has ended: the watchdog stops

    def request_stop(self, signum=None, frame=None) -> None:
        """Signal handler: the first asks to stop after the batches in hand, the second stops now."""
        if self.stopping:
            raise KeyboardInterrupt
        log.info("worker %s: stopping after the batch in hand", self.worker_id)
        self.stopping = True

    def run(self) -> None:
        heartbeat = self._heartbeat = Heartbeat(self.queue, self.worker_id, self.model_info, self.heartbeat_s)
        log.info(
            "worker %s serving queue %r in batches of up to %d, %d in flight",
            self.worker_id,
            self.queue.keys.name,
            self.batch_size,
            self.depth,
        )
        for lane in range(self.depth):
            self._lanes.put((lane, False))
        heartbeat.start()
        self._model_thread = threading.get_native_id()  # this thread runs the model (the watchdog reads its wait)
        feeder = self._feeder = threading.Thread(target=self._stage, args=(self._feed,), name="feeder", daemon=True)
        acker = threading.Thread(target=self._stage, args=(self._acknowledge,), name="acker", daemon=True)
        feeder.start()
        acker.start()
        if self.hung_after_s:
            threading.Thread(target=self._watch, name="watchdog", daemon=True).start()
        try:
            while (batch := self._handoff.take(poll_s=0.5)) is not None:  # the feeder closes it once stopping
                started = time.perf_counter()
                self._running_since = time.monotonic()
                answered = batch.run()
                self._running_since = None
                self._batch_s = time.perf_counter() - started
                if self._handoff.waiting():  # the next batch is ready: the acker answers this one meanwhile
                    self._acks.put((batch, answered, started))
                else:  # the model would wait anyway: answer at once, without a hop to another thread
                    self._finish(batch, answered, started)
        except Exception as exc:  # as a failed feeder or acker: leave, handing back what is held, exit 1
            log.exception("worker %s: the model thread failed; stopping", self.worker_id)
            self._failure, self.stopping = exc, True
            self._handoff.close()
        self._ran.set()
        self._acks.put(None)
        feeder.join()
        acker.join()
        heartbeat.stop()
        try:
            left = self.queue.unregister(self.worker_id)
            log.info("worker %s stopped (%d messages handed back)", self.worker_id, left)
        except REDIS_ERRORS as exc:
            log.warning("worker %s stopped without unregistering: %s", self.worker_id, exc)
        if self._failure is not None:  # the process exits non-zero, for its supervisor to restart it
            raise self._failure

    def _watch(self) -> None:
        """A model that never returns from a batch (a hung GPU or driver, a deadlock) would leave a worker whose
        heartbeats go on while it answers nothing: its batches never requeued, its requests all 504s, and
        /readyz content. A batch running hung_after_s (REQUEST_TIMEOUT_S: every request in it has had its
        504 by then) means a hung model: the worker stops claiming and beating, lets a blocking claim end,
        hands back every batch it holds, and exits 3 at once (the stuck call cannot be interrupted), for its
        supervisor to start a fresh one. Only time this thread saw pass counts: a worker stopped mid-batch
        (SIGSTOP) and woken later is not hung (its peers wrote it off meanwhile: its late answers are dropped,
        and it serves on); nor does time the model thread spent waiting for a core (runqueue_wait_s): a
        niced worker starved by a busy host is slow, not hung."""
        every_s = min(self.heartbeat_s, self.hung_after_s / 4)
        batch, watched, last, waited = None, 0.0, time.monotonic(), runqueue_wait_s(self._model_thread)
        while not self._ran.wait(every_s):
            now, now_waited = time.monotonic(), runqueue_wait_s(self._model_thread)
            step = min(now - last, 2 * every_s)  # a stalled process (SIGSTOP, a paused VM) is not hung ...
            step = max(0.0, step - (now_waited - waited))  # ... nor a model thread starved of CPU (niced, busy host)
            last, waited = now, now_waited
            if self._running_since != batch:
                batch, watched = self._running_since, 0.0
            elif batch is not None:
                watched += step
            if batch is None or watched < self.hung_after_s:
                continue
            log.error(
                "worker %s: the model has run one batch for %.1f s (REQUEST_TIMEOUT_S %g): it is hung; handing "
                "back its batches and exiting 3 for the supervisor to restart it",
                self.worker_id,
                now - batch,
                self.hung_after_s,
            )
            self.stopping = True  # the feeder claims no more ...
            self._handoff.close()  # ... nor waits to hand a batch over
            self._heartbeat.stop()
            self._feeder.join(FEEDER_STOP_S)  # a blocking claim ends within REDIS_BLOCK_S: its message is handed back
            try:
                left = self.queue.unregister(self.worker_id)
                log.info("worker %s: %d messages handed back", self.worker_id, left)
            except REDIS_ERRORS as exc:  # its peers requeue them once its heartbeat is WORKER_TTL_S old
                log.warning("worker %s: could not hand back its batches (%s)", self.worker_id, exc)
            logging.shutdown()
            os._exit(EXIT_HUNG)

    def _stage(self, run) -> None:
        """Run the feeder or the acker; anything unexpected stops the whole worker (its batches are handed
        back as it leaves) rather than leaving a worker that beats but never answers."""
        try:
            run()
        except Exception as exc:
            log.exception("worker %s: the %s failed; stopping", self.worker_id, threading.current_thread().name)
            self._failure = exc
            self.stopping = True

    # --- feeder: claim and decode the next batch, topped up until the model takes it -------------------

    def _feed(self) -> None:
        backoff = Backoff()
        try:
            while not self.stopping:
                lane, dirty = self._free_lane()
                if lane is None:
                    continue
                batch = Batch(self.classifier, lane)
                try:
                    if backoff.failures:
                        left = self._hand_back(lane)
                        self._heartbeat.beat()  # at once: Redis may have lost us and the model hash (no AOF)
                        log.info("worker %s: Redis is back (%d messages handed back)", self.worker_id, left)
                        backoff.reset()
                    elif dirty:  # a failed call may have left messages on this lane's list that we do not hold
                        self.queue.requeue_own(self.worker_id, lane)
                    claim = self.queue.claim(self.worker_id, self.batch_size, self.max_wait_s, lane)
                    batch.add(claim.messages, claim.server_time)
                    if batch.claimed:
                        self._top_up(batch)
                except REDIS_ERRORS as exc:
                    batch.dirty = True
                    if not self._redis_failed(exc, backoff):
                        break
                if batch.claimed:
                    self._handoff.give(batch)
                else:
                    self._lanes.put((lane, batch.dirty))
        finally:
            self._handoff.close()

    def _hand_back(self, lane: int) -> int:
        """After an outage: requeue what this lane's list and every other free lane's hold (batches in flight
        keep theirs: their acks release them, or mark their lanes to be handed back in turn)."""
        free = [lane]
        while True:
            try:
                free.append(self._lanes.get_nowait()[0])
            except stdlib_queue.Empty:
                break
        handed_back = 0
        try:
            while len(free) > 1:
                handed_back += self.queue.requeue_own(self.worker_id, free[-1])
                self._lanes.put((free.pop(), False))
            return handed_back + self.queue.requeue_own(self.worker_id, lane)
        finally:
            for other in free[1:]:  # not yet handed back: they stay marked
                self._lanes.put((other, True))

    def _free_lane(self) -> tuple[int | None, bool]:
        try:
            return self._lanes.get(timeout=0.5)
        except stdlib_queue.Empty:  # every lane in flight: look at self.stopping again
            return None, False

    def _top_up(self, batch: Batch) -> None:
        """Until the model asks for it, fill the batch from the queue a few times per model batch; then once
        more, unless it was just claimed (what a claim finds queued it takes at once)."""
        last_take = time.monotonic()
        while batch.claimed < self.batch_size and not self.stopping:
            asked = self._handoff.asked(min(max(self._batch_s / 4, 0.002), 0.05))
            if asked and time.monotonic() - last_take < 0.001:
                return
            self._take_more(batch)
            if asked:
                return
            last_take = time.monotonic()

    def _take_more(self, batch: Batch) -> None:
        more = self.queue.top_up(self.worker_id, self.batch_size - batch.claimed, batch.lane)
        if more.messages:
            batch.add(more.messages, more.server_time)

    def _redis_failed(self, exc: Exception, backoff: Backoff) -> bool:
        """Log a Redis error and back off; False when it is a configuration error (the worker exits 2)."""
        kind, delay = redis_trouble(exc), backoff.next_delay()
        if kind == "configuration":  # retrying cannot help: say so once and leave
            log.error("worker %s: Redis refused it (%s): check REDIS_URL and the ACL; exiting", self.worker_id, exc)
            self.exit_code = 2
            self.stopping = True
            return False
        if kind == "unexpected":  # logged in full; its batch goes back on the queue once Redis answers
            log.error("worker %s: unexpected Redis reply %r; retrying in %.2f s", self.worker_id, exc, delay)
        else:
            log.warning("worker %s: Redis unavailable (%s); retrying in %.2f s", self.worker_id, exc, delay)
        time.sleep(delay)
        return True

    def process(self, claim: Claim) -> None:
        """Run and answer one claimed batch (lane 0) in the calling thread: the pipeline's stages in a row."""
        batch = Batch(self.classifier)
        batch.add(claim.messages, claim.server_time)
        started = time.perf_counter()
        answered = batch.run()
        self._log_batch(batch, answered, started, *self._ack(batch, answered))

    # --- acker: write a batch's answers and free its lane ----------------------------------------------

    def _acknowledge(self) -> None:
        while (item := self._acks.get()) is not None:
            self._finish(*item)

    def _finish(self, batch: Batch, answered: Answered, started: float) -> None:
        """Write a batch's answers and free its lane."""
        try:
            self._log_batch(batch, answered, started, *self._ack(batch, answered))
        except REDIS_ERRORS as exc:  # its messages stay on the lane's list, which is handed back first
            batch.dirty = True
            log.warning("worker %s: could not answer a batch of %d (%s)", self.worker_id, batch.claimed, exc)
        self._lanes.put((batch.lane, batch.dirty))

    def _ack(self, batch: Batch, result: Answered) -> tuple[list[str], list[str]]:
        """Acknowledge, retrying through a short Redis outage; then give up and let the lane be handed back.

        An ack that needed a retry marks its lane to be handed back before its next claim: the outage may have
        been a failover that lost the lane's last ack (replication is asynchronous), leaving on it a batch
        whose answers went with the old master. A serial worker's feeder, waiting for the model meanwhile,
        meets no error of its own to do it (found by a review: such a request waited out its deadline)."""
        backoff, give_up = Backoff(), time.monotonic() + self.queue.worker_ttl_s
        while True:
            try:
                return self.queue.ack(self.worker_id, result.done, result.batch_size, result.inference_s, batch.lane)
            except REDIS_ERRORS as exc:
                batch.dirty = True
                if redis_trouble(exc) != "transient" or time.monotonic() > give_up:
                    raise
                delay = backoff.next_delay()
                log.warning("worker %s: could not answer (%s); retrying in %.2f s", self.worker_id, exc, delay)
                time.sleep(delay)

    def _log_batch(self, batch: Batch, result: Answered, started: float, answered: list[str], late: list[str]):
        """One INFO line names a batch's requests (ids=...), so the web's lines join it."""
        expired = sum(1 for d in result.done if d.answer is None and d.request_id is not None)
        log.info(
            "batch of %d in %.1f ms (+%.1f ms to answer): %d answered, %d expired in queue, %d too late; ids=%s",
            batch.claimed,
            result.inference_s * 1000,
            (time.perf_counter() - started - result.inference_s) * 1000,
            len(answered),
            expired,
            len(late),
            ",".join(answered + late) or "-",
            extra={"request_ids": answered + late},
        )
        for request_id in answered:
            log.debug("answered %s", request_id, extra={"request_id": request_id})


def credentials_accepted(queue: ImageQueue) -> bool:
    """Check the Redis password before loading the model: a refused one is a setting to fix, not an outage.

    An unreachable Redis is fine here (the worker loop waits for it with backoff); a wrong password
    would only make that loop retry forever, so the worker says so once and exits.
    """
    try:
        queue.redis.ping()
    except CONFIGURATION_ERRORS as exc:
        log.error("Redis refused this worker's credentials (%s): check the password in REDIS_URL; exiting", exc)
        return False
    except REDIS_ERRORS as exc:
        if redis_trouble(exc) == "configuration":  # the sentinels' own password (sentinels_refused), a NOPERM
            log.error("Redis refused this worker (%s): %s; exiting", exc, unavailable(exc))
            return False
        log.warning("Redis is not reachable yet (%s); the worker will wait for it once the model is loaded", exc)
    return True


def serving_batch_size(classifier, timings: dict[int, float], config: settings.Settings) -> int:
    """The most images this worker puts in one batch: BATCH_SIZE, or with BATCH_TUNE the largest size within
    BATCH_TUNE_TOLERANCE of the fastest per image, either lowered further where the takeover order needs it."""
    if config.BATCH_TUNE:
        tuned_batch_size(classifier, timings, config.BATCH_SIZE)
    return batch_size_in_takeover(classifier, timings, config)


def fastest_batch(timings: dict[int, float], tolerance: float = settings.BATCH_TUNE_TOLERANCE) -> int:
    """The largest timed batch size whose time per image is within tolerance of the fastest one's: a larger batch
    stays unless it runs measurably slower per image (by more than the warm-up's timing noise)."""
    fastest = min(s / n for n, s in timings.items())
    return max(n for n, s in timings.items() if s / n <= fastest * (1 + tolerance))


def tuned_batch_size(classifier, timings: dict[int, float], batch_size: int) -> int:
    """BATCH_TUNE: the batch size to serve up to, from the warm-up's timings of 1, 2, 4, ..., BATCH_SIZE.

    Where a large batch runs slower per image than a smaller one (a CPU's caches: BENCHMARKS.md, the AVX2-only
    EPYC), it only costs images/s and latency. The larger sizes leave timings and buckets, so that the takeover
    order is checked for the batch served (batch_size_in_takeover starts from the largest size timed).
    """
    size = fastest_batch(timings)
    log.info(
        "batches of up to %d (BATCH_TUNE, BATCH_SIZE %d): ms per image %s",
        size,
        batch_size,
        ", ".join(f"{s / n * 1000:.1f} at {n}" for n, s in sorted(timings.items())),
    )
    for n in [n for n in timings if n > size]:
        del timings[n]
    classifier.buckets = tuple(b for b in classifier.buckets if b <= size)
    return size


def batch_size_in_takeover(classifier, timings: dict[int, float], config: settings.Settings | None = None) -> int:
    """The largest size timed (BATCH_SIZE, or BATCH_TUNE's choice), or less where a batch that large is too slow
    on this machine for the takeover order.

    A dead worker's requests must be answered by a survivor before their deadline (Settings.takeover_s).
    On a CPU too slow for the configured batch the worker serves smaller batches, saying so once, rather
    than refusing to start with the shipped defaults; it refuses (SettingError) only when even its
    smallest batch is too slow.
    """
    config = config or settings.current
    largest = max(timings)
    if config.fits_takeover(max(timings.values())):
        return largest
    size = config.largest_batch_in_takeover(timings)
    if classifier.buckets:  # padded batches: only a bucket's own size is known to fit
        size = max((b for b in classifier.buckets if b <= size), default=0)
    if not size:
        config.check_takeover(min(timings.values()))
    if size not in timings:  # interpolated: time it, and fall back to the largest timed size that fits
        timings[size] = classifier.time_batch(size)
        if not config.fits_takeover(timings[size]):
            size = max(n for n, s in timings.items() if config.fits_takeover(s))
    classifier.buckets = tuple(b for b in classifier.buckets if b <= size)
    log.warning(
        "BATCH_SIZE %d%s lowered to %d: a batch of %d takes %.2f s here (of %d: %.2f s), and WORKER_TTL_S (%g s) + "
        "WORKER_HEARTBEAT_S (%g s) + %d x the largest batch must stay under REQUEST_TIMEOUT_S (%g s) for a "
        "dead worker's requests to be answered in time (set BATCH_SIZE=%d to start without this step, or raise "
        "REQUEST_TIMEOUT_S for larger batches)",
        config.BATCH_SIZE,
        "" if largest == config.BATCH_SIZE else f" (BATCH_TUNE: {largest})",
        size,
        largest,
        timings[largest],
        size,
        timings[size],
        config.WORKER_TTL_S,
        config.WORKER_HEARTBEAT_S,
        config.takeover_batches,
        config.REQUEST_TIMEOUT_S,
        size,
    )
    return size


def main() -> int:
    logs.configure()
    if settings.WORKER_NICE:  # before any thread starts: threads inherit it
        os.setpriority(os.PRIO_PROCESS, 0, settings.WORKER_NICE)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of the log
    queue = queue_from_config(settings.current.as_dict(), model_id=settings.MODEL_ID)
    if not credentials_accepted(queue):
        return 2
    from classifier import ModelConfigError, choose_buckets, load_configured_classifier, runs_on_host_cpu

    started = time.perf_counter()
    try:
        classifier = load_configured_classifier(settings)
    except ModelConfigError as exc:  # a setting to fix: one line saying which, no traceback
        log.error("cannot load the model: %s", exc)
        return 1
    classifier.buckets = choose_buckets(classifier.model, settings.BATCH_SIZE, settings.BATCH_BUCKETS)
    timings = classifier.warm_up(settings.BATCH_SIZE, every_size=settings.BATCH_TUNE)
    on_host_cpu = runs_on_host_cpu(classifier.runtime)
    depth = settings.current.pipeline_depth(on_host_cpu)
    height, width = classifier.input_size
    log.info(
        "model %s loaded and warmed in %.1f s: input %dx%d, %d classes, %s, batches padded to %s; %s; "
        "PIPELINE_DEPTH %d%s",
        classifier.name,
        time.perf_counter() - started,
        width,
        height,
        len(classifier.labels),
        f"{classifier.runtime} {classifier.precision}",
        list(classifier.buckets) or "none",
        ", ".join(f"batch {n}: {s * 1000:.0f} ms" for n, s in timings.items()),
        depth,
        "" if settings.PIPELINE_DEPTH else f" (auto: the model runs on {'this host' if on_host_cpu else 'a GPU'})",
    )
    try:  # the takeover order with this worker's own depth (Settings.takeover_batches: its peers' too)
        batch_size = serving_batch_size(classifier, timings, settings.current.replace(PIPELINE_DEPTH=depth))
    except settings.SettingError as exc:
        log.error("cannot serve with these settings: %s", exc)
        return 1
    return serve(queue, classifier, batch_size, depth)


def serve(queue, classifier, batch_size: int, depth: int) -> int:
    """Run the worker loop (depth: PIPELINE_DEPTH resolved) with the settings' batch wait and heartbeat until
    SIGTERM or SIGINT; its exit code. (bench/stand_in_worker.py serves the stand-in model through here too.)"""
    worker = ModelWorker(
        queue,
        classifier,
        batch_size=batch_size,
        max_wait_s=settings.MAX_BATCH_WAIT_MS / 1000,
        heartbeat_s=settings.WORKER_HEARTBEAT_S,
        depth=depth,
        hung_after_s=settings.REQUEST_TIMEOUT_S,
    )
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    worker.run()
    return worker.exit_code


if __name__ == "__main__":
    sys.exit(main())
