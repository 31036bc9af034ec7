"""The BentoML peer: the suite's ResNet50 (its OpenVINO IR, compiled as the service compiles it) behind BentoML's
adaptive batching, configured as BentoML's adaptive-batching guide shows.

    bentoml serve service:ResNet50 --host 127.0.0.1 --port N     (in bench/peers/bentoml, with PEER_* set)

bench/peers/__init__.py starts it so, in bench/peers/bentoml/.venv, with the settings in its PEERS. POST /predict
takes the multipart field "image" that loadgen sends (one file: the batchable API's list of one) and answers that
request's slice of the batch's output: a list of one {"predictions": [top 5]}.

- PEER_WORKERS=1: one process holds the model and its dispatcher sees every request, so batches form across all
  clients; OpenVINO's LATENCY hint already spreads one forward pass over both cores (a second worker would hold
  a second model and split the batches).
- batchable=True, batch_dim=0, PEER_MAX_BATCH_SIZE=32 (the service's BATCH_SIZE): BentoML's dispatcher chooses
  each batch's size and its wait itself, within max_latency_ms.
- PEER_MAX_LATENCY_MS=10000: the service's REQUEST_TIMEOUT_S, the same deadline; past it BentoML answers 503.
- Each image is read and prepared inside the batch call (helpers.prepare_image, as the service's web does): a
  batchable API takes one argument, the batch, and the guide's single-service form decodes there. (Its
  two-service form, a wrapper service calling the batchable one through bentoml.depends, would decode in another
  process at the cost of a second HTTP hop per image.)
"""

from pathlib import Path

import bentoml
import numpy as np
from common import Model, setting


@bentoml.service(workers=int(setting("WORKERS")), traffic={"timeout": 60})
class ResNet50:
    def __init__(self) -> None:
        self.model = Model()

    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=int(setting("MAX_BATCH_SIZE")),
        max_latency_ms=int(setting("MAX_LATENCY_MS")),
    )
    def predict(self, image: list[Path]) -> list[dict]:
        """A batch of uploads (one per request here) -> each one's top 5."""
        pixels = np.stack([self.model.prepare(path.read_bytes()) for path in image])
        return [{"predictions": top} for top in self.model.predict(pixels)]
