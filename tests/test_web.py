"""The Flask app against a real Redis, with a stand-in worker speaking the real queue protocol.

Fast: no model. The stand-in answers with a checksum of the pixels it received, so these tests also
show that what the web side prepared is exactly what a worker gets.
"""

import io
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from support import ROOT
from support.hostile_corpus import BOUNDARY, MULTIPART, multipart
from support.images import encode, photo
from support.stand_in import CAT, MODEL, StandInWorker, app_queue, assert_json_error, expected_checksum, post_image
from werkzeug.test import EnvironBuilder

import helpers
import image_queue
import run_web_server


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def worker(app):
    with StandInWorker(app_queue(app)) as w:
        yield w


# --- Serving ----------------------------------------------------------------------------------


def test_predict_returns_the_seed_shape_with_the_workers_answer(client, worker):
    response = post_image(client)
    assert response.status_code == 200 and response.json["success"] is True
    predictions = response.json["predictions"]
    assert len(predictions) == 5 and set(predictions[0]) == {"label", "probability", "index"}
    assert predictions[0]["label"] == expected_checksum(CAT)  # the worker saw exactly these pixels
    assert set(response.json) == {"success", "predictions"}  # the seed's shape, nothing else
    assert len(response.headers["X-Request-ID"]) == 32
    timing = dict(
        part.split(";dur=") for part in re.sub(r';desc="[^"]*"', "", response.headers["Server-Timing"]).split(", ")
    )
    assert set(timing) == {"prepare", "wait", "queue", "inference", "return", "total"}
    ms = {name: float(value) for name, value in timing.items()}
    assert ms["inference"] == 12.5 and min(ms.values()) >= 0
    assert abs(ms["prepare"] + ms["wait"] - ms["total"]) <= 0.2
    # the wait splits into queue + inference + return, unless the fake's 12.5 ms exceeds the real wait
    assert ms["queue"] + ms["inference"] + ms["return"] == pytest.approx(max(ms["wait"], ms["inference"]), abs=0.2)
    assert 'desc="batch of 1"' in response.headers["Server-Timing"]


def test_server_timing_splits_the_wait_into_queue_inference_and_return():
    from run_web_server import server_timing

    now = time.monotonic()  # arrived 300 ms ago, queued 200 ms ago at 1000.0 on the Redis clock
    answer = {"inference_ms": 100.0, "batch_size": 4, "claimed": 1000.05}  # taken 50 ms after it was queued
    header = server_timing(now - 0.3, now - 0.2, 1000.0, answer)
    ms = dict((part.split(";")[0], float(part.split("dur=")[1].split(";")[0])) for part in header.split(", "))
    assert list(ms) == ["prepare", "wait", "queue", "inference", "return", "total"]
    assert ms["prepare"] == pytest.approx(100, abs=1) and ms["queue"] == pytest.approx(50, abs=0.1)
    assert ms["return"] == pytest.approx(ms["wait"] - 150, abs=0.2) and ms["total"] == pytest.approx(300, abs=2)
    assert 'inference;dur=100.0;desc="batch of 4"' in header
    # a claim time off the clocks' edges never makes a negative or oversized part
    late = server_timing(now - 0.3, now - 0.2, 1000.0, {**answer, "claimed": 1005.0})
    late_ms = dict((part.split(";")[0], float(part.split("dur=")[1].split(";")[0])) for part in late.split(", "))
    assert late_ms["queue"] == pytest.approx(late_ms["wait"] - 100, abs=0.2) and late_ms["return"] == 0.0
    # an older worker sends no claim time: no split, the rest unchanged
    assert "queue" not in server_timing(now - 0.3, now - 0.2, 1000.0, {"inference_ms": 100.0, "batch_size": 4})


def test_a_raw_image_body_works_too(client, worker):
    response = client.post("/predict", data=CAT, content_type="image/jpeg")
    assert response.status_code == 200 and response.json["predictions"][0]["label"] == expected_checksum(CAT)


