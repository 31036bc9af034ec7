"""Scaling one machine out: one model worker per GPU or N on the CPU, and the stack on IPv6 as on IPv4.

The GPU assignment is a pure function of CUDA_VISIBLE_DEVICES and nvidia-smi's output, tested here with
the outputs a real nvidia-smi gives (no GPU on these machines); the slow test starts `python stack.py`
as a user would, with MODEL_WORKERS=2 on the CPU, listening on [::1] only.
"""

import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from support import IMAGENET_INDEX, ROOT
from support.images import distinct_photos
from support.traffic import expected_top5, same_answer, wait_for

import stack
from stack import free_port, visible_gpus, web_url, worker_environments

# --- The URL the stack prints and polls ------------------------------------------------------------


def test_web_url_brackets_ipv6_and_turns_wildcards_into_the_loopback_of_their_family():
    assert web_url("127.0.0.1", 5000) == "http://127.0.0.1:5000/"
    assert web_url("0.0.0.0", 5000) == "http://127.0.0.1:5000/"
    assert web_url("", 80) == "http://127.0.0.1:80/"
    assert web_url("::1", 5000) == "http://[::1]:5000/"
    assert web_url("[::1]", 5000) == "http://[::1]:5000/"
    assert web_url("::", 5001) == "http://[::1]:5001/"
    assert web_url("[::]", 5001) == "http://[::1]:5001/"
    assert web_url("fd00::12", 8080) == "http://[fd00::12]:8080/"
    assert web_url("gpu-box.internal", 5000) == "http://gpu-box.internal:5000/"


