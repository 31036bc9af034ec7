"""Shared fixtures: a private redis-server, queues and apps on it, seeded ResNet50 weights, real processes.

What the tests share that is not a fixture (stand-ins, photos, process stacks, traffic books) is in support/.
"""

import os
import sys
import uuid
from pathlib import Path

import hypothesis
import pytest
import redis
from support import IMAGENET_INDEX, ROOT

sys.path.insert(0, str(ROOT))

import stack  # noqa: E402

# Property tests draw the same examples on every run: CI must not fail on an input nobody ran before.
# To hunt for new counterexamples: HYPOTHESIS_PROFILE=explore pytest tests/test_properties.py
hypothesis.settings.register_profile("ci", derandomize=True, database=None, deadline=None)
hypothesis.settings.register_profile("explore", max_examples=2000, deadline=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
from support.stacks import StackFactory  # noqa: E402
from support.stand_in import TEST_MODEL  # noqa: E402

from image_queue import ImageQueue, Keys, connect, model_queue_name  # noqa: E402

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
    for key in redis_client.scan_iter(match=f"{{{name}*"):  # its models' queues ({name.model}:...) too
        redis_client.delete(key)


@pytest.fixture
def make_queue(redis_url, queue_name):
    """The queue of model `model` (default: TEST_MODEL) as a worker serves it, ImageQueue(**options) on the
    private Redis with short timeouts suited to tests; its heartbeats register the model for the web."""

    def make(model: str = TEST_MODEL, **options) -> ImageQueue:
        options = {"queue_max": 100, "block_s": 0.2, "result_ttl_s": 30, "worker_ttl_s": 2.0} | options
        registry = (Keys(queue_name).models, model)
        client = connect(redis_url, options["block_s"])
        return ImageQueue(client, model_queue_name(queue_name, model), registry=registry, **options)

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


# --- Model ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def resnet_weights(tmp_path_factory) -> Path:
    """The real ResNet50 architecture with seeded random weights, saved in Keras 3 format."""
    import keras

    path = tmp_path_factory.mktemp("weights") / "resnet50-seeded.weights.h5"
    keras.utils.set_random_seed(WEIGHTS_SEED)
    keras.applications.ResNet50(weights=None).save_weights(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """One MODEL_CACHE_DIR for the session's processes and the test process: OpenVINO converts a model once."""
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["MODEL_CACHE_DIR"] = str(path)  # every worker the tests start inherits it
    return path


@pytest.fixture(scope="session")
def resnet(resnet_weights, model_cache):
    """The same model the worker serves with the shipped defaults (MODEL_RUNTIME and MODEL_PRECISION auto:
    OpenVINO at bf16 on a CPU with BF16 and OpenVINO installed), loaded in the test process through the same
    seam, so a served answer is compared with the same runtime's own answer."""
    from classifier import choose_runtime, load_classifier

    runtime, _ = choose_runtime("auto")
    return load_classifier(
        "ResNet50", str(resnet_weights), labels_path=str(IMAGENET_INDEX), runtime=runtime, cache_dir=str(model_cache)
    )


@pytest.fixture(scope="session")
def resnet_keras(resnet_weights):
    """The same weights on the Keras runtime (TensorFlow, float32): for the tests of the Keras path itself."""
    from classifier import load_classifier

    return load_classifier("ResNet50", str(resnet_weights), labels_path=str(IMAGENET_INDEX), runtime="keras")


# --- Processes --------------------------------------------------------------------------------


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