@pytest.mark.parametrize("top", [1, 3, 20])
def test_top_k_is_honoured(client, worker, top):
    response = post_image(client, query=f"?top={top}")
    assert response.status_code == 200 and len(response.json["predictions"]) == top


@pytest.mark.parametrize("top", ["0", "21", "-1", "five", "", "²", "٣", "1" * 5000])
def test_bad_top_is_400(client, top):
    assert_json_error(post_image(client, query=f"?top={top}"), 400, "top must be")


def test_concurrent_requests_each_get_their_own_answer_in_shared_batches(app, worker):
    images = [encode(photo("coffee").rotate(angle), "PNG") for angle in range(0, 360, 18)]
    results = [None] * len(images)

    def call(i):
        results[i] = post_image(app.test_client(), images[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [r.status_code for r in results] == [200] * len(images)
    assert [r.json["predictions"][0]["label"] for r in results] == [expected_checksum(d) for d in images]
    assert len(set(expected_checksum(d) for d in images)) == len(images)  # the images really differ
    assert max(worker.batches) > 1  # concurrent requests shared batches


# --- Refusals ---------------------------------------------------------------------------------


def test_no_worker_is_503_at_once_with_retry_after(client):
    started = time.monotonic()
    response = post_image(client)
    assert_json_error(response, 503, "no model worker")
    assert response.headers["Retry-After"] == "5" and time.monotonic() - started < 0.5


def test_a_request_right_after_the_last_worker_left_is_503_at_once_though_the_status_is_reused(
    app, client, monkeypatch
):
    """Requests reuse a status read within STATUS_REUSE_S; the push itself re-checks the workers, so a request
    in that window does not wait out its deadline for a worker that has gone."""
    monkeypatch.setattr(run_web_server, "STATUS_REUSE_S", 60.0)  # the window surely covers the second request
    with StandInWorker(app_queue(app)) as worker:
        assert post_image(client).status_code == 200  # the status read here is open: reused for a moment
    app_queue(app).unregister(worker.worker_id)  # a graceful stop: the worker leaves the set at once
    reads, refusals = [], []
    status, enqueue = image_queue.ImageQueue.status, image_queue.ImageQueue.enqueue

    def counted_status(self, *args, **kwargs):
        reads.append(1)
        return status(self, *args, **kwargs)

    def recorded_enqueue(self, *args, **kwargs):
        try:
            return enqueue(self, *args, **kwargs)
        except image_queue.NoWorker as exc:
            refusals.append(exc)
            raise

    monkeypatch.setattr(image_queue.ImageQueue, "status", counted_status)
    monkeypatch.setattr(image_queue.ImageQueue, "enqueue", recorded_enqueue)
    started = time.monotonic()
    response = post_image(client)
    assert_json_error(response, 503, "no model worker")
    assert response.headers["Retry-After"] == "5" and time.monotonic() - started < 0.5
    assert reads == [] and len(refusals) == 1  # the reused status let it through; the push itself refused it
    assert app_queue(app).redis.llen(app_queue(app).keys.queue) == 0  # its message was taken off again


def test_a_full_queue_is_503_at_once_with_retry_after(make_app, redis_client):
    app = make_app(QUEUE_MAX=4)
    client, queue = app.test_client(), app_queue(app)
    queue.heartbeat("busy-elsewhere", MODEL)  # alive, but not taking anything
    for i in range(4):
        queue.enqueue(f"waiting{i}".encode())
    started = time.monotonic()
    response = post_image(client)
    assert_json_error(response, 503, "queue holds 4")
    assert response.headers["Retry-After"] == "1" and time.monotonic() - started < 0.5
    assert redis_client.llen(queue.keys.queue) == 4


def test_a_stalled_worker_means_504_at_the_deadline(app, client):
    app_queue(app).heartbeat("stalled", MODEL)  # fresh heartbeat, never claims
    started = time.monotonic()
    response = post_image(client)
    assert_json_error(response, 504, "no answer within 1.5 s")
    assert 1.4 < time.monotonic() - started < 1.5 + 0.3


def test_redis_down_is_503_not_a_hang(make_app):
    from stack import free_port

    app = make_app(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    response = post_image(app.test_client())
    assert_json_error(response, 503, "Redis is unavailable")
    assert time.monotonic() - started < 5
    assert app.test_client().get("/readyz").status_code == 503


def test_a_worker_error_keeps_its_status(app, client):
    with StandInWorker(app_queue(app), error=(500, "the model failed on this request's batch")):
        assert_json_error(post_image(client), 500, "the model failed")


def test_a_503_from_the_worker_says_when_to_retry(app, client):
    with StandInWorker(app_queue(app), error=(503, "the image was prepared for another model")):
        response = post_image(client)
    assert_json_error(response, 503, "another model")
    assert response.headers["Retry-After"] == "1"


def test_a_full_queue_is_refused_before_the_upload_is_read(make_app, monkeypatch):
    app = make_app(QUEUE_MAX=1)
    queue = app_queue(app)
    queue.heartbeat("busy-elsewhere", MODEL)
    queue.enqueue(b"waiting")
    for reader in ("read_body", "parse_form"):
        monkeypatch.setattr(run_web_server, reader, lambda *a: pytest.fail("read an upload it could not queue"))
    monkeypatch.setattr(helpers, "open_image", lambda *a: pytest.fail("opened an image it could not queue"))
    monkeypatch.setattr(helpers, "prepare_image", lambda *a: pytest.fail("decoded an image it could not queue"))
    assert_json_error(post_image(app.test_client()), 503, "queue holds 1")
    raw = app.test_client().post("/predict", data=CAT, content_type="image/jpeg")
    assert_json_error(raw, 503, "queue holds 1")  # a raw body too


def test_decode_slots_bound_how_many_images_one_process_decodes_at_once(make_app, monkeypatch):
    app = make_app(DECODE_SLOTS=2, REQUEST_TIMEOUT_S=5)
    real, inside, most, lock = helpers.prepare_image, [0], [0], threading.Lock()

    def slow_prepare(*args):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.2)
        with lock:
            inside[0] -= 1
        return real(*args)

    monkeypatch.setattr(helpers, "prepare_image", slow_prepare)
    with StandInWorker(app_queue(app)), ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: post_image(app.test_client()).status_code, range(6)))
    assert statuses == [200] * 6 and most[0] == 2  # all served, never more than two decoding


