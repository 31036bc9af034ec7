"""The worker's batch handling (stand-in model) and the model seam (real Keras models)."""

import json
import logging
import time

import numpy as np
import pytest
from support import IMAGENET_INDEX, ROOT
from support.images import distinct_photos
from support.stand_in import StandInClassifier
from support.traffic import wait_for

import helpers
import image_queue
import settings
from run_model_server import ModelWorker, answer_batch, batch_size_in_takeover, fastest_batch, serving_batch_size

NOW = 1_800_000_000.0


def message(request_id: str, value: int = 200, deadline: float = NOW + 10, size=(4, 4)) -> bytes:
    return image_queue.encode_message(request_id, deadline, 2, np.full((*size, 3), value, np.uint8))


def answers(done) -> dict:
    return {d.request_id: (image_queue.decode_answer(d.answer) if d.answer else None) for d in done}


def test_one_forward_pass_for_the_whole_batch_and_each_answer_is_its_own():
    model = StandInClassifier()
    result = answer_batch(model, [message("a", 255), message("b", 0), message("c", 51)], NOW)
    assert model.batches == [3] and result.batch_size == 3 and result.inference_s > 0  # what /metrics counts
    got = answers(result.done)
    assert got["a"]["predictions"][0] == {"label": "bright", "probability": 1.0, "index": 1}
    assert got["b"]["predictions"][0] == {"label": "dark", "probability": 1.0, "index": 0}
    assert got["c"]["predictions"][0] == {"label": "dark", "probability": pytest.approx(0.8), "index": 0}
    assert {a["claimed"] for a in got.values()} == {round(NOW, 4)}  # the claim's Redis time: the web's queue wait


def test_expired_messages_are_dropped_unanswered_and_not_run():
    model = StandInClassifier()
    result = answer_batch(model, [message("late", deadline=NOW - 0.001), message("fine")], NOW)
    assert answers(result.done)["late"] is None and "predictions" in answers(result.done)["fine"]
    assert model.batches == [1] and result.batch_size == 1


def test_poison_messages_are_dropped_and_answered_when_their_id_can_be_read(caplog):
    def edited(request_id: str, **changes) -> bytes:
        header, pixel_bytes = message(request_id).split(b"\n", 1)
        fields = {**json.loads(header), **changes}
        return json.dumps({k: v for k, v in fields.items() if v is not None}).encode() + b"\n" + pixel_bytes

    batch = [b"\x00not json", edited("x", id=None), edited("bad-dtype", dtype="float32"), message("good")]
    with caplog.at_level(logging.ERROR):
        done = answer_batch(StandInClassifier(), batch, NOW).done
    assert len(done) == 4  # every message is released
    unreadable = [d for d in done if d.request_id is None]
    assert len(unreadable) == 2 and all(d.answer is None for d in unreadable)
    assert answers(done)["bad-dtype"] == {
        "error": "the queued request was unusable: dtype must be uint8, got 'float32'",
        "status": 500,
    }
    assert "predictions" in answers(done)["good"]
    assert caplog.text.count("dropping an unusable queue message") == 3


def test_a_message_in_a_newer_format_is_answered_503_upgrade_the_workers_at_once():
    header, pixel_bytes = message("newer").split(b"\n", 1)
    newer = json.dumps({**json.loads(header), "v": image_queue.MESSAGE_FORMAT + 1}).encode() + b"\n" + pixel_bytes
    model = StandInClassifier()
    result = answer_batch(model, [newer, message("current")], NOW)
    got = answers(result.done)
    assert got["newer"]["status"] == 503 and "upgrade the model workers" in got["newer"]["error"]
    assert "predictions" in got["current"] and model.batches == [1]  # the batch's other requests are served


def test_an_image_prepared_for_another_model_size_is_503_retry():
    done = answer_batch(StandInClassifier(), [message("old", size=(8, 8))], NOW).done
    assert answers(done)["old"] == {
        "error": "the image was prepared as 8x8 but the model takes 4x4; retry",
        "status": 503,
    }


def test_a_failing_batch_answers_500_for_each_request_and_logs_once(caplog):
    with caplog.at_level(logging.ERROR):
        result = answer_batch(StandInClassifier(fail=True), [message("a"), message("b")], NOW)
    assert {r["status"] for r in answers(result.done).values()} == {500}
    assert result.batch_size == 0  # a failed batch is not counted as one the model ran
    assert caplog.text.count("Traceback") == 1


def test_first_signal_finishes_the_batch_second_stops_now():
    worker = ModelWorker(
        object.__new__(type("Q", (), {})), StandInClassifier(), batch_size=8, max_wait_s=0, heartbeat_s=1
    )
    worker.request_stop()
    assert worker.stopping
    with pytest.raises(KeyboardInterrupt):
        worker.request_stop()


# --- The model seam, with real Keras -------------------------------------------------------------


@pytest.fixture(scope="module")
def keras():
    import keras

    return keras


