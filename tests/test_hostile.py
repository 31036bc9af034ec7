"""Every case of the hostile corpus (tests/support/hostile_corpus.py) gets its right answer; the service goes on.

A refusal must be its 4xx as JSON {"success": false, "error": ...} naming what is wrong; a valid but
unusual image must be served with its predictions; nothing may be a 5xx; and a good photo sent after
each case must still be answered. The fast tests send the corpus through the Flask app as gunicorn
calls it (the WSGI environ built from the case's exact bytes) with the stand-in worker; the slow test
sends the bytes over a real socket to gunicorn with the real ResNet50 worker.
"""

import http.client
import io
import json
import socket
import threading
import uuid
import warnings
from collections import Counter

import pytest
from flask import Response
from PIL import Image
from support.hostile_corpus import Case, build_corpus, cat_jpeg, png_bomb, upload
from support.stand_in import StandInWorker, app_queue

import helpers
from run_web_server import create_app

MAX_UPLOAD_MB = 2  # small, so the over-limit bodies stay small; the live stack uses the same
MAX_IMAGE_PIXELS = 50_000_000  # the default
PILLOW_DEFAULT_LIMIT = 1024 * 1024 * 1024 // 4 // 3  # Image.MAX_IMAGE_PIXELS as Pillow ships it: 89,478,485
CORPUS = build_corpus(MAX_UPLOAD_MB)
APP_CASES = [case for case in CORPUS if case.app_answers]  # the rest never reach the app: gunicorn answers them
GOOD = upload("good-photo", "the photo sent after every case", cat_jpeg(), status=200)
CLIENT_TIMEOUT_S = 90  # longer than the stack's REQUEST_TIMEOUT_S: a hang shows as a failure

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "Corrupt EXIF data" and the like


def test_the_corpus_is_large_and_spread_over_every_kind_of_answer():
    refused = [case for case in CORPUS if not case.served]
    assert len(refused) >= 50 and sum(case.served for case in CORPUS) >= 20
    assert {case.status for case in refused} >= {400, 404, 405, 413, 415, 414, 431}
    assert all(400 <= case.status < 500 for case in refused)


def assert_right_answer(case: Case, status: int, content_type: str, body: bytes) -> None:
    """The answer the case calls for: its status, and JSON with the words or the predictions; never a 5xx."""
    assert status < 500, f"{case.name}: {status} {body[:300]!r}"
    assert status == case.status, f"{case.name}: {status}, not {case.status}: {body[:300]!r}"
    if not case.app_answers:
        assert content_type.startswith("text/html"), f"{case.name}: gunicorn's page is {content_type}"
        return
    assert content_type == "application/json", f"{case.name}: {content_type} {body[:200]!r}"
    answer = json.loads(body)
    if case.served:
        assert answer["success"] is True and len(answer["predictions"]) == case.predictions, f"{case.name}: {answer}"
    else:
        assert answer["success"] is False and set(answer) == {"success", "error"}, f"{case.name}: {answer}"
        missing = [word for word in case.words if word.lower() not in answer["error"].lower()]
        assert not missing, f"{case.name}: {missing} not in {answer['error']!r}"


# --- Fast: the Flask app, as gunicorn calls it -------------------------------------------------


def wsgi_environ(case: Case) -> dict:
    """The environ gunicorn builds for the case's request: its raw target, headers, and body (de-chunked)."""
    body = case.body[: case.send_only]
    if (case.header("Transfer-Encoding") or "").lower() == "chunked":
        body = dechunk(body)
    environ = {
        "REQUEST_METHOD": case.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": case.path.decode("latin-1"),
        "QUERY_STRING": case.query.decode("latin-1"),
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "5000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,  # as gunicorn sets it
    }
    headers = list(case.headers) + ([("Content-Length", str(len(case.body)))] if case.content_length else [])
    for name, value in headers:
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"] = value
    return environ


def dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if not size:
            return out
        out, rest = out + rest[:size], rest[size + 2 :]


def call_app(app, case: Case) -> tuple[int, str, bytes]:
    response = Response.from_app(app, wsgi_environ(case), buffered=True)
    return response.status_code, response.content_type, response.get_data()


@pytest.fixture(scope="module")
def hostile_app(redis_server):
    """The app configured as the live stack below, with a stand-in worker, shared by the fast cases."""
    app = create_app(
        {
            "REDIS_URL": redis_server["url"],
            "IMAGE_QUEUE": f"q{uuid.uuid4().hex[:10]}",
            "REDIS_BLOCK_S": 0.2,
            "REQUEST_TIMEOUT_S": 5,
            "WORKER_TTL_S": 2.0,
            "MAX_UPLOAD_MB": MAX_UPLOAD_MB,
            "MAX_IMAGE_PIXELS": MAX_IMAGE_PIXELS,
        }
    )
    with StandInWorker(app_queue(app)):
        yield app


