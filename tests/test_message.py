"""The queue's message and answer bytes (image_queue.py's format): pure functions, no Redis."""

import base64
import json

import numpy as np
import pytest

import image_queue


def test_message_round_trip_keeps_every_pixel():
    pixels = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    raw = image_queue.encode_message("abc123", 1_800_000_000.25, 5, pixels)
    message = image_queue.decode_message(raw)
    assert message.request_id == "abc123" and message.deadline == 1_800_000_000.25 and message.top == 5
    assert message.pixels.dtype == np.uint8 and np.array_equal(message.pixels, pixels)


def test_message_is_a_json_header_with_the_id_first_then_the_raw_pixels():
    pixels = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    raw = image_queue.encode_message("f" * 32, 1.0, 5, pixels)
    assert raw.startswith(b'{"id":"' + b"f" * 32)
    header, pixel_bytes = raw.split(b"\n", 1)
    fields = {"id": "f" * 32, "v": image_queue.MESSAGE_FORMAT, "deadline": 1.0, "top": 5, "shape": [224, 224, 3]}
    assert json.loads(header) == fields | {"dtype": "uint8"}
    assert pixel_bytes == pixels.tobytes()  # any language reads it: row-major height x width x RGB
    assert len(raw) <= 150_700  # 150,528 pixel bytes and the header; base64 in JSON was 200,828
    assert image_queue.decode_message(raw).pixels.base is not None  # a view of the message, not a copy


def test_workers_still_read_the_earlier_all_json_base64_message():
    """So that model workers can be upgraded before the web boxes that still send the earlier format."""
    pixels = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    earlier = {"id": "old1", "deadline": 9.5, "top": 3, "shape": [5, 7, 3], "dtype": "uint8"}
    earlier["data"] = base64.b64encode(pixels.tobytes()).decode()
    message = image_queue.decode_message(json.dumps(earlier).encode())
    assert (message.request_id, message.deadline, message.top) == ("old1", 9.5, 3)
    assert np.array_equal(message.pixels, pixels)


def test_workers_still_read_a_message_from_before_format_versions():
    """A web box not yet upgraded sends the same header without "v"."""
    pixels = np.random.default_rng(3).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    header, pixel_bytes = image_queue.encode_message("pre1", 7.0, 2, pixels).split(b"\n", 1)
    unversioned = {k: v for k, v in json.loads(header).items() if k != "v"}
    message = image_queue.decode_message(json.dumps(unversioned).encode() + b"\n" + pixel_bytes)
    assert message.request_id == "pre1" and np.array_equal(message.pixels, pixels)


@pytest.mark.parametrize("version", [image_queue.MESSAGE_FORMAT + 1, 99, "2"])
def test_a_format_version_the_worker_cannot_read_asks_for_a_worker_upgrade_with_503(version):
    raw = good_body(v=version)
    with pytest.raises(image_queue.MessageError, match="upgrade the model workers") as caught:
        image_queue.decode_message(raw)
    assert caught.value.request_id == "req1" and caught.value.status == 503


def test_message_refuses_non_uint8_pixels():
    with pytest.raises(ValueError, match="uint8"):
        image_queue.encode_message("x", 1.0, 5, np.zeros((4, 4, 3), np.float32))


def good_body(pixel_bytes: bytes = bytes(12), **changes) -> bytes:
    header = json.loads(image_queue.encode_message("req1", 2.0, 5, np.zeros((2, 2, 3), np.uint8)).split(b"\n")[0])
    header.update(changes)
    return json.dumps({k: v for k, v in header.items() if v is not None}).encode() + b"\n" + pixel_bytes


@pytest.mark.parametrize(
    ("raw", "request_id", "reason"),
    [
        (b"\xff\xfenot json", None, "not JSON"),
        (b"not json\n" + bytes(12), None, "not JSON"),
        (b"[" * 100_000, None, "not JSON"),  # json.loads raises RecursionError: it must not kill the worker
        (good_body().split(b"\n")[0][:-1] + b',"data":"@@"}', "req1", "bad base64"),
        (b"[1, 2, 3]", None, "not a JSON object"),
        (good_body(id=None), None, "no request id"),
        (good_body(dtype="float32"), "req1", "dtype"),
        (good_body(shape=[2, 2]), "req1", "shape"),
        (good_body(shape=[3, 3, 3]), "req1", "do not fill"),
        (good_body(bytes(11)), "req1", "11 pixel bytes do not fill"),
        (good_body(bytes(13)), "req1", "13 pixel bytes do not fill"),
        (good_body().split(b"\n")[0], "req1", "0 pixel bytes do not fill"),  # no newline: no pixels
        (good_body(deadline=None), "req1", "bad or missing"),
        (good_body(top=0), "req1", "top"),
    ],
)
def test_bad_messages_say_what_is_wrong_and_keep_the_id_when_readable(raw, request_id, reason):
    with pytest.raises(image_queue.MessageError, match=reason) as caught:
        image_queue.decode_message(raw)
    assert caught.value.request_id == request_id and caught.value.status == 500


def test_answers_round_trip():
    predictions = [{"label": "tabby", "probability": 0.5}]
    assert image_queue.decode_answer(image_queue.encode_answer(predictions, 3, 41.234)) == {
        "predictions": predictions,
        "batch_size": 3,
        "inference_ms": 41.23,
    }
    assert image_queue.decode_answer(image_queue.encode_error(500, "boom")) == {"error": "boom", "status": 500}
