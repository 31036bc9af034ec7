"""A stand-in model worker speaking the real queue protocol with no model, and helpers to call the app with.

The stand-in answers with a checksum of the pixels it received, so a test can show that what the web side
prepared is exactly what a worker gets.
"""

import hashlib
import io
import threading

import numpy as np

import helpers
import image_queue
from classifier import top_k
from image_queue import Done, ImageQueue, ModelInfo
from support.images import encode, photo

TEST_MODEL = "standin"  # the model id the tests' hand-made workers serve
MODEL = ModelInfo("StandIn", 32, 48, 2)  # height, width: not square, so a transposed size would show


def served_queue(client, base: str, model: str = TEST_MODEL, **options) -> ImageQueue:
    """Model `model`'s queue on IMAGE_QUEUE `base`, registering the model as its workers do, so the web finds it."""
    registry = (image_queue.Keys(base).models, model)
    return ImageQueue(client, image_queue.model_queue_name(base, model), registry=registry, **options)


def app_queue(app, model: str = TEST_MODEL) -> ImageQueue:
    """The queue of `model` on an app's Redis, as that model's workers serve it."""
    return app.extensions["models"].queue_for(model)


def post_concurrently(client, n: int) -> list:
    """n post_image calls at once, each from its own thread; the responses (order of completion)."""
    replies = []
    threads = [threading.Thread(target=lambda: replies.append(post_image(client))) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return replies


class StandInClassifier:
    """Probabilities that depend on the pixels, so answers can be traced back to their image."""

    name, input_size, labels = "StandIn", (4, 4), ["dark", "bright"]

    def __init__(self, fail: bool = False):
        self.fail, self.batches = fail, []

    def predict(self, pixels):
        self.batches.append(len(pixels))
        if self.fail:
            raise RuntimeError("out of memory")
        bright = pixels.reshape(len(pixels), -1).mean(axis=1) / 255
        return np.stack([1 - bright, bright], axis=1)

    def top_k(self, probabilities, k):
        return top_k(probabilities, self.labels, k)


class StandInWorker:
    """A thread that heartbeats, claims and answers like run_model_server.py, with no model."""

    def __init__(self, queue: ImageQueue, worker_id: str = "stand-in", error: tuple[int, str] | None = None):
        self.queue, self.worker_id, self.error = queue, worker_id, error
        self.batches: list[int] = []
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while self.running:
            self.queue.heartbeat(self.worker_id, MODEL)
            claim = self.queue.claim(self.worker_id, 16)
            if not claim.messages:
                continue
            self.batches.append(len(claim.messages))
            done = []
            for raw in claim.messages:
                message = image_queue.decode_message(raw)
                if self.error:
                    answer = image_queue.encode_error(*self.error)
                else:
                    checksum = fingerprint(message.pixels)
                    predictions = [{"label": checksum, "probability": 1.0, "index": 0}] * message.top
                    everything = np.array([1.0, 0.0]) if message.probabilities else None
                    answer = image_queue.encode_answer(
                        predictions, len(claim.messages), 12.5, claim.server_time, probabilities=everything
                    )
                done.append(Done(raw, message.request_id, answer, message.deadline))
            ran = 0 if self.error else len(claim.messages)  # counted in the stats hash as the real worker does
            self.queue.ack(self.worker_id, done, ran, 0.0125)

    def __enter__(self):
        self.queue.heartbeat(self.worker_id, MODEL)  # ready before the first request, as a real worker is
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join(5)


CAT = encode(photo("chelsea"), "JPEG")


def fingerprint(pixels: np.ndarray) -> str:
    return f"{hashlib.sha256(pixels.tobytes()).hexdigest()[:16]} {pixels.dtype} {pixels.shape}"


def expected_checksum(data: bytes) -> str:
    return fingerprint(helpers.prepare_image(helpers.open_image(data, 10**8), (MODEL.width, MODEL.height)))


def post_image(client, data: bytes = CAT, query: str = "", **kwargs):
    return client.post(f"/predict{query}", data={"image": (io.BytesIO(data), "cat.jpg")}, **kwargs)


def assert_json_error(response, status: int, words: str):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json and response.json["success"] is False
    assert words in response.json["error"]


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def counters(client, queue: str) -> dict[str, int]:
    """The rate-limit counters of one queue's service: key -> count."""
    return {key.decode(): int(client.get(key)) for key in client.scan_iter(match=f"{{{queue}}}:ratelimit:*")}