class TimedClassifier:
    """A model whose batches take a known time: a per-image cost (seconds) measured by time_batch."""

    def __init__(self, per_image_s: float, buckets=(), noise_s: float = 0.0):
        self.per_image_s, self.buckets, self.noise_s, self.timed = per_image_s, buckets, noise_s, []

    def time_batch(self, n: int) -> float:
        self.timed.append(n)
        return 0.06 + n * self.per_image_s + self.noise_s


@pytest.mark.parametrize(
    "per_image_s, buckets, noise_s, expected",
    [
        (0.02, (), 0.0, 32),  # 0.7 s at 32: the configured batch fits (auto unresolved: 7 batches in 6.5 s)
        (0.105, (), 0.0, 8),  # the slow CI machine (3.4 s at 32): interpolated, timed, kept
        (0.105, (), 0.5, 2),  # the interpolated batch timed slower than the line said: the largest timed fit
        (0.105, (1, 2, 4, 8, 16, 32), 0.0, 8),  # padded batches: the largest bucket that fits
    ],
)
def test_a_batch_too_slow_for_the_takeover_order_is_lowered_to_the_largest_that_fits(
    monkeypatch, caplog, per_image_s, buckets, noise_s, expected
):
    monkeypatch.setattr(settings, "current", settings.Settings.from_env({"BATCH_SIZE": "32"}))
    model = TimedClassifier(per_image_s, buckets)
    timings = {n: model.time_batch(n) for n in buckets or (1, 2, 32)}
    model.noise_s = noise_s
    with caplog.at_level(logging.WARNING, "model_server"):
        size = batch_size_in_takeover(model, timings)
    assert size == expected and settings.current.fits_takeover(timings[size])
    assert model.buckets == tuple(b for b in buckets if b <= size)  # no batch padded past it either
    if expected == 32:
        assert not caplog.records
    else:
        assert f"BATCH_SIZE 32 lowered to {size}" in caplog.text and "REQUEST_TIMEOUT_S (10 s)" in caplog.text


def test_a_serial_worker_keeps_a_batch_that_a_pipelined_one_would_lower(monkeypatch):
    """main() checks the takeover order with the worker's resolved depth (auto: 1 on the host's cores)."""
    monkeypatch.setattr(settings, "current", settings.Settings.from_env({"BATCH_SIZE": "32"}))
    model = TimedClassifier(0.035)  # 1.18 s at 32: 3 + 0.5 + 4 x 1.18 < 10 <= 3 + 0.5 + 7 x 1.18
    timings = {n: model.time_batch(n) for n in (1, 2, 32)}
    assert batch_size_in_takeover(model, dict(timings), settings.current.replace(PIPELINE_DEPTH=1)) == 32
    assert batch_size_in_takeover(model, dict(timings), settings.current.replace(PIPELINE_DEPTH=3)) < 32
    assert batch_size_in_takeover(model, dict(timings)) < 32  # auto, unresolved: counted as pipelined


@pytest.mark.parametrize(
    "ms_per_image, expected",
    [
        ({1: 20.1, 2: 18.9, 4: 17.6, 8: 17.0, 16: 17.1, 32: 17.2}, 32),  # the AVX512-BF16 EPYC: flat from 8 on
        ({1: 20.1, 2: 18.9, 4: 17.6, 8: 17.0, 16: 17.8, 32: 18.0}, 16),  # 32 is 5.9% slower per image than 8
        ({1: 68.0, 8: 63.3, 32: 70.4}, 8),  # the AVX2-only EPYC: a batch of 32 is slower per image than 8
        ({1: 9.0, 2: 5.0, 4: 2.6, 8: 1.4, 16: 0.8, 32: 0.5}, 32),  # a GPU: each doubling pays
        ({1: 10.0, 2: 10.1, 32: 10.4}, 32),  # batching gains nothing and loses nothing: as configured
        ({1: 10.0, 2: 10.1, 32: 10.6}, 2),
        ({4: 5.0}, 4),
    ],
)
def test_fastest_batch_is_the_largest_within_the_tolerance_of_the_fastest_per_image(ms_per_image, expected):
    assert fastest_batch({n: ms / 1000 * n for n, ms in ms_per_image.items()}) == expected


class CacheBound(TimedClassifier):
    """20 ms a batch and 40 ms per image up to 16 images; 110 ms per image beyond (a CPU's caches overflowing)."""

    def time_batch(self, n: int, warm: bool = False) -> float:
        return 0.02 + n * (0.04 if n <= 16 else 0.11)