def test_no_decode_slot_free_by_the_deadline_is_503_with_retry_after(app, client, worker):
    app.extensions["decode_slots"].acquire()  # a huge image is decoding
    app.extensions["decode_slots"].acquire()
    started = time.monotonic()
    response = post_image(client)
    assert_json_error(response, 503, "decoders stayed busy")
    assert response.headers["Retry-After"] == "1" and 1.4 < time.monotonic() - started < 4


def test_an_upload_that_is_no_image_of_ours_is_refused_at_once_while_every_decoder_is_busy(app, client, worker):
    """Headers are read under a decode slot; text, or a format we do not decode, need not wait for one."""
    icon = io.BytesIO()
    Image.new("RGB", (16, 16)).save(icon, "ICO")
    app.extensions["decode_slots"].acquire()
    app.extensions["decode_slots"].acquire()
    started = time.monotonic()
    text = post_image(client, b"these are not the pixels")
    ico = post_image(client, icon.getvalue())
    assert_json_error(text, 400, "not an image")
    assert_json_error(ico, 415, "ICO images are not supported")
    assert time.monotonic() - started < 1


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        # an empty file as curl, requests and browsers send it (werkzeug's test client leaves out the CRLF that
        # ends an empty part's body, which only werkzeug's own parser accepted)
        ({"data": multipart(("image", b"empty.jpg", "image/jpeg", b"")), "content_type": MULTIPART}, 400, "empty"),
        ({"data": {"image": (io.BytesIO(b"just text"), "photo.jpg")}}, 400, "not an image"),
        ({"data": {"image": (io.BytesIO(CAT[:3000]), "cut.jpg")}}, 400, "truncated"),
        ({"data": {"photo": (io.BytesIO(CAT), "cat.jpg")}}, 400, "no 'image' field"),
        ({"data": {"image": [(io.BytesIO(CAT), "a.jpg"), (io.BytesIO(CAT), "b.jpg")]}}, 400, "one image"),
        ({"data": b"{}", "content_type": "application/json"}, 400, "no image"),
        ({"data": b"<svg xmlns='http://www.w3.org/2000/svg'/>", "content_type": "image/svg+xml"}, 415, "SVG"),
        ({"data": encode(Image.new("RGB", (16, 16)), "ICO"), "content_type": "image/x-icon"}, 415, "ICO"),
        ({"data": b"\xff" * (1024 * 1024 + 1), "content_type": "image/jpeg"}, 413, "larger than 1 MB"),
        ({"data": encode(Image.new("1", (3000, 3000)), "PNG"), "content_type": "image/png"}, 413, "pixels"),
    ],
)
def test_bad_uploads_get_a_clear_4xx_and_the_next_good_request_is_served(client, worker, kwargs, status, words):
    assert_json_error(client.post("/predict", **kwargs), status, words)
    assert post_image(client).status_code == 200


