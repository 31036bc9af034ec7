"""End to end: real gunicorn, real model-worker processes, real ResNet50 (seeded weights), real photos.

Correctness is shown by comparison: the service must return what the same model, called directly in
this process on the same prepared pixels, returns. Seeded random weights give nearly the same top
labels for every image, so answers are matched on their probabilities, tightly.
"""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from conftest import ROOT, distinct_photos, encode, photo
from PIL import Image

import helpers
from image_queue import Keys
from stack import free_port

pytestmark = pytest.mark.slow

CLIENT_TIMEOUT_S = 120  # longer than any request deadline used here: a hang shows as a failure
PROBABILITY_TOLERANCE = 1e-4  # batched vs single-image inference differ by ~1e-6


def post(url: str, data: bytes, top: int | None = None) -> requests.Response:
    params = {"top": top} if top else None
    return requests.post(url + "predict", files={"image": ("photo.jpg", data)}, params=params, timeout=CLIENT_TIMEOUT_S)


def post_all(url: str, images: list[bytes]) -> list[requests.Response]:
    """All at once, each from its own thread."""
    with ThreadPoolExecutor(len(images)) as pool:
        return list(pool.map(lambda data: post(url, data), images))


def expected_top5(resnet, images: list[bytes]) -> list[list[dict]]:
    """The model's own answer for each image, from the same prepared pixels."""
    pixels = np.stack([helpers.prepare_image(helpers.open_image(d, 10**8), resnet.input_size[::-1]) for d in images])
    return [resnet.top_k(p, 5) for p in resnet.predict(pixels)]


def same_answer(served: list[dict], expected: list[dict]) -> bool:
    return [p["label"] for p in served] == [p["label"] for p in expected] and np.allclose(
        [p["probability"] for p in served], [p["probability"] for p in expected], atol=PROBABILITY_TOLERANCE, rtol=0
    )


def batch_sizes(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"batch of (\d+) in", log)]


def answered_ids(log: str) -> list[str]:
    return re.findall(r"answered ([0-9a-f]{32})", log)


@pytest.fixture(scope="module")
def served(make_module_stack):
    """One worker and gunicorn shared by the tests that leave them running as they found them."""
    s = make_module_stack(REQUEST_TIMEOUT_S=60, MAX_UPLOAD_MB=2)
    s.start_worker()
    s.start_web()
    s.wait_ready()
    return s


# --- Correctness ------------------------------------------------------------------------------


def test_served_top5_is_the_models_own_top5(served, resnet):
    images = [encode(photo("chelsea"), "JPEG"), encode(photo("coffee"), "PNG")]
    for data, expected in zip(images, expected_top5(resnet, images), strict=True):
        response = post(served.url, data)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["success"] is True and len(body["predictions"]) == 5
        assert same_answer(body["predictions"], expected), (body["predictions"], expected)


def test_50_concurrent_requests_each_get_their_own_images_answer_in_shared_batches(served, resnet):
    images = distinct_photos(50)
    expected = expected_top5(resnet, images)
    # The comparison can tell the images apart: every other image's answer is far outside the tolerance.
    vectors = np.array([[p["probability"] for p in e] for e in expected])
    nearest = min(np.abs(vectors[i] - vectors[j]).max() for i in range(50) for j in range(50) if i != j)
    assert nearest > 10 * PROBABILITY_TOLERANCE
    before = len(batch_sizes(served.worker_logs()))

    responses = post_all(served.url, images)

    assert [r.status_code for r in responses] == [200] * 50
    mixed_up = [
        i
        for i, (r, e) in enumerate(zip(responses, expected, strict=True))
        if not same_answer(r.json()["predictions"], e)
    ]
    assert mixed_up == []
    sizes = batch_sizes(served.worker_logs())[before:]
    assert sum(sizes) == 50 and max(sizes) > 1, sizes  # batched, and every image ran exactly once


