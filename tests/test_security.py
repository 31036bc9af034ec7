"""Security: API keys, the per-client rate limit, Redis with a password and over TLS, the upload limit
enforced before the body is read, the loopback default bind, and no pickle anywhere.

The key and rate-limit tests use the Flask test client against the session's real Redis with a stand-in
worker (tests/test_web.py). Where the issue asks for the real thing they start it: password-protected
and TLS redis-servers (a throwaway CA made with the openssl command), a real gunicorn spoken to over a
raw socket, and a real model worker process.
"""

import ast
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest
import redis
import requests
from support import ROOT
from support.stand_in import CAT, StandInWorker, assert_json_error, expected_checksum, post_image

import stack
from image_queue import ImageQueue, connect
from run_web_server import DRAIN_S, OPEN_PATHS, create_app

KEY_A, KEY_B = secrets.token_hex(16), secrets.token_hex(16)
PASSWORD = secrets.token_urlsafe(18)  # the test Redis servers' requirepass


@pytest.fixture
def make_app(make_app):
    """conftest's make_app with a 3 s deadline; the security settings are the caller's."""
    return lambda **config: make_app(**({"REQUEST_TIMEOUT_S": 3.0} | config))


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


class UnreadBody(io.BytesIO):
    """A request body that records whether anything read it."""

    touched = False

    def read(self, *args):
        self.touched = True
        return super().read(*args)

    readline = read


def counters(client: redis.Redis, queue: str) -> dict[str, int]:
    """The rate-limit counters of one queue's service: key -> count."""
    return {key.decode(): int(client.get(key)) for key in client.scan_iter(match=f"{{{queue}}}:ratelimit:*")}


# --- API keys ---------------------------------------------------------------------------------


def test_without_api_keys_the_service_is_open_as_by_default(make_app):
    app = make_app()  # API_KEYS from settings: empty unless the environment sets it
    with StandInWorker(app.extensions["image_queue"]):
        response = post_image(app.test_client())
    assert response.status_code == 200 and response.json["success"] is True


def test_with_keys_a_request_without_one_gets_401_json_before_its_body_is_read(make_app):
    client = make_app(API_KEYS=(KEY_A,)).test_client()
    body = UnreadBody(CAT)
    response = client.post("/predict", input_stream=body, content_type="image/jpeg", content_length=len(CAT))
    assert_json_error(response, 401, "an API key is required")
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="predict"'
    assert set(response.json) == {"success", "error"}
    assert not body.touched


@pytest.mark.parametrize(
    "headers",
    [
        bearer(KEY_B),  # a well-formed key, not one of ours
        {"X-API-Key": KEY_B},
        bearer(KEY_A[:-1]),  # a prefix of ours
        bearer(KEY_A + "0"),  # ours and one more character
        {"Authorization": f"Basic {KEY_A}"},  # ours, but not as a bearer token
        bearer(KEY_A.upper()),  # keys are case-sensitive
    ],
    ids=["bearer-unknown", "x-api-key-unknown", "prefix", "longer", "basic-scheme", "upper-case"],
)
def test_a_wrong_key_gets_401_json(make_app, headers):
    client = make_app(API_KEYS=(KEY_A,)).test_client()
    response = post_image(client, headers=headers)
    expected = "an API key is required" if headers.get("Authorization", "").startswith("Basic") else "not valid"
    assert_json_error(response, 401, expected)
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="predict"'


