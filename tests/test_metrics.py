"""GET /metrics and the logs: the numbers add up, and a request's id joins the web's and the worker's lines.

Fast tests: the Flask app (and a real gunicorn with two worker processes) against a real Redis, with the
stand-in worker thread of test_web.py speaking the real queue protocol. The slow test: real gunicorn (two
processes, so multiprocess mode matters) and two real ResNet50 model workers under a stream of requests,
scraped during and after, with every number checked against what the client received and the workers logged.
"""

import json
import logging
import os
import re
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from support.images import distinct_photos
from support.stand_in import CAT, MODEL, StandInClassifier, StandInWorker, app_queue, post_image
from support.traffic import Traffic, wait_for

import helpers
import image_queue
import logs
import stack
from image_queue import Done
from run_model_server import ModelWorker

WEB_FAMILIES = {
    "http_requests",
    "predict_latency_seconds",
    "predict_queue_wait_seconds",
    "predict_inference_seconds",
    "predict_rejected",
    "predict_timeouts",
}
REDIS_FAMILIES = {
    "queue_up",
    "queue_depth",
    "queue_draining",
    "queue_in_progress",
    "queue_max",
    "model_workers_live",
    "model_worker_heartbeat_age_seconds",
    "queue_requeued_messages",
    "model_batches",
    "model_images",
    "model_inference_seconds",
    "model_batch_size",
}


# "I0000 00:00:1795251541.400718   11398 cudart_stub.cc:31] Could not find cuda drivers ...", and absl's notice
TENSORFLOW_OWN_LINE = re.compile(
    r"[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] |WARNING: All log messages before absl"
)


class Scrape:
    """One scrape of /metrics, parsed by prometheus-client's own parser."""

    def __init__(self, text: str):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def get(self, name: str, **labels) -> float:
        """The sum of the samples called name whose labels include these (0 when there are none)."""
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())

    def by(self, name: str, label: str, **labels) -> Counter:
        """Sample values of name per value of one label (zeros left out)."""
        found = Counter()
        for s in self.samples:
            if s.name == name and labels.items() <= s.labels.items() and s.value:
                found[s.labels[label]] += s.value
        return found


def scrape(client, **headers) -> Scrape:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return Scrape(response.get_data(as_text=True))


def delta(after: Scrape, before: Scrape, name: str, **labels) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


# --- The format -------------------------------------------------------------------------------


def test_metrics_is_prometheus_text_with_every_metric_and_openmetrics_on_request(make_app):
    app = make_app()
    client = app.test_client()
    with StandInWorker(app_queue(app)):
        assert post_image(client).status_code == 200
        response = client.get("/metrics")
        openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    parsed = Scrape(response.get_data(as_text=True))
    assert set(parsed.families) == WEB_FAMILIES | REDIS_FAMILIES
    assert all(f.documentation for f in parsed.families.values())  # each says what it means
    assert parsed.get("queue_up") == 1 and parsed.get("queue_max") == 64
    assert "_created" not in response.get_data(as_text=True)
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert {f.name for f in parse_openmetrics(openmetrics.get_data(as_text=True))} == WEB_FAMILIES | REDIS_FAMILIES


def test_metrics_need_an_api_key_when_keys_are_set(make_app):
    key = "k" * 32
    client = make_app(API_KEYS=(key,)).test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 200


# --- Web counters -----------------------------------------------------------------------------


def test_every_answer_is_counted_by_route_method_and_status(make_app):
    app = make_app(MAX_IMAGE_PIXELS=5_000_000)
    client = app.test_client()
    with StandInWorker(app_queue(app)):
        before = scrape(client)
        statuses = [post_image(client).status_code for _ in range(3)]
        statuses += [post_image(client, b"not an image").status_code, post_image(client, query="?top=0").status_code]
        statuses.append(client.post("/predict", data=b"<svg/>", content_type="image/svg+xml").status_code)
        others = [
            client.get("/healthz"),
            client.get("/nowhere"),
            client.get("/predict"),
            client.open("/", method="BREW"),
        ]
        after = scrape(client)
    assert statuses == [200, 200, 200, 400, 400, 415]
    assert [r.status_code for r in others] == [200, 404, 405, 405]
    predict = {"endpoint": "/predict", "method": "POST"}
    assert delta(after, before, "http_requests_total", **predict, status="200") == 3
    assert delta(after, before, "http_requests_total", **predict, status="400") == 2
    assert delta(after, before, "http_requests_total", **predict, status="415") == 1
    assert delta(after, before, "http_requests_total", endpoint="/healthz", method="GET", status="200") == 1
    assert delta(after, before, "http_requests_total", endpoint="other", method="GET", status="404") == 1
    # no route matched: "other", so that made-up paths and methods cannot add series
    assert delta(after, before, "http_requests_total", endpoint="other", method="GET", status="405") == 1
    assert delta(after, before, "http_requests_total", endpoint="other", method="other", status="405") == 1
    assert delta(after, before, "http_requests_total", endpoint="/metrics", status="200") == 1  # the first scrape
    assert delta(after, before, "http_requests_total") == 11
    assert delta(after, before, "predict_latency_seconds_count") == 3  # answered requests only
    assert delta(after, before, "predict_rejected_total") == 0 and delta(after, before, "predict_timeouts_total") == 0