@pytest.mark.parametrize("buckets", [(), (1, 2, 4, 8, 16, 32)])
def test_with_batch_tune_a_worker_serves_up_to_its_fastest_size_and_checks_the_takeover_for_that(caplog, buckets):
    config = settings.Settings.from_env({"BATCH_SIZE": "32"}).replace(PIPELINE_DEPTH=1)
    assert config.BATCH_TUNE  # the shipped default
    model = CacheBound(0.0, buckets)
    timings = {n: model.time_batch(n) for n in (1, 2, 4, 8, 16, 32)}  # 32: 3.54 s, too slow for 3.5 + 4 x < 10
    with caplog.at_level(logging.INFO, "model_server"):
        assert serving_batch_size(model, dict(timings), config) == 16
    assert model.buckets == tuple(b for b in buckets if b <= 16) and "lowered" not in caplog.text
    assert "batches of up to 16 (BATCH_TUNE, BATCH_SIZE 32): ms per image 60.0 at 1, 50.0 at 2" in caplog.text

    model.buckets = buckets
    caplog.clear()
    with caplog.at_level(logging.INFO, "model_server"):  # off: the configured batch, lowered for the takeover only
        assert serving_batch_size(model, dict(timings), config.replace(BATCH_TUNE=False)) == 16
    assert "BATCH_TUNE" not in caplog.text and "BATCH_SIZE 32 lowered to 16" in caplog.text

    model.buckets = ()
    caplog.clear()
    tight = config.replace(REQUEST_TIMEOUT_S=5.7)  # tuned to 16 (0.66 s); 3.5 + 4 x 0.54 s at 13 fits
    with caplog.at_level(logging.INFO, "model_server"):
        assert serving_batch_size(model, dict(timings), tight) == 13
    assert "BATCH_SIZE 32 (BATCH_TUNE: 16) lowered to 13: a batch of 16 takes 0.66 s" in caplog.text


def test_warm_up_runs_each_size_once_untimed_then_in_turn_and_keeps_the_fastest(monkeypatch):
    from classifier import Classifier

    clock = [0.0]
    durations = iter([9.0, 9.0, 9.0, 0.03, 0.05, 0.20, 0.02, 0.06, 0.08])  # the first pass traces or compiles
    ran = []

    class Scripted(Classifier):
        def __init__(self):
            self.buckets = ()

        input_size = (4, 4)

        def predict(self, pixels):
            ran.append(len(pixels))
            clock[0] += next(durations)

    monkeypatch.setattr("classifier.time.perf_counter", lambda: clock[0])
    timings = Scripted().warm_up(4, every_size=True)
    assert ran == [1, 2, 4, 1, 2, 4, 1, 2, 4]
    assert timings == pytest.approx({1: 0.02, 2: 0.05, 4: 0.08})


def test_a_worker_whose_single_image_breaks_the_takeover_order_refuses_to_start(monkeypatch):
    monkeypatch.setattr(settings, "current", settings.Settings.from_env({}))
    with pytest.raises(settings.SettingError, match="raise REQUEST_TIMEOUT_S"):
        batch_size_in_takeover(TimedClassifier(3.3), {1: 3.36, 2: 6.66, 32: 105.66})


def test_labels_files_in_each_supported_format(tmp_path):
    from classifier import ModelConfigError, load_labels

    assert load_labels(IMAGENET_INDEX)[281] == "tabby"
    (tmp_path / "list.json").write_text('["cat", "dog"]')
    (tmp_path / "dict.json").write_text('{"1": "dog", "0": "cat"}')
    (tmp_path / "gap.json").write_text('{"0": "cat", "2": "dog"}')
    assert load_labels(tmp_path / "list.json") == load_labels(tmp_path / "dict.json") == ["cat", "dog"]
    with pytest.raises(ModelConfigError, match="class numbers"):
        load_labels(tmp_path / "gap.json")


def test_a_bad_setting_stops_the_worker_in_one_line_with_status_2():
    """Exit 2 is what the systemd unit does not restart (RestartPreventExitStatus=2): a bad setting is fixed by a
    person, not by restarting every 5 s with a traceback (it exited 1 before)."""
    import os
    import subprocess
    import sys

    env = os.environ | {"WORKER_TTL_S": "abc"}
    done = subprocess.run([sys.executable, "run_model_server.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr == "run_model_server: WORKER_TTL_S must be a number, got 'abc'\n"


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"name": "NotANet"}, "is not one of"),
        ({"preprocess": "sideways"}, "MODEL_PREPROCESS must be one of"),
        ({"model_path": "/some/model.keras", "labels_path": ""}, "needs LABELS_PATH"),
        ({"model_path": "/some/model.keras"}, "MODEL_PATH=/some/model.keras: no such file"),
        ({"weights": "/some/weights.h5"}, "MODEL_WEIGHTS=/some/weights.h5: no such file"),
    ],
)
def test_bad_model_settings_fail_with_a_clear_message(settings, words):
    from classifier import ModelConfigError, load_classifier

    with pytest.raises(ModelConfigError, match=words):
        load_classifier(**({"weights": "none", "labels_path": str(IMAGENET_INDEX)} | settings))


@pytest.mark.parametrize(
    ("name", "size", "module"),
    [
        ("MobileNetV2", (224, 224), "mobilenet_v2"),
        ("EfficientNetB0", (224, 224), "efficientnet"),
        ("VGG16", (224, 224), "vgg16"),
    ],
)
def test_other_keras_applications_bring_their_own_input_size_and_preprocessing(keras, name, size, module):
    from classifier import load_classifier

    c = load_classifier(name, "none", labels_path=str(IMAGENET_INDEX))
    assert c.name == name and c.input_size == size and len(c.labels) == 1000
    x = np.random.default_rng(0).integers(0, 256, (2, *size, 3)).astype(np.float32)
    own = getattr(keras.applications, module).preprocess_input(x.copy())
    np.testing.assert_allclose(c.preprocess(x.copy()), own)
    assert c.predict(x.astype(np.uint8)).shape == (2, 1000)


