"""Faults under a steady stream of real requests: kill -9, restarts, Redis outages, stalls, overload, poison.

Real gunicorn, real model workers with the real ResNet50 (seeded weights), real Redis. Every test
keeps the books of every request it sent (see traffic.py): answered by status, lost (sent, never
answered), wrong (someone else's answer), duplicated (an answer written twice). The promise: lost 0,
wrong 0, duplicated 0, and no request outlives its deadline. Each test prints its books; the README's
"Reliability" section quotes them.
"""

import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from PIL import Image
from support.images import distinct_photos, encode
from support.stacks import StackFactory
from support.stand_in import StandInWorker
from support.traffic import Traffic, expected_top5, same_answer, wait_for

import helpers
import image_queue
import settings
import stack
from classifier import choose_runtime, runs_on_host_cpu
from image_queue import ImageQueue, Keys, connect
from loadgen import LoadRun, percentile

pytestmark = pytest.mark.slow

RATE = 6.0  # requests/s: a steady stream under this CPU's capacity (~12-15 images/s served)
DEADLINE_SLACK_S = 1.5  # a 2-core machine that is also starting TensorFlow answers a little late


@pytest.fixture(scope="module")
def photos(resnet):
    """Distinct photos and the model's own answer for each; the answers tell the photos apart."""
    images = distinct_photos(24)  # more than a batch: a swap inside any batch would show
    expected = expected_top5(resnet, images)
    for i in range(len(images)):
        for j in range(i):
            assert not same_answer(expected[i], expected[j]), "two photos' answers look alike: a swap would hide"
    return images, expected


def assert_books(traffic: Traffic, s, name: str, allowed: set, deadline_s: float) -> None:
    """The books of a run: nothing lost, wrong or duplicated; only allowed statuses; no late answer."""
    try:  # a worker logs an answer just after writing it: give a busy (niced) worker time to catch up
        wait_for(lambda: not traffic.books(s.worker_logs()).unlogged, 20)
    except AssertionError:
        pass  # the assertion below says which
    books = traffic.books(s.worker_logs())
    print("\n" + books.line(name))
    assert books.lost == 0, [r.client_error for r in traffic.replies if r.status is None][:5]
    assert books.wrong == [] and books.duplicated == [] and books.unlogged == [], books
    assert set(books.by_status) <= allowed, books.by_status
    assert books.slowest_s <= deadline_s + DEADLINE_SLACK_S, books.slowest_s
    assert books.sent >= 150, "not enough traffic to show anything"
    for reply in traffic.replies:
        if reply.status == 503:
            assert reply.retry_after and reply.body["success"] is False, reply
    # and nothing is left behind in Redis: no message waiting or held by anyone
    queue = ImageQueue(redis.Redis.from_url(s.env["REDIS_URL"]), s.queue_name())
    wait_for(lambda: queue.redis.llen(queue.keys.queue) == 0 and not holds_a_batch(queue.redis, queue.keys), 15)


def stop_holding_a_batch(service, redis_client, keys: Keys, worker: str = "*") -> None:
    """SIGSTOP the worker at a moment it holds a claimed batch (so a signal that follows is mid-batch)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        service.process.send_signal(signal.SIGSTOP)
        if holds_a_batch(redis_client, keys, worker):
            return
        service.process.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("the worker never held a batch")


def worker_id(service) -> str:
    return wait_for(lambda: re.findall(r"worker (\S+) serving queue", service.log_text()), 240)[0]


def holds_a_batch(redis_client, keys: Keys, worker: str = "*") -> bool:
    """Whether the worker (any, by default) holds messages on any of its lanes' processing lists."""
    return any(redis_client.llen(k) for k in redis_client.scan_iter(match=keys.processing(worker) + "*"))


def held_by(redis_client, keys: Keys, worker: str) -> int:
    return sum(redis_client.llen(k) for k in keys.lanes(worker))


def expired_or_late(log: str) -> int:
    return sum(int(a) + int(b) for a, b in re.findall(r"(\d+) expired in queue, (\d+) too late", log))