def test_answered_requests_are_timed_end_to_end_in_the_queue_and_in_the_model(make_app):
    app = make_app()
    client = app.test_client()
    with StandInWorker(app_queue(app)):
        before = scrape(client)
        started = time.monotonic()
        for _ in range(4):
            assert post_image(client).status_code == 200
        took = time.monotonic() - started
        after = scrape(client)
    for name in ("predict_latency_seconds", "predict_queue_wait_seconds", "predict_inference_seconds"):
        assert delta(after, before, f"{name}_count") == 4
        assert delta(after, before, f"{name}_bucket", le="+Inf") == 4
    assert delta(after, before, "predict_inference_seconds_sum") == pytest.approx(4 * 0.0125)  # the worker's 12.5 ms
    assert delta(after, before, "predict_inference_seconds_bucket", le="0.01") == 0
    assert delta(after, before, "predict_inference_seconds_bucket", le="0.025") == 4
    assert 0 < delta(after, before, "predict_latency_seconds_sum") <= took


def stalled(app, client):
    app_queue(app).heartbeat("stalled", MODEL)  # a fresh heartbeat, never claims
    return post_image(client)


def no_worker(app, client):
    return post_image(client)


def queue_full(app, client):
    queue = app_queue(app)
    queue.heartbeat("busy-elsewhere", MODEL)
    for i in range(queue.queue_max):
        queue.enqueue(f"waiting{i}".encode())
    return post_image(client)


def redis_down(app, client):
    return post_image(client)


def draining(app, client):
    with StandInWorker(app_queue(app)):
        app_queue(app).pause()
        return post_image(client)


def decoders_busy(app, client):
    app_queue(app).heartbeat("idle", MODEL)
    for _ in range(app.config["DECODE_SLOTS"]):
        app.extensions["decode_slots"].acquire()
    return post_image(client)


def worker_503(app, client):
    with StandInWorker(app_queue(app), error=(503, "the image was prepared for another model")):
        return post_image(client)


def rate_limited(app, client):
    with StandInWorker(app_queue(app)):
        assert post_image(client).status_code == 200
        return post_image(client)


@pytest.mark.parametrize(
    ("cause", "config", "status", "reason"),
    [
        (no_worker, {}, 503, "no_worker"),
        (queue_full, {"QUEUE_MAX": 3}, 503, "queue_full"),
        (redis_down, {"REDIS_URL": "redis://127.0.0.1:{free}/0"}, 503, "redis"),
        (draining, {}, 503, "draining"),
        (decoders_busy, {"REQUEST_TIMEOUT_S": 0.5}, 503, "busy"),
        (worker_503, {}, 503, "worker_503"),
        (rate_limited, {"RATE_LIMIT": "1/minute"}, 429, "rate_limit"),
        (stalled, {"REQUEST_TIMEOUT_S": 0.5}, 504, None),
    ],
)
def test_each_refusal_and_timeout_is_counted_under_its_cause(make_app, cause, config, status, reason):
    config = {k: v.format(free=stack.free_port()) if isinstance(v, str) else v for k, v in config.items()}
    app = make_app(**config)
    client = app.test_client()
    before = scrape(client)
    response = cause(app, client)
    after = scrape(client)
    assert response.status_code == status, response.get_data(as_text=True)
    rejected = (after.by("predict_rejected_total", "reason") - before.by("predict_rejected_total", "reason")).total()
    assert rejected == (1 if reason else 0)
    if reason:
        assert delta(after, before, "predict_rejected_total", reason=reason) == 1
    assert delta(after, before, "predict_timeouts_total") == (1 if status == 504 else 0)
    assert delta(after, before, "http_requests_total", endpoint="/predict", status=str(status)) == 1
    assert delta(after, before, "predict_latency_seconds_count") == (1 if cause is rate_limited else 0)


