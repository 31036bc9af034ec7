"""uWSGI (from PyPI, built for this Python) serving the app with the repository's uwsgi.ini.

Fast: what uwsgi.ini makes of the environment, read back with `uwsgi --get` (uWSGI's own parser), and
that a bad setting stops uWSGI instead of leaving it serving without an app. Slow: real uWSGI in front
of a real ResNet50 worker on a free loopback port, its answers compared with the model's own.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from support import ROOT
from support.images import distinct_photos, encode, photo
from support.traffic import batch_sizes, expected_top5, same_answer, wait_for

import stack

UWSGI = str(Path(sys.executable).parent / "uwsgi")
CLIENT_TIMEOUT_S = 120
SETTINGS = ("WEB_HOST", "WEB_PORT", "WEB_WORKERS", "WEB_THREADS", "GUNICORN_TIMEOUT_S", "REQUEST_TIMEOUT_S")


def clean_env(**env) -> dict:
    return {k: v for k, v in os.environ.items() if k not in SETTINGS} | env


def uwsgi_option(name: str, **env) -> str:
    """The value uwsgi.ini gives an option in this environment, as uWSGI itself parses it."""
    result = subprocess.run(
        [UWSGI, "--ini", "uwsgi.ini", "--get", name], cwd=ROOT, env=clean_env(**env), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def settings_defaults() -> dict:
    code = f"import json, settings; print(json.dumps({{n: getattr(settings, n) for n in {SETTINGS!r}}}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_uwsgi_ini_defaults_are_settings_py_defaults():
    s = settings_defaults()
    assert uwsgi_option("http-socket") == f"{s['WEB_HOST']}:{s['WEB_PORT']}"  # 127.0.0.1: loopback only
    assert uwsgi_option("processes") == str(s["WEB_WORKERS"])
    assert uwsgi_option("threads") == str(s["WEB_THREADS"])
    harakiri = int(uwsgi_option("harakiri"))
    assert harakiri == s["GUNICORN_TIMEOUT_S"] > s["REQUEST_TIMEOUT_S"]  # never kills a request that only waits
    assert int(uwsgi_option("worker-reload-mercy")) == harakiri  # a graceful stop waits that long at most


def test_uwsgi_ini_reads_the_same_environment_variables_as_gunicorn():
    env = {"WEB_HOST": "[::1]", "WEB_PORT": "6001", "WEB_WORKERS": "3", "WEB_THREADS": "4", "GUNICORN_TIMEOUT_S": "45"}
    assert uwsgi_option("http-socket", **env) == "[::1]:6001"
    assert uwsgi_option("processes", **env) == "3" and uwsgi_option("threads", **env) == "4"
    assert uwsgi_option("harakiri", **env) == "45"
    assert uwsgi_option("http-socket", WEB_HOST="0.0.0.0") == "0.0.0.0:5000"


def test_uwsgi_exits_when_the_app_cannot_load_instead_of_serving_without_it():
    port = stack.free_port()
    result = subprocess.run(
        [UWSGI, "--ini", "uwsgi.ini"],
        cwd=ROOT,
        env=clean_env(WEB_PORT=str(port), REQUEST_TIMEOUT_S="soon"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "REQUEST_TIMEOUT_S must be a number" in result.stdout + result.stderr


# --- Real uWSGI in front of a real ResNet50 worker ---------------------------------------------------------


@pytest.fixture(scope="module")
def served(make_module_stack, tmp_path_factory):
    metrics_dir = tmp_path_factory.mktemp("uwsgi-metrics")
    (metrics_dir / "counter_999999.db").write_bytes(b"a stale file of an earlier run")
    s = make_module_stack(
        REQUEST_TIMEOUT_S=60,
        GUNICORN_TIMEOUT_S=90,
        MAX_UPLOAD_MB=2,
        WEB_THREADS=8,
        PROMETHEUS_MULTIPROC_DIR=metrics_dir,
    )
    s.start_worker()
    s.web = stack.start_uwsgi(s.env, s.logdir / "uwsgi.log")
    s.wait_ready()
    return s


def post(url: str, data: bytes, session=None, **kwargs) -> requests.Response:
    return (session or requests).post(
        url + "predict", files={"image": ("photo.jpg", data)}, timeout=CLIENT_TIMEOUT_S, **kwargs
    )


@pytest.mark.slow
def test_uwsgi_serves_the_models_own_top5(served, resnet):
    images = [encode(photo("chelsea"), "JPEG"), encode(photo("coffee"), "PNG")]
    for data, expected in zip(images, expected_top5(resnet, images), strict=True):
        response = post(served.url, data)
        assert response.status_code == 200, response.text
        assert response.headers["X-Request-ID"] and "inference" in response.headers["Server-Timing"]
        assert same_answer(response.json()["predictions"], expected)


@pytest.mark.slow
def test_concurrent_requests_through_uwsgi_share_batches_and_each_gets_its_own_answer(served, resnet):
    images = distinct_photos(16)  # 2 processes x 8 threads: all at once
    expected = expected_top5(resnet, images)
    before = len(batch_sizes(served.worker_logs()))
    with ThreadPoolExecutor(len(images)) as pool:
        responses = list(pool.map(lambda data: post(served.url, data), images))
    assert [r.status_code for r in responses] == [200] * len(images)
    assert all(same_answer(r.json()["predictions"], e) for r, e in zip(responses, expected, strict=True))
    sizes = batch_sizes(served.worker_logs())[before:]
    assert sum(sizes) == len(images) and max(sizes) > 1, sizes


@pytest.mark.slow
def test_bad_uploads_through_uwsgi_get_json_4xx_and_it_keeps_serving(served):
    good = encode(photo("chelsea"), "JPEG")
    url = served.url + "predict"
    cases = [
        (lambda: post(served.url, b"this is text, not a jpeg"), 400),
        (lambda: post(served.url, good[: len(good) // 2]), 400),
        (lambda: post(served.url, b"<svg xmlns='http://www.w3.org/2000/svg'/>"), 415),
        # Over MAX_UPLOAD_MB (2): the app's JSON 413, not a connection closed by uWSGI.
        (lambda: requests.post(url, data=b"\xff" * (3 * 1024 * 1024), headers={"Content-Type": "image/jpeg"}), 413),
        # uWSGI's http-socket passes a chunked body on as empty: a 400 that says so, not a 5xx.
        (lambda: requests.post(url, data=iter([good]), headers={"Content-Type": "image/jpeg"}), 400),
        (lambda: requests.get(url, timeout=30), 405),
        (lambda: requests.post(url, files={"file": ("x.jpg", good)}, timeout=30), 400),
    ]
    for send, status in cases:
        response = send()
        assert response.status_code == status, response.text
        assert response.headers["Content-Type"] == "application/json" and response.json()["success"] is False
        assert post(served.url, good).status_code == 200


@pytest.mark.slow
def test_uwsgi_takes_large_headers_and_loads_the_app_in_each_worker_after_the_fork(served):
    response = requests.get(served.url + "healthz", headers={"Cookie": "session=" + "x" * 20_000}, timeout=30)
    assert response.status_code == 200  # buffer-size: uWSGI's default 4 KB would drop this request
    log = served.web.log_text()
    master = int(re.search(r"spawned uWSGI master process \(pid: (\d+)\)", log).group(1))
    loaded_in = {int(pid) for pid in re.findall(r"WSGI app 0 \(mountpoint=''\) ready in .* pid: (\d+)", log)}
    assert len(loaded_in) == 2 and master not in loaded_in  # lazy-apps: once per worker, never in the master


@pytest.mark.slow
def test_a_keep_alive_client_is_told_each_connection_closes_and_never_gets_a_connection_error(served):
    """uWSGI's http-socket closes the connection after each answer; without 'Connection: close' a pooled
    connection was reused as it closed and about 1 request in 10 failed under load (bench.path_ceiling)."""
    good = encode(photo("chelsea"), "JPEG")
    with requests.Session() as session, ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: post(served.url, good, session=session), range(24)))
        health = [session.get(served.url + "healthz", timeout=10) for _ in range(50)]
    assert [r.status_code for r in responses + health] == [200] * 74
    assert {r.headers.get("Connection") for r in responses + health} == {"close"}


def predict_200s(url: str) -> float:
    """/metrics' count of answered predictions (0 before the first)."""
    text = requests.get(url + "metrics", timeout=10).text
    found = re.search(r'^http_requests_total\{endpoint="/predict",method="POST",status="200"\} (\S+)', text, re.M)
    return float(found[1]) if found else 0.0


