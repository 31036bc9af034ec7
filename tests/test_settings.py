"""settings.py reads the environment once into a typed Settings: defaults, overrides, clear errors for bad
values and for combinations that break the timeouts' order. Settings.from_env takes any mapping, so these
need no subprocess, but for the one that shows a bad value stops a process at import."""

import subprocess
import sys

import pytest
from support import ROOT

from settings import SettingError, Settings


def test_defaults_are_the_documented_ones():
    s = Settings.from_env({})
    assert s.REDIS_URL == "redis://localhost:6379/0" and s.REDIS_CONFIGURED is False
    assert Settings.from_env({"REDIS_URL": "", "REDIS_HOST": ""}).REDIS_CONFIGURED is False  # empty names none
    assert s.IMAGE_QUEUE == "image_queue" and s.BATCH_SIZE == 32 and s.MAX_BATCH_WAIT_MS == 0 and s.BATCH_TUNE
    assert s.PIPELINE_DEPTH == 0  # auto: see test_pipeline_depth_auto_is_serial_on_the_hosts_cores_pipelined_on_a_gpu
    assert s.MODEL_NAME == "ResNet50" and s.MODEL_WEIGHTS == "imagenet" and s.TOP_K == 5
    assert s.WEB_HOST == "127.0.0.1" and s.MODEL_PRECISION == "auto" and s.BATCH_BUCKETS == "auto"
    assert s.MODEL_RUNTIME == "auto" and s.MODEL_CACHE_DIR == ""
    assert s.API_KEYS == () and s.RATE_LIMIT == "" and s.LOG_JSON is False


def test_timeouts_are_ordered_by_default():
    s = Settings.from_env({})
    assert s.REDIS_BLOCK_S < s.REQUEST_TIMEOUT_S < s.GUNICORN_TIMEOUT_S
    assert s.REDIS_BLOCK_S < s.WORKER_TTL_S and s.WORKER_HEARTBEAT_S < s.WORKER_TTL_S


def test_seed_redis_names_build_the_url():
    s = Settings.from_env({"REDIS_HOST": "cache.internal", "REDIS_PORT": "6380", "REDIS_DB": "2"})
    assert s.REDIS_URL == "redis://cache.internal:6380/2" and s.REDIS_CONFIGURED is True


def test_redis_url_wins_over_host_and_port():
    s = Settings.from_env({"REDIS_URL": "rediss://:pw@example:6390/1", "REDIS_HOST": "ignored"})
    assert s.REDIS_URL == "rediss://:pw@example:6390/1" and s.REDIS_CONFIGURED is True