def test_every_rejection_reason_is_a_series_from_the_start(make_app):
    reasons = {
        sample.labels["reason"] for sample in scrape(make_app().test_client()).families["predict_rejected"].samples
    }
    assert reasons == {"queue_full", "no_worker", "redis", "draining", "busy", "worker_503", "rate_limit"}


# --- Read from Redis at scrape time -------------------------------------------------------------


def test_the_queue_and_the_model_workers_numbers_are_read_from_redis(make_app, redis_client):
    app = make_app(QUEUE_MAX=50, WORKER_TTL_S=2.0)
    client, queue = app.test_client(), app_queue(app)
    now = queue.status().server_time
    queue.heartbeat("alive", MODEL)
    for i in range(5):
        queue.enqueue(f"message-{i}".encode())
    mid = scrape(client)
    claimed = queue.claim("alive", 2).messages
    held_by_dead = queue.claim("dead", 1).messages
    redis_client.zadd(queue.keys.workers, {"dead": now - 100})  # then silent for 100 s, not yet noticed
    first = scrape(client)
    queue.ack("alive", [Done(m, m.decode(), b"answer", now + 60) for m in claimed], 2, 0.25)
    requeued = queue.requeue_dead_workers()
    queue.ack("alive", [Done(m, m.decode(), b"answer", now + 60) for m in queue.claim("alive", 3).messages], 3, 0.5)
    second = scrape(client)

    assert mid.get("queue_depth") == 5 and mid.get("queue_in_progress") == 0
    assert first.get("queue_depth") == 2 and first.get("queue_in_progress") == 3 and first.get("queue_max") == 50
    assert first.get("model_workers_live") == 1  # the dead one is registered but not live
    ages = first.by("model_worker_heartbeat_age_seconds", "worker")
    assert set(ages) == {"alive", "dead"} and ages["alive"] < 1.5 and 100 <= ages["dead"] < 102
    assert held_by_dead and requeued == 1
    assert second.get("queue_depth") == 0 and second.get("queue_in_progress") == 0
    assert set(second.by("model_worker_heartbeat_age_seconds", "worker")) == {"alive"}  # the dead one was dropped
    assert second.get("queue_requeued_messages_total") == 1
    assert second.get("model_batches_total") == 2 and second.get("model_images_total") == 5
    assert second.get("model_inference_seconds_total") == pytest.approx(0.75)
    buckets = {s.labels["le"]: s.value for s in second.samples if s.name == "model_batch_size_bucket"}
    assert buckets["1.0"] == 0 and buckets["2.0"] == 1 and buckets["4.0"] == 2 and buckets["+Inf"] == 2
    assert second.get("model_batch_size_count") == 2 and second.get("model_batch_size_sum") == 5
    assert queue.stats().batch_sizes == {2: 1, 3: 1}


def test_a_batch_is_counted_once_by_whoever_answered_it(make_queue):
    queue = make_queue(worker_ttl_s=1.0)
    deadline = time.time() + 60
    for name in ("a", "b"):
        queue.enqueue(name.encode())
    queue.heartbeat("stalls", MODEL)
    batch = queue.claim("stalls", 2).messages
    done = [Done(m, m.decode(), b"answer", deadline) for m in batch]
    time.sleep(1.2)  # "stalls" falls silent; a peer takes its batch over
    queue.heartbeat("peer", MODEL)
    assert queue.requeue_dead_workers() == 2
    taken = queue.claim("peer", 2).messages
    peer_done = [Done(m, m.decode(), b"answer", deadline) for m in taken]
    assert queue.ack("peer", peer_done, 2, 0.1)[0] == ["a", "b"]
    assert queue.ack("peer", peer_done, 2, 0.1) == ([], [])  # a retried ack (its reply lost) releases nothing ...
    assert queue.ack("stalls", done, 2, 0.1) == ([], [])  # ... nor does the stalled worker's late one
    queue.enqueue(b"c")
    queue.ack("peer", [Done(m, None, None) for m in queue.claim("peer", 1).messages], 0, 0.0)  # the model ran none
    stats = queue.stats()
    assert stats.batch_sizes == {2: 1} and stats.inference_s == pytest.approx(0.1) and stats.requeued == 2


