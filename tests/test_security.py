"""Security in the app: API keys, the per-client rate limit, and the security settings (loopback bind).

The Flask test client against the session's real Redis with a stand-in worker (tests/support/stand_in.py).
Redis with a password and over TLS, and limits enforced before a body is read, are in
test_redis_security.py; no pickle anywhere in test_no_pickle.py.
"""

import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import time
import uuid

import pytest
from support import ROOT
from support.stand_in import (
    CAT,
    StandInWorker,
    app_queue,
    assert_json_error,
    bearer,
    counters,
    expected_checksum,
    post_image,
)

import stack
from run_web_server import OPEN_PATHS

KEY_A, KEY_B = secrets.token_hex(16), secrets.token_hex(16)
PASSWORD = secrets.token_urlsafe(18)  # the test Redis servers' requirepass


@pytest.fixture
def make_app(make_app):
    """conftest's make_app with a 3 s deadline; the security settings are the caller's."""
    return lambda **config: make_app(**({"REQUEST_TIMEOUT_S": 3.0} | config))


class UnreadBody(io.BytesIO):
    """A request body that records whether anything read it."""

    touched = False

    def read(self, *args):
        self.touched = True
        return super().read(*args)

    readline = read


# --- API keys ---------------------------------------------------------------------------------


def test_without_api_keys_the_service_is_open_as_by_default(make_app):
    app = make_app()  # API_KEYS from settings: empty unless the environment sets it
    with StandInWorker(app_queue(app)):
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
    with StandInWorker(app_queue(app)):
        response = post_image(app.test_client(), headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json["predictions"][0]["label"] == expected_checksum(CAT)


def test_health_checks_the_welcome_and_the_api_description_stay_open(make_app):
    app = make_app(API_KEYS=(KEY_A,))
    client = app.test_client()
    with StandInWorker(app_queue(app)):
        assert client.get("/readyz").status_code == 200
    assert client.get("/healthz").json == {"status": "ok"}
    assert client.get("/").status_code == 200
    assert OPEN_PATHS == {"/", "/healthz", "/readyz", "/openapi.json", "/v2", "/v2/health/live", "/v2/health/ready"}
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/v2/health/live").status_code == 200 and client.get("/v2").json["name"] == "keras-rest-api"
    assert client.get("/v2/models/standin").json == {
        "error": "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    }
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
    with StandInWorker(app_queue(app)):
        responses = [post_image(client, headers=bearer(k)) for k in (KEY_A, KEY_A, KEY_B)]
    assert [r.status_code for r in responses] == [200, 429, 401]
    # The 401 and the rate limit were logged (the limit under the key's hash), without either key.
    assert "POST '/predict': 401, an unknown API key" in caplog.text
    assert re.search(r"ratelimit .* \(key-[0-9a-f]{16}\) exceeded", caplog.text), caplog.text
    for secret in (KEY_A, KEY_B):
        assert secret not in caplog.text
        assert all(secret not in r.get_data(as_text=True) + str(r.headers) for r in responses)


# --- Rate limit -------------------------------------------------------------------------------


def test_the_rate_limit_is_off_by_default_with_no_limiter_at_all(make_app, redis_client, queue_name):
    app = make_app()
    assert app.config["RATE_LIMIT"] == "" and "rate_limiter" not in app.extensions
    assert "limiter" not in app.extensions  # Flask-Limiter is not even registered: no storage, no hooks
    client = app.test_client()
    with StandInWorker(app_queue(app)):
        assert [post_image(client).status_code for _ in range(12)] == [200] * 12
    assert counters(redis_client, queue_name) == {}


def test_over_the_limit_a_client_gets_429_json_with_retry_after(make_app):
    app = make_app(RATE_LIMIT="3/minute")
    client = app.test_client()
    with StandInWorker(app_queue(app)):
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
    with StandInWorker(app_queue(app)):
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

    with StandInWorker(app_queue(app)):
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

    with StandInWorker(app_queue(app)):
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
        with StandInWorker(app_queue(first)), StandInWorker(app_queue(second)):
            on_first = [post_image(first.test_client(), headers=bearer(KEY_A)).status_code for _ in range(3)]
            on_second = post_image(second.test_client(), headers=bearer(KEY_A)).status_code
        counted = counters(redis_client, queue_name)
        assert on_first == [200, 200, 429] and on_second == 200
        [(key, count)] = counted.items()
        assert (
            key.startswith(f"{{{queue_name}}}:ratelimit:") and "/global/" in key and count == 3
        )  # one budget: /predict and v2
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


def test_readyz_shows_the_queue_figures_only_with_a_valid_key(make_app):
    app = make_app(API_KEYS=(KEY_A,))
    client = app.test_client()
    with StandInWorker(app_queue(app)):
        for headers in ({}, {"X-API-Key": "not-a-key-but-long-enough"}):
            response = client.get("/readyz", headers=headers)
            assert response.status_code == 200 and response.json == {"ready": True}  # open, but says no more
        figures = client.get("/readyz", headers={"X-API-Key": KEY_A}).json
        unknown = [client.get("/readyz?model=nope", headers=h) for h in ({}, {"X-API-Key": KEY_A})]
    assert figures["ready"] is True and figures["workers"] == 1 and "queue_depth" in figures and "model" in figures
    assert [r.status_code for r in unknown] == [404, 404]
    assert "models:" not in unknown[0].json["error"] and "models:" in unknown[1].json["error"]  # listed to keys only


def test_a_line_break_in_a_refused_path_cannot_forge_a_log_line(make_app, caplog):
    app = make_app(API_KEYS=(KEY_A,))
    caplog.set_level(logging.INFO)
    forged = "/x%0A2026-12-08 00:00:00,000 ERROR model_server[1]: FORGED"
    assert app.test_client().get(forged, headers=bearer(KEY_B)).status_code == 401
    assert not any(line.startswith("2026-12-08 00:00:00,000 ERROR") for line in caplog.text.splitlines())
    assert "\\n2026-12-08" in caplog.text  # the line break shown escaped, on the 401's own line
