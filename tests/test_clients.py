"""The clients' pure parts: percentiles and the load summary; the load generator against a small HTTP server."""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loadgen import LoadRun, Result, format_summary, percentile, summarize
from open_inference import HEADER_LENGTH


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0 and math.isnan(percentile([], 50))


def test_summary_counts_failures_by_status_and_times_only_successes():
    results = [Result(0.0, 0.1, "200"), Result(0.5, 0.3, "200"), Result(1.0, 0.01, "503"), Result(1.0, 2.0, "504")]
    summary = summarize(results)
    assert summary["sent"] == 4 and summary["succeeded"] == 2
    assert summary["failed"] == {"503": 1, "504": 1}
    assert summary["wall_s"] == 3.0 and summary["throughput_per_s"] == round(2 / 3.0, 3)
    assert summary["latency_ms"]["p50"] == 100.0 and summary["latency_ms"]["max"] == 300.0
    assert "failed 2 (503: 1, 504: 1)" in format_summary(summary)


def test_server_timing_is_parsed_with_the_batch_size():
    from loadgen import parse_server_timing

    header = (
        'prepare;dur=3.1, wait;dur=80.5, queue;dur=6.0, inference;dur=70.2;desc="batch of 4", return;dur=4.3, '
        "total;dur=84.0"
    )
    assert parse_server_timing(header) == {
        "prepare": 3.1,
        "wait": 80.5,
        "queue": 6.0,
        "return": 4.3,
        "inference": 70.2,
        "batch": 4,
        "total": 84.0,
    }
    assert parse_server_timing("") == {}


def test_a_closed_loop_spread_over_processes_sends_each_request_once_on_one_clock():
    """closed_loop(processes=3): the children send exactly count requests, with the parent's images, over
    their own connections, and their Results land in the parent on the parent's clock, with their CPU."""
    images = [b"\xff\xd8 first photo \xff\xd9", b"\xff\xd8 second \x00 photo \xff\xd9"]
    seen, connections, lock = [], set(), threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one connection per client

        def do_POST(self):
            arrived = time.monotonic()
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                seen.append([i for i, image in enumerate(images) if image in body])
                connections.add(self.client_address)
            time.sleep(0.01)
            self.send_response(200)  # when it arrived, on this machine's monotonic clock
            self.send_header("Server-Timing", f'arrived;dur={arrived * 1000}, inference;dur=1.5;desc="batch of 2"')
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/predict"
        run = LoadRun(url, images)
        run.closed_loop(8, count=37, processes=3)
        assert run.sent == 37 and len(run.results) == 37 and len(seen) == 37
        assert all(r.outcome == "200" and r.timing["inference"] == 1.5 and r.timing["batch"] == 2 for r in run.results)
        # each request was sent (on the parent's clock) before the server saw it, and answered after
        assert all(run.start + r.started <= r.timing["arrived"] / 1000 <= run.start + r.started + r.latency
                   for r in run.results)  # fmt: skip
        assert all(len(found) == 1 for found in seen)  # each request carried one of the parent's images, whole
        firsts = sum(found == [0] for found in seen)  # each process sends the images in turn, from the first
        assert 37 // 2 <= firsts <= 37 // 2 + 3
        assert 3 <= len(connections) <= 8  # 3 processes, each holding its own clients' connections
        assert run.children_cpu_s > 0  # theirs, counted here

        timed = LoadRun(url, images)
        timed.closed_loop(4, duration_s=1.0, processes=2)
        started = [r.started for r in timed.results]
        assert min(started) < 0.1 and 0.8 < max(started) < 1.0  # the whole second: the run starts when all are ready
        assert summarize(timed.results)["failed"] == {}

        refused = LoadRun("http://127.0.0.1:9/predict", images, timeout_s=2)  # nothing listens: errors, counted
        refused.closed_loop(2, count=4, processes=2)
        assert [r.outcome for r in refused.results] == ["ConnectionError"] * 4
    finally:
        server.shutdown()
        server.server_close()


