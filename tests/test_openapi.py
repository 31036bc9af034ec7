"""openapi.json, the API's description: valid, served as kept, complete, and what the service really answers.

Schemathesis generates requests from the document (valid ones, invalid ones and the boundaries between)
and checks every answer against it: never a 5xx, and status, content type, headers and body as documented.
The fast run goes through the Flask app in process with the stand-in worker; the slow one goes through real
gunicorn to a real ResNet50 model worker. Both drive the engine `st run` uses, with the same settings as
`st run URL/openapi.json --checks <CHECKS> --max-examples 60 --seed 20240531 --generation-deterministic`
(schemathesis 4.32.5's own pytest loader, `schemathesis.pytest.from_fixture`, fails under pytest 9.2).
"""

import base64
import json
import re
import time
from collections import Counter

import pytest
import schemathesis
import schemathesis.checks
from PIL import Image
from schemathesis.engine import Status, events, from_schema
from support import ROOT
from support.images import distinct_photos, encode, photo
from support.stand_in import MODEL, StandInWorker, app_queue

SPEC_PATH = ROOT / "openapi.json"
SPEC = json.loads(SPEC_PATH.read_text())
CONFORMANCE = [
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
]
CHECKS = ["not_a_server_error", *CONFORMANCE]
SEED = 20240531
AUTOMATIC_METHODS = {"HEAD", "OPTIONS"}  # Flask answers these for every GET route by itself
EXAMPLE_MODEL = "resnet50"  # the model id the document's examples name: the stand-in serves under it


def config(max_examples: int = 40, auth: dict | None = None) -> schemathesis.Config:
    """Reproducible runs: a fixed seed, derandomized Hypothesis, no example database carried between runs."""
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "workers": 1,
            "generation": {"max-examples": max_examples, "deterministic": True, "database": "none"},
            "checks": {"enabled": False} | {name: {"enabled": True} for name in CHECKS},
            "phases": {"stateful": {"enabled": False}},  # no links between operations to follow
        }
        | ({"auth": auth} if auth else {})
    )


def check_functions(names: list[str]) -> list:
    return [getattr(schemathesis.checks, name) for name in names]


def described_operations() -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in SPEC["paths"].items() for method in item}


def run_schemathesis(schema) -> Counter:
    """Every phase (examples, coverage, fuzzing) on every operation; fails listing each failed check.

    Returns the answers' status codes per operation, so a test can show that the run reached them.
    """
    # Schemathesis skips the operation that served the document unless a filter names it; this names them all.
    schema = schema.include(path_regex="^/")
    statuses, problems = Counter(), []
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            for interaction in recorder.interactions.values():
                statuses[recorder.label, getattr(interaction.response, "status_code", None)] += 1
            for checks in recorder.checks.values():
                problems += [
                    f"{recorder.label} [{check.name}] {check.failure_info.failure.title}\n"
                    f"{check.failure_info.failure.message}\n{check.failure_info.code_sample}"
                    for check in checks
                    if check.failure_info is not None
                ]
            if event.status == Status.ERROR:
                problems.append(f"{recorder.label}: the {event.phase.value} phase ended in an error")
        elif isinstance(event, events.NonFatalError | events.FatalError):
            problems.append(f"{type(event).__name__}: {getattr(event, 'value', None) or event.exception!r}")
    assert not problems, "\n\n".join(problems)
    return statuses


def show(statuses: Counter, elapsed: float) -> str:
    lines = [f"{label}: {status}: {n}" for (label, status), n in sorted(statuses.items(), key=str)]
    return f"{sum(statuses.values())} requests in {elapsed:.1f} s\n" + "\n".join(lines)


@pytest.fixture
def make_app(make_app):
    """conftest's make_app with a 5 s deadline and 2 MB uploads."""
    return lambda **config: make_app(**({"REQUEST_TIMEOUT_S": 5, "MAX_UPLOAD_MB": 2} | config))


# --- The document -----------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_and_every_operation_loads():
    schema = schemathesis.openapi.from_path(SPEC_PATH, config=config())
    schema.validate()  # against the OpenAPI 3.0 meta-schema; raises on the first violation
    operations = [result.ok() for result in schema.get_all_operations()]  # .ok() raises for one that did not load
    assert {(op.path, op.method.upper()) for op in operations} == described_operations()


def test_the_route_serves_exactly_the_file_in_the_repository(make_app):
    response = make_app().test_client().get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.data == SPEC_PATH.read_bytes()