def test_bad_uploads_through_gunicorn_get_4xx_and_the_service_keeps_serving(served):
    good = encode(photo("chelsea"), "JPEG")
    bomb = encode(Image.new("1", (20000, 20000)), "PNG")  # 400 megapixels in a small file
    cases = [
        (lambda: post(served.url, b"this is text, not a jpeg"), 400),
        (lambda: post(served.url, good[: len(good) // 2]), 400),
        (lambda: post(served.url, b"<svg xmlns='http://www.w3.org/2000/svg'/>"), 415),
        (lambda: post(served.url, bomb), 413),
        (
            lambda: requests.post(
                served.url + "predict",
                data=b"\xff" * (3 * 1024 * 1024),
                headers={"Content-Type": "image/jpeg"},
                timeout=30,
            ),
            413,
        ),
        (lambda: requests.get(served.url + "predict", timeout=30), 405),
        (lambda: requests.post(served.url + "predict", files={"file": ("x.jpg", good)}, timeout=30), 400),
    ]
    for send, status in cases:
        response = send()
        assert response.status_code == status, response.text
        assert response.headers["Content-Type"] == "application/json" and response.json()["success"] is False
        assert post(served.url, good).status_code == 200


def test_a_raw_body_and_top_k_through_gunicorn(served, resnet):
    data = encode(photo("astronaut"), "JPEG")
    response = requests.post(
        served.url + "predict?top=3", data=data, headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    assert response.status_code == 200
    assert same_answer(response.json()["predictions"], expected_top5(resnet, [data])[0][:3])


# --- Several workers, and workers that die or stall ------------------------------------------


def test_two_workers_on_one_queue_answer_every_request_exactly_once(make_stack, resnet):
    s = make_stack(REQUEST_TIMEOUT_S=90, BATCH_SIZE=8)
    s.start_worker()
    s.start_worker()
    s.start_web()
    s.wait_ready()
    images = distinct_photos(60)
    expected = expected_top5(resnet, images)

    responses = post_all(s.url, images)

    assert [r.status_code for r in responses] == [200] * 60
    assert all(same_answer(r.json()["predictions"], e) for r, e in zip(responses, expected, strict=True))
    per_worker = [answered_ids(w.log_text()) for w in s.workers]
    everything = per_worker[0] + per_worker[1]
    assert sorted(everything) == sorted(r.headers["X-Request-ID"] for r in responses)  # each exactly once
    assert all(per_worker), [len(ids) for ids in per_worker]  # both took a share


def test_kill_9_mid_batch_loses_nothing(make_stack, resnet, redis_client):
    s = make_stack(REQUEST_TIMEOUT_S=90, WORKER_TTL_S=3, BATCH_SIZE=16)
    victim = s.start_worker()
    s.start_web()
    s.wait_ready()
    keys = Keys(s.env["IMAGE_QUEUE"])
    images = distinct_photos(24)
    expected = expected_top5(resnet, images)
    results: list = []
    sender = threading.Thread(target=lambda: results.extend(post_all(s.url, images)))
    sender.start()
    held = wait_for(lambda: sum(redis_client.llen(k) for k in redis_client.scan_iter(match=keys.processing("*"))), 60)
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()

    time.sleep(3.5)  # the dead worker's heartbeat is now stale
    started = time.monotonic()
    refused = post(s.url, images[0])
    assert refused.status_code == 503 and time.monotonic() - started < 1 and refused.headers["Retry-After"]

    rescuer = s.start_worker()
    sender.join(CLIENT_TIMEOUT_S)
    assert not sender.is_alive()
    assert [r.status_code for r in results] == [200] * 24  # answered within the deadline, none lost
    assert all(same_answer(r.json()["predictions"], e) for r, e in zip(results, expected, strict=True))
    requeued = [int(n) for n in re.findall(r"requeued its (\d+) messages", rescuer.log_text())]
    assert requeued and requeued[0] >= held > 0
    assert redis_client.llen(keys.queue) == 0
    assert not [k for k in redis_client.scan_iter(match=keys.processing("*")) if redis_client.llen(k)]


def test_stalled_worker_means_504_in_time_and_a_full_queue_503_at_once(make_stack, redis_client):
    s = make_stack(REQUEST_TIMEOUT_S=4, WORKER_TTL_S=60, QUEUE_MAX=3)
    worker = s.start_worker()
    s.start_web()
    s.wait_ready()
    keys = Keys(s.env["IMAGE_QUEUE"])
    good = encode(photo("chelsea"), "JPEG")
    assert post(s.url, good).status_code == 200

    worker.process.send_signal(signal.SIGSTOP)
    waiting, results = [], {}

    def send(i):
        started = time.monotonic()
        results[i] = (post(s.url, good), time.monotonic() - started)

    for i in range(6):  # the stopped worker may still take one; the queue holds three more
        waiting.append(threading.Thread(target=send, args=(i,)))
        waiting[-1].start()
        time.sleep(0.3)
    for t in waiting:
        t.join(30)
    statuses = sorted(r.status_code for r, _ in results.values())
    assert statuses.count(503) >= 2 and set(statuses) == {503, 504}, statuses
    for response, took in results.values():
        if response.status_code == 503:
            assert took < 0.5 and response.headers["Retry-After"] == "1" and "queue" in response.json()["error"]
        else:
            assert 3.9 < took < 4.5, took  # 504 at the deadline, not later

    worker.process.send_signal(signal.SIGCONT)
    assert post(s.url, good).status_code == 200  # it serves again at once
    expired = sum(int(n) for n in re.findall(r"(\d+) expired in queue", worker.log_text()))
    assert expired == statuses.count(504)  # expired requests were dropped, not run
    assert not list(redis_client.scan_iter(match=keys.result("*")))  # and no answer was sent for them


def test_no_worker_means_503_at_once(make_stack):
    s = make_stack()
    s.start_web()
    wait_for(lambda: requests.get(s.url + "healthz", timeout=2).ok, 30)
    started = time.monotonic()
    response = post(s.url, encode(photo("chelsea"), "JPEG"))
    assert response.status_code == 503 and time.monotonic() - started < 1
    assert response.headers["Retry-After"] == "5" and "no model worker" in response.json()["error"]
    assert requests.get(s.url + "readyz", timeout=5).status_code == 503


# --- helpers ------------------------------------------------------------------------------------


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


# --- The clients against the live service -------------------------------------------------------


def test_simple_request_prints_the_predictions_and_fails_loudly(served, tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "simple_request.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
        )

    ok = run("images/chelsea.jpg", "--url", served.url + "predict", "--top", "3")
    assert ok.returncode == 0 and len(ok.stdout.strip().splitlines()) == 3 and ok.stdout.startswith("1. ")
    (tmp_path / "notes.jpg").write_text("not a photo")
    bad = run(str(tmp_path / "notes.jpg"), "--url", served.url + "predict")
    assert bad.returncode == 1 and "HTTP 400" in bad.stderr
    unreachable = run("images/chelsea.jpg", "--url", f"http://127.0.0.1:{free_port()}/predict")
    assert unreachable.returncode == 1 and "error:" in unreachable.stderr


def test_stress_test_waits_for_every_answer_and_summarises(served, tmp_path):
    result = subprocess.run(
        [sys.executable, "stress_test.py", "--url", served.url + "predict", "--count", "30", "--spacing", "0.02",
         "--image", "images/chelsea.jpg", "--image", "images/coffee.jpg", "--json", str(tmp_path / "s.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["sent"] == summary["succeeded"] == 30 and summary["failed"] == {}
    assert "latency p50" in result.stdout and summary["latency_ms"]["p50"] > 0
