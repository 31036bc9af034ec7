"""The Open Inference Protocol (KServe "v2", as Triton, KServe, MLServer and OpenVINO Model Server speak it),
REST: what an infer request's bytes say and what its answer's bytes are. Pure functions, no Flask or Redis;
run_web_server.py routes /v2/... here.

A model served here has one of two inputs per request and one output:
    image        BYTES [N]            encoded images, one element each (any format /predict accepts)
    pixels       UINT8 [N, H, W, 3]   pixels at the model's input size (H x W, from its metadata)
    probabilities FP32 [N, classes]   every class's probability; with "parameters": {"classification": K}
                                      on the requested output, BYTES [N, K] of "score:index:label" instead
                                      (Triton's classification extension)
Both the JSON form and the binary tensor data extension are read and written: a body whose JSON header is
followed by raw tensors, the header's length in the Inference-Header-Content-Length HTTP header, each
input's bytes sized by its "binary_data_size" parameter. BYTES elements in binary are each a 4-byte
little-endian length and the bytes; in JSON, a BYTES element is the image's bytes in base64.
"""

import base64
import binascii
import itertools
import json
import math
import struct
from dataclasses import dataclass

import numpy as np

IMAGE_INPUT, PIXELS_INPUT, OUTPUT = "image", "pixels", "probabilities"
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data", "classification"]
VERSION = "1"  # the one version of each model served
PROTOCOL_VERSION = "2"  # what GET /v2 gives as the server's version: the protocol it speaks
MAX_RANK, MAX_DIM = 8, 2**31 - 1  # a shape's dimensions, and each one's size: bounds before any arithmetic on them


class ProtocolError(ValueError):
    """An infer request that breaks the protocol (400); the message says what to fix."""


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: list[bytes] | None  # the BYTES input's elements, or
    pixels: np.ndarray | None  # the UINT8 input, [N, H, W, 3]
    classification: int  # K of the classification extension; 0: probabilities as FP32
    binary_output: bool  # answer the output as binary tensor data

    @property
    def count(self) -> int:
        return len(self.images) if self.images is not None else len(self.pixels) if self.pixels is not None else 0


def model_metadata(model_id: str, height: int, width: int, classes: int, platform: str) -> dict:
    return {
        "name": model_id,
        "versions": [VERSION],
        "platform": platform or "keras",
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS_INPUT, "datatype": "UINT8", "shape": [-1, height, width, 3]},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, classes or -1]}],
    }


def parse_infer_request(
    body: bytes, header_length: str | None, size: tuple[int, int], classes: int, max_images: int
) -> InferRequest:
    """Read an infer request's body (size: the model's (width, height)); ProtocolError says what is wrong.

    The shape is checked before the data: a bounded rank and dimensions (a shape of hundreds of 4,000-digit
    numbers held a web process's GIL for seconds in math.prod), and at most max_images images (QUEUE_MAX),
    so no more elements than that are expanded from the body."""
    header, binary = split_body(body, header_length)
    try:
        request = json.loads(header)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError("the request is not JSON (a binary request gives its JSON's length in "
                            f"{HEADER_LENGTH})") from None  # fmt: skip
    if not isinstance(request, dict):
        raise ProtocolError("the request must be a JSON object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"send one input: {IMAGE_INPUT!r} (BYTES, encoded images) or {PIXELS_INPUT!r} (UINT8)")
    tensor = inputs[0]
    data = tensor_bytes(tensor, binary)
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not (
        isinstance(shape, list)
        and 1 <= len(shape) <= MAX_RANK
        and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_DIM for n in shape)
    ):
        raise ProtocolError(
            f"input {name!r}: shape must be a list of 1 to {MAX_RANK} whole numbers from 0 to {MAX_DIM}, "
            f"got {short(shape)}"
        )
    images = pixels = None
    if name == IMAGE_INPUT:
        if datatype != "BYTES":
            raise ProtocolError(f"input {IMAGE_INPUT!r} must be BYTES, got {datatype!r}")
        too_many(math.prod(shape), max_images)
        images = read_bytes_elements(tensor, data, math.prod(shape))
        if len(images) != math.prod(shape):
            raise ProtocolError(f"input {IMAGE_INPUT!r}: the elements do not fill shape {shape}")
    elif name == PIXELS_INPUT:
        if datatype != "UINT8":
            raise ProtocolError(f"input {PIXELS_INPUT!r} must be UINT8, got {datatype!r}")
        width, height = size
        if len(shape) != 4 or shape[1:] != [height, width, 3]:
            raise ProtocolError(f"input {PIXELS_INPUT!r} must have shape [N, {height}, {width}, 3], got {shape}")
        too_many(shape[0], max_images)
        pixels = read_uint8(tensor, data, shape)
    else:
        raise ProtocolError(f"no input {name!r}: send {IMAGE_INPUT!r} (BYTES) or {PIXELS_INPUT!r} (UINT8)")
    if not (images if images is not None else len(pixels)):
        raise ProtocolError("the input holds no image")
    classification, binary_output = requested_output(request, classes)
    request_id = request.get("id")
    return InferRequest(
        request_id if isinstance(request_id, str) else None, images, pixels, classification, binary_output
    )