def settings_values(**env) -> list[str]:
    """MODEL_WORKERS and WEB_HOST as settings.py reads them from this environment (a fresh process)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("MODEL_WORKERS", "WEB_HOST")}
    code = "import settings; print(settings.MODEL_WORKERS, settings.WEB_HOST)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=clean | env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_model_workers_defaults_to_auto_and_web_host_may_be_bracketed():
    assert settings_values() == ["0", "127.0.0.1"]
    assert settings_values(MODEL_WORKERS="3", WEB_HOST="[::1]") == ["3", "::1"]
    assert settings_values(WEB_HOST="::") == ["0", "::"]


# --- One worker per GPU ----------------------------------------------------------------------------


def test_gpus_come_from_nvidia_smi_when_cuda_visible_devices_is_unset():
    assert visible_gpus(None, "0\n1\n2\n3\n") == ["0", "1", "2", "3"]
    assert visible_gpus(None, "0\n") == ["0"]
    assert visible_gpus(None, "No devices were found\n") == []  # what nvidia-smi prints (exit 6) without a GPU
    assert visible_gpus(None, "") == [] and visible_gpus(None, None) == []  # no nvidia-smi: the CPU


def test_a_cuda_visible_devices_already_set_wins_over_nvidia_smi():
    assert visible_gpus("2,3", "0\n1\n2\n3\n") == ["2", "3"]
    assert visible_gpus(" 1 , 0 ", "0\n1\n") == ["1", "0"]
    uuids = "GPU-5c3a0f5e-1f1b-4e7e-9d1a-0a1b2c3d4e5f,MIG-8e2f6f51-3c1d-5b2e-a1f0-123456789abc"
    assert visible_gpus(uuids, "0\n") == uuids.split(",")
    assert visible_gpus("", "0\n1\n") == []  # set but empty: every GPU hidden
    assert visible_gpus("-1", "0\n") == []
    assert visible_gpus("0,-1,1", "0\n1\n") == ["0"]  # CUDA stops at the first invalid entry


def test_auto_starts_one_worker_per_gpu_each_seeing_only_its_own():
    assert worker_environments(0, ["0", "1", "2", "3"]) == [{"CUDA_VISIBLE_DEVICES": g} for g in "0123"]
    assert worker_environments(0, ["GPU-a"]) == [{"CUDA_VISIBLE_DEVICES": "GPU-a"}]


def test_auto_without_a_gpu_starts_one_cpu_worker_and_n_means_exactly_n():
    assert worker_environments(0, []) == [{}]
    assert worker_environments(2, []) == [{}, {}]
    assert worker_environments(1, ["0", "1"]) == [{"CUDA_VISIBLE_DEVICES": "0"}]
    gpus = [w["CUDA_VISIBLE_DEVICES"] for w in worker_environments(5, ["0", "1"])]
    assert gpus == ["0", "1", "0", "1", "0"]  # more workers than GPUs: dealt out in turn


def test_detect_gpus_runs_nvidia_smi_and_honours_cuda_visible_devices(tmp_path, monkeypatch):
    """The real subprocess path, with an nvidia-smi stand-in on PATH that answers as a 2-GPU machine does."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\n[ "$*" = "--query-gpu=index --format=csv,noheader" ] || exit 9\nprintf "0\\n1\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert stack.detect_gpus() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert stack.detect_gpus() == ["1"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    fake.write_text(
        "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver'\nexit 9\n"
    )
    assert stack.detect_gpus() == []  # a broken driver: the CPU


# --- Two CPU workers behind gunicorn on [::1] ------------------------------------------------------


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class Output:
    """Everything a process prints, collected by a thread (the workers keep logging after "ready")."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(process.stdout), daemon=True)
        self.thread.start()

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, marker: str, process: subprocess.Popen, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while marker not in self.text():
            assert process.poll() is None and time.monotonic() < deadline, self.text()[-3000:]
            time.sleep(0.1)
        return self.text()


@pytest.mark.slow
def test_stack_with_model_workers_2_on_ipv6_loopback_serves_from_both_workers(resnet_weights, resnet):
    if not ipv6_loopback():
        pytest.skip("this kernel has no IPv6 loopback address (::1): IPv6 is disabled here")
    port = free_port("::1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}  # so it starts its own Redis
    env |= {
        "WEB_HOST": "[::1]",  # the bracketed form uWSGI needs works for gunicorn and stack.py too
        "WEB_PORT": str(port),
        "MODEL_WORKERS": "2",
        "CUDA_VISIBLE_DEVICES": "",  # the CPU, even on a machine with a GPU
        "BATCH_SIZE": "2",  # small batches, so that both workers get some of a burst
        "MODEL_WEIGHTS": str(resnet_weights),
        "LABELS_PATH": str(IMAGENET_INDEX),
        "LOG_JSON": "0",
    }
    launcher = subprocess.Popen(
        [sys.executable, "stack.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = Output(launcher)
    try:
        text = output.wait_for("stack: ready", launcher, timeout_s=300)
        url = f"http://[::1]:{port}/"
        assert f"stack: ready. curl -X POST -F image=@images/chelsea.jpg {url}predict" in text
        assert "stack: 2 model worker(s) on the CPU" in text
        worker_pids = {int(pid) for pid in re.findall(r"model worker pid (\d+)", text)}
        assert len(worker_pids) == 2

        # Ready once one worker is; the other may still be warming up.
        wait_for(lambda: requests.get(url + "readyz", timeout=10).json()["workers"] == 2, 120)
        with socket.socket() as s:  # bound to ::1 only: nothing answers on IPv4
            assert s.connect_ex(("127.0.0.1", port)) != 0

        images = distinct_photos(12)
        expected = expected_top5(resnet, images)
        answered_by: set[int] = set()
        for _ in range(5):  # a burst of 12 in batches of 2: both workers take some, almost always at once
            with ThreadPoolExecutor(len(images)) as pool:
                responses = list(
                    pool.map(lambda data: requests.post(url + "predict", files={"image": data}, timeout=120), images)
                )
            assert [r.status_code for r in responses] == [200] * len(images)
            assert all(same_answer(r.json()["predictions"], e) for r, e in zip(responses, expected, strict=True))
            time.sleep(0.5)  # the batch lines reach the output
            answered_by = {int(pid) for pid in re.findall(r"\[(\d+)\]: batch of \d+ in", output.text())}
            if answered_by == worker_pids:
                break
        assert answered_by == worker_pids, output.text()[-3000:]

        # The clients take an IPv6 URL as it is printed.
        for client in (["simple_request.py", "images/chelsea.jpg"], ["stress_test.py", "--count", "3"]):
            result = subprocess.run(
                [sys.executable, *client, "--url", url + "predict"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 0, result.stdout + result.stderr

        launcher.send_signal(2)  # SIGINT, what Ctrl-C sends
        assert launcher.wait(60) == 0
        output.thread.join(10)
        assert output.text().count("stopped (0 messages handed back)") == 2, output.text()[-3000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