def test_a_labels_count_that_does_not_match_the_model_is_refused(tmp_path):
    from classifier import ModelConfigError, load_classifier

    (tmp_path / "three.json").write_text('["a", "b", "c"]')
    with pytest.raises(ModelConfigError, match="1000 outputs but the labels file has 3"):
        load_classifier("MobileNetV2", "none", labels_path=str(tmp_path / "three.json"))


def test_keras2_h5_weights_as_keras_downloads_them_load_through_model_weights(keras, resnet_keras, tmp_path):
    """Air-gapped sites copy Keras's resnet50_weights_tf_dim_ordering_tf_kernels.h5 (Keras 2 layout)."""
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    from classifier import load_classifier

    path = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, resnet_keras.model)
    copy = load_classifier("ResNet50", str(path), labels_path=str(IMAGENET_INDEX))
    pixels = np.stack([helpers.prepare_image(helpers.open_image(d, 10**8), (224, 224)) for d in distinct_photos(2)])
    np.testing.assert_allclose(copy.predict(pixels), resnet_keras.predict(pixels), atol=1e-6)


def test_top_k_is_sorted_and_labelled(resnet_keras):
    probabilities = np.zeros(1000, np.float32)
    probabilities[[281, 5, 999]] = [0.2, 0.7, 0.1]
    assert resnet_keras.top_k(probabilities, 3) == [
        {"label": "electric_ray", "probability": pytest.approx(0.7), "index": 5},
        {"label": "tabby", "probability": pytest.approx(0.2), "index": 281},
        {"label": "toilet_tissue", "probability": pytest.approx(0.1), "index": 999},
    ]


def test_warm_up_leaves_no_tracing_for_the_first_request(resnet_keras):
    timings = resnet_keras.warm_up(8)
    assert set(timings) == {1, 2, 8} and all(0 < s < 60 for s in timings.values())
    assert set(resnet_keras.warm_up(8, every_size=True)) == {1, 2, 4, 8}  # BATCH_TUNE times each power of two
    x = np.zeros((5, 224, 224, 3), np.uint8)  # a size never run before
    started = time.perf_counter()
    resnet_keras.predict(x)
    first = time.perf_counter() - started
    started = time.perf_counter()
    resnet_keras.predict(x)
    second = time.perf_counter() - started
    assert first < 2 * second + 0.2  # no retrace: tracing ResNet50 costs over a second here


def photo_pixels(n: int) -> np.ndarray:
    return np.stack([helpers.prepare_image(helpers.open_image(p, 10**8), (224, 224)) for p in distinct_photos(n)])


def test_buckets_are_powers_of_two_up_to_the_batch_size_and_only_for_compiled_models(resnet_keras):
    from classifier import ModelConfigError, bucket_sizes, choose_buckets

    assert bucket_sizes(32) == (1, 2, 4, 8, 16, 32) and bucket_sizes(12) == (1, 2, 4, 8, 12)
    assert bucket_sizes(1) == (1,) and bucket_sizes(2) == (1, 2)
    assert resnet_keras.model.jit_compile is False  # TensorFlow on a CPU: Keras leaves XLA off
    assert choose_buckets(resnet_keras.model, 32) == () and choose_buckets(resnet_keras.model, 8, "on") == (1, 2, 4, 8)

    class Compiled:  # JAX, or TensorFlow on a GPU: Keras compiles predict with XLA
        jit_compile = True

    assert choose_buckets(Compiled(), 32) == bucket_sizes(32) and choose_buckets(Compiled(), 32, "off") == ()
    with pytest.raises(ModelConfigError, match="BATCH_BUCKETS"):
        choose_buckets(Compiled(), 32, "always")


def test_a_padded_batch_gives_each_image_the_answer_it_gets_alone(resnet_keras):
    pixels = photo_pixels(3)
    alone = resnet_keras.predict(pixels)
    resnet_keras.buckets = (1, 2, 4, 8)
    try:
        padded = resnet_keras.predict(pixels)  # run as 4: the zero image's row is dropped
        timings = resnet_keras.warm_up(8)
    finally:
        resnet_keras.buckets = ()
    assert padded.shape == (3, 1000) and padded.dtype == np.float32
    np.testing.assert_allclose(padded, alone, atol=1e-5)
    assert set(timings) == {1, 2, 4, 8}  # warm-up runs every bucket (each compiles, where XLA compiles)