def test_a_scrape_while_redis_is_down_still_answers_with_queue_up_0(make_app, caplog):
    client = make_app(REDIS_URL=f"redis://127.0.0.1:{stack.free_port()}/0").test_client()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="metrics"):
        parsed = scrape(client)
    assert time.monotonic() - started < 5
    assert parsed.get("queue_up") == 0 and set(parsed.families) == WEB_FAMILIES | {"queue_up"}
    assert "could not read the queue from Redis" in caplog.text


# --- Logs ---------------------------------------------------------------------------------------


def test_the_workers_info_line_per_batch_names_its_requests(make_queue, caplog):
    queue = make_queue()
    worker = ModelWorker(queue, StandInClassifier(), batch_size=8, max_wait_s=0, heartbeat_s=1)
    ids = [f"{i:032x}" for i in range(3)]
    for request_id in ids:
        pixels = helpers.prepare_image(helpers.open_image(CAT, 10**8), (4, 4))
        queue.enqueue(image_queue.encode_message(request_id, time.time() + 60, 2, pixels))
    with caplog.at_level(logging.DEBUG, logger="model_server"):
        worker.process(queue.claim(worker.worker_id, 8))
    [info] = [r for r in caplog.records if r.levelno == logging.INFO]
    assert info.getMessage().endswith(f"3 answered, 0 expired in queue, 0 too late; ids={','.join(ids)}")
    assert json.loads(logs.JsonFormatter().format(info))["request_ids"] == ids
    answered = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert [r.getMessage() for r in answered] == [f"answered {i}" for i in ids]  # what tests/support/traffic.py reads
    assert [json.loads(logs.JsonFormatter().format(r))["request_id"] for r in answered] == ids
    assert queue.stats().batch_sizes == {3: 1}  # the real worker counts its batches


def test_a_json_line_carries_the_request_id_of_the_request_being_served(make_app):
    app = make_app()
    formatter, seen = logs.JsonFormatter(), []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(json.loads(formatter.format(record)))

    handler = Keep()
    logging.getLogger("run_web_server").addHandler(handler)
    try:
        response = post_image(app.test_client())  # no worker: the 503 is logged while serving the request
        after = app.test_client().get("/healthz")
    finally:
        logging.getLogger("run_web_server").removeHandler(handler)
    assert response.status_code == 503 and after.status_code == 200
    [line] = seen
    assert line["request_id"] == response.headers["X-Request-ID"] and line["level"] == "WARNING"
    assert set(line) == {"time", "level", "logger", "pid", "message", "request_id"}
    assert logs.REQUEST_ID.get() is None  # reset when the request ended: the thread's next request is not tagged


