"""The Open Inference Protocol (KServe "v2", REST): open_inference.py's reading and writing, the web's /v2 routes
on a stand-in worker (fast), and Triton's own client, tritonclient[http], against real gunicorn and model
workers serving two real models at once (slow): ResNet50 and MobileNetV2 with seeded weights, each answer
compared with its own model's direct answer for the same pixels.
"""

import base64
import json
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from support import ROOT
from support.images import distinct_photos, encode, photo
from support.stand_in import (
    CAT,
    MODEL,
    TEST_MODEL,
    StandInWorker,
    app_queue,
    expected_checksum,
    post_image,
    served_queue,
)
from support.traffic import PROBABILITY_TOLERANCE, batch_sizes, same_answer, wait_for

import helpers
import image_queue
import open_inference
from image_queue import ModelDirectory
from open_inference import HEADER_LENGTH, ProtocolError, encode_pixels_request, infer_response, parse_infer_request

SIZE = (MODEL.width, MODEL.height)


MAX_IMAGES = 100  # QUEUE_MAX


def binary_request(header: dict, tensor: bytes) -> tuple[bytes, str]:
    """A request in the binary tensor data extension: the JSON, then the tensor; and the JSON's length."""
    head = json.dumps(header).encode()
    return head + tensor, str(len(head))


def bytes_elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


# --- Reading and writing (pure) ---------------------------------------------------------------


def test_a_json_bytes_input_is_base64_images_and_the_default_output_is_every_probability():
    body = {"id": "r1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [
        base64.b64encode(b"one").decode(), base64.b64encode(b"two").decode()]}]}  # fmt: skip
    infer = parse_infer_request(json.dumps(body).encode(), None, SIZE, 2, MAX_IMAGES)
    assert infer.images == [b"one", b"two"] and infer.pixels is None and infer.count == 2
    assert (infer.id, infer.classification, infer.binary_output) == ("r1", 0, False)


def test_binary_bytes_and_uint8_inputs_are_read_from_after_the_json():
    header = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1, 2], "parameters": {"binary_data_size": 4 + 3 + 4 + 5}}
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2, "binary_data": True}}],
    }
    body, length = binary_request(header, bytes_elements(b"cat", b"house"))
    infer = parse_infer_request(body, length, SIZE, 2, MAX_IMAGES)
    assert infer.images == [b"cat", b"house"] and (infer.classification, infer.binary_output) == (2, True)

    pixels = np.arange(2 * 32 * 48 * 3, dtype=np.uint8).reshape(2, 32, 48, 3)
    header = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 32, 48, 3],
                          "parameters": {"binary_data_size": pixels.nbytes}}]}  # fmt: skip
    infer = parse_infer_request(*binary_request(header, pixels.tobytes()), SIZE, 2, MAX_IMAGES)
    assert np.array_equal(infer.pixels, pixels) and infer.count == 2


def test_the_clients_pixels_request_reads_back_as_the_same_pixels():
    pixels = np.arange(3 * 32 * 48 * 3, dtype=np.uint8).reshape(3, 32, 48, 3)
    body, headers = encode_pixels_request([p.tobytes() for p in pixels], 32, 48, 5)
    infer = parse_infer_request(body, headers[HEADER_LENGTH], SIZE, 10, MAX_IMAGES)
    assert np.array_equal(infer.pixels, pixels) and (infer.classification, infer.binary_output) == (5, True)
    with pytest.raises(ValueError, match="32 x 48 x 3"):
        encode_pixels_request([pixels[0].tobytes()[:-1]], 32, 48, 5)