def test_mixed_bfloat16_is_opt_in_and_keeps_the_top_answer(resnet_keras, resnet_weights):
    from classifier import load_classifier

    half = load_classifier("ResNet50", str(resnet_weights), labels_path=str(IMAGENET_INDEX), precision="mixed_bfloat16")
    again = load_classifier("ResNet50", str(resnet_weights), labels_path=str(IMAGENET_INDEX))
    assert half.model.dtype_policy.name == "mixed_bfloat16" and again.model.dtype_policy.name == "float32"
    pixels = photo_pixels(4)
    full, low = resnet_keras.predict(pixels), half.predict(pixels)
    assert low.dtype == np.float32 and np.abs(low - full).max() < 0.05
    assert (low.argmax(axis=1) == full.argmax(axis=1)).all()
    np.testing.assert_allclose(again.predict(pixels), full, atol=1e-6)  # the next load is float32 again


# --- The worker loop against a Redis that goes away ----------------------------------------------


def test_worker_rides_out_a_redis_restart_without_busy_looping(tmp_path, caplog):
    import threading

    import stack
    from image_queue import ImageQueue, connect

    port = stack.free_port()
    server = stack.start_redis(port, str(tmp_path))
    url = f"redis://127.0.0.1:{port}/0"
    queue = ImageQueue(connect(url, 0.2), "restart", block_s=0.2, worker_ttl_s=2.0)
    worker = ModelWorker(queue, StandInClassifier(), batch_size=8, max_wait_s=0, heartbeat_s=0.2)
    thread = threading.Thread(target=worker.run, daemon=True)
    try:
        with caplog.at_level(logging.INFO, logger="model_server"):
            thread.start()
            time.sleep(0.5)
            assert queue.status().live_workers == 1
            server.stop()
            time.sleep(3)
            outage_warnings = caplog.text.count("Redis unavailable")
            assert thread.is_alive()  # it did not die
            assert 3 <= outage_warnings <= 15  # it retried, with backoff, not in a tight loop
            server = stack.start_redis(port, str(tmp_path))  # a fresh, empty Redis on the same address
            deadline = time.monotonic() + 10
            while queue.status().live_workers == 0 and time.monotonic() < deadline:
                time.sleep(0.05)  # test-side polling, waiting for the worker's next heartbeat
            assert queue.status().live_workers == 1 and queue.status().model.name == "StandIn"
            queue.enqueue(message("after-restart", deadline=time.time() + 30))
            answer = queue.wait_for("after-restart", time.monotonic() + 5)
            assert answer is not None and "predictions" in image_queue.decode_answer(answer)
            assert "Redis is back" in caplog.text
    finally:
        worker.request_stop()
        thread.join(5)
        server.stop()


def test_a_claim_whose_reply_was_lost_is_handed_back_and_answered(redis_url, queue_name, caplog):
    import threading

    import redis

    from image_queue import ImageQueue, connect

    queue = ImageQueue(connect(redis_url, 0.2), queue_name, block_s=0.2, worker_ttl_s=5.0)
    real_claim, lost = queue.claim, []

    def claim_losing_the_first_reply(*args, **kwargs):
        claim = real_claim(*args, **kwargs)  # the messages really moved to the processing list ...
        if claim.messages and not lost:
            lost.append(claim)
            raise redis.ConnectionError("connection reset")  # ... but the worker never saw them
        return claim

    queue.claim = claim_losing_the_first_reply
    worker = ModelWorker(queue, StandInClassifier(), batch_size=8, max_wait_s=0, heartbeat_s=0.2)
    thread = threading.Thread(target=worker.run, daemon=True)
    with caplog.at_level(logging.INFO, logger="model_server"):
        thread.start()
        try:
            queue.enqueue(message("lost-once", deadline=time.time() + 30))
            answer = queue.wait_for("lost-once", time.monotonic() + 10)
        finally:
            worker.request_stop()
            thread.join(5)
    assert lost and answer is not None and "predictions" in image_queue.decode_answer(answer)
    assert "Redis is back (1 messages handed back)" in caplog.text


def test_the_worker_is_backend_agnostic_tensorflow_only_in_the_optional_gpu_memory_setting():
    """The worker runs on any Keras 3 backend (KERAS_BACKEND=jax or torch on a GPU box without TensorFlow):
    no module of the service imports tensorflow except inside classifier.enable_gpu_memory_growth."""
    import ast

    found = []
    for path in sorted(ROOT.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.split(".")[0] == "tensorflow" for name in names):
                scope = node
                while scope in parents and not isinstance(scope, ast.FunctionDef):
                    scope = parents[scope]
                found.append((path.name, getattr(scope, "name", "<module>")))
    assert found == [("classifier.py", "enable_gpu_memory_growth")]


# --- Heartbeats from their own thread: takeover before the deadline ------------------------------


