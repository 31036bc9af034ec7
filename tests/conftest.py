"""Shared fixtures: a private redis-server, seeded ResNet50 weights, real photos, real processes."""

import io
import os
import signal
import sys
import uuid
from pathlib import Path

import hypothesis
import numpy as np
import pytest
import redis
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import stack  # noqa: E402

# Property tests draw the same examples on every run: CI must not fail on an input nobody ran before.
# To hunt for new counterexamples: HYPOTHESIS_PROFILE=explore pytest tests/test_properties.py
hypothesis.settings.register_profile("ci", derandomize=True, database=None, deadline=None)
hypothesis.settings.register_profile("explore", max_examples=2000, deadline=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
from image_queue import ImageQueue, connect  # noqa: E402

IMAGENET_INDEX = ROOT / "models" / "imagenet_class_index.json"  # a copy of ../shared/models' file
WEIGHTS_SEED = 1234


# --- Redis ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A redis-server of our own on a free port, keeping nothing on disk; stopped after the session."""
    workdir = tmp_path_factory.mktemp("redis")
    port = stack.free_port()
    server = stack.start_redis(port, str(workdir), workdir / "redis.log")
    yield {"port": port, "url": f"redis://127.0.0.1:{port}/0", "service": server}
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    return redis_server["url"]


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server["url"])
    yield client
    client.close()


@pytest.fixture
def queue_name(redis_client):
    """A queue name of the test's own (tests share the server); its keys are deleted afterwards."""
    name = f"q{uuid.uuid4().hex[:10]}"
    yield name
    for key in redis_client.scan_iter(match=f"{{{name}}}:*"):
        redis_client.delete(key)


@pytest.fixture
def make_queue(redis_url, queue_name):
    """ImageQueue(**options) on the private Redis, with short timeouts suited to tests."""

    def make(**options) -> ImageQueue:
        options = {"queue_max": 100, "block_s": 0.2, "result_ttl_s": 30, "worker_ttl_s": 2.0} | options
        return ImageQueue(connect(redis_url, options["block_s"]), queue_name, **options)

    return make


@pytest.fixture
def make_app(redis_url, queue_name):
    """create_app(**config) on the private Redis and the test's own queue, with short timeouts."""

    def make(**config):
        from run_web_server import create_app

        defaults = {
            "REDIS_URL": redis_url,
            "IMAGE_QUEUE": queue_name,
            "REDIS_BLOCK_S": 0.2,
            "REQUEST_TIMEOUT_S": 1.5,
            "WORKER_TTL_S": 2.0,
            "QUEUE_MAX": 64,
            "MAX_UPLOAD_MB": 1,
            "MAX_IMAGE_PIXELS": 5_000_000,
        }
        return create_app(defaults | config)

    return make


# --- Images -----------------------------------------------------------------------------------


def photo(name: str = "chelsea") -> Image.Image:
    """A real photo that ships with scikit-image (chelsea: a cat; coffee; astronaut; rocket)."""
    from skimage import data

    return Image.fromarray(getattr(data, name)())


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def distinct_photos(n: int) -> list[bytes]:
    """n different real images as JPEG bytes: crops of four photos at different places and sizes."""
    sources = [photo(name) for name in ("chelsea", "coffee", "astronaut", "rocket")]
    rng = np.random.default_rng(7)
    images = []
    for i in range(n):
        source = sources[i % len(sources)]
        w, h = source.size
        side = int(rng.integers(min(w, h) // 3, min(w, h)))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        images.append(encode(source.crop((x, y, x + side, y + side)), "JPEG", quality=90))
    return images


# --- Model ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def resnet_weights(tmp_path_factory) -> Path:
    """The real ResNet50 architecture with seeded random weights, saved in Keras 3 format."""
    import keras

    path = tmp_path_factory.mktemp("weights") / "resnet50-seeded.weights.h5"
    keras.utils.set_random_seed(WEIGHTS_SEED)
    keras.applications.ResNet50(weights=None).save_weights(path)
    return path


@pytest.fixture(scope="session")
def resnet(resnet_weights):
    """The same model the worker serves, loaded in the test process through the same seam."""
    from classifier import load_classifier

    return load_classifier("ResNet50", str(resnet_weights), labels_path=str(IMAGENET_INDEX))


# --- Processes --------------------------------------------------------------------------------


class Stack:
    """Model workers and a gunicorn on the private Redis, on a queue of the test's own."""

    def __init__(self, env: dict, logdir: Path):
        self.env, self.logdir = env, logdir
        self.url = f"http://127.0.0.1:{env['WEB_PORT']}/"
        self.workers: list[stack.Service] = []
        self.web: stack.Service | None = None

    def start_worker(self, **env) -> stack.Service:
        log_path = self.logdir / f"worker{len(self.workers)}.log"
        worker = stack.start_model_worker(self.env | env, log_path)
        self.workers.append(worker)
        return worker

    def start_web(self, **env) -> stack.Service:
        self.web = stack.start_web(self.env | env, self.logdir / "web.log")
        return self.web

    def wait_ready(self, timeout_s: float = 180) -> None:
        stack.wait_until_ready(self.url, [s for s in [self.web, *self.workers] if s], timeout_s)

    def worker_logs(self) -> str:
        return "".join(w.log_text() for w in self.workers)

    def stop(self) -> None:
        for service in [self.web, *self.workers]:
            if service and service.alive():
                os.kill(service.pid, signal.SIGCONT)  # in case the test stopped it
            if service:
                service.stop(timeout_s=20)


class StackFactory:
    """make(**env) -> Stack for ResNet50 with seeded weights, each on its own queue and port."""

    def __init__(self, redis_url: str, weights: Path, logdir: Path):
        self.redis_url, self.weights, self.logdir = redis_url, weights, logdir
        self.stacks: list[Stack] = []

    def __call__(self, **env) -> Stack:
        base = {
            "REDIS_URL": self.redis_url,
            "IMAGE_QUEUE": f"q{uuid.uuid4().hex[:10]}",
            "WEB_PORT": str(stack.free_port()),
            "WEB_WORKERS": "2",
            "WEB_THREADS": "32",
            "MODEL_WEIGHTS": str(self.weights),
            "LABELS_PATH": str(IMAGENET_INDEX),
            "BATCH_SIZE": "16",
            "WORKER_HEARTBEAT_S": "0.5",
            "LOG_LEVEL": "DEBUG",
        }
        logdir = self.logdir / f"stack{len(self.stacks)}"
        logdir.mkdir()
        s = Stack(base | {k: str(v) for k, v in env.items()}, logdir)
        self.stacks.append(s)
        return s

    def serve(self, **env) -> Stack:
        """A stack with one model worker and gunicorn, started and ready."""
        s = self(**env)
        s.start_worker()
        s.start_web()
        s.wait_ready()
        return s

    def stop_all(self) -> None:
        for s in self.stacks:
            s.stop()


@pytest.fixture
def make_stack(redis_url, resnet_weights, tmp_path):
    """Stacks for one test; everything stops after it."""
    factory = StackFactory(redis_url, resnet_weights, tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def make_module_stack(redis_server, resnet_weights, tmp_path_factory):
    """Stacks shared by the tests of one module."""
    factory = StackFactory(redis_server["url"], resnet_weights, tmp_path_factory.mktemp("stacks"))
    yield factory
    factory.stop_all()
