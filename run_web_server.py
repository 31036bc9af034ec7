"""The web app: check an upload, queue its pixels for the model worker, wait for the answer.

Never imports TensorFlow or Keras. Serve it with `gunicorn -c gunicorn_conf.py run_web_server:app`;
`python run_web_server.py` starts Flask's development server instead.
"""

import logging
import time
import uuid

from flask import Blueprint, Flask, current_app, g, jsonify, request
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge

import helpers
import image_queue
import settings

log = logging.getLogger(__name__)

# The settings the app copies into app.config; create_app(config) overrides any of them.
CONFIG_KEYS = (
    "REDIS_URL", "REDIS_BLOCK_S", "IMAGE_QUEUE", "QUEUE_MAX", "REQUEST_TIMEOUT_S", "RESULT_TTL_S",
    "WORKER_TTL_S", "MAX_UPLOAD_MB", "MAX_IMAGE_PIXELS", "TOP_K", "TOP_K_MAX",
)  # fmt: skip

# Domain errors -> (HTTP status, Retry-After seconds or None).
ERRORS = {
    helpers.NotAnImage: (400, None),
    helpers.ImageTooLarge: (413, None),
    helpers.UnsupportedImage: (415, None),
    image_queue.QueueFull: (503, 1),
    image_queue.NoWorker: (503, 5),
    image_queue.QueueUnavailable: (503, 5),
}

WELCOME = """Image classification service.

POST an image to /predict and get the top-{top} labels with probabilities as JSON:
    curl -X POST -F image=@photo.jpg {url}predict
    curl -X POST -H 'Content-Type: image/jpeg' --data-binary @photo.jpg '{url}predict?top=3'
Health: GET /healthz (process up), GET /readyz (Redis and a model worker ready).
"""

bp = Blueprint("api", __name__)


def create_app(config: dict | None = None) -> Flask:
    """The Flask app; config overrides settings (tests pass their Redis URL, queue name, ...)."""
    app = Flask(__name__)
    app.config.from_mapping({key: getattr(settings, key) for key in CONFIG_KEYS})
    app.config.update(config or {})
    app.config["MAX_CONTENT_LENGTH"] = int(app.config["MAX_UPLOAD_MB"] * 1024 * 1024)
    helpers.configure_pillow(app.config["MAX_IMAGE_PIXELS"])
    app.extensions["image_queue"] = image_queue.queue_from_config(app.config, image_queue.WEB_SOCKET_MARGIN_S)
    app.register_blueprint(bp)
    for error in ERRORS:
        app.register_error_handler(error, domain_error)
    app.register_error_handler(RequestEntityTooLarge, too_large)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected_error)
    app.after_request(add_request_id)
    return app


def queue() -> image_queue.ImageQueue:
    return current_app.extensions["image_queue"]


@bp.get("/")
def index():
    """A short welcome saying how to call /predict."""
    text = WELCOME.format(top=current_app.config["TOP_K"], url=request.host_url)
    return text, 200, {"Content-Type": "text/plain; charset=utf-8"}


@bp.get("/healthz")
def healthz():
    """The web process is up (it does not look at Redis or the workers)."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    """Ready when Redis answers and a model worker's heartbeat is fresh."""
    status = live_status()
    model = status.model
    return jsonify(
        ready=True,
        workers=status.live_workers,
        model={"name": model.name, "width": model.width, "height": model.height},
        queue_depth=status.queue_depth,
    )