def test_every_route_of_the_app_is_described_with_its_methods_and_nothing_else(make_app):
    served = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method)  # Flask's <name> is OpenAPI's {name}
        for rule in make_app().url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - AUTOMATIC_METHODS
    }
    assert served == described_operations()


# --- The app in process, with the stand-in worker ---------------------------------------------


KEY = "k" * 16  # an API key for the tests


@pytest.mark.parametrize("auth", [None, "bearer", "apiKey"], ids=["open", "bearer key", "X-API-Key"])
def test_schemathesis_finds_no_5xx_and_no_answer_off_the_document_in_process(make_app, auth):
    """Open, and with API keys on, schemathesis sending a key the way each security scheme describes."""
    app = make_app(API_KEYS=(KEY,) if auth else ())
    credentials = {"bearer": {"bearer": KEY}, "apiKey": {"api_key": KEY}}
    with StandInWorker(app_queue(app, EXAMPLE_MODEL)):
        auth_config = {"openapi": {auth: credentials[auth]}} if auth else None
        schema = schemathesis.openapi.from_wsgi("/openapi.json", app, config=config(100, auth_config))
        started = time.monotonic()
        statuses = run_schemathesis(schema)
    print(show(statuses, time.monotonic() - started))
    assert {label for label, _ in statuses} == {f"{method} {path}" for path, method in described_operations()}
    assert statuses["POST /predict", 200] and statuses["POST /predict", 400]  # images accepted and refused
    assert statuses["POST /v2/models/{model_id}/infer", 200] and statuses["POST /v2/models/{model_id}/infer", 400]


def test_a_form_part_without_a_name_is_refused_with_400_not_500(make_app):
    """Found by schemathesis: werkzeug files a part that has no name under None, and the 400's message,
    which lists the fields sent, could not sort None among the names."""
    body = b"--B\r\nContent-Disposition: form-data\r\n\r\nhello\r\n"
    body += b'--B\r\nContent-Disposition: form-data; name="photo"; filename="cat.jpg"\r\n\r\nxyz\r\n--B--\r\n'
    app = make_app()
    with StandInWorker(app_queue(app, EXAMPLE_MODEL)):
        response = app.test_client().post("/predict", data=body, content_type="multipart/form-data; boundary=B")
    assert response.status_code == 400
    assert response.json == {"success": False, "error": "no 'image' field in the form (fields sent: (no name), photo)"}


SVG = b"<svg xmlns='http://www.w3.org/2000/svg'/>"
PNG = encode(Image.new("RGB", (8, 8)), "PNG")
FORM, RAW = {"media_type": "multipart/form-data"}, {"media_type": "image/png", "body": PNG}
V2_INFER, V2_MODEL = "POST /v2/models/{model_id}/infer", {"path_parameters": {"model_id": EXAMPLE_MODEL}}
V2 = V2_MODEL | {"media_type": "application/json", "body": {"inputs": [
    {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(PNG).decode()]}]}}  # fmt: skip


def scenario(name, status, request_=RAW, worker="answering", operation="POST /predict", **config_):
    """A request to one operation, to an app with config_ and a worker that is: "answering" (the stand-in),
    "failing" (it answers every image with a model error), "stalled" (a fresh heartbeat, never claims),
    "full" (stalled, with one message queued: set QUEUE_MAX=1), "gone" (registered, no worker alive) or None."""
    return pytest.param(config_, worker, operation, request_, status, id=name)


