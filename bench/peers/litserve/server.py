"""The LitServe peer: the suite's ResNet50 (its OpenVINO IR, compiled as the service compiles it) behind LitServe's
batching, configured as LitServe's batching docs show (max_batch_size and batch_timeout on the LitAPI, batch and
unbatch overridden).

    python server.py --port N     (in bench/peers/litserve, with PEER_* set)

bench/peers/__init__.py starts it so, in bench/peers/litserve/.venv, with the settings in its PEERS. POST /predict
takes the multipart field "image" that loadgen sends and answers {"predictions": [top 5]}. Its requirements add
python-multipart, without which LitServe (through Starlette) cannot parse a form.

- PEER_WORKERS=1 inference worker (accelerator="cpu", devices=1, workers_per_device=1, LitServe's default): all
  requests reach one batching loop; OpenVINO's LATENCY hint already spreads one forward pass over both cores.
  One API server process (num_api_servers=None: as many as inference workers, LitServe's recommendation).
- PEER_MAX_BATCH_SIZE=32: the service's BATCH_SIZE.
- PEER_BATCH_TIMEOUT_S=0.01: the loop waits up to 10 ms from its first request for more (the docs' examples use
  10-50 ms); 0 would take what is queued at once, as the service does, but LitServe's loop then polls its queue
  without sleeping, a core's worth of CPU on a 2-core machine.
- PEER_TIMEOUT_S=30: LitServe's default request timeout (more than any wait at 32 clients here).
- fast_queue off: the docs advise ZeroMQ above ~100 requests/s; the model serves fewer here.
- decode_request runs in the inference worker, one upload at a time before the batch (LitServe's loop).
"""

import argparse

import litserve as ls
import numpy as np
from common import Model, setting


class ResNet50API(ls.LitAPI):
    def setup(self, device) -> None:
        self.model = Model()

    def decode_request(self, request) -> np.ndarray:
        """The multipart form's "image" -> uint8 pixels, as the service's web prepares them."""
        return self.model.prepare(request["image"].file.read())

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, pixels: np.ndarray) -> list[list[dict]]:
        return self.model.predict(pixels)

    def unbatch(self, output: list[list[dict]]) -> list[list[dict]]:
        return output

    def encode_response(self, top: list[dict]) -> dict:
        return {"predictions": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    api = ResNet50API(max_batch_size=int(setting("MAX_BATCH_SIZE")), batch_timeout=float(setting("BATCH_TIMEOUT_S")))
    workers, timeout = int(setting("WORKERS")), float(setting("TIMEOUT_S"))
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=workers, timeout=timeout)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)  # its default log: a line a request


if __name__ == "__main__":
    main()
