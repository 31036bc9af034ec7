"""A steady stream of real requests against a live stack, and the books that show nothing was lost.

Each request carries one of a few distinct photos whose right answer the test knows (the model's own
answer for the same pixels), so a request answered with someone else's predictions shows up as wrong,
not as a success. The worker logs each id it answers (LOG_LEVEL=DEBUG), so an answer written twice
shows up too.
"""

import http.client
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
import requests
from urllib3 import encode_multipart_formdata

import helpers

PROBABILITY_TOLERANCE = 1e-4  # batched vs single-image inference differ by ~1e-6


def expected_top5(resnet, images: list[bytes]) -> list[list[dict]]:
    """The model's own answer for each image, from the same prepared pixels."""
    pixels = np.stack([helpers.prepare_image(helpers.open_image(d, 10**8), resnet.input_size[::-1]) for d in images])
    return [resnet.top_k(p, 5) for p in resnet.predict(pixels)]


def same_answer(served: list[dict], expected: list[dict]) -> bool:
    return [p["label"] for p in served] == [p["label"] for p in expected] and np.allclose(
        [p["probability"] for p in served], [p["probability"] for p in expected], atol=PROBABILITY_TOLERANCE, rtol=0
    )


def answered_ids(log: str) -> list[str]:
    """The request ids a model worker's DEBUG log says it answered, one line per answer written."""
    return re.findall(r"answered ([0-9a-f]{32})", log)


def batch_sizes(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"batch of (\d+) in", log)]


def wait_for(condition, timeout_s: float):
    """Poll a condition in a test (not in the service): returns its first truthy value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = condition()
        except requests.ConnectionError:
            value = None
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout_s} s")


def replicas_streaming(master, key: str, replicas: int) -> None:
    """Wait until a master streams its writes to its replicas (a redis.Redis of the master): after a diskless
    sync it starts only on a replica's first REPLCONF ACK (replicas send one a second), so a test's first WAIT
    could wait its whole timeout while the replica's link already said up."""
    master.set(key, 1)
    assert master.execute_command("WAIT", replicas, 5000) >= replicas


@dataclass
class Reply:
    image: int  # which of the known images was sent
    sent: float  # time.monotonic() when it was sent
    latency: float  # seconds until the answer, or until the client gave up
    status: int | None = None  # None: no HTTP answer at all (the client's error says why)
    client_error: str = ""
    request_id: str = ""
    retry_after: str | None = None
    body: dict = field(default_factory=dict)


@dataclass
class Books:
    """What happened to every request of a run."""

    sent: int
    by_status: Counter  # HTTP status -> count; "lost" for requests that never got an HTTP answer
    lost: int  # sent, never answered (connection error or the client's own timeout)
    wrong: list[int]  # indexes of 200s carrying predictions that are not their image's
    duplicated: list[str]  # ids the workers' logs answered more than once
    unlogged: list[str]  # 200s whose id no worker says it answered
    slowest_s: float

    def line(self, name: str) -> str:
        statuses = ", ".join(f"{status}: {n}" for status, n in sorted(self.by_status.items(), key=str))
        return (
            f"{name}: sent {self.sent} ({statuses}); lost {self.lost}, wrong {len(self.wrong)}, "
            f"duplicated {len(self.duplicated)}; slowest {self.slowest_s:.2f} s"
        )


class Traffic:
    """Open loop: a new request every 1/rate seconds, each on a thread of its own, until stop()."""

    def __init__(self, url: str, images: list[bytes], expected: list[list[dict]], rate: float, client_timeout_s=90):
        self.address, self.images, self.expected = urlsplit(url).netloc, images, expected
        # Each image's multipart body, built once: the load generator shares the CPU with the service.
        self.bodies = [encode_multipart_formdata({"image": ("photo.jpg", image)}) for image in images]
        self.spacing = 1.0 / rate
        self.client_timeout_s = client_timeout_s
        self.replies: list[Reply] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.pacer = threading.Thread(target=self._pace, daemon=True)

    def __enter__(self):
        self.pacer.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _pace(self) -> None:
        start, i = time.monotonic(), 0
        while not self.stopping.wait(max(0.0, start + i * self.spacing - time.monotonic())):
            thread = threading.Thread(target=self._send, args=(i % len(self.images),), daemon=True)
            thread.start()
            self.threads.append(thread)
            i += 1

    def _send(self, image: int) -> None:
        reply = Reply(image, time.monotonic(), 0.0)
        body, content_type = self.bodies[image]
        # http.client, not requests: a tenth of the CPU per request, and the client shares the cores
        connection = http.client.HTTPConnection(self.address, timeout=self.client_timeout_s)
        try:
            connection.request("POST", "/predict", body, {"Content-Type": content_type})
            response = connection.getresponse()
            data = response.read()
            reply.latency = time.monotonic() - reply.sent
            reply.status, reply.request_id = response.status, response.getheader("X-Request-ID", "")
            reply.retry_after = response.getheader("Retry-After")
            reply.body = json.loads(data)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            reply.client_error = f"{type(exc).__name__}: {exc}"
            reply.latency = time.monotonic() - reply.sent
        finally:
            connection.close()
        with self.lock:
            self.replies.append(reply)

    def stop(self) -> list[Reply]:
        """Stop sending and wait for every answer (bounded by the client timeout)."""
        self.stopping.set()
        self.pacer.join()
        for thread in self.threads:
            thread.join(self.client_timeout_s + 5)
        return self.replies

    def wait_for_answers(self, n: int, timeout_s: float) -> None:
        """Until n more requests have been answered 200 (the stream keeps going)."""
        target = self.count(200) + n
        wait_for(lambda: self.count(200) >= target, timeout_s)

    def count(self, status: int) -> int:
        with self.lock:
            return sum(r.status == status for r in self.replies)

    def books(self, worker_logs: str) -> Books:
        replies = self.replies
        answered = Counter(answered_ids(worker_logs))
        oks = [r for r in replies if r.status == 200]
        return Books(
            sent=len(replies),
            by_status=Counter(r.status if r.status is not None else "lost" for r in replies),
            lost=sum(r.status is None for r in replies),
            wrong=[i for i, r in enumerate(replies) if r.status == 200 and not self._right(r)],
            duplicated=[request_id for request_id, n in answered.items() if n > 1],
            unlogged=[r.request_id for r in oks if r.request_id not in answered],
            slowest_s=max((r.latency for r in replies), default=0.0),
        )

    def _right(self, reply: Reply) -> bool:
        return reply.body.get("success") is True and same_answer(reply.body["predictions"], self.expected[reply.image])
