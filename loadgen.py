"""Load generation, shared by stress_test.py and the benchmark lab (bench/): send requests, keep a Result each,
and summarise them (throughput, latency percentiles, outcomes by status, batches, Server-Timing's time split).

Speaks both of the service's protocols: a URL ending /v2/models/<id>/infer gets Open Inference Protocol
requests (binary BYTES input, the top 5 as Triton's classification), any other URL /predict's multipart form.
Needs requests and open_inference.py; nothing here knows the service's internals beyond its HTTP answers.
"""

import base64
import itertools
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlencode

import requests

import open_inference

TIMEOUT_S = 60  # client timeout: longer than the service's REQUEST_TIMEOUT_S and gunicorn's timeout
TOP = 5  # predictions asked for per image over v2 (/predict's default top-k is the service's TOP_K, 5)
API_KEY_VARIABLE = "API_KEY"  # one of the service's API_KEYS, for the load tools (stress_test.py --api-key sets it)


def key_headers() -> dict[str, str]:
    """X-API-Key from API_KEY when it is set (processes a closed loop starts inherit it), else nothing."""
    key = os.environ.get(API_KEY_VARIABLE, "")
    return {"X-API-Key": key} if key else {}


V2_INFER = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer$")


def is_v2(url: str) -> bool:
    return bool(V2_INFER.search(url.split("?", 1)[0]))


def service_url(predict_url: str) -> str:
    """The service's base URL, from its /predict URL."""
    return predict_url.split("?", 1)[0].removesuffix("/predict")


def infer_url(predict_url: str, model: str) -> str:
    """The v2 infer URL of a model, from the service's /predict URL."""
    return f"{service_url(predict_url)}/v2/models/{model}/infer"


def target_url(predict_url: str, model: str | None, protocol: str) -> str:
    """Where a load tool sends its images: /predict (?model= when named), or the model's v2 infer URL; over v2
    with no model named, the only model the service's /readyz lists."""
    if protocol == "predict":
        return f"{predict_url}?{urlencode({'model': model})}" if model else predict_url
    if not model:
        readyz = f"{service_url(predict_url)}/readyz"
        try:
            served = list(requests.get(readyz, headers=key_headers(), timeout=10).json().get("models", {}))
        except (OSError, ValueError) as exc:  # requests' errors are OSErrors; a body that is not JSON, ValueError
            raise SystemExit(f"could not list the models at {readyz} ({exc}): is the service up?") from None
        if len(served) != 1:
            raise SystemExit(f"name the model with --model (the service lists {served or 'none'})")
        model = served[0]
    return infer_url(predict_url, model)


def post_image(url: str, image: bytes, timeout_s: float = TIMEOUT_S, session=None) -> requests.Response:
    """One image to /predict (a multipart form) or to a v2 infer URL, with requests or a session."""
    return post_images(url, [image], timeout_s, session)


def post_images(
    url: str, images: list[bytes], timeout_s: float = TIMEOUT_S, session=None, pixels: tuple[int, int] | None = None
) -> requests.Response:
    """Images to a v2 infer URL in one request: encoded (BYTES), or with pixels=(height, width) each image's
    height x width x 3 uint8 pixels (UINT8); one encoded image may also go to /predict (a multipart form)."""
    post = session.post if session else requests.post
    if is_v2(url):
        if pixels:
            body, headers = open_inference.encode_pixels_request(images, *pixels, TOP)
        else:
            body, headers = open_inference.encode_infer_request(images, TOP)
        return post(url, data=body, headers=headers | key_headers(), timeout=timeout_s)
    if len(images) != 1 or pixels:
        raise ValueError("/predict takes one encoded image per request: send several, or pixels, over v2")
    return post(url, files={"image": ("image.jpg", images[0])}, headers=key_headers(), timeout=timeout_s)


@dataclass
class Result:
    started: float  # seconds since the run began
    latency: float  # seconds
    outcome: str  # "200", another HTTP status, or the client-side error's name
    timing: dict[str, float] = field(default_factory=dict)  # the service's Server-Timing, ms; batch size
    images: int = 1  # images the request carried


def parse_server_timing(header: str) -> dict[str, float]:
    """'prepare;dur=3.1, inference;dur=70.2;desc="batch of 4"' -> {"prepare": 3.1, "inference": 70.2, "batch": 4}"""
    timing: dict[str, float] = {}
    for metric in filter(None, (m.strip() for m in header.split(","))):
        name, *params = metric.split(";")
        for param in params:
            key, _, value = param.partition("=")
            if key == "dur":
                timing[name] = float(value)
            elif key == "desc" and value.strip('"').startswith("batch of "):
                timing["batch"] = float(value.strip('"').split()[-1])
    return timing