@pytest.mark.parametrize(
    "body, length, words",
    [
        (b"not json", None, "not JSON"),
        (b"[1]", None, "JSON object"),
        (b'{"inputs": []}', None, "send one input"),
        (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": ["AA=="]}]}', None, "must be BYTES"),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["AA=="]}]}', None, "do not fill"),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["*"]}]}', None, "base64"),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [0], "data": []}]}', None, "no image"),
        (b'{"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]}', None, "no input"),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": "1", "data": ["AA=="]}]}', None, "shape"),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}', None, "neither data"),
        (
            b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 48, 32, 3], "data": []}]}',
            None,
            "[N, 32, 48, 3]",
        ),  # fmt: skip
        (
            b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 48, 3], "data": [300]}]}',
            None,
            "0-255",
        ),  # fmt: skip
        (
            b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 48, 3], "data": [true'
            + b", 0" * (32 * 48 * 3 - 1)
            + b"]}]}",
            None,
            "0-255",
        ),  # JSON true is no pixel value (Python's bool is an int)
        (
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}], "outputs": '
            b'[{"name": "probabilities", "parameters": {"classification": 3}}]}',
            None,
            "from 1 to 2",
        ),  # fmt: skip
        (
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}], "outputs": '
            b'[{"name": "logits"}]}',
            None,
            "no output",
        ),  # fmt: skip
        (b"{}", "9" * 5000, HEADER_LENGTH),  # past int()'s digit limit: still a 400
        (
            b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [' + str(2**54).encode() + b", 32, 48, 3], "
            b'"data": []}]}',
            None,
            "shape must be",
        ),  # 2**54 x ...: numpy's product of that shape wraps to 0
        (
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [' + b", ".join([b"9" * 4000] * 9) + b"], "
            b'"data": ["AA=="]}]}',
            None,
            "shape must be a list of 1 to 8 whole numbers",
        ),  # hundreds of such dimensions held the GIL for seconds in math.prod
        (
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [101], "data": ["AA=="]}]}',
            None,
            "at most 100",
        ),
        (
            b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [101, 32, 48, 3], "data": [0]}]}',
            None,
            "at most 100 images",
        ),  # fmt: skip
        (
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], '
            b'"parameters": {"binary_data_size": 400000}}]}' + b"\x00" * 400000,
            "json",
            "do not fill",
        ),  # 100,000 empty elements for a shape of 1: reading stops at the second
        (b"{}", "99", HEADER_LENGTH),
        (
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]}'
            b"\x05\x00\x00\x00abcd",
            "json",
            "binary_data_size",
        ),  # fmt: skip
        (
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]}'
            b"\x05\x00\x00\x00ab",
            "json",
            "ends inside an element",
        ),  # fmt: skip
    ],
)
def test_a_request_that_breaks_the_protocol_says_what_to_fix(body, length, words):
    if length == "json":  # binary: the JSON's length
        length = str(body.index(b"}]}") + 3)
    with pytest.raises(ProtocolError) as error:
        parse_infer_request(body, length, SIZE, 2, MAX_IMAGES)
    assert words in str(error.value) and len(str(error.value)) < 300  # the request is not echoed back whole


def test_the_answer_is_fp32_probabilities_or_the_classification_strings_in_json_or_binary():
    answers = [
        {"predictions": [{"label": "cat", "probability": 0.75, "index": 1}], "probabilities": np.array([0.25, 0.75])},
        {"predictions": [{"label": "dog", "probability": 0.5, "index": 0}], "probabilities": np.array([0.5, 0.5])},
    ]
    request = open_inference.InferRequest("r", [b"a", b"b"], None, 0, False)
    body, headers = infer_response("m", request, answers)
    output = json.loads(body)["outputs"][0]
    assert json.loads(body)["id"] == "r" and headers["Content-Type"] == "application/json"
    assert output == {"name": "probabilities", "datatype": "FP32", "shape": [2, 2], "data": [0.25, 0.75, 0.5, 0.5]}

    request = open_inference.InferRequest(None, [b"a", b"b"], None, 1, True)
    body, headers = infer_response("m", request, answers)
    head = json.loads(body[: int(headers[HEADER_LENGTH])])
    assert head["outputs"][0]["shape"] == [2, 1] and head["outputs"][0]["datatype"] == "BYTES"
    assert body[int(headers[HEADER_LENGTH]) :] == bytes_elements(b"0.750000:1:cat", b"0.500000:0:dog")
    decoded = open_inference.decode_classification(body, headers[HEADER_LENGTH])  # as the load tools read it
    assert decoded == [
        [{"label": "cat", "probability": 0.75, "index": 1}],
        [{"label": "dog", "probability": 0.5, "index": 0}],
    ]


# --- The /v2 routes, on a stand-in worker -----------------------------------------------------


@pytest.fixture
def app(make_app):
    return make_app(QUEUE_MAX=8)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def worker(app):
    with StandInWorker(app_queue(app)) as w:
        yield w