class CountedReads:
    """A wsgi.input that counts the reads the app makes of it."""

    def __init__(self, stream):
        self.stream, self.reads = stream, []

    def read(self, size=-1):
        data = self.stream.read(size)
        self.reads.append(len(data))
        return data

    def readinto(self, buffer):
        size = self.stream.readinto(buffer)
        self.reads.append(size)
        return size

    def __getattr__(self, name):  # the rest as the stream has it
        return getattr(self.stream, name)


def counted_upload(client, **builder_options):
    """POST /predict (werkzeug's EnvironBuilder options: data, content_type), counting the body's reads."""
    environ = EnvironBuilder(path="/predict", method="POST", **builder_options).get_environ()
    environ["wsgi.input"] = counted = CountedReads(environ["wsgi.input"])
    return client.open(environ), counted


def test_an_upload_is_read_in_large_pieces_not_64_kb_ones(make_app, worker):
    """werkzeug reads a body 64 KB at a time; gunicorn answers each read from a read-ahead buffer of up to
    1 MB that it copies whole each time, so a large upload cost the web far more CPU than its size: a body of
    known length, form or raw, is read in one call."""
    noise = np.random.default_rng(3).integers(0, 256, (700, 1000, 3), dtype=np.uint8)
    big = encode(Image.fromarray(noise), "PNG")  # ~2.1 MB, incompressible
    client = make_app(MAX_UPLOAD_MB=4).test_client()
    response, counted = counted_upload(client, data={"image": (io.BytesIO(big), "big.png")})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert len(big) > 2 * 2**20 and sum(counted.reads) > len(big)
    assert len(counted.reads) == 1, counted.reads  # the whole form in one read (werkzeug: 64 KB at a time, ~34 reads)
    assert response.json["predictions"][0]["label"] == expected_checksum(big)  # what the worker got: the image

    response, counted = counted_upload(client, data=big, content_type="image/png")
    assert response.status_code == 200 and counted.reads == [len(big)]  # one read of the declared length


class Trickle:
    """A wsgi.input that hands out at most size bytes per read, as a WSGI server may."""

    def __init__(self, data: bytes, size: int = 1000):
        self.data, self.size = io.BytesIO(data), size

    def read(self, want: int = -1) -> bytes:
        return self.data.read(self.size if want < 0 else min(self.size, want))