class LoadRun:
    """Sends requests from threads and collects one Result each; thread-safe. Each request carries one of
    images, or with per_request > 1 that many in turn (a v2 URL); pixels: see post_images."""

    def __init__(
        self,
        url: str,
        images: list[bytes],
        timeout_s: float = TIMEOUT_S,
        per_request: int = 1,
        pixels: tuple[int, int] | None = None,
    ):
        if (per_request > 1 or pixels) and not is_v2(url):
            raise ValueError("several images per request, or pixels, need a v2 infer URL")
        self.url, self.images, self.timeout_s = url, images, timeout_s
        self.per_request, self.pixels = per_request, pixels
        self.results: list[Result] = []
        self.sent = 0
        self.children_cpu_s = 0.0  # CPU seconds of the processes closed_loop(processes=N) started, when they ended
        self.lock = threading.Lock()
        self.start = time.monotonic()

    def send_one(self, index: int, session: requests.Session | None = None) -> None:
        first = index * self.per_request
        images = [self.images[i % len(self.images)] for i in range(first, first + self.per_request)]
        started = time.monotonic()
        with self.lock:
            self.sent += 1
        timing = {}
        try:
            response = post_images(self.url, images, self.timeout_s, session, self.pixels)
            outcome = str(response.status_code)
            timing = parse_server_timing(response.headers.get("Server-Timing", ""))
        except requests.RequestException as exc:
            outcome = type(exc).__name__
        result = Result(started - self.start, time.monotonic() - started, outcome, timing, len(images))
        with self.lock:
            self.results.append(result)

    def open_loop(self, count: int, spacing_s: float) -> None:
        """A new request every spacing_s seconds, each from its own thread, until count are sent."""
        threads = []
        for i in range(count):
            time.sleep(max(0.0, self.start + i * spacing_s - time.monotonic()))  # pacing, on a fixed schedule
            thread = threading.Thread(target=self.send_one, args=(i,), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()

    def closed_loop(
        self, clients: int, count: int | None = None, duration_s: float | None = None, processes: int = 1
    ) -> None:
        """clients threads, each sending its next request when the last is answered. With processes > 1 the
        clients are spread over that many Python processes, so that one interpreter's GIL does not cap the load
        (~1.4 ms of CPU per request here: ~700 requests/s per process); their results come back when they end."""
        if processes > 1 and clients > 1:
            self._closed_loop_in_processes(clients, count, duration_s, min(processes, clients))
            return
        counter = itertools.count()
        stop_at = None if duration_s is None else self.start + duration_s

        def client():
            with requests.Session() as session:
                while True:
                    i = next(counter)
                    if (count is not None and i >= count) or (stop_at is not None and time.monotonic() >= stop_at):
                        return
                    self.send_one(i, session)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _closed_loop_in_processes(self, clients: int, count: int | None, duration_s: float | None, n: int) -> None:
        """closed_loop's clients (and count, in proportion) shared out over n child processes: this file run with
        --child, one JSON line each way per step. Each child takes its job and says it is ready; the run starts
        when all are (self.start is reset then, so no child's start-up comes out of duration_s), and each child is
        told that start, so that all Results share one clock (CLOCK_MONOTONIC is system-wide)."""
        bounds = [clients * i // n for i in range(n + 1)]  # process i runs clients bounds[i] to bounds[i + 1]
        images = [base64.b64encode(image).decode() for image in self.images]
        children: list[subprocess.Popen] = []
        try:
            for lo, hi in itertools.pairwise(bounds):
                share = None if count is None else count * hi // clients - count * lo // clients
                argv = [sys.executable, __file__, "--child"]
                children.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
                job = [self.url, images, self.timeout_s, self.per_request, self.pixels, hi - lo, share, duration_s]
                _send(children[-1], job)
            for child in children:
                _receive(child)  # ready: Python started, requests imported, the job read
            self.start = time.monotonic()
            for child in children:
                _send(child, self.start)
            for child in children:
                sent, rows, cpu_s = _receive(child)
                with self.lock:
                    self.sent += sent
                    self.results.extend(Result(*row) for row in rows)
                    self.children_cpu_s += cpu_s
        except OSError as exc:  # a child that died: its stdin is a broken pipe
            raise RuntimeError(f"a load generator process failed: {exc}") from exc
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                child.wait()

    def print_progress(self, count: int, every_s: float = 1.0) -> None:
        """Run in a thread of its own: a line a second until every answer is in."""
        while True:
            time.sleep(every_s)
            with self.lock:
                done, ok = len(self.results), sum(r.outcome == "200" for r in self.results)
            print(
                f"  {time.monotonic() - self.start:5.1f} s  sent {self.sent}/{count}  answered {done}  ok {ok}",
                flush=True,
            )
            if done >= count:
                return


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


TIME_PARTS = ("prepare", "queue", "inference", "return")  # Server-Timing's split of a request's time


def batch_sizes(results: list[Result]) -> dict[int, int]:
    """Batches the answered requests ran in, by size: n images answered in batches of b make n / b batches (a
    request of several images is counted by its first image's batch, the one its Server-Timing gives)."""
    images_by_size = Counter()
    for r in results:
        if r.outcome == "200" and "batch" in r.timing:
            images_by_size[int(r.timing["batch"])] += r.images
    return {size: round(n / size) for size, n in sorted(images_by_size.items())}


def time_split(results: list[Result]) -> dict[str, float]:
    """Mean ms per answered request in each part of Server-Timing's split (prepare, queue, inference, return)."""
    timed = [r.timing for r in results if r.outcome == "200" and all(part in r.timing for part in TIME_PARTS)]
    return {part: round(sum(t[part] for t in timed) / len(timed), 1) for part in TIME_PARTS} if timed else {}


def summarize(results: list[Result]) -> dict:
    """Throughput over the run (answered requests and their images per second), latency percentiles of the
    successes, outcomes by status, and, from Server-Timing, the batch sizes the requests ran in and where
    their time went."""
    ok = sorted(r.latency for r in results if r.outcome == "200")
    images = sum(r.images for r in results if r.outcome == "200")
    wall = max((r.started + r.latency for r in results), default=0.0) - min((r.started for r in results), default=0.0)
    return {
        "sent": len(results),
        "succeeded": len(ok),
        "failed": dict(Counter(r.outcome for r in results if r.outcome != "200")),
        "wall_s": round(wall, 3),
        "throughput_per_s": round(len(ok) / wall, 3) if wall else 0.0,
        "images_per_s": round(images / wall, 3) if wall else 0.0,
        "latency_ms": {
            name: round(percentile(ok, q) * 1000, 1)
            for name, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
        },
        "batches_by_size": batch_sizes(results),
        "time_split_ms": time_split(results),
    }


def format_summary(summary: dict) -> str:
    lat = summary["latency_ms"]
    by_status = ", ".join(f"{k}: {v}" for k, v in sorted(summary["failed"].items())) or "none"
    failed = sum(summary["failed"].values())
    several = summary["images_per_s"] != summary["throughput_per_s"]  # requests of several images
    images = f" ({summary['images_per_s']:.2f} images/s)" if several else ""
    return (
        f"sent {summary['sent']}, succeeded {summary['succeeded']}, failed {failed} ({by_status})\n"
        f"throughput {summary['throughput_per_s']:.2f} answers/s{images} over {summary['wall_s']:.1f} s\n"
        f"latency p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, p99 {lat['p99']:.0f} ms, max {lat['max']:.0f} ms"
        + (f"\nbatches by size: {summary['batches_by_size']}" if summary["batches_by_size"] else "")
        + (f"\nmean time split, ms: {summary['time_split_ms']}" if summary["time_split_ms"] else "")
    )


def _send(child: subprocess.Popen, value) -> None:
    child.stdin.write(json.dumps(value).encode() + b"\n")
    child.stdin.flush()


def _receive(child: subprocess.Popen):
    line = child.stdout.readline()
    if not line:
        raise RuntimeError(f"a load generator process ended early (exit code {child.wait()})")
    return json.loads(line)


def _child() -> None:
    """One of closed_loop(processes=N)'s processes: its job, then the run's start, on stdin; "ready", then its
    results and the CPU seconds its closed loop took (its start-up not counted), on stdout."""
    url, images, timeout_s, per_request, pixels, clients, count, duration_s = json.loads(sys.stdin.readline())
    images = [base64.b64decode(image) for image in images]
    run = LoadRun(url, images, timeout_s, per_request, tuple(pixels) if pixels else None)
    print(json.dumps("ready"), flush=True)
    run.start = json.loads(sys.stdin.readline())
    cpu_s = time.process_time()
    run.closed_loop(clients, count, duration_s)
    rows = [(r.started, r.latency, r.outcome, r.timing, r.images) for r in run.results]
    print(json.dumps([run.sent, rows, time.process_time() - cpu_s]), flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    _child()