def infer_json(client, images: list[bytes], model: str = TEST_MODEL, **request):
    tensor = {"name": "image", "datatype": "BYTES", "shape": [len(images)],
              "data": [base64.b64encode(i).decode() for i in images]}  # fmt: skip
    return client.post(f"/v2/models/{model}/infer", json={"inputs": [tensor], **request})


def test_server_and_model_metadata_and_health(client, worker):
    assert client.get("/v2/health/live").json == {"live": True}
    assert client.get("/v2/health/ready").json == {"ready": True}
    assert set(client.get("/v2").json["extensions"]) == {"binary_tensor_data", "classification"}
    metadata = client.get(f"/v2/models/{TEST_MODEL}").json
    assert metadata["name"] == TEST_MODEL and metadata["versions"] == ["1"]
    assert metadata["inputs"][1] == {"name": "pixels", "datatype": "UINT8", "shape": [-1, 32, 48, 3]}
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]
    assert client.get(f"/v2/models/{TEST_MODEL}/versions/1/ready").json == {"name": TEST_MODEL, "ready": True}


def test_unknown_models_and_versions_are_404_json_and_a_model_with_no_worker_is_503(client, app, worker, redis_client):
    for path in ["/v2/models/nope", "/v2/models/nope/ready", f"/v2/models/{TEST_MODEL}/versions/2"]:
        response = client.get(path)
        assert response.status_code == 404 and set(response.json) == {"error"}, path
    assert infer_json(client, [CAT], model="nope").status_code == 404
    assert post_image(client, query="?model=nope").status_code == 404
    assert post_image(client, query="?model=").status_code == 200  # empty: names none, the only model
    sleeping = served_queue(redis_client, app.config["IMAGE_QUEUE"], "sleeping")
    sleeping.heartbeat("gone", MODEL)  # registered, then its only worker went away
    redis_client.delete(sleeping.keys.workers)
    time.sleep(ModelDirectory.FORCED_S)  # the 404s above each forced a read of the registry: the next is due now
    for path in ["/v2/models/sleeping/ready", "/v2/models/sleeping"]:
        response = client.get(path)
        assert response.status_code == 503 and set(response.json) == {"error"}, path
    assert infer_json(client, [CAT], model="sleeping").status_code == 503


def test_each_image_is_its_own_message_and_the_answers_come_back_in_order(client, worker):
    dark, bright = encode(photo("chelsea").point(lambda v: v // 4)), encode(photo("coffee"), "PNG")
    response = infer_json(client, [dark, bright, CAT], outputs=[{"name": "probabilities",
                                                                 "parameters": {"classification": 1}}])  # fmt: skip
    assert response.status_code == 200, response.text
    output = response.json["outputs"][0]
    assert output["shape"] == [3, 1] and output["datatype"] == "BYTES"
    assert [s.split(":", 2)[2] for s in output["data"]] == [expected_checksum(i) for i in (dark, bright, CAT)]
    assert sum(worker.batches) == 3  # three queue messages

    response = infer_json(client, [CAT], outputs=[])  # no output named: every probability, FP32
    assert response.json["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [1, 2],
                                           "data": [1.0, 0.0]}  # fmt: skip


def test_a_requests_images_are_decoded_in_turn_under_one_decode_slot(app, client, worker):
    """A request's images take one decode slot for all of them, not one each: each new turn at the slot
    let other requests in between, and under load some requests waited turn after turn (p99)."""
    slots = app.extensions["decode_slots"]
    taken = []
    acquire = slots.acquire

    def counted(*args, **kwargs):
        taken.append(1)
        return acquire(*args, **kwargs)

    slots.acquire = counted
    response = infer_json(client, [CAT, encode(photo("coffee"), "PNG"), CAT])
    assert response.status_code == 200, response.text
    assert len(taken) == 1 and sum(worker.batches) == 3
    assert post_image(client).status_code == 200 and len(taken) == 2  # /predict: one image, one turn


def test_a_requests_json_is_parsed_under_a_decode_slot_too(app, client, worker):
    """A JSON body parses into ~11 x its size (a 16 MB request of UINT8 pixels, ~190 MB): the parse waits for a
    decode slot as a decode does, so DECODE_SLOTS bounds it too. Pixels need no decode: they took no slot."""
    pixels = np.zeros((1, *reversed(SIZE), 3), np.uint8)
    body = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                        "data": pixels.ravel().tolist()}]}  # fmt: skip
    assert client.post(f"/v2/models/{TEST_MODEL}/infer", json=body).status_code == 200
    for _ in range(app.config["DECODE_SLOTS"]):
        app.extensions["decode_slots"].acquire()  # huge requests are being parsed or decoded
    response = client.post(f"/v2/models/{TEST_MODEL}/infer", json=body)
    assert response.status_code == 503 and "decoders stayed busy" in response.json["error"]