class SlowClassifier(StandInClassifier):
    """A batch that takes longer than the workers' TTL, as a big batch on a slow CPU does."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def predict(self, pixels):
        time.sleep(self.seconds)
        return super().predict(pixels)


def test_a_batch_longer_than_the_ttl_keeps_its_worker_alive_and_is_answered_once(redis_url, queue_name):
    import threading

    from image_queue import ImageQueue, connect

    queue = ImageQueue(connect(redis_url, 0.2), queue_name, block_s=0.2, worker_ttl_s=1.0)
    worker = ModelWorker(queue, SlowClassifier(2.5), batch_size=8, max_wait_s=0, heartbeat_s=0.2)
    peer = ImageQueue(connect(redis_url, 0.2), queue_name, block_s=0.2, worker_ttl_s=1.0)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: peer.status().live_workers == 1, 5)  # its first heartbeat
        queue.enqueue(message("slow", deadline=time.time() + 30))
        live, requeued = [], 0
        answer = None
        while answer is None:
            live.append(peer.status().live_workers)
            requeued += peer.requeue_dead_workers()  # a peer looking for dead workers all along
            answer = queue.wait_for("slow", time.monotonic() + 0.1)
        assert min(live) == 1 and requeued == 0  # its heartbeats went on while the model ran for 2.5 s
        assert queue.redis.llen(queue.keys.result("slow")) == 0  # and one answer, already taken
        assert queue.stats().requeued == 0
    finally:
        worker.request_stop()
        thread.join(5)


def test_an_ack_that_needed_a_retry_hands_its_lane_back_before_the_next_claim(redis_url, queue_name, monkeypatch):
    """A failover can lose a lane's last ack (replication is asynchronous): the new master still holds that
    batch on the lane, its answers gone with the old master. A serial worker's feeder waits for the model
    through the outage and meets no error, so the lane the retried ack frees must be handed back: its
    messages run again and are answered, not left on a live worker's list until its requests time out."""
    import threading

    import redis

    from image_queue import ImageQueue, connect

    queue = ImageQueue(connect(redis_url, 0.2), queue_name, block_s=0.2, worker_ttl_s=30)
    worker = ModelWorker(queue, SlowClassifier(0.3), batch_size=8, max_wait_s=0, heartbeat_s=0.2, depth=1)
    ack, failed = queue.ack, []

    def ack_through_a_failover(worker_id, done, *args, **options):
        if not failed:  # the first ack: the batch acked before it comes back with the failover, then Redis fails
            queue.redis.lpush(queue.keys.processing(worker_id), message("lost-ack", deadline=time.time() + 30))
            failed.append(True)
            raise redis.ConnectionError("the master failed over")
        return ack(worker_id, done, *args, **options)

    monkeypatch.setattr(queue, "ack", ack_through_a_failover)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        queue.enqueue(message("first", deadline=time.time() + 30))
        assert queue.wait_for("first", time.monotonic() + 10) is not None
        assert queue.wait_for("lost-ack", time.monotonic() + 5) is not None  # handed back, run again, answered
    finally:
        worker.request_stop()
        thread.join(5)


WATCHED_WORKER = """
import signal, sys, threading, time
sys.path[:0] = [sys.argv[3], sys.argv[3] + "/tests"]
from image_queue import ImageQueue, connect
from run_model_server import ModelWorker
from support.stand_in import StandInClassifier

class Slow(StandInClassifier):
    def predict(self, pixels):
        if sys.argv[4] == "hang":
            threading.Event().wait()  # a GPU or driver that never returns
        started = time.thread_time()
        while time.thread_time() - started < float(sys.argv[4]):  # the CPU's work: a stopped process does none
            pass
        return super().predict(pixels)

queue = ImageQueue(connect(sys.argv[1], 0.2), sys.argv[2], block_s=0.2, worker_ttl_s=30)
worker = ModelWorker(queue, Slow(), batch_size=1, max_wait_s=0, heartbeat_s=0.2, depth=2, hung_after_s=2.5)
signal.signal(signal.SIGTERM, worker.request_stop)
worker.run()
"""


def watched_worker(redis_url: str, queue_name: str, batch_s: str) -> list[str]:
    """A worker process whose model takes batch_s of CPU per batch ("hang": for ever), its watchdog at 2.5 s."""
    import sys

    return [sys.executable, "-c", WATCHED_WORKER, redis_url, queue_name, str(ROOT), batch_s]


