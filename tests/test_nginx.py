"""nginx in front of gunicorn, for real: the repository's deploy/nginx/keras-rest-api.conf in Debian's nginx.

The site file is used as committed; only its listen address, its upstream (gunicorn's port) and its log
directory are set to this test's. Behind it run a real gunicorn (TRUSTED_PROXIES=1, as the file says) and
a real ResNet50 model worker. Requests come from different loopback addresses (127.0.0.2, 127.0.0.3, ...)
so that each test is a client of its own for nginx's per-address limits.
"""

import http.client
import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support import ROOT
from support.hostile_corpus import Case, build_corpus, multipart
from support.images import encode, photo
from support.traffic import answered_ids, expected_top5, same_answer, wait_for

import settings
import stack

NGINX = "/usr/sbin/nginx"  # Debian's package; scripts/setup.sh installs it
SITE = ROOT / "deploy" / "nginx" / "keras-rest-api.conf"
CLIENT_TIMEOUT_S = 90
BURST = 20  # the site file's limit_req burst for /predict
RATE_PER_S = 10  # and its rate

# The main file Debian's nginx.conf would be, with every path under the test's own directory.
MAIN_CONF = """\
user www-data;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{
    worker_connections 512;
}}
http {{
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/keras-rest-api.conf;
}}
"""


def render_site(listen_port: int, upstream_port: int, logdir: Path) -> str:
    """The committed site file with this test's addresses; each replaced text must be there exactly once."""
    text = SITE.read_text()
    for old, new in {
        "listen 80;": f"listen 127.0.0.1:{listen_port};",
        "server 127.0.0.1:5000;": f"server 127.0.0.1:{upstream_port};",
        "/var/log/nginx/": f"{logdir}/",
    }.items():
        assert text.count(old) == 1, f"{SITE.name} should contain {old!r} once"
        text = text.replace(old, new)
    return text


