"""Apache with mod_wsgi, for real: the repository's deploy/apache/keras-rest-api.conf in Debian's apache2.

The site file is used as committed; only its Define lines (checkout, venv, port) are set to this test's.
The main file around it is what Debian's apache2.conf and `a2enmod wsgi_venv headers` amount to, with its
paths under a directory of the test's own. mod_wsgi is the one pip built into .venv (requirements-dev.txt)
against .venv's Python, loaded with the line `mod_wsgi-express module-config` prints. Behind it runs a real
ResNet50 model worker; the settings (Redis URL, queue, API key) reach the app only through Apache's own
environment, as the site file documents, so a served prediction shows that they did.
"""

import http.client
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests
from support import ROOT
from support.images import encode, photo
from support.traffic import expected_top5, same_answer, wait_for

import settings
import stack

APACHE = "/usr/sbin/apache2"  # Debian's package; scripts/setup.sh installs it with apache2-dev
SITE = ROOT / "deploy" / "apache" / "keras-rest-api.conf"
USER = "www-data"  # Debian's APACHE_RUN_USER; Apache and mod_wsgi refuse to run the app as root
API_KEY = "apache-test-key-5f0c2a9e7d41b3c8"
CLIENT_TIMEOUT_S = 90
AUTH = {"Authorization": f"Bearer {API_KEY}"}  # the header mod_wsgi drops without WSGIPassAuthorization

# What Debian's apache2.conf, ports.conf and mods-enabled/ give the site, with this test's paths.
MAIN_CONF = """\
ServerRoot /etc/apache2
ServerName 127.0.0.1
DefaultRuntimeDir {dir}
PidFile {dir}/apache2.pid
ErrorLog {dir}/error.log
LogLevel info
User {user}
Group {user}
Listen 127.0.0.1:{port}
LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule headers_module /usr/lib/apache2/modules/mod_headers.so
{module_config}
WSGISocketPrefix {dir}/wsgi
Include {dir}/keras-rest-api.conf
"""


def render_site(port: int) -> str:
    """The committed site file with this test's Define values; each Define must be there exactly once."""
    text = SITE.read_text()
    for name, value in {
        "KERAS_API_HOME": ROOT,
        "KERAS_API_VENV": sys.prefix,  # the venv running these tests
        "KERAS_API_PORT": port,
        "KERAS_API_USER": USER,
    }.items():
        text, count = re.subn(rf"^Define {name} .*$", f"Define {name} {value}", text, flags=re.M)
        assert count == 1, f"{SITE.name} should define {name} once"
    return text


def open_the_way(paths: list[Path]) -> list[tuple[Path, int]]:
    """Let other users (www-data) pass through every directory above these paths; returns what to restore.

    The venv's Python may live under /root (pyenv's place; the CI machine's case), which is mode 700, so
    mod_wsgi's daemon process could not read the standard library and dies at start ("failed to get the
    Python codec of the filesystem encoding"). Granting o+x (pass, not list) for the test is the least
    that works: Apache refuses User root, and mod_wsgi refuses user=root. A server should have a venv
    made from a Python every user can read (the site file says so).
    """
    changed = []
    for path in paths:
        for directory in [path, *path.parents]:
            mode = directory.stat().st_mode
            if not mode & stat.S_IXOTH:
                directory.chmod(mode | stat.S_IXOTH)
                changed.append((directory, mode))
    return changed