@pytest.mark.parametrize(
    "config_, worker, operation, request_, status",
    [
        scenario("no image field", 400, FORM | {"body": {"picture": PNG}}),
        scenario("bad top", 400, FORM | {"body": {"image": PNG}, "query": {"top": 21}}),
        scenario("not an image", 400, RAW | {"body": b"hello"}),
        scenario("body too large", 413, RAW | {"body": b"\xff" * (2 << 20) + b"!"}),
        scenario("SVG", 415, {"media_type": "image/svg+xml", "body": SVG}),
        scenario("served", 200),
        scenario("no worker", 503, worker=None),
        scenario("queue full", 503, worker="full", QUEUE_MAX=1),
        scenario("stalled worker", 504, worker="stalled", REQUEST_TIMEOUT_S=0.5),
        scenario("model failed", 500, worker="failing"),
        scenario("no key", 401, API_KEYS=(KEY,)),
        scenario("wrong key", 401, RAW | {"headers": {"X-API-Key": "x" * 16}}, API_KEYS=(KEY,)),
        scenario("bearer key", 200, RAW | {"headers": {"Authorization": f"Bearer {KEY}"}}, API_KEYS=(KEY,)),
        scenario("X-API-Key", 200, RAW | {"headers": {"X-API-Key": KEY}}, API_KEYS=(KEY,)),
        scenario("ready", 200, {}, operation="GET /readyz"),
        scenario("not ready", 503, {}, worker=None, operation="GET /readyz"),
        scenario("v2 served", 200, V2, operation=V2_INFER),
        scenario("v2 bad tensor", 400, V2 | {"body": {"inputs": [{"name": "image"}]}}, operation=V2_INFER),
        scenario("v2 unknown model", 404, V2 | {"path_parameters": {"model_id": "nope"}}, operation=V2_INFER),
        scenario("v2 no worker", 503, V2, worker="gone", operation=V2_INFER),
        scenario("v2 stalled worker", 504, V2, worker="stalled", operation=V2_INFER, REQUEST_TIMEOUT_S=0.5),
        scenario("v2 model failed", 500, V2, worker="failing", operation=V2_INFER),
        scenario("v2 no key", 401, V2, operation=V2_INFER, API_KEYS=(KEY,)),
        scenario("v2 model ready", 200, V2_MODEL, operation="GET /v2/models/{model_id}/ready"),
        scenario("v2 metadata", 200, V2_MODEL, operation="GET /v2/models/{model_id}"),
        scenario("v2 not ready", 503, {}, worker=None, operation="GET /v2/health/ready"),
    ],
)
def test_each_status_the_service_gives_matches_the_document(make_app, config_, worker, operation, request_, status):
    """Also the statuses a fuzzer does not reach (no worker, a full queue, a stall, a model failure)."""
    app = make_app(**config_)
    queue = app_queue(app, EXAMPLE_MODEL)
    method, path = operation.split()
    case = schemathesis.openapi.from_wsgi("/openapi.json", app, config=config())[path][method].Case(**request_)
    if worker in ("stalled", "full", "gone"):
        queue.heartbeat("stalled", MODEL)
    if worker == "gone":
        queue.redis.delete(queue.keys.workers)
    if worker == "full":
        queue.enqueue(b"waiting")
    if worker in ("answering", "failing"):
        with StandInWorker(queue, error=(500, "the model failed") if worker == "failing" else None):
            response = case.call()
    else:
        response = case.call()
    assert response.status_code == status, response.text
    case.validate_response(response, checks=check_functions(CONFORMANCE))


def test_the_rate_limit_answer_matches_the_document(make_app):
    app = make_app(RATE_LIMIT="1/minute")
    case = schemathesis.openapi.from_wsgi("/openapi.json", app, config=config())["/predict"]["POST"].Case(**RAW)
    with StandInWorker(app_queue(app, EXAMPLE_MODEL)):
        first, second = case.call(), case.call()
    assert (first.status_code, second.status_code) == (200, 429)
    case.validate_response(second, checks=check_functions(CONFORMANCE))


# --- The live server: real gunicorn and a real ResNet50 model worker --------------------------


@pytest.fixture(scope="module")
def live(make_module_stack):
    return make_module_stack.serve(REQUEST_TIMEOUT_S=60, GUNICORN_TIMEOUT_S=90, MAX_UPLOAD_MB=2)


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_answer_off_the_document_on_the_live_server(live):
    schema = schemathesis.openapi.from_url(live.url + "openapi.json", config=config(max_examples=60))
    started = time.monotonic()
    statuses = run_schemathesis(schema)
    print(show(statuses, time.monotonic() - started))
    assert {label for label, _ in statuses} == {f"{method} {path}" for path, method in described_operations()}
    assert statuses["POST /predict", 200] and statuses["POST /predict", 400]  # images accepted and refused


@pytest.mark.slow
def test_real_photos_sent_every_documented_way_get_200_answers_that_match_the_document(live):
    operation = schemathesis.openapi.from_url(live.url + "openapi.json", config=config())["/predict"]["POST"]
    cat, coffee, astronaut = distinct_photos(3)
    requests_ = [
        ({"media_type": "multipart/form-data", "body": {"image": cat}}, 5),
        ({"media_type": "image/jpeg", "body": coffee, "query": {"top": 1}}, 1),
        ({"media_type": "application/octet-stream", "body": astronaut, "query": {"top": 20}}, 20),
        ({"media_type": "image/png", "body": encode(photo("rocket"), "PNG"), "query": {"top": 3}}, 3),
    ]
    for request_, top in requests_:
        response = operation.Case(**request_).call_and_validate(checks=check_functions(CHECKS))
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == top
