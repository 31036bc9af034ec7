"""Slow clients cannot hold a box's threads: an upload still being read at its request's deadline is cut
there (504), against a real gunicorn whose every thread a trickling client holds."""

import socket
import threading
import time
import uuid

import pytest
import requests
from support.stand_in import CAT, StandInWorker, served_queue

import stack
from image_queue import connect

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 3  # REQUEST_TIMEOUT_S of this gunicorn


def trickle(port: int, replies: list, seconds: float) -> None:
    """Declare a 100 KB upload and send it a byte every 0.2 s: a thread's worth of nothing, for seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds + 10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
        started = time.monotonic()
        try:
            while time.monotonic() - started < seconds:
                sock.sendall(b"\xff")
                time.sleep(0.2)
            replies.append(("still sending", time.monotonic() - started))
        except OSError:  # the server closed the connection: read what it answered first
            pass
        try:
            replies.append((sock.recv(4096).split(b"\r\n", 1)[0].decode(), time.monotonic() - started))
        except OSError as exc:
            replies.append((f"closed: {exc}", time.monotonic() - started))


def test_trickling_uploads_are_cut_at_the_deadline_and_the_box_keeps_serving(redis_url, tmp_path):
    name, port = f"q{uuid.uuid4().hex[:10]}", stack.free_port()
    env = {"REDIS_URL": redis_url, "IMAGE_QUEUE": name, "WEB_PORT": str(port), "WEB_WORKERS": "1"}
    env |= {"WEB_THREADS": "2", "REQUEST_TIMEOUT_S": str(TIMEOUT_S), "WORKER_TTL_S": "2"}
    web = stack.start_web(env, tmp_path / "web.log")
    queue = served_queue(connect(redis_url, 0.2), name, block_s=0.2, worker_ttl_s=2.0)
    try:
        with StandInWorker(queue):
            stack.wait_until_ready(f"http://127.0.0.1:{port}/", [web], timeout_s=60)
            replies: list = []
            slow = [threading.Thread(target=trickle, args=(port, replies, 30)) for _ in range(2)]
            for thread in slow:  # as many as the box has threads
                thread.start()
            time.sleep(0.5)
            started = time.monotonic()
            response = requests.post(f"http://127.0.0.1:{port}/predict", files={"image": ("c.jpg", CAT)}, timeout=20)
            served_after = time.monotonic() - started
            for thread in slow:
                thread.join(40)
    finally:
        web.stop()
    print(f"\nserved after {served_after:.2f} s; the trickling uploads: {replies}")
    assert response.status_code == 200, response.text
    assert served_after < TIMEOUT_S + 2, served_after  # once a slow upload was cut, not after 30 s
    assert len(replies) == 2
    for status_line, after_s in replies:
        assert after_s < TIMEOUT_S + 2, replies  # cut at the deadline, not left to trickle on
        assert status_line.startswith("HTTP/1.1 504") or status_line.startswith("closed"), replies