class Nginx:
    """A real nginx serving the rendered site from a directory of its own (nginx -p DIR -c FILE)."""

    def __init__(self, upstream_port: int):
        # mkdtemp, not pytest's tmp_path: nginx's workers run as www-data and need to reach their temp paths.
        self.dir = Path(tempfile.mkdtemp(prefix="nginx-test-"))
        self.dir.chmod(0o755)
        self.port = stack.free_port()
        (self.dir / "keras-rest-api.conf").write_text(render_site(self.port, upstream_port, self.dir))
        (self.dir / "nginx.conf").write_text(MAIN_CONF.format(dir=self.dir))
        self.argv = [NGINX, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-e", str(self.dir / "error.log")]
        check = subprocess.run([*self.argv, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.service = stack._start("nginx", [*self.argv, "-g", "daemon off;"], None, self.dir / "nginx.out")
        wait_for(lambda: self._listening() or not self.service.alive(), 10)
        assert self.service.alive(), self.service.log_text()

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def access_log(self) -> str:
        """The whole lines written so far (a line being written is read only once it is complete)."""
        text = (self.dir / "keras-rest-api.access.log").read_text()
        return text[: text.rfind("\n") + 1]

    def stop(self) -> None:
        self.service.stop(timeout_s=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def request(port: int, raw: bytes, source: str = "127.0.0.2") -> tuple[int, dict, bytes]:
    """Exact bytes over a new connection from a chosen loopback address; the answer is read until close."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S, source_address=(source, 0)) as sock:
        try:
            sock.sendall(raw)
        except OSError:
            pass  # answered and closed before taking it all (an over-limit body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def predict_request(image: bytes) -> bytes:
    boundary = "nginx-test-boundary"
    body = multipart(("image", b"photo.jpg", "image/jpeg", image), boundary=boundary)
    head = (
        "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def json_error(headers: dict, body: bytes) -> dict:
    """The answer must be the service's error shape, as JSON: {"success": false, "error": "..."}."""
    assert headers.get("content-type", "").startswith("application/json"), (headers, body[:300])
    answer = json.loads(body)
    assert answer["success"] is False and set(answer) == {"success", "error"} and answer["error"], answer
    return answer


def gunicorn_predicts(served) -> int:
    """POST /predict lines in gunicorn's access log: the requests that reached the service."""
    return len(re.findall(r'"POST /predict', served.web.log_text()))


@pytest.fixture(scope="module")
def served(make_module_stack):
    return make_module_stack.serve(TRUSTED_PROXIES=1, REQUEST_TIMEOUT_S=60, GUNICORN_TIMEOUT_S=90)


@pytest.fixture(scope="module")
def nginx(served):
    proxy = Nginx(int(served.env["WEB_PORT"]))
    yield proxy
    proxy.stop()


# --- The committed numbers agree with the service's defaults (fast) ----------------------------


def test_the_site_files_limits_and_timeouts_match_the_services_defaults():
    text = SITE.read_text()
    assert f"client_max_body_size {settings.MAX_UPLOAD_MB:g}m;" in text  # MAX_UPLOAD_MB's twin
    assert f"larger than {settings.MAX_UPLOAD_MB:g} MB" in text
    read_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", text)[1])
    # nginx waits for gunicorn longer than gunicorn lets a worker hang, which is longer than a request lives
    assert settings.REQUEST_TIMEOUT_S < settings.GUNICORN_TIMEOUT_S < read_timeout < CLIENT_TIMEOUT_S
    import gunicorn_conf

    assert int(re.search(r"keepalive_timeout (\d+)s;", text)[1]) < gunicorn_conf.keepalive
    assert f"burst={BURST} " in text and f"rate={RATE_PER_S}r/s" in text


def test_with_gunicorn_down_nginx_answers_503_json_with_retry_after():
    proxy = Nginx(stack.free_port())  # nothing listens there
    try:
        status, headers, body = request(proxy.port, predict_request(b"\xff\xd8\xff"))
    finally:
        proxy.stop()
    assert status == 503 and headers["retry-after"] == "5"
    json_error(headers, body)


# --- Live -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_prediction_through_nginx_is_the_models_own_answer(served, nginx, resnet):
    images = [encode(photo("chelsea"), "JPEG"), encode(photo("coffee"), "JPEG")]
    for image, expected in zip(images, expected_top5(resnet, images), strict=True):
        status, headers, body = request(nginx.port, predict_request(image))
        assert status == 200, body
        assert same_answer(json.loads(body)["predictions"], expected)
        request_id = headers["x-request-id"]
        # nginx's own line for it: served by gunicorn, under the id the service and its model worker logged
        line = wait_for(lambda rid=request_id: [x for x in nginx.access_log().splitlines() if f"id={rid} " in x], 5)
        assert '"POST /predict HTTP/1.1" 200 ' in line[0] and " upstream=200 " in line[0]
        wait_for(lambda rid=request_id: rid in served.worker_logs(), 5)


@pytest.mark.slow
def test_a_burst_beyond_the_rate_limit_gets_429_json_from_nginx_and_never_reaches_gunicorn(served, nginx, capsys):
    image = encode(photo("chelsea"), "JPEG")
    raw = predict_request(image)
    reached_before, answered_before = gunicorn_predicts(served), len(answered_ids(served.worker_logs()))
    started = time.monotonic()
    with ThreadPoolExecutor(30) as pool:  # 30 at once from one address: under its connection limit (64)
        replies = list(pool.map(lambda _: request(nginx.port, raw, source="127.0.0.3"), range(60)))
    elapsed = time.monotonic() - started
    # Right after, another address is served at once: the limit is per client.
    status, _, body = request(nginx.port, raw, source="127.0.0.4")
    assert status == 200, body

    statuses = [status for status, _, _ in replies]
    served_ok, refused = statuses.count(200), [r for r in replies if r[0] == 429]
    assert served_ok + len(refused) == 60, statuses
    # The bucket lets one request plus the burst through at once, then RATE_PER_S a second.
    assert BURST + 1 <= served_ok <= BURST + 2 + RATE_PER_S * elapsed, (served_ok, elapsed)
    for _, headers, body in refused:
        json_error(headers, body)
        assert headers["retry-after"] == "1"

    # Only the 200s reached gunicorn and the model: the 429s were answered by nginx alone.
    def reached() -> tuple[int, int]:  # + 1: the other address's request
        answered = len(answered_ids(served.worker_logs()))
        return gunicorn_predicts(served) - reached_before - 1, answered - answered_before - 1

    wait_for(lambda: reached() == (served_ok, served_ok), 5)
    time.sleep(0.5)  # nothing more comes
    assert reached() == (served_ok, served_ok)
    assert "limiting requests" in (nginx.dir / "error.log").read_text()
    with capsys.disabled():
        print(
            f"\nnginx: a burst of 60 /predict from one address in {elapsed:.2f} s: {served_ok} x 200, "
            f"{len(refused)} x 429 from nginx; gunicorn and the model saw {served_ok}"
        )


@pytest.mark.slow
def test_metrics_are_served_to_this_machine_and_refused_with_403_json_to_other_addresses(served, nginx):
    scrape = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, headers, body = request(nginx.port, scrape, source="127.0.0.1")
    assert status == 200 and b"http_requests_total" in body
    status, headers, body = request(nginx.port, scrape, source="127.0.0.6")  # not in the site's allow list
    assert status == 403
    json_error(headers, body)


@pytest.mark.slow
def test_request_lines_gunicorn_accepts_pass_and_longer_ones_get_414_json_from_nginx(served, nginx):
    def get(port: int, line_length: int) -> tuple[int, dict, bytes]:
        head, tail = b"GET /healthz?", b" HTTP/1.1"
        line = head + b"a" * (line_length - len(head) - len(tail)) + tail
        return request(port, line + b"\r\nHost: x\r\nConnection: close\r\n\r\n", source="127.0.0.1")

    longest = 4094  # gunicorn's limit_request_line: the longest request line it takes (CRLF not counted)
    gunicorn = int(served.env["WEB_PORT"])
    assert get(gunicorn, longest)[0] == 200
    status, headers, _ = get(gunicorn, longest + 1)
    assert status == 414 and headers["content-type"].startswith("text/html")

    status, _, body = get(nginx.port, longest)
    assert status == 200 and json.loads(body) == {"status": "ok"}  # passed on, and gunicorn took it
    status, headers, body = get(nginx.port, longest + 1)
    assert status == 414  # nginx's, in JSON
    json_error(headers, body)


# The requests gunicorn refuses itself with an HTML page (tests/support/hostile_corpus.py), and an upload over the
# limit: through nginx, each gets its 4xx as JSON from nginx itself, and gunicorn never sees it. Except one:
# nginx bounds the bytes of the headers, not their number, so 150 small headers reach gunicorn, whose limit
# is 100 (limit_request_fields); that client gets gunicorn's 431, in HTML. No real client sends 100 headers.
HTML_CASES = [case for case in build_corpus(settings.MAX_UPLOAD_MB) if not case.app_answers]
OVER_LIMIT = Case(
    "over-limit",
    f"a Content-Length over {settings.MAX_UPLOAD_MB:g} MB",
    headers=(("Content-Type", "image/jpeg"), ("Content-Length", str(int(settings.MAX_UPLOAD_MB * 2**20) + 1))),
    body=b"\xff\xd8\xff",
    content_length=False,
    status=413,
)
PASSED_ON = {"too-many-headers"}


@pytest.mark.slow
@pytest.mark.parametrize("case", [*HTML_CASES, OVER_LIMIT], ids=lambda case: case.name)
def test_requests_gunicorn_answers_in_html_get_json_from_nginx(served, nginx, case):
    if not case.app_answers:  # sent straight to gunicorn: its HTML page, the reason nginx is in front
        status, headers, _ = request(int(served.env["WEB_PORT"]), case.request_bytes(), source="127.0.0.1")
        assert status == case.status and headers["content-type"].startswith("text/html")

    logged = len(nginx.access_log().splitlines())
    status, headers, body = request(nginx.port, case.request_bytes(), source="127.0.0.5")

    assert status == case.status, (status, body)
    line = wait_for(lambda: nginx.access_log().splitlines()[logged:], 5)[0]  # written as the connection ends
    if case.name in PASSED_ON:
        assert "upstream=431 " in line
    else:
        json_error(headers, body)
        assert "upstream=- " in line  # nginx answered; gunicorn never saw it
