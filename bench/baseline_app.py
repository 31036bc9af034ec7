"""The in-process baseline: the design users would otherwise run, for bench/benchmark.py to compare against.

    gunicorn -c gunicorn_conf.py 'bench.baseline_app:create_app()'      (the same gunicorn settings as the service)

Each gunicorn worker process loads the model itself and runs every request's one image through it on
the request's own thread: no Redis, no model worker, no batching across requests. It prepares images
and calls the model exactly as the service does (helpers.prepare_image, Classifier.predict, i.e.
predict_on_batch), so the comparison measures the architecture, not a different call path. It is a
yardstick, not a product: no deadlines, no queue bound, no API keys.
"""

import os
import sys
import time

from flask import Flask, jsonify, request

import helpers
import settings
from classifier import load_configured_classifier

READY = "baseline: model loaded in process"  # one line per gunicorn worker, for benchmark.py to wait on


def create_app() -> Flask:
    """Load and warm the model in this process, then serve /predict one image per request."""
    classifier = load_configured_classifier(settings)
    classifier.warm_up(1)
    print(f"{READY} {os.getpid()}", file=sys.stderr, flush=True)
    height, width = classifier.input_size
    helpers.configure_pillow(settings.MAX_IMAGE_PIXELS)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(settings.MAX_UPLOAD_MB * 1024 * 1024)

    @app.get("/readyz")
    def readyz():
        """Ready as soon as it answers: the model loaded before the first request."""
        return jsonify(ready=True, model={"name": classifier.name, "width": width, "height": height})

    @app.post("/predict")
    def predict():
        """One image through the model on this thread; the same answer and Server-Timing shape as the service."""
        arrived = time.monotonic()
        upload = request.files.get("image")
        if upload is None:
            return jsonify(success=False, error="send the image as the multipart field 'image'"), 400
        try:
            image = helpers.open_image(upload.read(), settings.MAX_IMAGE_PIXELS)
            pixels = helpers.prepare_image(image, (width, height))
        except helpers.ImageError as exc:
            return jsonify(success=False, error=str(exc)), 400
        prepared = time.monotonic()
        probabilities = classifier.predict(pixels[None])[0]
        inferred = time.monotonic()
        response = jsonify(success=True, predictions=classifier.top_k(probabilities, settings.TOP_K))
        now = time.monotonic()
        response.headers["Server-Timing"] = (
            f"prepare;dur={(prepared - arrived) * 1000:.1f}, queue;dur=0.0, "
            f'inference;dur={(inferred - prepared) * 1000:.1f};desc="batch of 1", '
            f"return;dur={(now - inferred) * 1000:.1f}, total;dur={(now - arrived) * 1000:.1f}"
        )
        return response

    return app