def test_requests_of_several_images_or_pixels_go_over_v2_and_are_counted_per_image():
    """LoadRun(per_request=3): each v2 request carries the next 3 images in turn, and the summary counts
    images as well as answers; pixels=(h, w) sends them as one UINT8 tensor. /predict takes one image."""
    bodies, lock = [], threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            head = json.loads(body[: int(self.headers[HEADER_LENGTH])])
            with lock:
                bodies.append((head["inputs"][0], body[int(self.headers[HEADER_LENGTH]) :]))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v2/models/m/infer"
        images = [b"\xff\xd8 one \xff\xd9", b"\xff\xd8 two \xff\xd9"]
        run = LoadRun(url, images, per_request=3)
        run.closed_loop(1, count=2)
        assert [tensor["shape"] for tensor, _ in bodies] == [[3], [3]] and bodies[0][0]["datatype"] == "BYTES"
        assert [data.count(b" one ") for _, data in bodies] == [2, 1]  # images 0, 1, 0, then 1, 0, 1
        summary = summarize(run.results)
        assert [r.images for r in run.results] == [3, 3]
        assert summary["images_per_s"] == pytest.approx(3 * summary["throughput_per_s"], abs=0.01)  # both rounded
        assert "images/s" in format_summary(summary)

        bodies.clear()
        pixels = [bytes([v]) * (2 * 4 * 3) for v in (7, 9)]  # two 2 x 4 images
        LoadRun(url, pixels, per_request=2, pixels=(2, 4)).closed_loop(1, count=1)
        tensor, data = bodies[0]
        assert (tensor["datatype"], tensor["shape"], data) == ("UINT8", [2, 2, 4, 3], pixels[0] + pixels[1])

        bodies.clear()  # the same from processes of their own (closed_loop(processes=2): the job crosses a pipe)
        spread = LoadRun(url, pixels, per_request=2, pixels=(2, 4))
        spread.closed_loop(2, count=4, processes=2)
        assert [(t["datatype"], t["shape"]) for t, _ in bodies] == [("UINT8", [2, 2, 4, 3])] * 4
        assert [r.images for r in spread.results] == [2] * 4 and all(
            data == pixels[0] + pixels[1] for _, data in bodies
        )
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ValueError, match="v2"):
        LoadRun("http://127.0.0.1:9/predict", images, per_request=2)


def test_the_clients_send_an_api_key_to_a_service_with_api_keys(make_app):
    """With API_KEYS set, simple_request.py and stress_test.py got 401s and loadgen's v2 model lookup saw no
    model: --api-key (or API_KEY) sends one, to /readyz too, and from the processes a closed loop spreads over."""
    import subprocess
    import sys

    from support import ROOT
    from support.stand_in import StandInWorker, app_queue
    from werkzeug.serving import make_server

    key = "a-key-of-the-service-0123456789"
    app = make_app(API_KEYS=(key,))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/predict"

    def run(*argv, **env):
        import os

        environment = {k: v for k, v in os.environ.items() if k != "API_KEY"} | env
        return subprocess.run([sys.executable, *argv], cwd=ROOT, env=environment, capture_output=True, text=True)

    try:
        with StandInWorker(app_queue(app)):
            assert run("simple_request.py", "images/chelsea.jpg", "--url", url).returncode == 1  # 401
            assert run("simple_request.py", "images/chelsea.jpg", "--url", url, "--api-key", key).returncode == 0
            assert run("simple_request.py", "images/chelsea.jpg", "--url", url, API_KEY=key).returncode == 0
            load = ["stress_test.py", "--url", url, "--count", "6", "--concurrency", "2", "--processes", "2"]
            done = run(*load, "--api-key", key)
            assert done.returncode == 0 and "succeeded 6" in done.stdout, done.stdout + done.stderr
            assert "failed 6 (401: 6)" in run(*load).stdout  # no key
            v2 = run(*load, "--protocol", "v2", "--count", "1", API_KEY=key)  # the model found through /readyz
            assert "/v2/models/standin/infer" in v2.stdout, v2.stdout + v2.stderr
            assert "the service lists none" in run(*load, "--protocol", "v2").stderr  # /readyz lists none without
    finally:
        server.shutdown()


def test_the_clients_say_in_one_line_what_is_wrong_with_a_missing_image_or_a_service_that_is_down():
    import subprocess
    import sys

    from support import ROOT

    from stack import free_port

    down = f"http://127.0.0.1:{free_port()}/predict"
    for argv, words in [
        (["--image", "no-such-photo.jpg"], "cannot read no-such-photo.jpg: No such file or directory"),
        (["--protocol", "v2", "--url", down], "could not list the models at"),
    ]:
        done = subprocess.run([sys.executable, "stress_test.py", *argv], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode != 0 and "Traceback" not in done.stderr and words in done.stderr, done.stderr