@pytest.mark.parametrize(
    "headers",
    [bearer(KEY_A), {"Authorization": f"bearer {KEY_A}"}, {"X-API-Key": KEY_A}, bearer(KEY_B), {"X-API-Key": KEY_B}],
    ids=["bearer", "bearer-lower-case", "x-api-key", "second-key-bearer", "second-key-x-api-key"],
)
def test_a_valid_key_in_either_header_is_served(make_app, headers):
    app = make_app(API_KEYS=(KEY_A, KEY_B))
    with StandInWorker(app.extensions["image_queue"]):
        response = post_image(app.test_client(), headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json["predictions"][0]["label"] == expected_checksum(CAT)


def test_health_checks_the_welcome_and_the_api_description_stay_open(make_app):
    app = make_app(API_KEYS=(KEY_A,))
    client = app.test_client()
    with StandInWorker(app.extensions["image_queue"]):
        assert client.get("/readyz").status_code == 200
    assert client.get("/healthz").json == {"status": "ok"}
    assert client.get("/").status_code == 200
    assert OPEN_PATHS == {"/", "/healthz", "/readyz", "/openapi.json"}
    assert client.get("/openapi.json").status_code == 200
    assert_json_error(client.get("/predict"), 401, "API key")  # even the wrong method needs a key first
    assert_json_error(client.get("/admin"), 401, "API key")  # and so does any path not opened on purpose


def test_every_configured_key_is_compared_with_compare_digest_and_no_early_exit(make_app, monkeypatch):
    keys = [secrets.token_hex(16) for _ in range(3)]
    client = make_app(API_KEYS=keys).test_client()
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented, authorized in [(keys[0], True), (keys[2], True), ("x" * 64, False), ("y" * 16, False)]:
        calls.clear()
        response = client.post("/predict", headers=bearer(presented))  # no image: 400 once past the key
        assert (response.status_code != 401) is authorized
        # Every key compared whatever matched first, always 32-byte digests: the time says nothing.
        assert calls == [(32, 32)] * 3


def test_the_key_is_never_logged_or_echoed(make_app, caplog):
    app = make_app(API_KEYS=(KEY_A,), RATE_LIMIT="1/minute")
    client = app.test_client()
    caplog.set_level(logging.DEBUG)
    with StandInWorker(app.extensions["image_queue"]):
        responses = [post_image(client, headers=bearer(k)) for k in (KEY_A, KEY_A, KEY_B)]
    assert [r.status_code for r in responses] == [200, 429, 401]
    assert caplog.records  # the 401 and the rate limit were logged, without either key
    for secret in (KEY_A, KEY_B):
        assert secret not in caplog.text
        assert all(secret not in r.get_data(as_text=True) + str(r.headers) for r in responses)


# --- Rate limit -------------------------------------------------------------------------------


def test_the_rate_limit_is_off_by_default_with_no_limiter_at_all(make_app, redis_client, queue_name):
    app = make_app()
    assert app.config["RATE_LIMIT"] == "" and "rate_limiter" not in app.extensions
    assert "limiter" not in app.extensions  # Flask-Limiter is not even registered: no storage, no hooks
    client = app.test_client()
    with StandInWorker(app.extensions["image_queue"]):
        assert [post_image(client).status_code for _ in range(12)] == [200] * 12
    assert counters(redis_client, queue_name) == {}


def test_over_the_limit_a_client_gets_429_json_with_retry_after(make_app):
    app = make_app(RATE_LIMIT="3/minute")
    client = app.test_client()
    with StandInWorker(app.extensions["image_queue"]):
        statuses = [post_image(client).status_code for _ in range(3)]
        refused = post_image(client)
    assert statuses == [200] * 3
    assert_json_error(refused, 429, "the limit is 3 per 1 minute")
    assert 1 <= int(refused.headers["Retry-After"]) <= 61
    assert f"retry in {refused.headers['Retry-After']} s" in refused.json["error"]
    assert [client.get(path).status_code for path in ("/healthz", "/healthz", "/", "/")] == [200] * 4  # not limited


def test_each_api_key_has_its_own_counter_and_refused_keys_count_for_nothing(make_app, redis_client, queue_name):
    app = make_app(API_KEYS=(KEY_A, KEY_B), RATE_LIMIT="2/minute")
    client = app.test_client()
    with StandInWorker(app.extensions["image_queue"]):
        anonymous = [post_image(client).status_code for _ in range(4)]
        a = [post_image(client, headers=bearer(KEY_A)).status_code for _ in range(3)]
        b = [post_image(client, headers={"X-API-Key": KEY_B}).status_code for _ in range(3)]
    assert anonymous == [401] * 4  # never 429: a request without a valid key is refused before it is counted
    assert a == [200, 200, 429] and b == [200, 200, 429]
    clients = {key.split(":ratelimit:", 1)[1].split("/")[1] for key in counters(redis_client, queue_name)}
    assert clients == {f"key-{hashlib.sha256(k.encode()).hexdigest()[:16]}" for k in (KEY_A, KEY_B)}


def test_without_keys_each_remote_address_has_its_own_counter_and_x_forwarded_for_is_ignored(make_app):
    app = make_app(RATE_LIMIT="2/minute")
    client = app.test_client()

    def status(address: str, forwarded: str | None = None) -> int:
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        return post_image(client, environ_base={"REMOTE_ADDR": address}, headers=headers).status_code

    with StandInWorker(app.extensions["image_queue"]):
        first = [status("10.0.0.1") for _ in range(3)]
        spoofed = status("10.0.0.1", forwarded="203.0.113.9")  # a made-up header does not buy a new counter
        second = [status("10.0.0.2") for _ in range(3)]
    assert first == [200, 200, 429] and spoofed == 429 and second == [200, 200, 429]


def test_behind_a_trusted_proxy_the_forwarded_address_is_the_client(make_app):
    app = make_app(RATE_LIMIT="2/minute", TRUSTED_PROXIES=1)
    client = app.test_client()

    def status(forwarded: str) -> int:
        environ = {"REMOTE_ADDR": "127.0.0.1"}  # the proxy
        return post_image(client, environ_base=environ, headers={"X-Forwarded-For": forwarded}).status_code

    with StandInWorker(app.extensions["image_queue"]):
        one = [status("198.51.100.1") for _ in range(3)]
        two = [status("198.51.100.2") for _ in range(3)]
        chained = status("6.6.6.6, 198.51.100.1")  # only the hop the proxy added is trusted
    assert one == [200, 200, 429] and two == [200, 200, 429] and chained == 429


def test_counters_live_in_the_queues_redis_under_its_prefix_and_two_services_count_apart(
    make_app, redis_client, queue_name
):
    first = make_app(API_KEYS=(KEY_A,), RATE_LIMIT="2/minute")
    other_queue = f"q{uuid.uuid4().hex[:10]}"
    second = make_app(API_KEYS=(KEY_A,), RATE_LIMIT="2/minute", IMAGE_QUEUE=other_queue)
    try:
        with StandInWorker(first.extensions["image_queue"]), StandInWorker(second.extensions["image_queue"]):
            on_first = [post_image(first.test_client(), headers=bearer(KEY_A)).status_code for _ in range(3)]
            on_second = post_image(second.test_client(), headers=bearer(KEY_A)).status_code
        counted = counters(redis_client, queue_name)
        assert on_first == [200, 200, 429] and on_second == 200
        [(key, count)] = counted.items()
        assert key.startswith(f"{{{queue_name}}}:ratelimit:") and "api.predict" in key and count == 3
        assert 0 < redis_client.ttl(key) <= 60  # the window expires on its own
        assert KEY_A not in key
        assert list(counters(redis_client, other_queue).values()) == [1]
    finally:
        for key in redis_client.scan_iter(match=f"{{{other_queue}}}:*"):
            redis_client.delete(key)


def test_a_dead_redis_never_turns_the_limit_into_500s_and_memory_keeps_counting(make_app, caplog):
    app = make_app(REDIS_URL=f"redis://127.0.0.1:{stack.free_port()}/0", RATE_LIMIT="2/minute")
    client = app.test_client()
    started = time.monotonic()
    responses = [post_image(client) for _ in range(3)]
    assert [r.status_code for r in responses] == [503, 503, 429]
    assert "Redis is unavailable" in responses[0].json["error"]
    assert responses[0].headers["Retry-After"] == "5"
    assert time.monotonic() - started < 3
    assert client.get("/healthz").status_code == 200
    assert "falling back to in-memory storage" in caplog.text


# --- Settings ---------------------------------------------------------------------------------


def settings_in_a_clean_process(**env) -> subprocess.CompletedProcess:
    """Import settings (and gunicorn_conf) in a fresh interpreter with only these security variables set."""
    names = ("API_KEYS", "RATE_LIMIT", "TRUSTED_PROXIES", "WEB_HOST", "WEB_PORT")
    clean = {k: v for k, v in os.environ.items() if k not in names}
    code = (
        "import json, settings, gunicorn_conf; print(json.dumps({'API_KEYS': settings.API_KEYS, "
        "'RATE_LIMIT': settings.RATE_LIMIT, 'TRUSTED_PROXIES': settings.TRUSTED_PROXIES, "
        "'WEB_HOST': settings.WEB_HOST, 'bind': gunicorn_conf.bind}))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=clean | env, capture_output=True, text=True, timeout=60
    )


def test_by_default_the_service_is_open_unlimited_and_listens_on_loopback_only():
    result = settings_in_a_clean_process()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "API_KEYS": [],
        "RATE_LIMIT": "",
        "TRUSTED_PROXIES": 0,
        "WEB_HOST": "127.0.0.1",
        "bind": "127.0.0.1:5000",
    }