# --- 1, 2: workers killed ----------------------------------------------------------------------


def test_kill_9_mid_batch_and_a_new_worker_loses_nothing(make_stack, photos, redis_client):
    # PIPELINE_DEPTH 3, as auto is on a GPU (on this CPU auto is 1): the victim dies with batches on 3 lanes
    s = make_stack(REQUEST_TIMEOUT_S=30, GUNICORN_TIMEOUT_S=60, WORKER_TTL_S=3, BATCH_SIZE=16, PIPELINE_DEPTH=3)
    victim = s.start_worker()
    s.start_web()
    s.wait_ready()
    keys = s.keys()
    with Traffic(s.url, *photos, rate=RATE) as traffic:
        traffic.wait_for_answers(60, 60)
        stop_holding_a_batch(victim, redis_client, keys)
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        killed_at = time.monotonic()
        rescuer = s.start_worker()
        traffic.wait_for_answers(90, 240)  # 150 in all, however fast the rescuer starts (~1.3 s from the cache)

    assert_books(traffic, s, "kill -9 mid-batch, new worker", {200, 503}, 30)
    requeued = [int(n) for n in re.findall(r"requeued its (\d+) messages", rescuer.log_text())]
    assert requeued and requeued[0] > 0  # the dead worker's batch went back onto the queue ...
    in_flight = [r for r in traffic.replies if r.sent < killed_at < r.sent + r.latency]
    assert in_flight and {r.status for r in in_flight} == {200}  # ... and its requests were answered


def test_with_the_shipped_timeouts_one_of_two_workers_killed_mid_batch_its_requests_are_answered_by_the_other(
    make_stack, photos, redis_client
):
    """The defaults (REQUEST_TIMEOUT_S 10, WORKER_TTL_S 3, WORKER_HEARTBEAT_S 0.5, BATCH_SIZE 32, BATCH_TUNE on): the
    survivor requeues the dead worker's batch and answers it before the deadline, so nobody gets a 504."""
    s = make_stack(BATCH_SIZE=32, BATCH_TUNE="on")
    defaults = settings.Settings.from_env({})
    for name in (
        "REQUEST_TIMEOUT_S",
        "WORKER_TTL_S",
        "WORKER_HEARTBEAT_S",
        "GUNICORN_TIMEOUT_S",
        "PIPELINE_DEPTH",
        "BATCH_TUNE",
    ):
        given = {name: s.env[name]} if name in s.env else {}  # absent, or a value read as the default
        assert getattr(settings.Settings.from_env(given), name) == getattr(defaults, name)
    victim, survivor = s.start_worker(), s.start_worker()
    s.start_web()
    s.wait_ready()
    wait_for(lambda: requests.get(s.url + "readyz", timeout=5).json()["workers"] == 2, 240)
    keys = s.keys()
    with Traffic(s.url, *photos, rate=RATE) as traffic:
        traffic.wait_for_answers(60, 60)
        victim_id = worker_id(victim)
        for worker in (survivor, victim):  # 2 s of requests queue up (under WORKER_TTL_S: both stay live) ...
            worker.process.send_signal(signal.SIGSTOP)
        time.sleep(2)
        victim.process.send_signal(signal.SIGCONT)  # ... the victim claims them all as one batch ...
        # (a full batch of the worker's own size: BATCH_TUNE's choice, the largest within 5% of the fastest per
        # image, 8-32 on an AVX512-BF16 EPYC; where the model is slow, the takeover order lowers it further: before
        # BATCH_TUNE it chose 2 on an AVX2-only AMD EPYC, where two workers warming at once timed 3.7 s for 32)
        full = min(6, int(re.search(r"in batches of up to (\d+)", victim.log_text())[1]))
        wait_for(lambda: held_by(redis_client, keys, victim_id) >= full, 5)
        victim.process.send_signal(signal.SIGKILL)  # ... and dies running it
        survivor.process.send_signal(signal.SIGCONT)
        killed_at = time.monotonic()
        held = held_by(redis_client, keys, victim_id)
        victim.process.wait()
        traffic.wait_for_answers(100, 120)

    assert_books(traffic, s, f"defaults: 1 of 2 workers kill -9 holding {held}", {200}, 10)
    shipped = settings.Settings.from_env(os.environ | s.env)  # the workers' own settings (auto, unless the runner's)
    depth = shipped.pipeline_depth(runs_on_host_cpu(choose_runtime(shipped.MODEL_RUNTIME)[0]))  # auto: 1 on a CPU
    assert f"PIPELINE_DEPTH {depth} (auto: the model runs on" in survivor.log_text()
    requeued = [int(n) for n in re.findall(r"requeued its (\d+) messages", survivor.log_text())]
    assert requeued and requeued[0] >= held > 0  # the survivor took the dead worker's batch over ...
    in_flight = [r for r in traffic.replies if r.sent < killed_at < r.sent + r.latency]
    assert in_flight and {r.status for r in in_flight} == {200}  # ... and answered it in time
    print(f"in flight at the kill: {len(in_flight)}, slowest of them {max(r.latency for r in in_flight):.2f} s")