def test_a_body_is_read_whole_however_the_server_hands_it_out():
    assert run_web_server.read_exactly(Trickle(b"x" * 4500), 4500) == b"x" * 4500
    assert run_web_server.read_exactly(Trickle(b"x" * 4500), 9000) == b"x" * 4500  # ended first: what there is
    assert run_web_server.read_exactly(Trickle(b""), 10) == b""


def test_a_form_is_parsed_whole_however_the_server_hands_it_out(make_app):
    """The parts come out byte for byte when the body arrives a few bytes at a time, and when the image's own
    bytes contain the start of a delimiter, with a Content-Length or chunked; only the 'image' fields' bytes
    are kept."""
    tricky = b"\xff\xd8\xff" + b"\r\n--" + BOUNDARY.encode()[:-1] + b"\r\n--\r\n" + bytes(range(256)) * 40
    parts = ("note", None, None, b"hello"), ("image", b"cat.jpg", "image/jpeg", tricky), ("", b"t", None, b"x")
    body, app = multipart(*parts), make_app()
    for size in (1, 7, 4096, len(body)):
        environ = EnvironBuilder(path="/predict", method="POST").get_environ()
        environ.update({"wsgi.input": Trickle(body, size), "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": MULTIPART})
        with app.request_context(environ):
            assert run_web_server.parse_form() == [("note", False, b""), ("image", True, tricky), ("", True, b"")]
        del environ["CONTENT_LENGTH"]  # chunked: read until the server ends the stream
        environ.update({"wsgi.input": Trickle(body, size), "wsgi.input_terminated": True})
        with app.request_context(environ):
            assert run_web_server.parse_form() == [("note", False, b""), ("image", True, tricky), ("", True, b"")]


def test_a_form_of_exactly_the_upload_limit_is_served(make_app, worker):
    """Under gunicorn (wsgi.input_terminated) werkzeug bounds the stream by the upload limit, not by
    Content-Length: a form is read once, so one of exactly MAX_UPLOAD_MB is not refused as too large."""
    head = multipart(("image", b"cat.jpg", "image/jpeg", CAT), ("note", None, None, b""))
    body = multipart(("image", b"cat.jpg", "image/jpeg", CAT), ("note", None, None, b"x" * (2**20 - len(head))))
    client = make_app(MAX_UPLOAD_MB=1).test_client()
    gunicorn_like = {"wsgi.input_terminated": True}
    response = client.post("/predict", data=body, content_type=MULTIPART, environ_overrides=gunicorn_like)
    assert len(body) == 2**20 and response.status_code == 200, response.get_data(as_text=True)
    response = client.post("/predict", data=body + b"x", content_type=MULTIPART, environ_overrides=gunicorn_like)
    assert_json_error(response, 413, "larger than 1 MB")


class TimeoutsSet:
    """Stands in for gunicorn's socket (environ["gunicorn.socket"]): the timeouts drain_unread_body sets on it."""

    def __init__(self):
        self.timeouts = []

    def settimeout(self, seconds):
        self.timeouts.append(seconds)


def test_a_body_read_to_its_end_is_not_drained_and_one_left_unread_is(client, worker):
    """drain_unread_body reads what a refused upload left unread (gunicorn would reset the connection); a body
    already read makes no socket call at all."""
    form = multipart(("image", b"cat.jpg", "image/jpeg", CAT))
    for data, content_type in ((CAT, "image/jpeg"), (form, MULTIPART)):
        sock = TimeoutsSet()
        overrides = {"gunicorn.socket": sock, "wsgi.input_terminated": True}
        response = client.post("/predict", data=data, content_type=content_type, environ_overrides=overrides)
        assert response.status_code == 200 and sock.timeouts == []
        sock = TimeoutsSet()
        overrides = {"gunicorn.socket": sock, "wsgi.input_terminated": True}
        response = client.post("/predict?top=0", data=data, content_type=content_type, environ_overrides=overrides)
        assert response.status_code == 400 and len(sock.timeouts) >= 2 and sock.timeouts[-1] is None  # drained