def test_api_keys_are_comma_separated_with_blanks_ignored_and_the_limit_is_read():
    result = settings_in_a_clean_process(
        API_KEYS=f" {KEY_A} ,, {KEY_B},", RATE_LIMIT="10/second;300/minute", TRUSTED_PROXIES="1"
    )
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["API_KEYS"] == [KEY_A, KEY_B] and values["RATE_LIMIT"] == "10/second;300/minute"
    assert values["TRUSTED_PROXIES"] == 1


@pytest.mark.parametrize("bad", ["tiny-secret", "has a space in it, see", "ünïcödé-but-long-enough"])
def test_a_short_or_malformed_key_stops_the_start_without_printing_it(bad):
    result = settings_in_a_clean_process(API_KEYS=f"{KEY_A},{bad}")
    assert result.returncode != 0
    assert "SettingError: API_KEYS: key 2 of" in result.stderr and "at least 16" in result.stderr
    for part in bad.split(","):
        assert part.strip() not in result.stderr


@pytest.mark.parametrize("bad", ["10/secnd", "ten per second", "0/second", "10/second;5/fortnight"])
def test_a_rate_limit_typo_stops_the_start(bad):
    result = settings_in_a_clean_process(RATE_LIMIT=bad)
    assert result.returncode != 0 and "SettingError: RATE_LIMIT must be limits like" in result.stderr


