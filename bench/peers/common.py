"""What both peers' servers share: the model (the suite's converted OpenVINO IR, compiled as the service's worker
compiles it), the web's image preparation and the top 5. Runs in a peer's own virtual environment (openvino,
numpy, pillow and the framework; no TensorFlow, no Flask): it imports only helpers.py and classifier.py from the
repository, which need nothing more at import.

The bench starts a peer with these in its environment:
    PEER_MODEL      the IR's .xml (uint8 NHWC in, probabilities out, the preprocessing in the graph)
    PEER_PRECISION  OpenVINO's INFERENCE_PRECISION_HINT, the one the service's worker uses (bf16 or f32)
    PEER_LABELS     the labels file (models/imagenet_class_index.json)
    PEER_REPO       the repository, for helpers.py and classifier.py
and the peer's settings (PEER_MAX_BATCH_SIZE, ...: bench/peers/__init__.py's PEERS).
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.environ["PEER_REPO"])
sys.modules.setdefault("openvino_telemetry", None)  # as classifier.openvino_classifier: nothing leaves

import helpers  # noqa: E402
from classifier import load_labels, top_k  # noqa: E402

MAX_IMAGE_PIXELS = 50_000_000  # the service's MAX_IMAGE_PIXELS default
TOP_K = 5  # the service's TOP_K default


def setting(name: str) -> str:
    """A peer setting the bench passed (PEER_<name>)."""
    return os.environ[f"PEER_{name}"]


class Model:
    """The compiled model and its labels: uint8 pixels (n, h, w, 3) in, the top 5 of each image out."""

    def __init__(self):
        import openvino as ov

        core = ov.Core()
        hints = {"INFERENCE_PRECISION_HINT": os.environ["PEER_PRECISION"], "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(os.environ["PEER_MODEL"], "CPU", hints)
        self.request = self.compiled.create_infer_request()
        shape = self.compiled.input(0).get_partial_shape()
        self.size = (shape[2].get_length(), shape[1].get_length())  # (width, height), as prepare_image takes it
        self.labels = load_labels(os.environ["PEER_LABELS"])
        helpers.configure_pillow(MAX_IMAGE_PIXELS)
        self.predict(np.zeros((1, self.size[1], self.size[0], 3), np.uint8))  # the first inference allocates

    def prepare(self, data: bytes) -> np.ndarray:
        """An upload's bytes -> uint8 (h, w, 3), exactly as the service's web prepares it."""
        return helpers.prepare_image(helpers.open_image(data, MAX_IMAGE_PIXELS), self.size)

    def predict(self, pixels: np.ndarray) -> list[list[dict]]:
        """One forward pass over the batch; each image's top 5 (label, probability, index)."""
        probabilities = self.request.infer(np.ascontiguousarray(pixels))[0]
        return [top_k(row, self.labels, TOP_K) for row in probabilities]