class Apache:
    """apache2 -f MAIN -DFOREGROUND: the rendered site in a real Apache, under a directory of its own."""

    def __init__(self, env: dict):
        # mkdtemp, not pytest's tmp_path (mode 700): Apache's children run as www-data and connect to the
        # daemon processes' sockets in here.
        self.dir = Path(tempfile.mkdtemp(prefix="apache-test-"))
        self.dir.chmod(0o755)
        self.port = stack.free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        module_config = subprocess.run(
            [str(Path(sys.prefix) / "bin" / "mod_wsgi-express"), "module-config"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (self.dir / "keras-rest-api.conf").write_text(render_site(self.port))
        conf = self.dir / "apache2.conf"
        conf.write_text(MAIN_CONF.format(dir=self.dir, user=USER, port=self.port, module_config=module_config))
        # As the site file's header sets up: an empty metrics directory the daemon processes can write.
        metrics_dir = self.dir / "metrics"
        metrics_dir.mkdir()
        shutil.chown(metrics_dir, USER, USER)
        # APACHE_LOG_DIR: the site file's log directory, set by Debian's /etc/apache2/envvars on a server.
        self.env = env | {"APACHE_LOG_DIR": str(self.dir), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        argv = [APACHE, "-f", str(conf)]
        check = subprocess.run([*argv, "-t"], capture_output=True, text=True, env=os.environ | self.env)
        assert check.returncode == 0, check.stderr
        self.service = stack._start("apache", [*argv, "-DFOREGROUND"], self.env, self.dir / "apache.out")

    def log(self, name: str) -> str:
        path = self.dir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def access_lines(self, text: str) -> list[str]:
        return [line for line in self.log("keras-rest-api-access.log").splitlines() if text in line]

    def stop(self) -> None:
        self.service.stop(timeout_s=20)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon_user_reads_the_venv():
    """www-data can run the venv's Python for the module's tests (see open_the_way); undone afterwards."""
    changed = open_the_way([Path(sys.base_prefix), Path(sys.prefix), ROOT])
    try:
        check = subprocess.run(
            ["runuser", "-u", USER, "--", sys.executable, "-c", "import flask, numpy, PIL, redis"],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, f"{USER} cannot run the venv's Python: {check.stderr}"
        yield
    finally:
        for directory, mode in reversed(changed):
            directory.chmod(mode)


@pytest.fixture(scope="module")
def apache(make_module_stack, daemon_user_reads_the_venv):
    """A ResNet50 worker on a queue of its own, and Apache serving the app for that queue; no gunicorn."""
    s = make_module_stack(API_KEYS=API_KEY, REQUEST_TIMEOUT_S=60, GUNICORN_TIMEOUT_S=90)
    worker = s.start_worker()
    server = Apache(s.env)
    try:
        try:
            stack.wait_until_ready(server.url, [server.service, worker], timeout_s=180)
        except RuntimeError:
            pytest.fail(server.log("error.log")[-3000:] + server.log("keras-rest-api-error.log")[-3000:])
        yield server, s
    finally:
        server.stop()


def test_the_site_files_limits_and_timeouts_match_the_services_defaults():
    text = SITE.read_text()

    def number(pattern: str) -> int:
        return int(re.search(pattern, text)[1])

    assert number(r"LimitRequestBody (\d+)") == int(settings.MAX_UPLOAD_MB * 2**20)  # MAX_UPLOAD_MB's twin
    # As many requests at once as gunicorn serves by default, the same way: processes of threads.
    assert number(r"processes=(\d+)") == settings.WEB_WORKERS and number(r"threads=(\d+)") == settings.WEB_THREADS
    # In order: a request's life < a wait for a thread < restart grace < a stuck process < Apache's wait < client
    queue, graceful = number(r"queue-timeout=(\d+)"), number(r"graceful-timeout=(\d+)")
    stuck, socket_timeout = number(r"request-timeout=(\d+)"), number(r"socket-timeout=(\d+)")
    assert settings.REQUEST_TIMEOUT_S <= queue < graceful < stuck < socket_timeout < CLIENT_TIMEOUT_S
    assert graceful == settings.REQUEST_TIMEOUT_S + 5 and stuck == settings.GUNICORN_TIMEOUT_S
    assert number(r"\n    Timeout (\d+)") == socket_timeout


def test_a_raw_byte_that_is_not_utf8_in_the_query_string_is_a_400_not_a_500(redis_url, queue_name):
    """gunicorn refuses such a request line itself; mod_wsgi hands it to the app as is (QUERY_STRING
    "top=\\xff", Latin-1 as WSGI says), where werkzeug's request.args raised UnicodeDecodeError: a 500."""
    from run_web_server import create_app

    app = create_app({"REDIS_URL": redis_url, "IMAGE_QUEUE": queue_name})
    client = app.test_client()
    for method, path, query in [("POST", "/predict", "top=\xff"), ("POST", "/predict", "model=\xff"),
                                ("GET", "/readyz", "model=\xff")]:  # fmt: skip
        response = client.open(path, method=method, environ_overrides={"QUERY_STRING": query})
        assert response.status_code == 400, (path, query)
        assert response.json == {"success": False, "error": "the query string is not valid UTF-8 (percent-encode it)"}


def test_settings_reach_the_app_through_apaches_environment_and_a_bad_one_shows_at_start(
    daemon_user_reads_the_venv, redis_url
):
    """The daemon processes inherit Apache's environment, and load the app as they start (the site file's
    WSGIScriptAlias names both groups): a bad setting is in the site's error log before any request."""
    server = Apache({"REDIS_URL": redis_url, "MAX_UPLOAD_MB": "-3"})
    try:
        # No request is sent: the error is there from the start.
        wait_for(lambda: "SettingError: MAX_UPLOAD_MB must be at least" in server.log("keras-rest-api-error.log"), 30)
    finally:
        server.stop()


@pytest.mark.slow
def test_a_prediction_through_apache_mod_wsgi_is_the_models_own_answer(apache, resnet):
    server, s = apache
    images = [encode(photo("chelsea"), "JPEG"), encode(photo("coffee"), "PNG")]
    for image, expected in zip(images, expected_top5(resnet, images), strict=True):
        response = requests.post(
            server.url + "predict", files={"image": ("photo", image)}, headers=AUTH, timeout=CLIENT_TIMEOUT_S
        )
        assert response.status_code == 200, response.text
        assert "mod_wsgi" in response.headers["Server"]  # Apache answered, through mod_wsgi
        assert same_answer(response.json()["predictions"], expected)
        request_id = response.headers["X-Request-ID"]
        # Apache's access line and the model worker's log carry the same request id.
        line = wait_for(lambda rid=request_id: server.access_lines(rid), 5)[0]
        assert line.startswith('127.0.0.1 "POST /predict HTTP/1.1" 200 ') and line.endswith(f"id={request_id}")
        wait_for(lambda rid=request_id: rid in s.worker_logs(), 5)
    # The daemon processes, not Apache's own children, ran the app, as the site file asks.
    assert "Starting daemon process 'keras-rest-api'" in server.log("error.log")
    # /metrics counts the predictions of every daemon process (the metrics directory the header sets up).
    metrics = requests.get(server.url + "metrics", headers=AUTH, timeout=CLIENT_TIMEOUT_S).text
    assert 'http_requests_total{endpoint="/predict",method="POST",status="200"} 2.0' in metrics


@pytest.mark.slow
def test_errors_through_apache_are_the_services_json(apache):
    server, _ = apache
    not_an_image = requests.post(
        server.url + "predict", files={"image": ("notes.txt", b"hello")}, headers=AUTH, timeout=CLIENT_TIMEOUT_S
    )
    assert not_an_image.status_code == 400
    assert not_an_image.json()["success"] is False and "image" in not_an_image.json()["error"]

    no_key = requests.post(server.url + "predict", files={"image": ("photo", b"x")}, timeout=CLIENT_TIMEOUT_S)
    assert no_key.status_code == 401 and no_key.headers["WWW-Authenticate"].startswith("Bearer")
    assert no_key.json()["success"] is False

    # Over MAX_UPLOAD_MB: refused by Apache itself (LimitRequestBody) before the body is read, as JSON.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=CLIENT_TIMEOUT_S)
    connection.putrequest("POST", "/predict")
    for name, value in (AUTH | {"Content-Type": "image/jpeg"}).items():
        connection.putheader(name, value)
    connection.putheader("Content-Length", str(int(settings.MAX_UPLOAD_MB * 2**20) + 1))
    connection.endheaders(b"\xff\xd8\xff")  # and the rest never comes
    too_large = connection.getresponse()
    assert too_large.status == 413 and too_large.getheader("Content-Type") == "application/json"
    assert json.loads(too_large.read()) == {"success": False, "error": "the upload is larger than MAX_UPLOAD_MB"}
    assert too_large.getheader("X-Request-ID") is None  # the app never saw it
    connection.close()

    # A raw 0xFF in the query string reaches the app through mod_wsgi (gunicorn refuses it): a 400.
    with socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT_S) as sock:
        sock.sendall(b"POST /predict?top=\xff HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n" % API_KEY.encode())
        sock.sendall(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        raw_byte = http.client.HTTPResponse(sock)
        raw_byte.begin()
        assert raw_byte.status == 400 and "UTF-8" in json.loads(raw_byte.read())["error"]
    assert json.loads(requests.get(server.url + "healthz", timeout=CLIENT_TIMEOUT_S).text) == {"status": "ok"}