# --- No pickle --------------------------------------------------------------------------------

PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}


def pickle_uses(source: str) -> list[str]:
    """What in this Python source can run code hidden in data: a pickling module, or a loader told to allow it.

    Parsed, not grepped: words in strings and comments do not count, and `import pickle as p` does.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING_MODULES:
            found.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            keywords = {k.arg: k.value for k in node.keywords}
            name = ast.unparse(node.func)
            for flag in ("allow_pickle", "safe_mode"):  # numpy's and Keras' switches for unsafe loading
                if flag in keywords and not (
                    isinstance(keywords[flag], ast.Constant) and keywords[flag].value is (flag == "safe_mode")
                ):
                    found.append(f"{name}({flag}={ast.unparse(keywords[flag])})")
            if name in ("np.load", "numpy.load") and "allow_pickle" not in keywords:
                found.append(f"{name}() without allow_pickle=False")
    return found


def test_the_pickle_detector_catches_each_form_and_passes_safe_code():
    unsafe = {
        "import pickle": 1,
        "import pickle as p": 1,
        "import os, cPickle": 1,
        "from dill import loads": 1,
        "import marshal": 1,
        "from joblib import load": 1,
        "np.load(path)": 1,
        "numpy.load(path, allow_pickle=True)": 1,
        "np.load(path, allow_pickle=flag)": 1,
        "keras.models.load_model(path, safe_mode=False)": 1,
    }
    for source, count in unsafe.items():
        assert len(pickle_uses(source)) == count, source
    safe = "np.load(path, allow_pickle=False)\nkeras.models.load_model(path)\nx = 'import pickle'  # pickle\n"
    assert pickle_uses(safe) == []


def test_no_pickle_anywhere_in_the_repository():
    sources = {}
    for directory, subdirectories, names in os.walk(ROOT):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".") and d != "__pycache__"]  # .venv, .git
        for name in names:
            if name.endswith((".py", ".wsgi")):
                path = os.path.join(directory, name)
                sources[os.path.relpath(path, ROOT)] = path
    assert {"run_web_server.py", "run_model_server.py", "image_queue.py", "helpers.py", "classifier.py"} <= set(sources)
    assert {"keras_rest_api_app.wsgi", "tests/conftest.py", "tests/test_security.py"} <= set(sources)
    offences = {name: uses for name, path in sources.items() if (uses := pickle_uses(open(path).read()))}
    assert offences == {}


# --- Real processes: Redis with a password, over TLS; gunicorn over a raw socket -----------------


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory):
    """A redis-server of its own that demands PASSWORD."""
    workdir = tmp_path_factory.mktemp("redis-password")
    port = stack.free_port()
    server = stack.start_redis(port, str(workdir), workdir / "redis.log", "--requirepass", PASSWORD)
    yield {"port": port, "url": f"redis://:{PASSWORD}@127.0.0.1:{port}/0"}
    server.stop()


@pytest.fixture(scope="module")
def gunicorn_on_password_redis(password_redis, tmp_path_factory):
    """A real gunicorn with API_KEYS and a 1 MB upload limit on the password-protected Redis, and a
    stand-in worker thread in this process answering on the same queue."""
    name = f"q{uuid.uuid4().hex[:10]}"
    port = stack.free_port()
    env = {
        "REDIS_URL": password_redis["url"],
        "IMAGE_QUEUE": name,
        "WEB_PORT": str(port),
        "WEB_WORKERS": "1",
        "WEB_THREADS": "4",
        "MAX_UPLOAD_MB": "1",
        "API_KEYS": KEY_A,
    }
    log_path = tmp_path_factory.mktemp("gunicorn") / "web.log"
    web = stack.start_web(env, log_path)
    queue = ImageQueue(connect(password_redis["url"], 0.2), name, block_s=0.2, worker_ttl_s=2.0)
    with StandInWorker(queue):
        try:
            stack.wait_until_ready(f"http://127.0.0.1:{port}/", [web], timeout_s=60)
            yield {"port": port, "url": f"http://127.0.0.1:{port}/", "log": log_path}
        finally:
            web.stop()


def test_gunicorn_on_a_password_protected_redis_is_ready_and_serves(gunicorn_on_password_redis):
    url = gunicorn_on_password_redis["url"]
    ready = requests.get(url + "readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    response = requests.post(url + "predict", files={"image": ("cat.jpg", CAT)}, headers=bearer(KEY_A), timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == expected_checksum(CAT)
    assert PASSWORD not in gunicorn_on_password_redis["log"].read_text()


@pytest.mark.parametrize("credentials", ["wrong-password", ""], ids=["wrong", "none"])
def test_a_wrong_or_missing_redis_password_is_a_quick_503_that_says_authentication_failed(
    password_redis, queue_name, credentials
):
    secret = f":{credentials}@" if credentials else ""
    app = create_app({"REDIS_URL": f"redis://{secret}127.0.0.1:{password_redis['port']}/0", "IMAGE_QUEUE": queue_name})
    client = app.test_client()
    started = time.monotonic()
    for response in (client.get("/readyz"), post_image(client)):
        assert_json_error(response, 503, "Redis authentication failed")
        assert "check the password in REDIS_URL" in response.json["error"]
        assert response.headers["Retry-After"] == "5"
    assert time.monotonic() - started < 3


def test_a_model_worker_with_a_wrong_redis_password_exits_at_once_saying_why(password_redis, tmp_path):
    log_path = tmp_path / "worker.log"
    url = f"redis://:not-{PASSWORD}@127.0.0.1:{password_redis['port']}/0"
    started = time.monotonic()
    worker = stack.start_model_worker({"REDIS_URL": url, "IMAGE_QUEUE": "security-test"}, log_path)
    assert worker.process.wait(60) == 2
    took = time.monotonic() - started
    text = log_path.read_text()
    assert "Redis refused this worker's credentials" in text and "check the password in REDIS_URL" in text
    assert "loaded and warmed" not in text and took < 30  # before spending time on the model
    assert PASSWORD not in text


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length body, from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def send_headers_only(port: int, headers: str) -> tuple[int, dict, dict]:
    """Send a request's headers and no body; the answer must come without the body ever being sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
        status, response_headers, body = read_response(sock)  # times out (fails) if the server waits for the body
    return status, response_headers, json.loads(body)