def test_two_then_three_workers_one_killed_and_restarted_again_and_again(make_stack, photos, redis_client):
    s = make_stack(REQUEST_TIMEOUT_S=30, GUNICORN_TIMEOUT_S=60, WORKER_TTL_S=3, BATCH_SIZE=8, PIPELINE_DEPTH=3)
    workers = [s.start_worker(), s.start_worker()]
    s.start_web()
    s.wait_ready()
    keys = s.keys()
    kills = 0
    with Traffic(s.url, *photos, rate=RATE) as traffic:
        for round_ in range(4):
            if round_ == 2:
                workers.append(s.start_worker())  # from here on, three on the queue
                worker_id(workers[-1])
            traffic.wait_for_answers(30, 120)  # 150 in all with the last, however fast the replacements start
            victim = workers[round_ % len(workers)]
            stop_holding_a_batch(victim, redis_client, keys, worker_id(victim))
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait()
            kills += 1
            workers[workers.index(victim)] = replacement = s.start_worker()
            worker_id(replacement)
        traffic.wait_for_answers(30, 120)

    assert kills == 4
    assert_books(traffic, s, "2 then 3 workers, 4 kill -9 and restarts", {200}, 30)  # peers served throughout


# --- 3: Redis restarted, and down at start-up --------------------------------------------------


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of the test's own that the test may stop and start, keeping an append-only file."""
    port, workdir = stack.free_port(), tmp_path / "redis"
    workdir.mkdir()
    args = ("--appendonly", "yes", "--appendfsync", "everysec")
    servers = []

    def start():
        servers.append(stack.start_redis(port, str(workdir), workdir / "redis.log", *args))
        return servers[-1]

    yield f"redis://127.0.0.1:{port}/0", start
    for server in servers:
        server.stop()


def readyz(s) -> int:
    return requests.get(s.url + "readyz", timeout=5).status_code


def test_redis_restarted_mid_run_nothing_hangs_and_everything_recovers_by_itself(
    own_redis, resnet_weights, tmp_path, photos
):
    url, start_redis = own_redis
    redis_server = start_redis()
    factory = StackFactory(url, resnet_weights, tmp_path)
    try:
        s = factory(REQUEST_TIMEOUT_S=10, WORKER_TTL_S=5)
        s.start_worker()
        s.start_web()
        s.wait_ready()
        with Traffic(s.url, *photos, rate=RATE) as traffic:
            traffic.wait_for_answers(60, 60)
            redis_server.stop()  # SIGTERM: Redis writes its append-only file and exits
            stopped = time.monotonic()
            assert readyz(s) == 503
            time.sleep(3)
            start_redis()
            wait_for(lambda: readyz(s) == 200, 30)
            recovered_s = time.monotonic() - stopped
            traffic.wait_for_answers(80, 120)
        assert all(service.alive() for service in [s.web, *s.workers])  # nobody was restarted
    finally:
        factory.stop_all()

    assert_books(traffic, s, f"Redis restarted (back in {recovered_s:.1f} s)", {200, 503}, 10)
    after = [r for r in traffic.replies if r.sent > stopped + recovered_s + 1]
    assert after and {r.status for r in after} == {200}