def test_every_setting_is_read_from_its_variable():
    s = Settings.from_env(
        {
            "IMAGE_QUEUE": "cats", "BATCH_SIZE": "8", "MAX_BATCH_WAIT_MS": "2.5", "QUEUE_MAX": "10",
            "REQUEST_TIMEOUT_S": "3", "RESULT_TTL_S": "9", "MODEL_NAME": "MobileNetV2", "MODEL_WEIGHTS": "/w.h5",
            "MODEL_PATH": "/m.keras", "LABELS_PATH": "/l.json", "MODEL_PREPROCESS": "Torch", "MAX_UPLOAD_MB": "2",
            "MAX_IMAGE_PIXELS": "1000", "TOP_K": "3", "MODEL_PRECISION": "Mixed_BFloat16", "BATCH_BUCKETS": "on",
            "WEB_HOST": "[::1]", "LOG_JSON": "yes", "WORKER_TTL_S": "4", "WORKER_HEARTBEAT_S": "0.5",
            "BATCH_TUNE": "off",
        }
    )  # fmt: skip
    assert s.IMAGE_QUEUE == "cats" and s.BATCH_SIZE == 8 and s.MAX_BATCH_WAIT_MS == 2.5 and s.BATCH_TUNE is False
    assert s.QUEUE_MAX == 10 and s.REQUEST_TIMEOUT_S == 3.0 and s.RESULT_TTL_S == 9
    assert s.MODEL_NAME == "MobileNetV2" and s.MODEL_WEIGHTS == "/w.h5" and s.MODEL_PATH == "/m.keras"
    assert s.LABELS_PATH == "/l.json" and s.MODEL_PREPROCESS == "torch"
    assert s.MAX_UPLOAD_MB == 2.0 and s.MAX_IMAGE_PIXELS == 1000 and s.TOP_K == 3
    assert s.MODEL_PRECISION == "mixed_bfloat16" and s.BATCH_BUCKETS == "on"
    assert s.WEB_HOST == "::1" and s.LOG_JSON is True and s.WORKER_TTL_S == 4.0 and s.WORKER_HEARTBEAT_S == 0.5
    assert isinstance(s.BATCH_SIZE, int) and isinstance(s.REQUEST_TIMEOUT_S, float)


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"BATCH_SIZE": "lots"}, "BATCH_SIZE must be a whole number"),
        ({"BATCH_SIZE": "0"}, "BATCH_SIZE must be at least 1"),
        ({"MODEL_PRECISION": "float16"}, "MODEL_PRECISION must be one of auto, float32, mixed_bfloat16"),
        ({"MODEL_RUNTIME": "onnx"}, "MODEL_RUNTIME must be one of auto, keras, openvino"),
        ({"BATCH_BUCKETS": "yes"}, "BATCH_BUCKETS must be one of auto, on, off"),
        ({"REQUEST_TIMEOUT_S": "soon"}, "REQUEST_TIMEOUT_S must be a number"),
        ({"REQUEST_TIMEOUT_S": "inf"}, "REQUEST_TIMEOUT_S must be finite"),
        ({"REQUEST_TIMEOUT_S": "nan"}, "REQUEST_TIMEOUT_S must be finite"),
        ({"REQUEST_TIMEOUT_S": "-inf"}, "REQUEST_TIMEOUT_S must be finite"),
        ({"WORKER_NICE": "20"}, "WORKER_NICE must be 0 to 19"),
        ({"PIPELINE_DEPTH": "4"}, "PIPELINE_DEPTH must be 1 to 3"),
        ({"PIPELINE_DEPTH": "0"}, "PIPELINE_DEPTH must be at least 1"),
        ({"PIPELINE_DEPTH": "deep"}, "PIPELINE_DEPTH must be a whole number or auto"),
        ({"LOG_JSON": "maybe"}, "LOG_JSON must be 1/true/yes/on"),
        ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL must be one of debug, info, warning, warn, error, critical"),
    ],
)
def test_bad_values_fail_with_the_setting_named(env, words):
    with pytest.raises(SettingError, match=words):
        Settings.from_env(env)


def test_an_empty_model_weights_is_the_default_imagenet_not_random_weights_and_log_level_takes_any_case():
    """MODEL_WEIGHTS= (an env file's empty line, or $W unset) served ResNet50 with random weights, as `none` does,
    with the ImageNet labels: confident nonsense."""
    assert Settings.from_env({"MODEL_WEIGHTS": ""}).MODEL_WEIGHTS == "imagenet"
    assert Settings.from_env({"MODEL_WEIGHTS": "none"}).MODEL_WEIGHTS == "none"
    assert Settings.from_env({"LOG_LEVEL": "debug"}).LOG_LEVEL == "DEBUG"