def test_uint8_pixels_reach_the_worker_unchanged(client, worker):
    pixels = helpers.prepare_image(helpers.open_image(CAT, 10**8), SIZE)[None]
    header = {
        "inputs": [
            {
                "name": "pixels",
                "datatype": "UINT8",
                "shape": list(pixels.shape),
                "parameters": {"binary_data_size": pixels.nbytes},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 1, "binary_data": True}}],
    }
    body, length = binary_request(header, pixels.tobytes())
    response = client.post(f"/v2/models/{TEST_MODEL}/infer", data=body, headers={HEADER_LENGTH: length})
    assert response.status_code == 200, response.text
    head_length = int(response.headers[HEADER_LENGTH])
    (size,) = struct.unpack_from("<I", response.data, head_length)
    assert response.data[head_length + 4 : head_length + 4 + size].decode().split(":", 2)[2] == expected_checksum(CAT)


def test_a_bad_image_fails_the_whole_request_before_anything_is_queued(client, worker, monkeypatch):
    pushed = []
    enqueue = image_queue.ImageQueue.enqueue
    monkeypatch.setattr(
        image_queue.ImageQueue, "enqueue", lambda self, *m, **k: pushed.append(m) or enqueue(self, *m, **k)
    )
    response = infer_json(client, [CAT, b"not an image"])
    assert response.status_code == 400 and "image" in response.json["error"] and set(response.json) == {"error"}
    assert pushed == [] and worker.batches == []  # nothing pushed, so nothing withdrawn or claimed later
    assert infer_json(client, [CAT]).status_code == 200 and len(pushed) == 1  # the spy sees what is pushed
    assert client.post(f"/v2/models/{TEST_MODEL}/infer", data=b"{").status_code == 400
    gzipped = client.post(f"/v2/models/{TEST_MODEL}/infer", data=b"\x1f\x8b", headers={"Content-Encoding": "gzip"})
    assert gzipped.status_code == 415 and "uncompressed" in gzipped.json["error"]


def test_the_limits_of_predict_apply(make_app, client, app, worker):
    response = infer_json(client, [CAT] * 9)  # QUEUE_MAX 8: can never fit
    assert response.status_code == 400 and "at most 8" in response.json["error"]
    response = infer_json(client, [bytes(800_000)])  # ~1.1 MB of JSON: over MAX_UPLOAD_MB 1
    assert response.status_code == 413 and set(response.json) == {"error"}
    many_pixels = make_app(MAX_IMAGE_PIXELS=1000).test_client()
    predict = many_pixels.post("/predict", data=CAT, content_type="image/jpeg")
    response = infer_json(many_pixels, [CAT])
    assert response.status_code == predict.status_code >= 400 and "pixels" in response.json["error"]
    keyed = make_app(API_KEYS=("secret-key-000000000000",)).test_client()
    assert infer_json(keyed, [CAT]).status_code == 401
    headers = {"Authorization": "Bearer secret-key-000000000000"}
    assert keyed.post(f"/v2/models/{TEST_MODEL}/infer", json={}, headers=headers).status_code == 400


def test_a_request_that_does_not_fit_the_queue_is_refused_whole_and_one_that_does_waits_until_its_deadline(
    client, app, redis_client
):
    queue = app_queue(app)
    queue.heartbeat("idle", MODEL)  # a worker that claims nothing: the queue fills
    queue.enqueue(*[b"x"] * 6)
    response = infer_json(client, [CAT, CAT, CAT])  # 6 + 3 > QUEUE_MAX 8
    assert response.status_code == 503 and "error" in response.json
    assert redis_client.llen(queue.keys.queue) == 6  # none of the three was pushed
    response = infer_json(client, [CAT, CAT])  # fits (8 of 8), and no worker answers by the deadline
    assert response.status_code == 504 and set(response.json) == {"error"}
    assert redis_client.llen(queue.keys.queue) == 6  # the failed request's two were withdrawn