@pytest.mark.parametrize(
    "content_type", ["image/jpeg", "multipart/form-data; boundary=xyz"], ids=["raw-body", "multipart"]
)
def test_a_content_length_over_the_limit_gets_413_before_any_body_is_sent(gunicorn_on_password_redis, content_type):
    headers = f"X-API-Key: {KEY_A}\r\nContent-Type: {content_type}\r\nContent-Length: {100 * 1024 * 1024}\r\n"
    status, response_headers, body = send_headers_only(gunicorn_on_password_redis["port"], headers)
    assert status == 413 and response_headers["content-type"] == "application/json"
    assert body == {"success": False, "error": "the upload is larger than 1 MB"}


def test_without_a_key_a_large_upload_gets_401_before_any_body_is_sent(gunicorn_on_password_redis):
    headers = f"Content-Type: image/jpeg\r\nContent-Length: {100 * 1024 * 1024}\r\n"
    status, response_headers, body = send_headers_only(gunicorn_on_password_redis["port"], headers)
    assert status == 401 and response_headers["www-authenticate"] == 'Bearer realm="predict"'
    assert body["success"] is False and "API key" in body["error"]


def test_without_a_key_a_trickled_upload_under_the_limit_gets_401_within_the_drain_bound(gunicorn_on_password_redis):
    """The app reads the rest of a refused upload, so that gunicorn need not reset the connection and lose the
    answer, but for DRAIN_S at most: a client that stops sending mid-body gets its 401 then."""
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nContent-Length: {512 * 1024}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gunicorn_on_password_redis["port"]), timeout=DRAIN_S + 10) as sock:
        sock.sendall(head.encode() + b"x" * 100 * 1024)  # a fifth of the body, then nothing
        started = time.monotonic()
        status, _, body = read_response(sock)
    assert status == 401 and "API key" in json.loads(body)["error"]
    assert DRAIN_S - 1 < time.monotonic() - started < DRAIN_S + 3


