"""A stand-in model for measuring the path outside the model: the queue, the worker loop, the web.

It costs a fixed time per batch, whatever the batch's size, as a batch on an accelerator nearly does
(0 by default: then only the path outside the model is measured), and its answer depends on the pixels, so
answers can still be told apart. It has the methods run_model_server.ModelWorker uses of a Classifier.
"""

import time

import numpy as np

from classifier import top_k


class StandInModel:
    """input_size (height, width) as a real model's; labels "class 0" ... "class <classes - 1>"."""

    name = "StandIn"

    def __init__(self, batch_ms: float = 0.0, input_size: tuple[int, int] = (224, 224), classes: int = 1000):
        self.batch_s, self.input_size = batch_ms / 1000, input_size
        self.labels = [f"class {i}" for i in range(classes)]
        self.buckets = ()

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities peaked at class (mean pixel value of the image) mod classes."""
        started = time.perf_counter()
        means = pixels.reshape(len(pixels), -1)[:, ::97].mean(axis=1)  # a sample: cheap, still per image
        probabilities = np.full((len(pixels), len(self.labels)), 1e-4, np.float32)
        probabilities[np.arange(len(pixels)), means.astype(int) % len(self.labels)] = 1.0
        if (left := self.batch_s - (time.perf_counter() - started)) > 0:
            time.sleep(left)
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def top_k(self, probabilities: np.ndarray, k: int) -> list[dict]:
        return top_k(probabilities, self.labels, k)
