"""End to end: real gunicorn, real model-worker processes, real ResNet50 (seeded weights), real photos.

Correctness is shown by comparison: the service must return what the same model, called directly in
this process on the same prepared pixels, returns. Seeded random weights give nearly the same top
labels for every image, so answers are matched on their probabilities, tightly.
"""

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image
from support import ROOT
from support.images import distinct_photos, encode, photo
from support.traffic import PROBABILITY_TOLERANCE, batch_sizes, expected_top5, same_answer, wait_for

from settings import BATCH_TUNE_TOLERANCE
from stack import free_port

pytestmark = pytest.mark.slow

CLIENT_TIMEOUT_S = 120  # longer than any request deadline used here: a hang shows as a failure


def post(url: str, data: bytes, top: int | None = None) -> requests.Response:
    params = {"top": top} if top else None
    return requests.post(url + "predict", files={"image": ("photo.jpg", data)}, params=params, timeout=CLIENT_TIMEOUT_S)


def post_all(url: str, images: list[bytes]) -> list[requests.Response]:
    """All at once, each from its own thread."""
    with ThreadPoolExecutor(len(images)) as pool:
        return list(pool.map(lambda data: post(url, data), images))


@pytest.fixture(scope="module")
def served(make_module_stack):
    """One worker and gunicorn shared by the tests that leave them running as they found them."""
    return make_module_stack.serve(REQUEST_TIMEOUT_S=60, GUNICORN_TIMEOUT_S=90, MAX_UPLOAD_MB=2)


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


def test_with_batch_tune_the_worker_serves_batches_up_to_its_fastest_size_per_image(make_stack, resnet):
    """BATCH_TUNE (on by default): the worker times batches of 1, 2, 4, ..., BATCH_SIZE at warm-up, serves batches
    up to the largest within BATCH_TUNE_TOLERANCE of the fastest per image, and a burst gets its own answers."""
    s = make_stack.serve(BATCH_SIZE=16, BATCH_TUNE="on", REQUEST_TIMEOUT_S=60, GUNICORN_TIMEOUT_S=90)
    log = s.worker_logs()
    tuned, timed = re.search(r"batches of up to (\d+) \(BATCH_TUNE, BATCH_SIZE 16\): ms per image (.*)", log).groups()
    per_image = {int(n): float(ms) for ms, n in re.findall(r"([\d.]+) at (\d+)", timed)}
    tuned, limit = int(tuned), min(per_image.values()) * (1 + BATCH_TUNE_TOLERANCE)
    assert sorted(per_image) == [1, 2, 4, 8, 16] and f"in batches of up to {tuned}," in log
    assert per_image[tuned] <= limit + 0.1 and all(per_image[n] > limit - 0.1 for n in per_image if n > tuned)
    images = distinct_photos(40)
    expected = expected_top5(resnet, images)
    before = len(batch_sizes(s.worker_logs()))

    responses = post_all(s.url, images)

    assert [r.status_code for r in responses] == [200] * 40
    answers = [r.json()["predictions"] for r in responses]
    assert all(same_answer(a, e) for a, e in zip(answers, expected, strict=True))
    sizes = batch_sizes(s.worker_logs())[before:]
    assert sum(sizes) == 40 and max(sizes) <= tuned, (tuned, sizes)


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


# --- No worker (faults under load: test_faults.py) ------------------------------------------


def test_no_worker_means_503_at_once(make_stack):
    s = make_stack()
    s.start_web()
    wait_for(lambda: requests.get(s.url + "healthz", timeout=2).ok, 30)
    started = time.monotonic()
    response = post(s.url, encode(photo("chelsea"), "JPEG"))
    assert response.status_code == 503 and time.monotonic() - started < 1
    assert response.headers["Retry-After"] == "5" and "no model worker" in response.json()["error"]
    assert requests.get(s.url + "readyz", timeout=5).status_code == 503


def test_a_large_upload_refused_before_it_is_read_still_gets_its_503_on_a_kept_alive_connection(make_stack):
    """gunicorn drains only 64 KB of a body the app left unread, then closes the socket with the rest unread,
    and the kernel resets the connection: without the app reading the rest, clients got "Connection
    aborted" instead of the 503 (found with Locust: 29 of 102 requests with coffee.jpg, 72 KB)."""
    s = make_stack()
    s.start_web()
    wait_for(lambda: requests.get(s.url + "healthz", timeout=2).ok, 30)
    data = encode(photo("astronaut"), "PNG")
    assert len(data) > 4 * 64 * 1024
    with requests.Session() as session:  # one connection, kept alive between the requests
        for _ in range(10):
            response = session.post(s.url + "predict", files={"image": ("a.png", data)}, timeout=CLIENT_TIMEOUT_S)
            assert response.status_code == 503 and "no model worker" in response.json()["error"]


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
         "--image", "images/chelsea.jpg", "--image", "images/coffee.jpg", "--json", str(tmp_path / "s.json"),
         "--plot", str(tmp_path / "run.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["sent"] == summary["succeeded"] == 30 and summary["failed"] == {}
    assert "latency p50" in result.stdout and summary["latency_ms"]["p50"] > 0
    # every request ran in one of the batches counted, and its time split adds up to less than its latency
    assert sum(int(size) * n for size, n in summary["batches_by_size"].items()) == 30
    split = summary["time_split_ms"]
    assert set(split) == {"prepare", "queue", "inference", "return"} and split["inference"] > 0
    assert sum(split.values()) <= summary["latency_ms"]["max"]
    assert "batches by size" in result.stdout and "mean time split" in result.stdout
    with Image.open(tmp_path / "run.png") as plot:  # latency over the run + histogram, side by side
        assert plot.format == "PNG" and plot.width > plot.height > 300
