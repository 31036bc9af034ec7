"""The model worker: load and warm the model, then claim a batch -> predict -> answer, until SIGTERM.

One process per GPU (CUDA_VISIBLE_DEVICES picks it); on CPU one per machine is usually best.
SIGTERM or SIGINT: finish the batch in hand, write its answers, leave, exit 0. A second signal: now.
"""

import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import NamedTuple

import numpy as np

import logs
import settings
from image_queue import (
    CONFIGURATION_ERRORS,
    REDIS_ERRORS,
    Backoff,
    Claim,
    Done,
    ImageQueue,
    MessageError,
    ModelInfo,
    decode_message,
    encode_answer,
    encode_error,
    queue_from_config,
    redis_trouble,
)

log = logging.getLogger("model_server")


class Answered(NamedTuple):
    """What answer_batch made of a claimed batch."""

    done: list[Done]  # one per claimed message
    batch_size: int  # images the model ran (0: it ran none, or failed)
    inference_s: float  # seconds the model took for them


def answer_batch(classifier, messages: list[bytes], now: float) -> Answered:
    """Turn claimed messages into answers: drop the unreadable and expired, predict the rest at once.

    One bad message, or one batch that raises, yields error answers for those requests only.
    """
    done, batch, ran, took_ms = [], [], 0, 0.0
    height, width = classifier.input_size
    for raw in messages:
        try:
            message = decode_message(raw)
        except MessageError as exc:
            log.error("dropping an unusable queue message (%s), request id %s", exc, exc.request_id)
            reason = str(exc) if exc.status == 503 else f"the queued request was unusable: {exc}"
            answer = encode_error(exc.status, reason) if exc.request_id else None
            done.append(Done(raw, exc.request_id, answer))
            continue
        if message.deadline < now:
            done.append(Done(raw, message.request_id, None, message.deadline))  # nobody is waiting
        elif message.pixels.shape[:2] != (height, width):
            got_height, got_width, _ = message.pixels.shape
            error = f"the image was prepared as {got_width}x{got_height} but the model takes {width}x{height}; retry"
            done.append(Done(raw, message.request_id, encode_error(503, error), message.deadline))
        else:
            batch.append((raw, message))
    if batch:
        try:
            started = time.perf_counter()
            probabilities = classifier.predict(np.stack([m.pixels for _, m in batch]))
            took_ms = (time.perf_counter() - started) * 1000
            answers = [
                encode_answer(classifier.top_k(p, m.top), len(batch), took_ms, now, p if m.probabilities else None)
                for (_, m), p in zip(batch, probabilities, strict=True)
            ]
            ran = len(batch)
        except Exception:
            log.exception("the model failed on a batch of %d; answering 500 for each", len(batch))
            answers = [encode_error(500, "the model failed on this request's batch")] * len(batch)
        done += [Done(raw, m.request_id, answer, m.deadline) for (raw, m), answer in zip(batch, answers, strict=True)]
    return Answered(done, ran, took_ms / 1000)