@bp.post("/predict")
def predict():
    """Classify one image: multipart field "image", or the raw body with Content-Type image/*."""
    arrived = time.monotonic()
    g.request_id = request_id = uuid.uuid4().hex
    timeout = current_app.config["REQUEST_TIMEOUT_S"]
    top = requested_top()
    image = helpers.open_image(read_upload(), current_app.config["MAX_IMAGE_PIXELS"])
    status = live_status()
    # The message's deadline on the Redis clock: the server time just read, plus what is left of ours.
    deadline = status.server_time + timeout - (time.monotonic() - arrived)
    if status.queue_depth >= current_app.config["QUEUE_MAX"]:  # refuse before decoding; enqueue re-checks
        raise image_queue.QueueFull(f"the queue holds {status.queue_depth} images")
    pixels = helpers.prepare_image(image, (status.model.width, status.model.height))
    if time.monotonic() >= arrived + timeout:
        return error_response(504, f"the image took longer than {timeout:g} s to prepare")
    queue().enqueue(helpers.encode_message(request_id, deadline, top, pixels))
    queued = time.monotonic()
    raw = queue().wait_for(request_id, arrived + timeout)
    if raw is None:
        return error_response(504, f"no answer within {timeout:g} s; the model workers are overloaded or stalled")
    answer = helpers.decode_answer(raw)
    if "error" in answer:
        status_code = answer["status"]
        return error_response(status_code, answer["error"], retry_after=1 if status_code == 503 else None)
    response = jsonify(success=True, predictions=answer["predictions"])
    response.headers["Server-Timing"] = server_timing(arrived, queued, answer)
    return response


def server_timing(arrived: float, queued: float, answer: dict) -> str:
    """Where the request's time went (ms): upload + preparation, waiting for the answer, of which inference."""
    now = time.monotonic()
    return (
        f"prepare;dur={(queued - arrived) * 1000:.1f}, wait;dur={(now - queued) * 1000:.1f}, "
        f'inference;dur={answer["inference_ms"]:.1f};desc="batch of {answer["batch_size"]}", '
        f"total;dur={(now - arrived) * 1000:.1f}"
    )


def live_status() -> image_queue.Status:
    """The queue's status, or NoWorker (503) when no model worker's heartbeat is fresh."""
    status = queue().status()
    if not status.live_workers or status.model is None:
        raise image_queue.NoWorker("no model worker is running")
    return status


def requested_top() -> int:
    raw, most = request.args.get("top"), current_app.config["TOP_K_MAX"]
    if raw is None:
        return current_app.config["TOP_K"]
    if not (raw.isascii() and raw.isdecimal() and len(raw) <= 3 and 1 <= int(raw) <= most):
        raise BadRequest(f"top must be a whole number from 1 to {most}, got {raw!r}")
    return int(raw)


def read_upload() -> bytes:
    """The image bytes from a multipart form or a raw image body; 400 says how to send one."""
    if request.mimetype == "multipart/form-data":
        files = request.files.getlist("image")
        if len(files) > 1:
            raise BadRequest(f"send one image per request, not {len(files)} 'image' fields")
        if not files:
            sent = sorted(set(request.files) | set(request.form))
            raise BadRequest(f"no 'image' field in the form (fields sent: {', '.join(sent) or 'none'})")
        return files[0].read()
    if request.mimetype.startswith("image/") or request.mimetype == "application/octet-stream":
        return request.get_data(cache=False)
    raise BadRequest(
        "no image: send it as the multipart form field 'image' (curl -F image=@photo.jpg) "
        "or as the request body with Content-Type image/*"
    )


def error_response(status: int, message: str, retry_after: int | None = None):
    response = jsonify(success=False, error=message)
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def domain_error(exc: Exception):
    status, retry_after = next(v for cls, v in ERRORS.items() if isinstance(exc, cls))
    if status >= 500:
        log.warning("%s %s: %d %s", request.method, request.path, status, exc)
    return error_response(status, str(exc), retry_after)


def too_large(exc: RequestEntityTooLarge):
    return error_response(413, f"the upload is larger than {current_app.config['MAX_UPLOAD_MB']:g} MB")


def http_error(exc: HTTPException):
    response = error_response(exc.code or 500, exc.description or exc.name)
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def unexpected_error(exc: Exception):
    log.exception("%s %s failed", request.method, request.path)
    return error_response(500, "internal error; the service log has the details")


def add_request_id(response):
    if "request_id" in g:
        response.headers["X-Request-ID"] = g.request_id
    return response


app = create_app()

if __name__ == "__main__":
    logging.basicConfig(level=settings.LOG_LEVEL, format=settings.LOG_FORMAT)
    app.run(host=settings.WEB_HOST, port=settings.WEB_PORT, threaded=True)