def test_a_worker_whose_model_hangs_hands_back_its_batches_and_exits_3(redis_url, queue_name):
    """Its heartbeats would go on for ever (their own thread): a batch running hung_after_s means a hung model.
    The worker exits 3 for its supervisor to restart it, handing back both batches it held (the hung one and
    the next, claimed while it ran) at once, not a WORKER_TTL_S (30 s here) later."""
    import subprocess

    from image_queue import ImageQueue, connect

    queue = ImageQueue(connect(redis_url, 0.2), queue_name, block_s=0.2)
    queue.enqueue(message("first", deadline=time.time() + 60), message("second", deadline=time.time() + 60))
    started = time.monotonic()
    worker = subprocess.run(watched_worker(redis_url, queue_name, "hang"), capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert worker.returncode == 3, worker.stderr[-3000:]
    assert "the model has run one batch for" in worker.stderr and "it is hung" in worker.stderr
    assert 2.5 <= took < 15, took  # (a Python start and imports included)
    status = queue.status()
    assert status.queue_depth == 2 and status.held == 2 and status.live_workers == 0  # back on the queue, none held
    assert queue.stats().requeued == 2


def test_a_worker_stopped_mid_batch_for_longer_than_the_watchdog_is_not_hung_when_it_wakes(redis_url, queue_name):
    """SIGSTOP (or a paused VM) stops the watchdog's clock too: a batch of 0.5 s of CPU stalled for 4 s, then
    woken, is answered and the worker serves on; by the wall clock it would have run over 4 s of a 2.5 s limit."""
    import signal
    import subprocess

    from image_queue import ImageQueue, connect

    queue = ImageQueue(connect(redis_url, 0.2), queue_name, block_s=0.2)
    worker = subprocess.Popen(watched_worker(redis_url, queue_name, "0.5"), stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: queue.status().live_workers == 1, 30)
        queue.enqueue(message("stalled", deadline=time.time() + 60))
        wait_for(lambda: queue.status().queue_depth == 0, 5)  # claimed: the model is running it
        time.sleep(0.1)
        worker.send_signal(signal.SIGSTOP)
        time.sleep(4)
        worker.send_signal(signal.SIGCONT)
        assert queue.wait_for("stalled", time.monotonic() + 5) is not None
        queue.enqueue(message("after", deadline=time.time() + 60))
        assert queue.wait_for("after", time.monotonic() + 5) is not None
        assert worker.poll() is None  # still serving
    finally:
        worker.terminate()
        _, stderr = worker.communicate(timeout=30)
    assert worker.returncode == 0 and "hung" not in stderr, stderr[-3000:]


def test_a_busy_worker_requeues_a_dead_peers_batch_within_ttl_plus_a_heartbeat(redis_url, queue_name):
    """The rescue does not wait for the survivor's batch in hand: its heartbeat thread requeues."""
    import threading

    from image_queue import ImageQueue, connect

    queue = ImageQueue(connect(redis_url, 0.2), queue_name, block_s=0.2, worker_ttl_s=1.0)
    for i in range(3):
        queue.enqueue(message(f"dead-{i}", deadline=time.time() + 30))
    dead = queue.claim("dead-peer", 3)  # a worker that claimed a batch and was then killed
    assert len(dead.messages) == 3
    died = time.monotonic()
    queue.enqueue(message("busy", deadline=time.time() + 30))
    survivor = ModelWorker(queue, SlowClassifier(3.0), batch_size=1, max_wait_s=0, heartbeat_s=0.2)
    thread = threading.Thread(target=survivor.run, daemon=True)
    thread.start()
    try:
        while queue.redis.llen(queue.keys.processing("dead-peer")):
            assert time.monotonic() - died < 1.0 + 0.2 + 0.5, "not requeued while the survivor was busy"
            time.sleep(0.02)
        requeued_after = time.monotonic() - died
        assert requeued_after < 3.0  # before the survivor's 3 s batch ended
        for i in range(3):
            assert queue.wait_for(f"dead-{i}", time.monotonic() + 15) is not None
    finally:
        survivor.request_stop()
        thread.join(10)


# --- The pipeline: claim N+1 and ack N-1 while the model runs N ----------------------------------


class RecordingClassifier(SlowClassifier):
    """A slow model that records, at each batch it starts, what every lane of its worker holds."""

    def __init__(self, seconds: float, queue, worker):
        super().__init__(seconds)
        self.queue, self.worker, self.seen = queue, worker, []

    def predict(self, pixels):
        time.sleep(0.05)  # let the feeder claim the next batch
        self.seen.append([self.queue.redis.llen(k) for k in self.queue.keys.lanes(self.worker.worker_id)])
        return super().predict(pixels)


def test_the_next_batch_is_claimed_on_its_own_lane_while_the_model_runs_and_each_is_answered_once(
    redis_url, queue_name
):
    import threading

    from image_queue import ImageQueue, connect

    queue = ImageQueue(connect(redis_url, 0.2), queue_name, block_s=0.2, worker_ttl_s=2.0)
    worker = ModelWorker(queue, StandInClassifier(), batch_size=4, max_wait_s=0, heartbeat_s=0.2)
    worker.classifier = RecordingClassifier(0.2, queue, worker)
    ids = [f"p{i}" for i in range(16)]
    for request_id in ids:
        queue.enqueue(message(request_id, deadline=time.time() + 30))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        got = {request_id: queue.wait_for(request_id, time.monotonic() + 15) for request_id in ids}
    finally:
        worker.request_stop()
        thread.join(10)
    assert all(a is not None and "predictions" in image_queue.decode_answer(a) for a in got.values())
    # while a batch ran, the next one was already held on another lane
    assert any(sum(1 for n in lanes if n) >= 2 for lanes in worker.classifier.seen), worker.classifier.seen
    assert max(max(lanes) for lanes in worker.classifier.seen) <= 4
    assert queue.stats().batch_sizes == {4: 4}  # 16 images in 4 full batches, each counted once
    assert not thread.is_alive() and queue.status().held == 0
    assert all(queue.redis.llen(key) == 0 for key in queue.keys.lanes(worker.worker_id))


def test_the_next_batch_fills_while_the_model_runs_rather_than_leaving_with_the_first_arrival(redis_url, queue_name):
    """Requests arriving one by one during a long batch all go in the next one, not one per batch."""
    import threading

    from image_queue import ImageQueue, connect

    queue = ImageQueue(connect(redis_url, 0.2), queue_name, block_s=0.2, worker_ttl_s=2.0)
    worker = ModelWorker(queue, SlowClassifier(0.6), batch_size=8, max_wait_s=0, heartbeat_s=0.2)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        queue.enqueue(message("first", deadline=time.time() + 30))
        time.sleep(0.2)  # the model is running "first"
        for i in range(5):
            queue.enqueue(message(f"later-{i}", deadline=time.time() + 30))
            time.sleep(0.05)
        answers_ = [queue.wait_for(f"later-{i}", time.monotonic() + 10) for i in range(5)]
    finally:
        worker.request_stop()
        thread.join(10)
    sizes = {image_queue.decode_answer(a)["batch_size"] for a in answers_}
    assert sizes == {5}  # all five in one batch: the claimed batch was topped up until the model took it


@pytest.mark.parametrize("depth", [1, 3])
def test_a_stop_request_answers_every_batch_in_flight_and_hands_nothing_back(redis_url, queue_name, caplog, depth):
    import threading

    from image_queue import ImageQueue, connect

    queue = ImageQueue(connect(redis_url, 0.2), queue_name, block_s=0.2, worker_ttl_s=2.0)
    worker = ModelWorker(queue, SlowClassifier(0.3), batch_size=2, max_wait_s=0, heartbeat_s=0.2, depth=depth)
    for i in range(12):
        queue.enqueue(message(f"s{i}", deadline=time.time() + 30))
    thread = threading.Thread(target=worker.run, daemon=True)
    with caplog.at_level(logging.INFO, logger="model_server"):
        thread.start()
        time.sleep(0.45)  # mid-batch, with the next one claimed where pipelined
        worker.request_stop()
        thread.join(10)
    answered = [i for i in range(12) if queue.redis.llen(queue.keys.result(f"s{i}"))]
    assert not thread.is_alive() and "stopped (0 messages handed back)" in caplog.text
    assert answered == list(range(len(answered))) and 4 <= len(answered) <= 6  # whole batches, in order
    status = queue.status()  # the rest wait on the queue; no lane holds any
    assert status.queue_depth == 12 - len(answered) and status.held == status.queue_depth


def test_an_unexpected_failure_in_the_acker_stops_the_worker_and_hands_its_batches_back(redis_url, queue_name, caplog):
    """Not a worker that beats but never answers: it leaves, requeueing what it held, and run() raises (exit 1)."""
    import threading

    from image_queue import ImageQueue, connect

    queue = ImageQueue(connect(redis_url, 0.2), queue_name, block_s=0.2, worker_ttl_s=2.0)
    worker = ModelWorker(queue, StandInClassifier(), batch_size=2, max_wait_s=0, heartbeat_s=0.2)

    def broken_ack(*args, **kwargs):
        raise RuntimeError("a bug in the ack")

    queue.ack = broken_ack
    for i in range(4):
        queue.enqueue(message(f"b{i}", deadline=time.time() + 30))
    raised = []
    thread = threading.Thread(target=lambda: raised.append(pytest.raises(RuntimeError, worker.run)), daemon=True)
    with caplog.at_level(logging.INFO, logger="model_server"):
        thread.start()
        thread.join(10)
    assert not thread.is_alive() and raised and "a bug in the ack" in caplog.text
    status = queue.status()
    assert status.live_workers == 0 and status.queue_depth == 4 and status.held == 4  # all back on the queue


def test_predict_calls_take_turns_where_the_keras_backend_cannot_run_two_at_once():
    """Keras on JAX donates the model's state to each predict call: two threads at once failed ("Buffer has
    been deleted or donated"; the benchmark's in-process baseline got 500s). Such a classifier's calls take
    turns; others still run at once."""
    import threading

    from classifier import Classifier, predict_takes_turns

    assert predict_takes_turns("jax") and not predict_takes_turns("tensorflow") and not predict_takes_turns("torch")

    class Overlaps:  # a model that counts the calls running at once
        input_shape, output_shape = (None, 4, 4, 3), (None, 2)

        def __init__(self):
            self.running = self.most = 0
            self.lock = threading.Lock()

        def predict_on_batch(self, x):
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(0.02)
            with self.lock:
                self.running -= 1
            return np.zeros((len(x), 2), np.float32)

    def most_at_once(calls_take_turns: bool) -> int:
        model = Overlaps()
        classifier = Classifier("m", model, lambda x: x, ["a", "b"], calls_take_turns=calls_take_turns)
        threads = [
            threading.Thread(target=classifier.predict, args=(np.zeros((1, 4, 4, 3), np.uint8),)) for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return model.most

    assert most_at_once(calls_take_turns=False) > 1  # the threads do overlap when allowed to
    assert most_at_once(calls_take_turns=True) == 1