@pytest.mark.parametrize("case", APP_CASES, ids=lambda case: case.name)
def test_each_case_gets_its_right_answer_and_the_next_photo_is_served(hostile_app, case):
    helpers.configure_pillow(MAX_IMAGE_PIXELS)  # as create_app left a gunicorn worker; pytest resets warning filters
    assert_right_answer(case, *call_app(hostile_app, case))
    assert_right_answer(GOOD, *call_app(hostile_app, GOOD))


# --- Pillow's decompression-bomb limit ----------------------------------------------------------


def test_pillows_bomb_limit_is_our_setting_and_an_error_not_a_warning(redis_url, queue_name, monkeypatch):
    """Left alone, Pillow only warns between its limit (89 M pixels) and twice it, and decodes anyway."""
    bomb = png_bomb(10_000, 10_000)  # 100 M pixels in 12 KB
    assert PILLOW_DEFAULT_LIMIT < 100_000_000 < 2 * PILLOW_DEFAULT_LIMIT and len(bomb) < 20_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_DEFAULT_LIMIT)  # as Pillow ships; restored afterwards
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        assert Image.open(io.BytesIO(bomb)).size == (10_000, 10_000)  # opened, with a warning
    assert [w.category for w in caught] == [Image.DecompressionBombWarning]

    app = create_app({"REDIS_URL": redis_url, "IMAGE_QUEUE": queue_name, "MAX_IMAGE_PIXELS": 30_000_000})
    assert Image.MAX_IMAGE_PIXELS == 30_000_000  # our setting, set deliberately
    with pytest.raises(Image.DecompressionBombWarning):  # over it but under twice it: an error, not a warning
        Image.open(io.BytesIO(png_bomb(6000, 6000)))  # 36 M pixels
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))
    case = upload(
        "bomb-100M",
        "100 M pixels, which Pillow alone would only warn about",
        bomb,
        status=413,
        words=("more than 30,000,000 pixels",),
    )
    with StandInWorker(app_queue(app)):  # a worker is up, so only the image decides
        assert_right_answer(case, *call_app(app, case))


def test_open_image_refuses_what_pillow_would_let_through_with_a_warning(monkeypatch):
    """Even if the warning filter were lost (another library resetting filters), the pixel check holds."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_DEFAULT_LIMIT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(helpers.ImageTooLarge, match="more than 30,000,000 pixels"):
            helpers.open_image(png_bomb(10_000, 10_000), 30_000_000)


# --- Slow: a real socket to gunicorn with the real model worker ---------------------------------


def send(port: int, case: Case) -> tuple[int, str, bytes]:
    """The case's exact bytes over a new connection; the answer is read while the body is still going out,
    since the service answers an over-limit body without reading it and then closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S) as sock:

        def send_all():
            try:
                sock.sendall(case.request_bytes())
                if case.send_only is not None:
                    sock.shutdown(socket.SHUT_WR)  # the rest of the promised body never comes
            except OSError:
                pass  # the server answered and closed before taking it all

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
        sender.join(CLIENT_TIMEOUT_S)
    return response.status, response.getheader("Content-Type", ""), body


@pytest.fixture(scope="module")
def served(make_module_stack):
    return make_module_stack.serve(MAX_UPLOAD_MB=MAX_UPLOAD_MB, REQUEST_TIMEOUT_S=60, GUNICORN_TIMEOUT_S=90)


@pytest.mark.slow
def test_live_every_case_gets_its_right_answer_never_a_5xx_and_the_next_photo_is_served(served, capsys):
    port = int(served.env["WEB_PORT"])
    failures, statuses = [], Counter()
    for case in CORPUS:
        try:
            status, content_type, body = send(port, case)
            statuses[status] += 1
            assert_right_answer(case, status, content_type, body)
        except (AssertionError, OSError, http.client.HTTPException, ValueError) as exc:
            failures.append(f"{case.name}: {type(exc).__name__}: {exc}")
        try:
            assert_right_answer(GOOD, *send(port, GOOD))
        except (AssertionError, OSError, http.client.HTTPException, ValueError) as exc:
            failures.append(f"the photo after {case.name}: {type(exc).__name__}: {exc}")

    refused = sorted((s, n) for s, n in statuses.items() if s != 200)
    html = [case.name for case in CORPUS if not case.app_answers]
    summary = (
        f"hostile corpus over HTTP: {len(CORPUS)} cases, {sum(n for _, n in refused)} refused "
        f"({', '.join(f'{n} x {s}' for s, n in refused)}), {statuses[200]} served 200, "
        f"5xx={sum(n for s, n in statuses.items() if s >= 500)}; a photo answered after each; "
        f"{len(html)} answered by gunicorn in HTML, not JSON ({', '.join(html)})"
    )
    with capsys.disabled():
        print("\n" + summary)
    assert not failures, "\n".join(failures)
    assert served.web.alive() and all(worker.alive() for worker in served.workers)
    web_log, worker_log = served.web.log_text(), served.worker_logs()
    assert "Traceback" not in web_log and "Traceback" not in worker_log, web_log[-3000:] + worker_log[-3000:]
    assert web_log.count("Booting worker") == int(served.env["WEB_WORKERS"])  # no gunicorn worker died