class Heartbeat:
    """A thread that says the worker is alive every heartbeat_s and requeues the batches of silent peers.

    It does not wait for the batch in hand, so a dead worker's last heartbeat is at most heartbeat_s before
    its death, whatever its batch takes (settings.Settings.takeover_s). A stalled process (SIGSTOP) stalls
    this thread too, so a stalled worker is still written off, and its late answers dropped by the ack.
    """

    def __init__(self, queue: ImageQueue, worker_id: str, model_info: ModelInfo, every_s: float):
        self.queue, self.worker_id, self.model_info, self.every_s = queue, worker_id, model_info, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop beating; after this returns, nothing re-registers the worker (unregister may follow)."""
        self._stop.set()
        self._thread.join()

    def beat(self) -> None:
        self.queue.heartbeat(self.worker_id, self.model_info)  # also rewrites the model hash a restart lost
        self.queue.requeue_dead_workers()

    def _run(self) -> None:
        backoff, delay = Backoff(), 0.0
        while not self._stop.wait(delay):
            try:
                self.beat()
                backoff.reset()
                delay = self.every_s
            except REDIS_ERRORS as exc:
                delay = min(backoff.next_delay(), self.every_s)
                if backoff.failures == 1:  # the main loop logs the outage too: once per outage here
                    log.warning(
                        "worker %s: heartbeat failed (%s: %s); retrying", self.worker_id, redis_trouble(exc), exc
                    )


class ModelWorker:
    """The worker loop: claim, predict, acknowledge; a Heartbeat thread beside it."""

    def __init__(self, queue: ImageQueue, classifier, *, batch_size: int, max_wait_s: float, heartbeat_s: float):
        self.queue = queue
        self.classifier = classifier
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.heartbeat_s = heartbeat_s
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        height, width = classifier.input_size
        runtime = getattr(classifier, "runtime", "")
        self.model_info = ModelInfo(classifier.name, height, width, len(classifier.labels), runtime)
        self.stopping = False
        self.exit_code = 0  # 2: Redis refused this worker's credentials or permissions

    def request_stop(self, signum=None, frame=None) -> None:
        """Signal handler: the first asks to stop after the batch in hand, the second stops now."""
        if self.stopping:
            raise KeyboardInterrupt
        log.info("worker %s: stopping after the batch in hand", self.worker_id)
        self.stopping = True

    def run(self) -> None:
        backoff = Backoff()
        heartbeat = Heartbeat(self.queue, self.worker_id, self.model_info, self.heartbeat_s)
        log.info(
            "worker %s serving queue %r in batches of up to %d", self.worker_id, self.queue.keys.name, self.batch_size
        )
        heartbeat.start()
        while not self.stopping:
            try:
                if backoff.failures:
                    # A failed call may have left messages on our list that we do not hold: hand them back.
                    left = self.queue.requeue_own(self.worker_id)
                    heartbeat.beat()  # at once: Redis may have lost us and the model hash (a restart without AOF)
                    log.info("worker %s: Redis is back (%d messages handed back)", self.worker_id, left)
                    backoff.reset()
                claim = self.queue.claim(self.worker_id, self.batch_size, self.max_wait_s)
                if claim.messages:
                    self.process(claim)
            except REDIS_ERRORS as exc:
                kind, delay = redis_trouble(exc), backoff.next_delay()
                if kind == "configuration":  # retrying cannot help: say so once and leave
                    log.error(
                        "worker %s: Redis refused it (%s): check REDIS_URL and the ACL; exiting", self.worker_id, exc
                    )
                    self.exit_code = 2
                    break
                if kind == "unexpected":  # logged in full; its batch goes back on the queue once Redis answers
                    log.error("worker %s: unexpected Redis reply %r; retrying in %.2f s", self.worker_id, exc, delay)
                else:
                    log.warning("worker %s: Redis unavailable (%s); retrying in %.2f s", self.worker_id, exc, delay)
                time.sleep(delay)
        heartbeat.stop()
        try:
            left = self.queue.unregister(self.worker_id)
            log.info("worker %s stopped (%d messages handed back)", self.worker_id, left)
        except REDIS_ERRORS as exc:
            log.warning("worker %s stopped without unregistering: %s", self.worker_id, exc)

    def process(self, claim: Claim) -> None:
        """Run and answer one batch; one INFO line names its requests (ids=...), so the web's lines join it."""
        start = time.perf_counter()
        result = answer_batch(self.classifier, claim.messages, claim.server_time)
        inferred = time.perf_counter()
        answered, late = self._ack(result)
        expired = sum(1 for d in result.done if d.answer is None and d.request_id is not None)
        log.info(
            "batch of %d in %.1f ms (+%.1f ms to answer): %d answered, %d expired in queue, %d too late; ids=%s",
            len(claim.messages),
            (inferred - start) * 1000,
            (time.perf_counter() - inferred) * 1000,
            len(answered),
            expired,
            len(late),
            ",".join(answered + late) or "-",
            extra={"request_ids": answered + late},
        )
        for request_id in answered:
            log.debug("answered %s", request_id, extra={"request_id": request_id})

    def _ack(self, result: Answered) -> tuple[list[str], list[str]]:
        """Acknowledge, retrying through a short Redis outage; then give up and let run() requeue the batch."""
        backoff, give_up = Backoff(), time.monotonic() + self.queue.worker_ttl_s
        while True:
            try:
                return self.queue.ack(self.worker_id, result.done, result.batch_size, result.inference_s)
            except REDIS_ERRORS as exc:
                if redis_trouble(exc) != "transient" or time.monotonic() > give_up:
                    raise
                delay = backoff.next_delay()
                log.warning("worker %s: could not answer (%s); retrying in %.2f s", self.worker_id, exc, delay)
                time.sleep(delay)


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
        log.warning("Redis is not reachable yet (%s); the worker will wait for it once the model is loaded", exc)
    return True