@pytest.mark.parametrize(
    ("env", "words"),
    [
        (
            {"REDIS_BLOCK_S": "2", "REQUEST_TIMEOUT_S": "1.5"},
            "REDIS_BLOCK_S (2 s) must be shorter than REQUEST_TIMEOUT_S",
        ),
        ({"REDIS_BLOCK_S": "3", "WORKER_TTL_S": "2"}, "REDIS_BLOCK_S (3 s) must be shorter than WORKER_TTL_S"),
        (
            {"WORKER_HEARTBEAT_S": "5", "WORKER_TTL_S": "5"},
            "WORKER_HEARTBEAT_S (5 s) must be shorter than WORKER_TTL_S",
        ),
        (  # uWSGI's harakiri and mod_wsgi's request-timeout would kill requests the app still waits on
            {"REQUEST_TIMEOUT_S": "45"},
            "GUNICORN_TIMEOUT_S (30 s) must be longer than REQUEST_TIMEOUT_S (45 s)",
        ),
        ({"GUNICORN_TIMEOUT_S": "10"}, "GUNICORN_TIMEOUT_S (10 s) must be longer than REQUEST_TIMEOUT_S (10 s)"),
        (  # redis-py lets the URL win: a socket timeout under REDIS_BLOCK_S breaks every idle blocking call
            {"REDIS_URL": "redis://h:6379/0?socket_timeout=0.2&health_check_interval=5&socket_keepalive=true"},
            "REDIS_URL must not set health_check_interval, socket_timeout:",
        ),
    ],
)
def test_combinations_that_break_the_timeouts_order_are_refused(env, words):
    with pytest.raises(SettingError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(env)


@pytest.mark.parametrize(
    "env, words",
    [
        (
            {"REQUEST_TIMEOUT_S": "26"},
            "GUNICORN_TIMEOUT_S (30 s) must be longer than the longest a request can take, 31 s",
        ),
        (  # a hung Redis call twice and a late decode: the 504 comes at ~33.9 s, harakiri at 30
            {"REQUEST_TIMEOUT_S": "25.9", "REDIS_BLOCK_S": "2.5"},
            "take, 33.9 s: REQUEST_TIMEOUT_S (25.9 s)",
        ),
        ({"TOP_K": "50"}, "TOP_K must be at most 20"),  # as ?top=K
    ],
)
def test_the_web_refuses_settings_of_its_own_that_a_model_worker_accepts(env, words):
    """Checked where the web starts (gunicorn_conf.py, create_app), not in every process: a worker started with
    an environment the web refuses still serves."""
    s = Settings.from_env(env)  # a worker's view: accepted
    with pytest.raises(SettingError, match=words.replace("(", r"\(").replace(")", r"\)")):
        s.check_web()


@pytest.mark.parametrize("name", ["", "a:b", "{a}", "my queue"])
def test_an_image_queue_name_that_would_break_its_keys_is_refused_at_start(name):
    with pytest.raises(SettingError, match="IMAGE_QUEUE must be non-empty, without braces, colons or spaces"):
        Settings.from_env({"IMAGE_QUEUE": name})


def test_a_longer_request_timeout_is_accepted_with_a_longer_worker_timeout():
    s = Settings.from_env({"REQUEST_TIMEOUT_S": "45", "GUNICORN_TIMEOUT_S": "60"})
    assert (s.REQUEST_TIMEOUT_S, s.GUNICORN_TIMEOUT_S) == (45, 60)


def test_a_changed_copy_is_checked_again():
    s = Settings.from_env({})
    assert s.replace(BATCH_SIZE=4).BATCH_SIZE == 4 and s.BATCH_SIZE == 32
    with pytest.raises(SettingError, match="WORKER_HEARTBEAT_S"):
        s.replace(WORKER_HEARTBEAT_S=s.WORKER_TTL_S)


def test_the_module_reads_the_environment_once_and_a_bad_value_stops_the_process_at_import():
    code = "import settings; print(settings.BATCH_SIZE, settings.current.BATCH_SIZE, settings.TOP_K_MAX)"
    env = {"PATH": "/usr/bin:/bin", "BATCH_SIZE": "7"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.split() == ["7", "7", "20"], result.stderr
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env | {"BATCH_SIZE": "0"}, capture_output=True, text=True
    )
    assert result.returncode != 0 and "SettingError: BATCH_SIZE must be at least 1" in result.stderr


@pytest.mark.parametrize(
    "value, on_host_cpu, depth, takeover_batches",
    [
        (None, True, 1, 7),  # the default, auto: serial where the model has the host's cores (OpenVINO, CPU Keras)
        (None, False, 3, 7),  # ... pipelined where it runs on a GPU; unresolved, the takeover order assumes depth 3
        ("AUTO", True, 1, 7),
        ("1", False, 1, 4),  # a number is kept whatever the model runs on
        ("3", True, 3, 7),
        ("2", True, 2, 6),
    ],
)
def test_pipeline_depth_auto_is_serial_on_the_hosts_cores_pipelined_on_a_gpu(
    value, on_host_cpu, depth, takeover_batches
):
    s = Settings.from_env({} if value is None else {"PIPELINE_DEPTH": value})
    assert s.pipeline_depth(on_host_cpu) == depth
    assert s.takeover_batches == takeover_batches


def test_a_worker_refuses_settings_under_which_a_dead_workers_requests_expire_before_takeover():
    defaults = Settings.from_env({})
    assert (defaults.WORKER_TTL_S, defaults.WORKER_HEARTBEAT_S, defaults.REQUEST_TIMEOUT_S) == (3.0, 0.5, 10.0)
    # pipelined (PIPELINE_DEPTH 3, or auto before the worker resolves it): the request waited and ran in the
    # dead worker (2 batches), a survivor's running and claimed batches (2), then the dead worker's 3
    assert defaults.takeover_s(0.5) == pytest.approx(7.0)
    defaults.check_takeover(0.9)
    with pytest.raises(SettingError, match=r"WORKER_TTL_S \(3 s\).*7 x the largest batch \(1.00 s here\)"):
        defaults.check_takeover(1.0)  # 3 + 0.5 + 7 >= 10
    # serial: it waited on the queue and ran in the dead worker (2), then a survivor's batch and its own (2)
    serial = Settings.from_env({"PIPELINE_DEPTH": "1"})
    assert serial.takeover_s(1.1) == pytest.approx(7.9)  # ResNet50, batch 32, on 2 cores (TensorFlow): fits
    serial.check_takeover(1.6)  # 3 + 0.5 + 6.4 < 10
    with pytest.raises(SettingError, match=r"4 x the largest batch \(1.70 s here\)"):
        serial.check_takeover(1.7)  # 3 + 0.5 + 6.8 >= 10
    Settings.from_env({"REQUEST_TIMEOUT_S": "14"}).check_takeover(1.4)  # 3 + 0.5 + 9.8 < 14
    with pytest.raises(SettingError, match="lower WORKER_TTL_S or BATCH_SIZE, or raise REQUEST_TIMEOUT_S"):
        Settings.from_env({"WORKER_TTL_S": "10"}).check_takeover(0.1)  # the old default TTL: 504s, not takeover


def test_the_largest_batch_in_the_takeover_order_is_interpolated_between_timed_sizes():
    assert Settings.from_env({}).largest_batch_in_takeover({1: 0.167, 2: 0.282, 32: 3.436}) == 8  # (10-3.5)/7 s
    defaults = Settings.from_env({"PIPELINE_DEPTH": "1"})  # serial: a batch may take up to (10 - 3 - 0.5) / 4 s
    assert defaults.largest_batch_in_takeover({1: 0.1, 2: 0.2, 32: 1.1}) == 32  # all fit
    # the slow CI machine's warm-up with two workers warming at once: 0.105 s more per image after batch 2
    assert defaults.largest_batch_in_takeover({1: 0.167, 2: 0.282, 32: 3.436}) == 14
    assert defaults.largest_batch_in_takeover({1: 0.5, 2: 3.3, 32: 9.0}) == 1  # nothing between 1 and 2
    assert defaults.largest_batch_in_takeover({1: 3.3, 2: 6.0}) == 0  # even one image is too slow
    assert defaults.largest_batch_in_takeover({1: 1.0, 2: 2.5, 4: 1.5}) == 4  # noise: a larger batch timed faster
    for timings in ({1: 0.167, 2: 0.282, 32: 3.436}, {1: 0.5, 2: 3.3}, {1: 0.2, 8: 1.0, 32: 5.0}):
        n = defaults.largest_batch_in_takeover(timings)
        below, above = max(k for k in timings if k <= n), min((k for k in timings if k > n), default=None)
        if above is not None:  # the interpolated batch fits, one more image would not
            slope = (timings[above] - timings[below]) / (above - below)
            assert defaults.fits_takeover(timings[below] + (n - below) * slope)
            assert not defaults.fits_takeover(timings[below] + (n + 1 - below) * slope) or n + 1 == above


def test_sentinels_are_host_port_pairs_and_count_as_a_configured_redis():
    s = Settings.from_env({"REDIS_SENTINELS": "10.0.0.1:26379, [::1]:26380,", "REDIS_SENTINEL_MASTER": "q"})
    assert s.REDIS_SENTINELS == (("10.0.0.1", 26379), ("::1", 26380)) and s.REDIS_SENTINEL_MASTER == "q"
    assert s.REDIS_CONFIGURED is True and Settings.from_env({}).REDIS_SENTINELS == ()
    for bad in ("10.0.0.1", "host:port", ":26379", "h:70000"):
        with pytest.raises(SettingError, match="REDIS_SENTINELS must be host:port"):
            Settings.from_env({"REDIS_SENTINELS": bad})