def test_a_form_costs_no_regular_expression_per_request(make_app, monkeypatch):
    """werkzeug's form parser compiled a regular expression for each request's boundary, and boundaries differ
    from one request to the next, so Python's regex cache never helped: ~0.4 ms of a /predict's web CPU."""
    app, compiled = make_app(), []
    real_compile = re.compile
    monkeypatch.setattr(re, "compile", lambda *args, **kwargs: compiled.append(args) or real_compile(*args, **kwargs))
    for n in range(20):
        boundary = f"----request{n}"
        body = multipart(("image", b"cat.jpg", "image/jpeg", CAT), boundary=boundary)
        content_type = f"multipart/form-data; boundary={boundary}"
        with app.test_request_context("/predict", method="POST", data=body, content_type=content_type):
            assert run_web_server.parse_form() == [("image", True, CAT)]
    assert compiled == []


def test_wrong_method_and_unknown_path_are_json(client):
    response = client.get("/predict")
    assert_json_error(response, 405, "not allowed")
    assert "POST" in response.headers["Allow"]
    assert_json_error(client.get("/nowhere"), 404, "not found")


# --- Health and welcome -----------------------------------------------------------------------


def test_health_readiness_and_welcome(client):
    assert client.get("/healthz").json == {"status": "ok"}
    assert_json_error(client.get("/readyz"), 503, "no model worker")
    welcome = client.get("/")
    assert welcome.status_code == 200 and "curl -X POST -F image=@photo.jpg" in welcome.get_data(as_text=True)


def test_ready_once_a_worker_heartbeats(client, worker):
    body = client.get("/readyz").json
    assert (
        body["ready"] is True
        and body["workers"] == 1
        and body["model"] == {"name": "StandIn", "width": 48, "height": 32, "classes": 2}
    )
    assert body["models"] == {
        "standin": {"ready": True, **{k: v for k, v in body.items() if k not in ("ready", "models")}}
    }


def test_the_web_side_never_imports_tensorflow_or_keras():
    code = (
        "import sys, run_web_server, runpy; runpy.run_path('keras_rest_api_app.wsgi'); "
        "import gunicorn_conf; heavy = [m for m in ('tensorflow', 'keras', 'jax', 'torch') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_decode_work_per_process_is_budgeted_a_flat_png_bomb_is_refused_undecoded(make_app, monkeypatch):
    """A 4-megapixel flat PNG is a few KB: DECODE_SLOTS alone would decode one after another for anyone
    who sends them. With a budget of 1 MP/s (burst 5 MP, MAX_IMAGE_PIXELS here), the first decodes, the
    second gets 503 + Retry-After at once without being decoded, and a photo still fits."""
    flat = encode(Image.new("RGB", (2000, 2000), (200, 100, 50)), "PNG")
    assert len(flat) < 50_000
    app = make_app(DECODE_MEGAPIXELS_S=1)
    client = app.test_client()
    decoded = []
    prepare = helpers.prepare_image
    monkeypatch.setattr(
        helpers, "prepare_image", lambda image, size: decoded.append(image.size) or prepare(image, size)
    )
    with StandInWorker(app_queue(app)):
        assert post_image(client, flat).status_code == 200
        refused = post_image(client, flat)
        assert post_image(client, CAT).status_code == 200  # 451 x 300 at most: within what is left
    assert_json_error(refused, 503, "DECODE_MEGAPIXELS_S")
    assert refused.headers["Retry-After"]
    assert len(decoded) == 2 and decoded[0] == (2000, 2000) and decoded[1] != (2000, 2000)  # the refused: never


def test_a_jpeg_counts_at_the_scale_it_decodes_at():
    big = Image.open(io.BytesIO(encode(photo().resize((2000, 1500)))))
    assert helpers.decoded_pixels(big, (224, 224)) == 500 * 375  # 1/4 scale still covers 224
    assert helpers.decoded_pixels(Image.open(io.BytesIO(encode(photo(), "PNG"))), (224, 224)) == 451 * 300
