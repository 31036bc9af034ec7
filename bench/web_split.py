"""Where a request's web CPU goes: each step of /predict timed on its own, in CPU time of one thread,
for each of the README's photos (images/), next to the whole request through the app.

    python -m bench.web_split [--n 300]     (starts its own redis-server; ~30 s)

Steps: the multipart parse (run_web_server.parse_form; werkzeug's, which request.files uses, beside it
in brackets, not counted in the sum), the header check (helpers.open_image), the decode and resize
(helpers.prepare_image: JPEG draft scale, EXIF, RGB), the message (encode_message), the queue's status and
enqueue (two round trips to a local Redis), the answer's JSON. "whole app" is one /predict through Flask's
test client with a stand-in worker thread answering, so it adds Flask's own work and the wait; gunicorn's
HTTP parsing and socket work come on top (bench/path_ceiling.py measures the process).
"""

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import helpers  # noqa: E402
import stack  # noqa: E402
from bench.stand_in import StandInModel  # noqa: E402
from image_queue import encode_message, queue_from_config  # noqa: E402
from run_model_server import ModelWorker  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def cpu_ms(step, n: int) -> float:
    """Median CPU milliseconds of one call of step() over n calls (this thread only)."""
    times = []
    for _ in range(n):
        started = time.thread_time()
        step()
        times.append((time.thread_time() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="calls per step")
    args = parser.parse_args()
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    import run_web_server

    with tempfile.TemporaryDirectory() as workdir:
        port = stack.free_port()
        redis_server = stack.start_redis(port, workdir)
        try:
            config = {"REDIS_URL": f"redis://127.0.0.1:{port}/0", "IMAGE_QUEUE": "split", "REDIS_BLOCK_S": 1.0,
                      "QUEUE_MAX": 100000, "RESULT_TTL_S": 60, "WORKER_TTL_S": 3.0}  # fmt: skip
            worker = ModelWorker(
                queue_from_config(config, model_id="standin"),
                StandInModel(),
                batch_size=32,
                max_wait_s=0,
                heartbeat_s=0.5,
            )
            threading.Thread(target=worker.run, daemon=True).start()
            time.sleep(1)
            app = run_web_server.create_app(config | {"DECODE_MEGAPIXELS_S": 0})
            client = app.test_client()
            web_queue = queue_from_config(
                config, 0.5, "standin"
            )  # for status + enqueue alone, no worker answers needed
            answer = {"predictions": [{"label": "tabby", "probability": 0.5}] * 5, "batch_size": 8}
            for path in sorted((ROOT / "images").glob("*.jpg")):
                data = path.read_bytes()
                # A form per call, each with its own boundary, as clients send them: werkzeug's parser compiles a
                # regular expression per boundary, which Python's regex cache hides when one body is sent again.
                forms = [
                    EnvironBuilder(method="POST", data={"image": (io.BytesIO(data), "photo.jpg")}).get_environ()
                    for _ in range(2 * args.n)
                ]
                forms = iter([(form["wsgi.input"].read(), form["CONTENT_TYPE"]) for form in forms])

                def werkzeug_parse(forms=forms):
                    body, content_type = next(forms)
                    env = EnvironBuilder(method="POST", data=body, content_type=content_type).get_environ()
                    return Request(env).files["image"].read()

                def parse(forms=forms):
                    body, content_type = next(forms)
                    with app.test_request_context("/predict", method="POST", data=body, content_type=content_type):
                        return run_web_server.parse_form()

                image = helpers.open_image(data, 10**8)
                pixels = helpers.prepare_image(helpers.open_image(data, 10**8), (224, 224))
                steps = {
                    "multipart parse": parse,
                    "(werkzeug's, as request.files)": werkzeug_parse,
                    "header check": lambda data=data: helpers.open_image(data, 10**8),
                    "decode + resize": lambda data=data: helpers.prepare_image(
                        helpers.open_image(data, 10**8), (224, 224)
                    ),  # fmt: skip
                    "message": lambda pixels=pixels: encode_message(uuid.uuid4().hex, 1e10, 5, pixels),
                    "status + enqueue": lambda pixels=pixels: (
                        web_queue.status(),
                        web_queue.enqueue(encode_message(uuid.uuid4().hex, 1e10, 5, pixels)),
                    ),
                    "answer JSON": lambda: json.dumps({"success": True, **answer}),
                    "whole app (Flask test client)": lambda data=data: client.post(
                        "/predict", data={"image": (io.BytesIO(data), "photo.jpg")}
                    ),
                }
                image.close()
                figures = {name: cpu_ms(step, args.n) for name, step in steps.items()}
                web_queue.redis.delete(web_queue.keys.queue)
                parts = sum(v for k, v in figures.items() if not k.startswith(("whole", "(")))
                width, height = helpers.open_image(data, 10**8).size
                split = ", ".join(f"{name} {ms:.2f}" for name, ms in figures.items())
                print(f"{path.name} ({len(data) // 1024} KB, {width}x{height}): {split}; steps in all {parts:.2f}")
            worker.request_stop()
        finally:
            redis_server.stop()


if __name__ == "__main__":
    main()