def too_many(images: int, max_images: int) -> None:
    if images > max_images:
        raise ProtocolError(f"send at most {max_images} images per request, not {images}")


def short(value) -> str:
    """A value's repr for an error message, cut at 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if (
        not (header_length.isascii() and header_length.isdigit())
        or len(header_length) > 19
        or int(header_length) > len(body)
    ):
        raise ProtocolError(f"{HEADER_LENGTH} must be the JSON's length in bytes, at most the body's ({len(body)})")
    return body[: int(header_length)], body[int(header_length) :]


def tensor_bytes(tensor: dict, binary: bytes) -> bytes | list:
    """The input's data: its binary bytes (binary_data_size), else its JSON "data"."""
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("an input's parameters must be an object")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise ProtocolError(f"input {tensor.get('name')!r} has neither data nor binary_data_size")
        return tensor["data"]
    if not isinstance(size, int) or size != len(binary):
        raise ProtocolError(f"binary_data_size ({size!r}) must be the bytes after the JSON ({len(binary)})")
    return binary


def read_bytes_elements(tensor: dict, data: bytes | list, expected: int) -> list[bytes]:
    """The BYTES tensor's elements; reading stops past the expected count (which is then not met)."""
    if isinstance(data, bytes):  # binary: 4-byte little-endian length, then the element, repeated
        elements, at = [], 0
        while at < len(data) and len(elements) <= expected:
            if at + 4 > len(data):
                raise ProtocolError("the BYTES tensor's binary data ends inside an element's length")
            (length,) = struct.unpack_from("<I", data, at)
            if at + 4 + length > len(data):
                raise ProtocolError("the BYTES tensor's binary data ends inside an element")
            elements.append(data[at + 4 : at + 4 + length])
            at += 4 + length
        return elements
    flat = list(itertools.islice(flatten(data), expected + 1))
    try:
        return [base64.b64decode(item, validate=True) for item in flat]
    except (TypeError, ValueError, binascii.Error):
        raise ProtocolError(f"input {IMAGE_INPUT!r}: in JSON, each element is an image's bytes in base64") from None