def test_redis_down_at_start_up_then_up_the_stack_comes_ready_by_itself(own_redis, resnet_weights, tmp_path, photos):
    url, start_redis = own_redis
    factory = StackFactory(url, resnet_weights, tmp_path)
    try:
        s = factory(REQUEST_TIMEOUT_S=10)
        s.start_worker()
        s.start_web()
        wait_for(lambda: requests.get(s.url + "healthz", timeout=2).ok, 60)
        wait_for(lambda: "Redis unavailable" in s.worker_logs(), 240)  # the model loaded; Redis refused it
        with Traffic(s.url, *photos, rate=RATE) as traffic:
            response = requests.get(s.url + "readyz", timeout=5)
            assert response.status_code == 503 and "Redis is unavailable" in response.json()["error"]
            time.sleep(10)
            start_redis()
            up = time.monotonic()
            wait_for(lambda: readyz(s) == 200, 30)
            ready_s = time.monotonic() - up
            traffic.wait_for_answers(120, 120)
    finally:
        factory.stop_all()

    assert_books(traffic, s, f"Redis down at start-up (ready {ready_s:.1f} s after it came up)", {200, 503}, 10)
    before = [r for r in traffic.replies if r.sent + r.latency < up]
    assert before and {r.status for r in before} == {503}
    assert max(r.latency for r in before) < 1.0  # refused at once while Redis is down, not held


# --- 4: a stalled worker ----------------------------------------------------------------------


def test_a_stalled_worker_means_504_in_time_and_no_answer_for_the_expired_after_it_wakes(
    make_stack, photos, redis_client
):
    s = make_stack(REQUEST_TIMEOUT_S=5, BATCH_SIZE=8, QUEUE_MAX=64)
    worker = s.start_worker()
    s.start_web()
    s.wait_ready()
    keys = s.keys()
    with Traffic(s.url, *photos, rate=RATE) as traffic:
        traffic.wait_for_answers(60, 60)
        worker.process.send_signal(signal.SIGSTOP)  # its heartbeat thread stops too: after WORKER_TTL_S, 503s
        time.sleep(9)
        worker.process.send_signal(signal.SIGCONT)
        woke = time.monotonic()
        traffic.wait_for_answers(80, 60)

    assert_books(traffic, s, "worker stalled 9 s (SIGSTOP, SIGCONT)", {200, 503, 504}, 5)
    timed_out = [r for r in traffic.replies if r.status == 504]
    assert len(timed_out) >= 10 and all(4.9 <= r.latency <= 5.0 + DEADLINE_SLACK_S for r in timed_out)
    refused = [r for r in traffic.replies if r.status == 503]
    assert refused and all("no model worker" in r.body["error"] for r in refused)  # silent for WORKER_TTL_S
    log = worker.log_text()
    assert expired_or_late(log) >= len(timed_out)  # dropped by the worker, not answered to anyone ...
    assert not set(r.request_id for r in timed_out) & set(re.findall(r"answered (\w+)", log))
    assert not list(redis_client.scan_iter(match=keys.result("*")))  # ... and no answer left lying in Redis
    after = [r for r in traffic.replies if r.sent > woke + 1]
    assert after and {r.status for r in after} == {200}  # and new requests are served


# --- 5: graceful stops -------------------------------------------------------------------------