def test_the_rate_limit_is_one_budget_for_predict_and_v2(make_app, worker):
    client = make_app(RATE_LIMIT="3/minute").test_client()
    assert post_image(client).status_code == 200
    assert [infer_json(client, [CAT]).status_code for _ in range(2)] == [200, 200]
    limited = infer_json(client, [CAT])
    assert limited.status_code == 429 and set(limited.json) == {"error"} and limited.headers["Retry-After"]
    assert post_image(client).status_code == 429  # switching protocols does not reset the count
    assert client.get(f"/v2/models/{TEST_MODEL}/ready").status_code == 200  # health is never limited


# --- tritonclient against real processes: two models on one web tier --------------------------


@pytest.fixture(scope="session")
def mobilenet_weights(tmp_path_factory):
    """The real MobileNetV2 architecture with seeded random weights."""
    import keras

    path = tmp_path_factory.mktemp("weights") / "mobilenetv2-seeded.weights.h5"
    keras.utils.set_random_seed(7)
    keras.applications.MobileNetV2(weights=None).save_weights(path)
    return path


@pytest.fixture(scope="module")
def two_models(make_module_stack, mobilenet_weights):
    """One gunicorn, a ResNet50 worker and a MobileNetV2 worker: the web finds both in Redis."""
    stack = make_module_stack(REQUEST_TIMEOUT_S=60, GUNICORN_TIMEOUT_S=90)
    stack.start_worker()
    stack.start_worker(MODEL_NAME="MobileNetV2", MODEL_WEIGHTS=str(mobilenet_weights))
    stack.start_web()
    stack.wait_ready()
    wait_for(lambda: all(requests.get(f"{stack.url}v2/models/{m}/ready", timeout=5).ok for m in MODELS), 240)
    return stack


MODELS = ("resnet50", "mobilenetv2")


@pytest.fixture(scope="module")
def direct(resnet, mobilenet_weights, model_cache):
    """Each model loaded in this process through the worker's own seam (same runtime), by model id."""
    from support import IMAGENET_INDEX

    from classifier import choose_runtime, load_classifier

    runtime, _ = choose_runtime("auto")
    mobilenet = load_classifier("MobileNetV2", str(mobilenet_weights), labels_path=str(IMAGENET_INDEX),
                                runtime=runtime, cache_dir=str(model_cache))  # fmt: skip
    return {"resnet50": resnet, "mobilenetv2": mobilenet}


def own_answer(model, data: bytes, k: int = 5) -> tuple[np.ndarray, list[dict]]:
    pixels = helpers.prepare_image(helpers.open_image(data, 10**8), model.input_size[::-1])
    probabilities = model.predict(pixels[None])[0]
    return probabilities, model.top_k(probabilities, k)


def triton(url: str):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url=url.removeprefix("http://").rstrip("/"), connection_timeout=120,
                                            network_timeout=120)  # fmt: skip


def classify_with_triton(client, model: str, data: bytes, k: int = 5) -> list[dict]:
    import tritonclient.http as httpclient

    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([data], dtype=np.object_), binary_data=True)
    output = httpclient.InferRequestedOutput("probabilities", binary_data=True, class_count=k)
    result = client.infer(model, [image], outputs=[output])
    assert result.get_response()["model_name"] == model
    scores = [s.decode().split(":", 2) for s in result.as_numpy("probabilities").reshape(-1)]
    return [{"label": label, "probability": float(score), "index": int(index)} for score, index, label in scores]