def test_an_empty_prometheus_multiproc_dir_means_unset_outside_gunicorn(redis_url, tmp_path):
    """An env file's "PROMETHEUS_MULTIPROC_DIR=" (the README's empty default) under mod_wsgi, uWSGI or the
    development server: prometheus-client took it for multiprocess mode, every scrape was a 500 and its files
    landed in the working directory."""
    import subprocess
    import sys

    from support import ROOT

    scrape = (
        "import sys; sys.path.insert(0, sys.argv[1]); from run_web_server import create_app; "
        "client = create_app({'REDIS_URL': sys.argv[2]}).test_client(); client.get('/healthz'); "
        "response = client.get('/metrics'); print(response.status_code, b'http_requests_total' in response.data)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {"PROMETHEUS_MULTIPROC_DIR": ""}
    done = subprocess.run(
        [sys.executable, "-c", scrape, str(ROOT), redis_url], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.stdout.split() == ["200", "True"], done.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # no counter_*.db files in the working directory


# --- Real gunicorn, two processes -----------------------------------------------------------------


def start_gunicorn(redis_url: str, queue_name: str, logdir, **env) -> tuple[stack.Service, str]:
    port = stack.free_port()
    base = {
        "REDIS_URL": redis_url,
        "IMAGE_QUEUE": queue_name,
        "WEB_PORT": str(port),
        "WEB_WORKERS": "2",
        "WEB_THREADS": "8",
        "REDIS_BLOCK_S": "0.2",
        "WORKER_TTL_S": "2",
        "REQUEST_TIMEOUT_S": "5",
    }
    web = stack.start_web(base | env, logdir / "web.log")
    return web, f"http://127.0.0.1:{port}/"


def send(url: str, data: bytes) -> requests.Response:
    return requests.post(url + "predict", files={"image": ("photo.jpg", data)}, timeout=30)


def json_lines(service: stack.Service) -> list[dict]:
    return [json.loads(line) for line in service.log_text().splitlines()]  # fails on any line that is not JSON


def served_by(service: stack.Service, path: str) -> list[dict]:
    """The JSON access-log entries of one path."""
    return [e for e in json_lines(service) if e["logger"] == "gunicorn.access" and e.get("path") == path]


def test_under_gunicorn_a_scrape_sums_every_process_even_a_killed_one_and_logs_are_json(
    redis_url, queue_name, make_queue, tmp_path
):
    """gunicorn with two processes: the worker process that served the first requests is killed (-9) and
    replaced, others serve the rest; every scrape, whichever process answers it, counts them all."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"left by an earlier run")  # must be cleared at start
    web, url = start_gunicorn(redis_url, queue_name, tmp_path, LOG_JSON="1", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    try:
        with StandInWorker(make_queue(block_s=0.2, worker_ttl_s=2.0)), ThreadPoolExecutor(8) as pool:
            stack.wait_until_ready(url, [web], 60)
            first = list(pool.map(lambda data: send(url, data), [CAT] * 20 + [b"not an image"] * 3))
            first_pids = {
                e["pid"]
                for e in wait_for(lambda: len(served_by(web, "/predict")) == 23 and served_by(web, "/predict"), 10)
            }
            for pid in first_pids:
                os.kill(pid, signal.SIGKILL)
            wait_for(lambda: sum("Booting worker" in e["message"] for e in json_lines(web)) == 2 + len(first_pids), 30)
            second = list(pool.map(lambda data: send(url, data), [CAT] * 20 + [b"not an image"] * 3))
            scrapes = [Scrape(requests.get(url + "metrics", timeout=10).text) for _ in range(6)]
    finally:
        web.stop()
    responses = first + second
    statuses = Counter(str(r.status_code) for r in responses)
    assert statuses == {"200": 40, "400": 6}
    access = served_by(web, "/predict")
    assert len(access) == 46 and {e["status"] for e in access} == {200, 400}
    assert {e["pid"] for e in access[23:]}.isdisjoint(first_pids)  # the rest went to other processes
    entries = json_lines(web)
    assert all({"time", "level", "logger", "pid", "message"} <= set(e) for e in entries)
    ids = {r.headers["X-Request-ID"] for r in responses if r.status_code == 200}
    assert {e["request_id"] for e in access if e["status"] == 200} == ids and len(ids) == 40
    for parsed in scrapes:  # whichever process answered, the same totals, the killed process's included
        assert parsed.by("http_requests_total", "status", endpoint="/predict") == statuses
        assert parsed.get("predict_latency_seconds_count") == 40
        assert parsed.get("predict_inference_seconds_sum") == pytest.approx(40 * 0.0125)
        assert parsed.get("model_images_total") == 40 and parsed.get("queue_up") == 1
    assert metrics_dir.exists() and not (metrics_dir / "counter_1.db").exists()  # the operator's directory stays


def test_a_reload_then_a_binary_upgrade_leaves_the_new_master_its_own_metrics_directory(
    redis_url, queue_name, make_queue, tmp_path
):
    """systemctl reload (HUP) puts the private PROMETHEUS_MULTIPROC_DIR into the environment gunicorn hands a
    USR2 re-exec; the new master then took it for the operator's, and the old master's exit removed it under
    the new generation: no counters, and the next worker it started failed to boot."""
    web, url = start_gunicorn(redis_url, queue_name, tmp_path, LOG_JSON="1", WEB_WORKERS="1")

    def logged(start: str) -> list[int]:
        return [e["pid"] for e in json_lines(web) if e["message"].startswith(start)]

    new_master = None
    try:
        with StandInWorker(make_queue(block_s=0.2, worker_ttl_s=2.0)):
            stack.wait_until_ready(url, [web], 60)
            web.process.send_signal(signal.SIGHUP)
            wait_for(lambda: len(logged("Booting worker")) == 2, 30)
            web.process.send_signal(signal.SIGUSR2)
            new_master = wait_for(lambda: logged("Starting gunicorn")[1:], 30)[0]  # a child of the old master
            wait_for(lambda: len(logged("Booting worker")) == 3, 30)
            web.stop()  # the old master, as the upgrade's last step
            assert send(url, CAT).status_code == 200
            counted = Scrape(requests.get(url + "metrics", timeout=10).text)
            assert counted.by("http_requests_total", "status", endpoint="/predict") == {"200": 1}
            os.kill(logged("Booting worker")[-1], signal.SIGKILL)  # the new master starts another in its place
            wait_for(lambda: len(logged("Booting worker")) == 4, 30)
            assert send(url, CAT).status_code == 200
            counted = Scrape(requests.get(url + "metrics", timeout=10).text)
            assert counted.by("http_requests_total", "status", endpoint="/predict") == {"200": 2}
    finally:
        web.stop()
        if new_master:
            os.kill(new_master, signal.SIGTERM)
            wait_for(lambda: not os.path.exists(f"/proc/{new_master}"), 30)
    assert not any("Worker failed to boot" in e["message"] for e in json_lines(web))


def test_gunicorns_text_access_line_carries_the_request_id(redis_url, queue_name, make_queue, tmp_path):
    web, url = start_gunicorn(redis_url, queue_name, tmp_path, WEB_WORKERS="1")
    try:
        with StandInWorker(make_queue(block_s=0.2, worker_ttl_s=2.0)):
            stack.wait_until_ready(url, [web], 60)
            response = send(url, CAT)
    finally:
        web.stop()
    assert response.status_code == 200
    request_id = response.headers["X-Request-ID"]
    [line] = [line for line in web.log_text().splitlines() if request_id in line]
    assert re.fullmatch(
        rf'\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} INFO gunicorn.access\[\d+\]: 127.0.0.1 "POST /predict HTTP/1.1" '
        rf"200 \d+ \d+us id={request_id}",
        line,
    ), line


# --- Slow: real gunicorn and two real model workers ------------------------------------------------


@pytest.mark.slow
def test_under_load_with_two_model_workers_the_numbers_add_up(make_stack, redis_client):
    """~130 requests (200s, 400s, 503s from a full queue) through 2 gunicorn processes to 2 ResNet50 workers,
    one of which is killed (-9) holding a batch; /metrics scraped every 0.3 s throughout."""
    s = make_stack(
        QUEUE_MAX=12,
        BATCH_SIZE=8,
        WORKER_TTL_S=3,
        REQUEST_TIMEOUT_S=30,
        GUNICORN_TIMEOUT_S=60,
        LOG_JSON=1,
        LOG_LEVEL="INFO",
    )
    workers = [s.start_worker(), s.start_worker()]
    s.start_web()
    s.wait_ready(240)
    images = distinct_photos(6)
    scrapes, stop_scraping = [], threading.Event()

    def scrape_all_the_time():
        while not stop_scraping.wait(0.3):
            scrapes.append(Scrape(requests.get(s.url + "metrics", timeout=10).text))

    scraper = threading.Thread(target=scrape_all_the_time)
    scraper.start()
    try:
        with Traffic(s.url, images, [None] * len(images), rate=5) as traffic:
            traffic.wait_for_answers(40, 120)
            bad = [requests.post(s.url + "predict", files={"image": ("x.jpg", b"text")}, timeout=30) for _ in range(8)]
            with ThreadPoolExecutor(30) as pool:  # a burst past QUEUE_MAX: some are refused at once
                burst = list(pool.map(lambda i: send(s.url, images[i % 6]), range(30)))
            traffic.wait_for_answers(20, 120)
        # kill -9 a worker holding a batch: its peer requeues the batch and answers it
        keys = s.keys()
        victim = workers[0]
        victim_id = wait_for(lambda: re.findall(r"worker (\S+) serving queue", victim.log_text()), 30)[0]
        with Traffic(s.url, images, [None] * len(images), rate=5) as tail:
            while True:  # stopped while it holds a batch: its ack has not run (nor, so, been counted)
                wait_for(lambda: any(redis_client.llen(k) for k in keys.lanes(victim_id)), 60)
                victim.process.send_signal(signal.SIGSTOP)
                if any(redis_client.llen(k) for k in keys.lanes(victim_id)):
                    break
                victim.process.send_signal(signal.SIGCONT)
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait()
            wait_for(lambda: "requeued its" in workers[1].log_text(), 30)
            tail.wait_for_answers(5, 60)
    finally:
        stop_scraping.set()
        scraper.join()
    final = Scrape(requests.get(s.url + "metrics", timeout=10).text)

    replies = [*traffic.replies, *tail.replies]
    client_saw = Counter(str(r.status) for r in replies) + Counter(str(r.status_code) for r in [*bad, *burst])
    oks = client_saw["200"]
    print(f"\nmetrics under load: client saw {dict(client_saw)}; {len(scrapes)} scrapes during the run")
    assert client_saw["400"] == 8 and client_saw["503"] >= 1 and oks >= 60 and set(client_saw) <= {"200", "400", "503"}
    # Web counters: exactly what the client received, summed over both gunicorn processes.
    assert final.by("http_requests_total", "status", endpoint="/predict") == client_saw
    assert final.get("predict_latency_seconds_count") == oks == final.get("predict_queue_wait_seconds_count")
    assert final.get("predict_rejected_total", reason="queue_full") == client_saw["503"]
    assert final.get("predict_timeouts_total") == 0
    # Model counters, from Redis: every answered image once, in batches the workers' logs list one by one.
    worker_lines = [json.loads(line) for w in workers for line in w.log_text().splitlines() if line.startswith("{")]
    batches = [e for e in worker_lines if e["message"].startswith("batch of ")]
    sizes = Counter(int(re.match(r"batch of (\d+)", e["message"])[1]) for e in batches)
    per_worker = Counter(e["pid"] for e in batches)
    assert len(per_worker) == 2 and min(per_worker.values()) >= 1  # both workers' batches are in the one count
    assert final.get("model_images_total") == oks
    assert final.get("model_batches_total") == final.get("model_batch_size_count") == len(batches)
    assert final.get("model_batch_size_sum") == sum(n * k for n, k in sizes.items()) == oks
    for bound in (1, 2, 4, 8):
        assert final.get("model_batch_size_bucket", le=f"{bound}.0") == sum(k for n, k in sizes.items() if n <= bound)
    # each batch's time counted once, against once per request of it (answers round it to 0.01 ms)
    assert 0 < final.get("model_inference_seconds_total") <= final.get("predict_inference_seconds_sum") + 0.001
    # The kill: the requeued count is the rescuer's; the dead worker's heartbeat shows until it is dropped.
    requeued = sum(int(n) for n in re.findall(r"requeued its (\d+) messages", workers[1].log_text()))
    assert final.get("queue_requeued_messages_total") == requeued >= 1
    assert final.get("model_workers_live") == 1
    # During the load: every scrape parsed, counters never went back, the queue stayed within QUEUE_MAX.
    assert len(scrapes) >= 20
    for earlier, later in zip(scrapes, scrapes[1:], strict=False):
        for name in (
            "http_requests_total",
            "model_batches_total",
            "model_images_total",
            "predict_latency_seconds_count",
        ):
            assert later.get(name) >= earlier.get(name), name
    assert max(x.get("queue_depth") + x.get("queue_in_progress") for x in scrapes) <= 12
    # the scrapes did see work held: two workers can drain the waiting list between two scrapes,
    # so a held batch (in progress) counts as well as a waiting message
    assert max(x.get("queue_depth") + x.get("queue_in_progress") for x in scrapes) >= 1
    # Logs: every line JSON; each answered request's id is in the access log and in exactly one worker INFO line.
    web_lines = [json.loads(line) for line in s.web.log_text().splitlines()]
    access_ids = {e.get("request_id") for e in web_lines if e["logger"] == "gunicorn.access"}
    worker_ids = Counter(i for e in batches for i in e["request_ids"])
    answered = [r.request_id for r in replies if r.status == 200] + [r.headers["X-Request-ID"] for r in burst if r.ok]
    assert set(answered) <= access_ids
    assert [i for i in answered if worker_ids[i] != 1] == []
    # TensorFlow's C++ runtime writes a few start-up lines of its own to stderr, past Python's logging
    stray = [line for w in workers for line in w.log_text().splitlines() if not line.startswith("{")]
    assert [line for line in stray if not TENSORFLOW_OWN_LINE.match(line)] == []