def test_sigterm_to_the_worker_finishes_its_batch_and_to_gunicorn_finishes_in_flight_requests(
    make_stack, photos, redis_client
):
    s = make_stack(REQUEST_TIMEOUT_S=30, GUNICORN_TIMEOUT_S=60, BATCH_SIZE=16, PIPELINE_DEPTH=3)  # a GPU's auto
    first = s.start_worker()
    s.start_web()
    s.wait_ready()
    keys = s.keys()
    with Traffic(s.url, *photos, rate=RATE) as traffic:
        traffic.wait_for_answers(60, 60)
        stop_holding_a_batch(first, redis_client, keys)
        first.process.send_signal(signal.SIGTERM)
        first.process.send_signal(signal.SIGCONT)
        assert first.process.wait(60) == 0
        second = s.start_worker()
        worker_id(second)
        traffic.wait_for_answers(90, 120)  # 150 in all, however fast the new worker starts

    assert_books(traffic, s, "SIGTERM to the worker mid-batch, then a new one", {200, 503}, 30)
    log = first.log_text()
    finished = re.findall(r"answered (\w+)", log.split("stopping after the batch in hand")[1])
    assert finished, log[-2000:]  # the batch in hand was answered after the signal ...
    ok = {r.request_id for r in traffic.replies if r.status == 200}
    assert set(finished) <= ok  # ... and those requests got their answers
    assert re.search(r"stopped \(0 messages handed back\)", log)

    # gunicorn: hold the answers back (worker stopped), SIGTERM gunicorn with requests in flight.
    second.process.send_signal(signal.SIGSTOP)
    images, expected = photos
    results = {}

    def send(i):
        results[i] = requests.post(s.url + "predict", files={"image": ("p.jpg", images[i])}, timeout=60)

    senders = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in senders:
        t.start()
    queue = ImageQueue(redis_client, s.queue_name())
    wait_for(lambda: queue.status().held >= 8, 30)
    s.web.process.send_signal(signal.SIGTERM)
    time.sleep(1)
    second.process.send_signal(signal.SIGCONT)
    for t in senders:
        t.join(60)
    assert [results[i].status_code for i in range(8)] == [200] * 8
    assert all(same_answer(results[i].json()["predictions"], expected[i]) for i in range(8))
    assert s.web.process.wait(30) == 0


# --- 6: overload -------------------------------------------------------------------------------