@pytest.mark.slow
def test_metrics_under_uwsgi_count_every_process_and_leave_an_earlier_runs_files_out(served):
    metrics_dir = Path(served.env["PROMETHEUS_MULTIPROC_DIR"])
    assert not (metrics_dir / "counter_999999.db").exists()  # emptied at start (uwsgi.ini's exec-asap)
    before = predict_200s(served.url)
    good = encode(photo("chelsea"), "JPEG")
    for _ in range(6):
        assert post(served.url, good).status_code == 200
    # Whichever process answers a scrape, it sums every process's files: the same count each time.
    assert [predict_200s(served.url) - before for _ in range(6)] == [6.0] * 6
    assert len({p.name.split("_")[-1] for p in metrics_dir.glob("*.db")}) == 2  # both processes write there


def held(url: str) -> int:
    """Requests in Redis (queued or claimed), as /readyz says."""
    status = requests.get(url + "readyz", timeout=10).json()
    return status["queue_depth"] + status["in_progress"]


@pytest.mark.slow
def test_sigterm_lets_the_requests_in_flight_finish_then_uwsgi_exits_0(served):
    """Last in this module: it stops the module's uWSGI. The worker is paused so that every request is
    surely in flight (queued, its client waiting) when uWSGI gets SIGTERM, and resumed after it."""
    images = distinct_photos(8)
    worker = served.workers[0]
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(len(images)) as pool:
            futures = [pool.submit(post, served.url, data) for data in images]
            wait_for(lambda: held(served.url) == len(images), 30)
            served.web.process.send_signal(signal.SIGTERM)
            time.sleep(1)  # uWSGI is stopping, the requests still wait for their answers
            assert served.web.alive()
            os.kill(worker.pid, signal.SIGCONT)
            statuses = [f.result().status_code for f in futures]
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert statuses == [200] * len(images)
    assert served.web.process.wait(60) == 0
    assert "graceful shutdown triggered" in served.web.log_text()