@pytest.mark.parametrize("multipart", [False, True], ids=["raw-body", "multipart"])
def test_a_chunked_body_over_the_limit_gets_413(gunicorn_on_password_redis, multipart):
    chunk = os.urandom(64 * 1024)
    content_type = "multipart/form-data; boundary=xyz" if multipart else "image/jpeg"
    with socket.create_connection(("127.0.0.1", gunicorn_on_password_redis["port"]), timeout=10) as sock:
        sock.sendall(
            f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY_A}\r\n"
            f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        if multipart:  # one file part that never ends
            part = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        sent, offered = 0, 64 * 1024 * 1024  # 64 times the limit, far more than the sockets' buffers hold
        try:
            while sent < offered:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed the connection without reading the rest
        status, _, body = read_response(sock)
    assert status == 413 and json.loads(body) == {"success": False, "error": "the upload is larger than 1 MB"}
    assert sent < offered / 4  # the server stopped reading soon after the limit (the rest is socket buffers)


# --- TLS ----------------------------------------------------------------------------------------


def make_certificates(directory) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it, made with the openssl command."""

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=throwaway test CA")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "server.ext",
    )  # fmt: skip


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """A redis-server with a password on a TLS port (its plain port only answers the start-up check)."""
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is not installed: no way to make a throwaway CA")
    workdir = tmp_path_factory.mktemp("redis-tls")
    make_certificates(workdir)
    port, tls_port = stack.free_port(), stack.free_port()
    tls = ["--tls-port", str(tls_port), "--tls-auth-clients", "no"]
    for option, name in (("cert", "server.pem"), ("key", "server.key"), ("ca-cert", "ca.pem")):
        tls += [f"--tls-{option}-file", str(workdir / name)]
    log_path = workdir / "redis.log"
    try:
        server = stack.start_redis(port, str(workdir), log_path, "--requirepass", PASSWORD, *tls)
    except RuntimeError:
        log = log_path.read_text(errors="replace")
        if re.search(r"TLS.*not (compiled|supported|built)|without TLS|Bad directive.*tls", log, re.I | re.S):
            pytest.skip(f"this redis-server was built without TLS support: {log.strip().splitlines()[-1]}")
        raise
    yield {"tls_port": tls_port, "ca": workdir / "ca.pem"}
    server.stop()


def test_a_tls_redis_with_a_password_serves_requests_and_holds_the_rate_limit(tls_redis, queue_name):
    url = f"rediss://:{PASSWORD}@127.0.0.1:{tls_redis['tls_port']}/0?ssl_ca_certs={tls_redis['ca']}"
    app = create_app({"REDIS_URL": url, "IMAGE_QUEUE": queue_name, "REDIS_BLOCK_S": 0.2, "RATE_LIMIT": "2/minute"})
    client = app.test_client()
    tls_client = app.extensions["image_queue"].redis
    assert tls_client.connection_pool.connection_class is redis.SSLConnection
    try:
        with StandInWorker(app.extensions["image_queue"]):
            responses = [post_image(client) for _ in range(3)]
        assert [r.status_code for r in responses] == [200, 200, 429]
        assert responses[0].json["predictions"][0]["label"] == expected_checksum(CAT)
        assert list(counters(tls_client, queue_name).values()) == [3]  # the limiter counted over TLS too
    finally:
        for key in tls_client.scan_iter(match=f"{{{queue_name}}}:*"):
            tls_client.delete(key)


@pytest.mark.parametrize(
    "scheme, query, words",
    [("redis", "", "Redis is unavailable"), ("rediss", "", "certificate verify failed")],
    ids=["plain-to-tls-port", "tls-without-our-ca"],
)
def test_a_tls_redis_spoken_to_wrongly_is_a_quick_503(tls_redis, queue_name, scheme, query, words):
    url = f"{scheme}://:{PASSWORD}@127.0.0.1:{tls_redis['tls_port']}/0{query}"
    client = create_app({"REDIS_URL": url, "IMAGE_QUEUE": queue_name, "REDIS_BLOCK_S": 0.2}).test_client()
    started = time.monotonic()
    assert_json_error(client.get("/readyz"), 503, words)
    assert_json_error(post_image(client), 503, words)
    assert time.monotonic() - started < 5