def predict(url: str, model: str, data: bytes) -> list[dict]:
    response = requests.post(url + "predict", params={"model": model}, files={"image": ("i.jpg", data)}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


@pytest.mark.slow
def test_tritonclient_live_ready_and_metadata(two_models):
    client = triton(two_models.url)
    assert client.is_server_live() and client.is_server_ready()
    assert all(client.is_model_ready(m) for m in MODELS) and not client.is_model_ready("nope")
    resnet, mobilenet = (client.get_model_metadata(m) for m in MODELS)
    assert resnet["name"] == "resnet50" and resnet["inputs"][0] == {"name": "image", "datatype": "BYTES", "shape": [-1]}
    assert resnet["inputs"][1]["shape"] == mobilenet["inputs"][1]["shape"] == [-1, 224, 224, 3]
    assert resnet["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data", "classification"]


@pytest.mark.slow
def test_tritonclient_classification_equals_predict_and_the_models_own_answer(two_models, direct):
    client = triton(two_models.url)
    data = encode(photo("chelsea"), "JPEG")
    for model in MODELS:
        served = classify_with_triton(client, model, data)
        _, expected = own_answer(direct[model], data)
        assert same_answer(served, expected), (model, served, expected)
        assert same_answer(served, predict(two_models.url, model, data))
        assert [p["index"] for p in served] == [p["index"] for p in expected]


@pytest.mark.slow
def test_tritonclient_uint8_binary_pixels_give_the_models_own_probabilities(two_models, direct):
    import tritonclient.http as httpclient

    client = triton(two_models.url)
    images = [encode(photo("chelsea"), "JPEG"), encode(photo("coffee"), "PNG")]
    pixels = np.stack([helpers.prepare_image(helpers.open_image(d, 10**8), (224, 224)) for d in images])
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    for model in MODELS:
        result = client.infer(model, [tensor], outputs=[httpclient.InferRequestedOutput("probabilities")])
        served = result.as_numpy("probabilities")
        expected = np.stack([own_answer(direct[model], d)[0] for d in images])
        assert served.shape == (2, 1000) and served.dtype == np.float32
        assert np.allclose(served, expected, atol=PROBABILITY_TOLERANCE, rtol=0), np.abs(served - expected).max()
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="no model 'nope'") as refused:
        client.infer("nope", [tensor])
    assert refused.value.status() == "404"


@pytest.mark.slow
def test_two_models_under_32_way_concurrency_each_answer_is_its_own_models(two_models, direct):
    images = distinct_photos(8)
    expected = {(m, i): own_answer(direct[m], data)[1] for m in MODELS for i, data in enumerate(images)}
    jobs = [(m, i, via) for m in MODELS for i in range(len(images)) for via in ("v2", "predict")] * 2  # 64
    local = threading.local()  # tritonclient's HTTP client (geventhttpclient) is for one thread: one each

    def send(job):
        model, i, via = job
        if via == "predict":
            return same_answer(predict(two_models.url, model, images[i]), expected[model, i])
        if not hasattr(local, "client"):
            local.client = triton(two_models.url)
        return same_answer(classify_with_triton(local.client, model, images[i]), expected[model, i])

    with ThreadPoolExecutor(32) as pool:
        right = list(pool.map(send, jobs))
    assert right.count(False) == 0 and len(right) == 64
    assert max(batch_sizes(two_models.worker_logs())) > 1  # v2's and /predict's images shared batches
    # the two models' answers differ: a mix-up would have shown
    assert any(not same_answer(expected["resnet50", i], expected["mobilenetv2", i]) for i in range(len(images)))


@pytest.mark.slow
def test_the_clients_name_the_model_and_speak_v2(two_models, direct, tmp_path):
    def run(script, *args):
        argv = [sys.executable, script, *args]
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)

    data = (ROOT / "images" / "chelsea.jpg").read_bytes()
    for model in MODELS:  # simple_request.py --model: that model's own top label
        printed = run("simple_request.py", "images/chelsea.jpg", "--url", two_models.url + "predict", "--model", model)
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout.startswith(f"1. {own_answer(direct[model], data)[1][0]['label']}: ")
    unnamed = run("simple_request.py", "images/chelsea.jpg", "--url", two_models.url + "predict")
    assert unnamed.returncode == 1 and "HTTP 400" in unnamed.stderr and "several models" in unnamed.stderr

    summary = tmp_path / "v2.json"
    stress = ["stress_test.py", "--url", two_models.url + "predict", "--count", "12", "--concurrency", "4"]
    v2 = run(*stress, "--protocol", "v2", "--model", "mobilenetv2", "--json", str(summary), "--processes", "2")
    assert v2.returncode == 0 and "/v2/models/mobilenetv2/infer" in v2.stdout, v2.stdout + v2.stderr
    assert "over 2 processes" in v2.stdout
    figures = json.loads(summary.read_text())
    assert figures["succeeded"] == 12 and figures["time_split_ms"]["inference"] > 0  # v2 sends Server-Timing
    assert run(*stress, "--model", "resnet50").returncode == 0
    ambiguous = run(*stress, "--protocol", "v2")
    assert ambiguous.returncode != 0 and "name the model with --model" in ambiguous.stderr
