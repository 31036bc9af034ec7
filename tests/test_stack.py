"""The one-command stack: its own redis-server, a model worker and gunicorn; Ctrl-C stops all of it."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from support import IMAGENET_INDEX, ROOT

from stack import free_port

pytestmark = pytest.mark.slow


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_stack_serves_and_ctrl_c_stops_everything_cleanly(resnet_weights):
    web_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}  # so it starts its own Redis
    env |= {"WEB_PORT": str(web_port), "MODEL_WEIGHTS": str(resnet_weights), "LABELS_PATH": str(IMAGENET_INDEX)}
    launcher = subprocess.Popen(
        [sys.executable, "stack.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines = []
        for line in launcher.stdout:
            lines.append(line)
            if "stack: ready" in line or launcher.poll() is not None:
                break
        output = "".join(lines)
        assert "stack: ready" in output, output[-3000:]
        redis_port = int(output.split("redis-server on 127.0.0.1:")[1].split()[0])
        pids = [int(pid) for pid in re.findall(r"pid (\d+)", output)]
        assert len(pids) == 3  # redis, model worker, gunicorn
        with open(ROOT / "images" / "chelsea.jpg", "rb") as f:
            response = requests.post(f"http://127.0.0.1:{web_port}/predict", files={"image": f}, timeout=60)
        assert response.status_code == 200 and len(response.json()["predictions"]) == 5

        launcher.send_signal(signal.SIGINT)  # what Ctrl-C sends
        rest, _ = launcher.communicate(timeout=60)
        assert launcher.returncode == 0, rest
        assert "stack: stopping" in rest
        time.sleep(0.2)
        assert not listening(web_port) and not listening(redis_port)  # nothing left behind
        assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
        assert "handed back" in rest  # the model worker left gracefully: its SIGTERM path ran
    finally:
        if launcher.poll() is None:
            launcher.kill()
