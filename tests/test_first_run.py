"""A first run that cannot load its model ends in one line naming the setting that fixes it, not a traceback.

The real worker (and, last, the real scripts/stack.sh) with each kind of bad model setting: no internet
for the ImageNet weights or class index, a partial download in Keras's cache, a missing or corrupt weights
file, a missing or broken labels file, a MODEL_PATH that is not a model, an unknown MODEL_NAME. "No
internet" is made sure of with a proxy on a closed port, so the test means the same on a connected machine.
"""

import os
import socket
import subprocess
import sys

import pytest
from support import IMAGENET_INDEX, ROOT

import stack

OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": "127.0.0.1"}


def clean_environment(**env) -> dict:
    """Ours without any model, labels, Keras cache or Redis setting, plus env."""
    names = ("MODEL_", "LABELS_", "KERAS_HOME", "REDIS_", "IMAGE_QUEUE", "WEB_PORT")
    return {k: v for k, v in os.environ.items() if not k.startswith(names)} | OFFLINE | env


def last_line(output: str) -> str:
    return [line for line in output.splitlines() if line.strip()][-1]


@pytest.fixture
def files(tmp_path):
    """Broken files of each kind, and an empty and a spoilt Keras cache."""
    (tmp_path / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4000))  # a cut-off HDF5 file
    (tmp_path / "corrupt.weights.h5").write_bytes(os.urandom(4000))
    (tmp_path / "labels.json").write_text('{"0": ["n01440764", "tench"],')  # cut off
    (tmp_path / "model.keras").write_text("not a model")
    (tmp_path / "empty-cache").mkdir()
    partial = tmp_path / "partial-cache" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(os.urandom(100_000))  # what an interrupted download leaves: Keras's hash check fails
    return tmp_path


CASES = {
    "offline, the default ImageNet weights": (
        {"KERAS_HOME": "{d}/empty-cache"},
        ["ImageNet weights", "MODEL_WEIGHTS="],
    ),
    "a partial download in the Keras cache": (
        {"KERAS_HOME": "{d}/partial-cache"},
        ["ImageNet weights", "{d}/partial-cache/models", "MODEL_WEIGHTS="],
    ),
    "offline, the ImageNet class index": (
        {"MODEL_WEIGHTS": "none", "KERAS_HOME": "{d}/empty-cache"},
        ["class index", "LABELS_PATH=models/imagenet_class_index.json"],
    ),
    "a wrong weights path": ({"MODEL_WEIGHTS": "{d}/nowhere.h5"}, ["MODEL_WEIGHTS={d}/nowhere.h5: no such file"]),
    "a corrupt Keras 2 weights file": ({"MODEL_WEIGHTS": "{d}/corrupt.h5"}, ["MODEL_WEIGHTS={d}/corrupt.h5 is not"]),
    "a corrupt Keras 3 weights file": (
        {"MODEL_WEIGHTS": "{d}/corrupt.weights.h5"},
        ["MODEL_WEIGHTS={d}/corrupt.weights.h5 is not"],
    ),
    "a missing labels file": (
        {"MODEL_WEIGHTS": "none", "LABELS_PATH": "{d}/nowhere.json"},
        ["LABELS_PATH={d}/nowhere.json: no such file"],
    ),
    "a broken labels file": (
        {"MODEL_WEIGHTS": "none", "LABELS_PATH": "{d}/labels.json"},
        ["LABELS_PATH={d}/labels.json is not a JSON labels file"],
    ),
    "a MODEL_PATH that is not a model": (
        {"MODEL_PATH": "{d}/model.keras", "LABELS_PATH": str(IMAGENET_INDEX)},
        ["MODEL_PATH={d}/model.keras is not a Keras model"],
    ),
    "an unknown MODEL_NAME": ({"MODEL_NAME": "ResNet5O"}, ["MODEL_NAME 'ResNet5O' is not one of", "ResNet50"]),
}


@pytest.mark.parametrize("case", CASES)
def test_the_worker_names_the_setting_in_one_line_and_exits_without_a_traceback(case, files, redis_url):
    env, words = CASES[case]
    env = {k: v.format(d=files) for k, v in env.items()}
    result = subprocess.run(
        [sys.executable, "run_model_server.py"],
        cwd=ROOT,
        env=clean_environment(REDIS_URL=redis_url, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    line = last_line(output)
    assert "cannot load the model: " in line, output
    for word in words:
        assert word.format(d=files) in line, line


def test_an_offline_first_run_of_stack_sh_ends_with_that_line_last(files):
    """scripts/stack.sh as a new user runs it, with no weights and no internet: the reason is what they see last."""
    env = clean_environment(KERAS_HOME=str(files / "empty-cache"), WEB_PORT=str(stack.free_port()))
    result = subprocess.run(
        ["scripts/stack.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    line = last_line(result.stderr)
    assert line.startswith("stack: model worker exited with status 1: ") and "MODEL_WEIGHTS=" in line, output
    assert "README's Offline section" in line


def test_stack_py_names_a_bad_setting_or_a_taken_port_in_one_line_before_starting_anything():
    """A bad setting was a traceback from `import settings`; a port another server holds let gunicorn retry for
    seconds while the other server's /readyz answered for it ("stack: ready")."""
    bad = subprocess.run(
        [sys.executable, "stack.py"], cwd=ROOT, env=clean_environment(LOG_LEVEL="verbose"), capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert last_line(bad.stderr) == (
        "stack: LOG_LEVEL must be one of debug, info, warning, warn, error, critical, got 'verbose'"
    )
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        busy = subprocess.run(
            [sys.executable, "stack.py"], cwd=ROOT, env=clean_environment(WEB_PORT=str(port)), capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
    assert busy.returncode == 1 and "Traceback" not in busy.stderr, busy.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in last_line(busy.stderr) and "set WEB_PORT" in busy.stderr
    assert "started redis-server" not in busy.stdout  # refused before starting anything