def encode_bytes_elements(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def read_uint8(tensor: dict, data: bytes | list, shape: list[int]) -> np.ndarray:
    if isinstance(data, bytes):
        if len(data) != math.prod(shape):
            raise ProtocolError(f"input {PIXELS_INPUT!r}: {len(data)} bytes do not fill shape {shape}")
        return np.frombuffer(data, dtype=np.uint8).reshape(shape)
    flat = list(itertools.islice(flatten(data), math.prod(shape) + 1))
    if len(flat) != math.prod(shape) or not all(type(v) is int and 0 <= v <= 255 for v in flat):
        raise ProtocolError(f"input {PIXELS_INPUT!r}: data must be {math.prod(shape)} whole numbers 0-255")
    return np.asarray(flat, dtype=np.uint8).reshape(shape)


def flatten(data):
    if isinstance(data, list):
        for item in data:
            yield from flatten(item)
    else:
        yield data


def requested_output(request: dict, classes: int) -> tuple[int, bool]:
    """(classification K or 0, binary) from the request's "outputs" (none: probabilities, all of them)."""
    parameters = request.get("parameters") or {}
    binary = bool(isinstance(parameters, dict) and parameters.get("binary_data_output"))
    outputs = request.get("outputs")
    if outputs is None or outputs == []:  # none named: every output, as FP32
        return 0, binary
    if not isinstance(outputs, list) or len(outputs) != 1 or not isinstance(outputs[0], dict):
        raise ProtocolError(f"ask for one output, {OUTPUT!r}, or none")
    output = outputs[0]
    if output.get("name") != OUTPUT:
        raise ProtocolError(f"no output {output.get('name')!r}: the output is {OUTPUT!r}")
    parameters = output.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("an output's parameters must be an object")
    k = parameters.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0 or (classes and k > classes):
        raise ProtocolError(f"classification must be a whole number from 1 to {classes or 'the classes'}, got {k!r}")
    return k, bool(parameters.get("binary_data", binary))


def infer_response(model_id: str, request: InferRequest, answers: list[dict]) -> tuple[bytes, dict]:
    """The response body and its extra headers, for the worker answers of each image in order."""
    n = len(answers)
    if request.classification:
        k = min(request.classification, len(answers[0]["predictions"]))
        strings = [
            f"{p['probability']:.6f}:{p['index']}:{p['label']}".encode()
            for answer in answers
            for p in answer["predictions"][:k]
        ]
        output = {"name": OUTPUT, "datatype": "BYTES", "shape": [n, k]}
        binary = encode_bytes_elements(strings)
        data = [s.decode() for s in strings]
    else:
        probabilities = np.stack([answer["probabilities"] for answer in answers]).astype("<f4")
        output = {"name": OUTPUT, "datatype": "FP32", "shape": list(probabilities.shape)}
        binary = probabilities.tobytes()
        data = probabilities.ravel().tolist() if not request.binary_output else None
    body = {"model_name": model_id, "model_version": VERSION, "outputs": [output]}
    if request.id is not None:
        body["id"] = request.id
    if not request.binary_output:
        output["data"] = data
        return json.dumps(body).encode(), {"Content-Type": "application/json"}
    output["parameters"] = {"binary_data_size": len(binary)}
    header = json.dumps(body).encode()
    return header + binary, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


# --- The client's side: what stress_test.py, the benchmark and Locust send and read back ------------------


def encode_infer_request(images: list[bytes], classification: int) -> tuple[bytes, dict]:
    """A binary infer request for encoded images asking for the top `classification` classes of each, as
    tritonclient sends it (InferInput BYTES with binary data, InferRequestedOutput with class_count)."""
    elements = encode_bytes_elements(images)
    return binary_infer_request(IMAGE_INPUT, "BYTES", [len(images)], elements, classification)


def encode_pixels_request(pixels: list[bytes], height: int, width: int, classification: int) -> tuple[bytes, dict]:
    """The same for images already at the model's input size: each element height x width x 3 uint8 (RGB)."""
    if any(len(p) != height * width * 3 for p in pixels):
        raise ValueError(f"each image's pixels must be {height} x {width} x 3 bytes")
    shape = [len(pixels), height, width, 3]
    return binary_infer_request(PIXELS_INPUT, "UINT8", shape, b"".join(pixels), classification)


def binary_infer_request(name: str, datatype: str, shape: list, data: bytes, classification: int) -> tuple[bytes, dict]:
    """An infer request of one input in binary, asking for the top `classification` classes of each image."""
    tensor = {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(data)}}
    header = {
        "inputs": [tensor],
        "outputs": [{"name": OUTPUT, "parameters": {"classification": classification, "binary_data": True}}],
    }
    head = json.dumps(header).encode()
    return head + data, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def decode_classification(body: bytes, header_length: str | None) -> list[list[dict]]:
    """Each image's predictions ({"label", "probability", "index"}) from a classification answer, JSON or binary."""
    head, binary = split_body(body, header_length)
    output = json.loads(head)["outputs"][0]
    n, k = output["shape"]
    strings = read_bytes_elements({}, binary, n * k) if binary else [s.encode() for s in output["data"]]
    predictions = []
    for string in strings:
        score, index, label = string.decode().split(":", 2)
        predictions.append({"label": label, "probability": float(score), "index": int(index)})
    return [predictions[i * k : (i + 1) * k] for i in range(n)]