def test_twice_the_capacity_for_60_s_rejects_fast_keeps_p99_bounded_and_redis_memory_capped(
    make_stack, photos, redis_client
):
    queue_max, batch = 24, 16
    # WORKER_NICE=19: on these two cores gunicorn must go before the model for 503s to stay under 50 ms
    s = make_stack(REQUEST_TIMEOUT_S=10, QUEUE_MAX=queue_max, BATCH_SIZE=batch, WORKER_NICE=19)
    s.start_worker()
    s.start_web()
    s.wait_ready()
    images, expected = photos
    assert os.getpriority(os.PRIO_PROCESS, s.workers[0].pid) == 19  # WORKER_NICE: gunicorn goes first

    probe = LoadRun(s.url + "predict", images)
    probe.closed_loop(8, duration_s=10)
    capacity = sum(r.outcome == "200" for r in probe.results) / (time.monotonic() - probe.start)

    message = image_queue.encode_message("0" * 32, time.time(), 5, helpers.prepare_image(
        helpers.open_image(images[0], 10**8), (224, 224)))  # fmt: skip
    probe_key = "{" + s.env["IMAGE_QUEUE"] + "}:footprint-probe"
    redis_client.lpush(probe_key, message)
    footprint = redis_client.memory_usage(probe_key)  # one message, as Redis stores it
    redis_client.delete(probe_key)
    # Every key of this queue, measured in one atomic look: the queue, processing lists, results.
    queue_bytes = redis_client.register_script(
        "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do "
        "n = n + redis.call('MEMORY', 'USAGE', k, 'SAMPLES', 0) end return n"
    )
    pattern = "{" + s.queue_name() + "}:*"
    queue = ImageQueue(redis_client, s.queue_name())
    baseline = redis_client.memory_stats()["total.allocated"]
    allocated, held, data, clients, buffers = [baseline], [0], [0], [0], [0]
    sampling = threading.Event()

    def sample():
        while not sampling.wait(0.05):
            memory = redis_client.memory_stats()
            allocated.append(memory["total.allocated"])
            buffers.append(memory["clients.normal"])  # what Redis counts for its clients' buffers
            held.append(queue.status().held)  # waiting plus being processed
            data.append(queue_bytes(args=[pattern]))
            clients.append(redis_client.info("clients")["connected_clients"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with Traffic(s.url, images, expected, rate=2 * capacity) as traffic:
        time.sleep(60)
    sampling.set()
    sampler.join()
    assert len(held) > 100, len(held)  # the sampler ran throughout (a sample that raised would end it early)

    assert_books(traffic, s, f"2x capacity ({2 * capacity:.1f}/s) for 60 s", {200, 503}, 10)
    rejected = sorted(r.latency for r in traffic.replies if r.status == 503)
    accepted = sorted(r.latency for r in traffic.replies if r.status == 200)
    served_rate = len(accepted) / 60
    bound = (queue_max + batch) / capacity + 1.0  # wait behind a full queue and one batch, plus slack
    print(
        f"capacity {capacity:.1f}/s; served {served_rate:.1f}/s; rejects {len(rejected)}: p50 / p95 / p99 "
        f"{percentile(rejected, 50) * 1000:.0f} / {percentile(rejected, 95) * 1000:.0f} / "
        f"{percentile(rejected, 99) * 1000:.0f} ms; accepted {len(accepted)}: p50 {percentile(accepted, 50):.2f} s "
        f"p99 {percentile(accepted, 99):.2f} s (bound {bound:.2f}); Redis held at most {max(held)} messages in "
        f"{max(data) / 1e6:.2f} MB (cap {queue_max} x {footprint / 1e3:.0f} KB = {queue_max * footprint / 1e6:.2f} "
        f"MB); all of Redis +{(max(allocated) - baseline) / 1e6:.1f} MB with the buffers of its {max(clients)} "
        f"connections (clients' buffers at most {max(buffers) / 1e6:.1f} MB)"
    )
    assert len(rejected) > len(traffic.replies) / 4  # it was overloaded ...
    # ... and said so at once: a reject costs the web's own work (the full-queue check) on two cores that the
    # model worker also uses, never a wait for the queue. The typical reject takes a tenth of an accepted
    # answer's wait at most, and 95% of them 150 ms at most; the slowest percent wait for a core while the
    # model runs (OpenVINO's threads at nice 19: 86-228 ms on a 2-core Xeon, below the accepted p50)
    assert percentile(rejected, 50) < percentile(accepted, 50) / 10 and percentile(rejected, 95) < 0.15
    assert percentile(accepted, 99) < bound
    # overload does not collapse throughput; the rejects' web work comes out of the model's two cores (on
    # OpenVINO, 100 answers/s, 2x capacity is 200 requests/s: served 0.80-0.86 of capacity here)
    assert served_rate > 0.7 * capacity
    assert max(held) <= queue_max  # what Redis holds for the queue is capped ...
    assert max(data) <= queue_max * footprint
    # ... and the rest is the I/O buffers of commands in flight, which the number of connections bounds: every
    # request, the rejected too, sends its image in the push that the admit script then takes back, so a connection
    # may hold two messages (the push's argument queued in its MULTI, and the query buffer Redis keeps for reuse
    # until its cron shrinks it), and the worker's claim reply one batch. Seen: +7.8-8.0 MB with 40-41 connections
    # on an AVX2-only EPYC (clients' buffers at most 3.4-3.7 MB); the 3 x cap bound this replaces failed in CI at
    # +12.1 MB over a 3.9 MB cap, its connections not recorded.
    assert max(allocated) - baseline < (queue_max + 2 * max(clients) + batch) * footprint


def test_a_flood_of_huge_images_decodes_two_at_a_time_in_bounded_memory(make_stack, redis_url):
    """16 uploads of 50 megapixels at once: ~600 MB each while it decodes, 8.5 GB if all decode at once."""
    s = make_stack(
        WEB_WORKERS=1, DECODE_SLOTS=2, DECODE_MEGAPIXELS_S=0, REQUEST_TIMEOUT_S=60, GUNICORN_TIMEOUT_S=90
    )  # memory, not budget
    s.start_web()
    wait_for(lambda: requests.get(s.url + "healthz", timeout=2).ok, 60)
    worker = StandInWorker(s.queue(connect(redis_url, 0.2), block_s=0.2))
    huge = encode(Image.new("RGBA", (7000, 7000), (200, 100, 50, 128)), "PNG")  # 49 M pixels in 200 KB
    web_worker = int(subprocess.run(["pgrep", "-P", str(s.web.pid)], capture_output=True, text=True).stdout)

    def rss() -> int:
        return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{web_worker}/status").read_text())[1]) * 1024

    idle = rss()
    peak, samples, sampling = [idle], [], threading.Event()

    def sample():
        while not sampling.wait(0.02):
            peak[0] = max(peak[0], rss())
            samples.append(1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with worker, ThreadPoolExecutor(16) as pool:
        post = lambda _: requests.post(  # noqa: E731
            s.url + "predict", data=huge, headers={"Content-Type": "image/png"}, timeout=120
        )
        statuses = [r.status_code for r in pool.map(post, range(16))]
    sampling.set()
    sampler.join()
    print(
        f"\n16 x 50-megapixel PNGs at once: {statuses.count(200)} answered, web worker peak RSS {peak[0] / 1e6:.0f} MB"
    )
    assert statuses == [200] * 16
    # It sampled throughout, and saw a decode: one 7000 x 7000 RGBA image alone is 196 MB.
    assert len(samples) > 10 and peak[0] - idle > 150e6, (len(samples), idle, peak[0])
    # Two decodes at a time peaked at 851-852 MB (an AMX Xeon and an AMD EPYC), three at 1,165-1,173 MB (the
    # Xeon, DECODE_SLOTS=3), sixteen would take ~8.5 GB: 1 GB tells two from three.
    assert peak[0] < 1.0e9


# --- 7: poison on the queue --------------------------------------------------------------------


def test_poison_planted_on_the_queue_is_logged_and_dropped_and_the_worker_keeps_serving(
    make_stack, photos, redis_client
):
    s = make_stack(REQUEST_TIMEOUT_S=10)
    worker = s.start_worker()
    s.start_web()
    s.wait_ready()
    keys = s.keys()
    pixels = b"\n" + bytes(6)  # the header's end, then 2 x 1 x 3 pixel bytes
    poison = {
        None: [b"not json at all", b"\xff\xfe\x00binary", b"[1, 2, 3]\n", b'{"deadline": 1e18, "top": 5}', b"{}"],
        "wrongshape": b'{"id":"wrongshape","deadline":1e18,"top":5,"shape":[2,3],"dtype":"uint8"}' + pixels,
        "wrongdtype": b'{"id":"wrongdtype","deadline":1e18,"top":5,"shape":[2,1,3],"dtype":"float32"}' + pixels,
        "nopixels": b'{"id":"nopixels","deadline":1e18,"top":5,"shape":[2,1,3],"dtype":"uint8"}',
        "shortdata": b'{"id":"shortdata","deadline":1e18,"top":5,"shape":[224,224,3],"dtype":"uint8"}' + pixels,
        "notop": b'{"id":"notop","deadline":1e18,"shape":[2,1,3],"dtype":"uint8"}' + pixels,
    }
    with Traffic(s.url, *photos, rate=RATE) as traffic:
        traffic.wait_for_answers(40, 60)
        for request_id, raw in poison.items():
            for message in raw if request_id is None else [raw]:
                redis_client.lpush(keys.queue, message)
            time.sleep(0.5)
        traffic.wait_for_answers(120, 120)

    assert_books(traffic, s, "10 poison messages planted on the queue", {200}, 10)
    log = worker.log_text()
    assert log.count("dropping an unusable queue message") == 5 + len(poison) - 1
    assert "Traceback" not in log and worker.alive()
    for request_id in [k for k in poison if k]:  # an id that can be read gets its error answer
        answer = image_queue.decode_answer(redis_client.lpop(keys.result(request_id)))
        assert answer["status"] == 500 and "unusable" in answer["error"], answer
    assert redis_client.llen(keys.queue) == 0 and not holds_a_batch(redis_client, keys)