def batch_size_in_takeover(classifier, timings: dict[int, float]) -> int:
    """BATCH_SIZE, or less where a batch that large is too slow on this machine for the takeover order.

    A dead worker's requests must be answered by a survivor before their deadline (Settings.takeover_s).
    On a CPU too slow for the configured batch the worker serves smaller batches, saying so once, rather
    than refusing to start with the shipped defaults; it refuses (SettingError) only when even its
    smallest batch is too slow.
    """
    config = settings.current
    if config.fits_takeover(max(timings.values())):
        return config.BATCH_SIZE
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
        "BATCH_SIZE %d lowered to %d: a batch of %d takes %.2f s here (of %d: %.2f s), and WORKER_TTL_S (%g s) + "
        "WORKER_HEARTBEAT_S (%g s) + 2 x the largest batch must stay under REQUEST_TIMEOUT_S (%g s) for a "
        "dead worker's requests to be answered in time (set BATCH_SIZE=%d to start without this step, or raise "
        "REQUEST_TIMEOUT_S for larger batches)",
        config.BATCH_SIZE,
        size,
        config.BATCH_SIZE,
        timings[config.BATCH_SIZE],
        size,
        timings[size],
        config.WORKER_TTL_S,
        config.WORKER_HEARTBEAT_S,
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
    from classifier import ModelConfigError, choose_buckets, load_configured_classifier

    started = time.perf_counter()
    try:
        classifier = load_configured_classifier(settings)
    except ModelConfigError as exc:  # a setting to fix: one line saying which, no traceback
        log.error("cannot load the model: %s", exc)
        return 1
    classifier.buckets = choose_buckets(classifier.model, settings.BATCH_SIZE, settings.BATCH_BUCKETS)
    timings = classifier.warm_up(settings.BATCH_SIZE)
    height, width = classifier.input_size
    log.info(
        "model %s loaded and warmed in %.1f s: input %dx%d, %d classes, %s, batches padded to %s; %s",
        classifier.name,
        time.perf_counter() - started,
        width,
        height,
        len(classifier.labels),
        f"{classifier.runtime} {classifier.precision}",
        list(classifier.buckets) or "none",
        ", ".join(f"batch {n}: {s * 1000:.0f} ms" for n, s in timings.items()),
    )
    try:
        batch_size = batch_size_in_takeover(classifier, timings)
    except settings.SettingError as exc:
        log.error("cannot serve with these settings: %s", exc)
        return 1
    return serve(queue, classifier, batch_size)


def serve(queue, classifier, batch_size: int) -> int:
    """Run the worker loop with the settings' batch wait and heartbeat until SIGTERM or SIGINT; its exit code.
    (bench/stand_in_worker.py serves the stand-in model through here too.)"""
    worker = ModelWorker(
        queue,
        classifier,
        batch_size=batch_size,
        max_wait_s=settings.MAX_BATCH_WAIT_MS / 1000,
        heartbeat_s=settings.WORKER_HEARTBEAT_S,
    )
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    worker.run()
    return worker.exit_code


if __name__ == "__main__":
    sys.exit(main())
