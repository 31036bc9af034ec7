"""Security with real processes: password-protected and TLS redis-servers (a throwaway CA made with the
openssl command), a real gunicorn spoken to over a raw socket (413 and 401 before the body is read), and a
real model worker with a wrong password."""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
import uuid

import pytest
import redis
import requests
from support.stand_in import (
    CAT,
    StandInWorker,
    app_queue,
    assert_json_error,
    bearer,
    counters,
    expected_checksum,
    post_image,
    served_queue,
)

import stack
from image_queue import connect
from run_web_server import DRAIN_S, create_app

KEY_A, KEY_B = secrets.token_hex(16), secrets.token_hex(16)

KEY_A = secrets.token_hex(16)
PASSWORD = secrets.token_urlsafe(18)  # the test Redis servers' requirepass


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
    queue = served_queue(connect(password_redis["url"], 0.2), name, block_s=0.2, worker_ttl_s=2.0)
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


@pytest.mark.parametrize(
    "framing",
    [b"zz\r\n\xff\xd8\xff\r\n0\r\n\r\n", b"3\r\n\xff\xd8\xffXY0\r\n\r\n"],
    ids=["bad-chunk-size", "chunk-without-its-end"],
)
def test_a_malformed_chunked_body_gets_a_400_that_says_so(gunicorn_on_password_redis, framing):
    """gunicorn's chunk reader raises its own parse errors (neither OSError nor ValueError), which werkzeug
    passes on: they are the client's framing, a 400, not a 500 with a traceback in the log."""
    with socket.create_connection(("127.0.0.1", gunicorn_on_password_redis["port"]), timeout=10) as sock:
        sock.sendall(
            f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY_A}\r\n"
            f"Content-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + framing
        )
        status, _, body = read_response(sock)
    assert status == 400, body
    assert json.loads(body) == {"success": False, "error": "the chunked upload is malformed or cut short"}


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
    tls_client = app_queue(app).redis
    assert issubclass(tls_client.connection_pool.connection_class, redis.SSLConnection)
    try:
        with StandInWorker(app_queue(app)):
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
