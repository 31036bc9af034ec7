"""admin.py: drain, resume and purge a live queue (real Redis, the Flask app, a stand-in worker)."""

import subprocess
import sys
import threading
import time

import numpy as np
from support import ROOT
from support.stand_in import MODEL, StandInWorker, app_queue, assert_json_error, post_image

import admin
import image_queue


def test_purge_answers_each_waiting_request_with_503_at_once_and_spares_the_rest(make_app, redis_client):
    app = make_app(REQUEST_TIMEOUT_S=20)
    queue = app_queue(app)
    queue.heartbeat("stalled", MODEL)  # alive, never claims: requests wait
    queue.enqueue(b"in progress")
    queue.claim("stalled", 1)
    results = []
    waiting = threading.Thread(target=lambda: results.append(post_image(app.test_client())))
    waiting.start()
    while queue.status().queue_depth < 1:
        time.sleep(0.01)
    redis_client.set("other data", "kept")
    started = time.monotonic()

    assert queue.purge("test") == 1
    waiting.join(5)
    assert_json_error(results[0], 503, "purged from the queue by an operator: test")
    assert time.monotonic() - started < 2  # at once, not at the 20 s deadline
    assert queue.status().queue_depth == 0 and redis_client.lrange(queue.keys.processing("stalled"), 0, -1) == [
        b"in progress"
    ]  # being processed: left to finish
    assert redis_client.get("other data") == b"kept"


def test_purge_drops_a_message_whose_id_cannot_be_read_without_answering_anyone(make_queue, redis_client):
    queue = make_queue()
    message = image_queue.encode_message("abc123", time.time() + 30, 5, np.zeros((2, 2, 3), np.uint8))
    queue.enqueue(b"garbage")
    queue.enqueue(message)
    assert queue.purge("test") == 2
    assert image_queue.decode_answer(redis_client.lpop(queue.keys.result("abc123")))["status"] == 503
    assert [k for k in redis_client.scan_iter(match=queue.keys.result("*"))] == []


def test_purge_goes_in_chunks_and_answers_every_request_that_was_waiting(make_queue, redis_client, monkeypatch):
    """Each script call copies its messages into Lua while Redis serves no one else: thousands in one call froze
    Redis past its lua-time-limit. A chunk of 2 here: 5 waiting, purged in 3 calls, each answered once."""
    monkeypatch.setattr(image_queue, "PURGE_CHUNK", 2)
    queue = make_queue()
    for n in range(5):
        queue.enqueue(image_queue.encode_message(f"r{n}", time.time() + 30, 5, np.zeros((2, 2, 3), np.uint8)))
    calls = []
    purge = queue._purge
    monkeypatch.setattr(queue, "_purge", lambda **kw: calls.append(kw["args"][-1]) or purge(**kw))
    assert queue.purge("test") == 5 and calls == [2, 2, 2]
    for n in range(5):
        assert redis_client.llen(queue.keys.result(f"r{n}")) == 1


def test_drain_refuses_new_requests_waits_until_nothing_is_held_and_resume_reopens(make_app, capsys):
    app = make_app()
    queue, client = app_queue(app), app.test_client()
    with StandInWorker(queue):
        queue.enqueue(image_queue.encode_message("queued", time.time() + 30, 5, np.zeros((32, 48, 3), np.uint8)))
        assert admin.drain([queue], wait_s=10) == 0  # the worker answered what was held
        response = post_image(client)
        assert_json_error(response, 503, "draining")
        assert response.headers["Retry-After"] == "5"
        assert client.get("/readyz").status_code == 503
        queue.resume()
        assert post_image(client).status_code == 200
    assert "drained: nothing is held" in capsys.readouterr().out


def test_a_request_that_passed_the_pause_check_before_a_drain_is_refused_not_queued_after_it(make_app, monkeypatch):
    """The drain starts while a request that saw the queue open is still decoding: once the drain has seen
    nothing held, that request must get 503 "draining", not slip into the queue and 504 when workers stop."""
    import helpers

    app = make_app()
    queue, client = app_queue(app), app.test_client()
    prepare = helpers.prepare_image
    drained = []

    def prepare_while_a_drain_starts(image, size):
        drained.append(admin.drain([queue], wait_s=1))  # nothing is held yet: the drain reports 0
        return prepare(image, size)

    monkeypatch.setattr(helpers, "prepare_image", prepare_while_a_drain_starts)
    queue.heartbeat("idle", MODEL)  # a live worker that claims nothing: a queued message would wait
    response = post_image(client)
    assert drained == [0]
    assert_json_error(response, 503, "draining")
    assert queue.status().held == 0  # nothing arrived after the drain said so


def test_drain_gives_up_with_status_1_when_nothing_answers(make_queue):
    queue = make_queue()
    queue.enqueue(b"stuck")
    assert admin.drain([queue], wait_s=0.5) == 1


def test_the_command_line_shows_the_queue_and_asks_before_purging(redis_url, queue_name, make_queue):
    queue = make_queue()
    queue.heartbeat("w1", MODEL)
    queue.enqueue(b"waiting")
    env = {"REDIS_URL": redis_url, "IMAGE_QUEUE": queue_name, "PATH": "/usr/bin:/bin"}

    def run(*args):
        return subprocess.run([sys.executable, "admin.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)

    status = run("status")
    assert (
        status.returncode == 0
        and "1 waiting, 0 being processed" in status.stdout
        and "w1: last heartbeat" in status.stdout
    )
    refused = run("purge")
    assert refused.returncode == 2 and "--yes" in refused.stdout and queue.status().queue_depth == 1
    assert run("purge", "--yes").returncode == 0 and queue.status().queue_depth == 0


def test_the_command_line_refuses_a_model_no_worker_serves_or_another_queue_shards_setting(
    redis_url, queue_name, make_queue, redis_client
):
    """A typo in --model, or a shell without the service's QUEUE_SHARDS, would drain (and say "drained") or
    purge queues nobody serves, or some of the shards only; a paused model whose workers are gone resumes."""
    import dataclasses

    queue = make_queue()
    queue.heartbeat("w1", dataclasses.replace(MODEL, shards=1))
    queue.enqueue(b"waiting")
    env = {"REDIS_URL": redis_url, "IMAGE_QUEUE": queue_name, "PATH": "/usr/bin:/bin"}

    def run(*args, **more):
        return subprocess.run(
            [sys.executable, "admin.py", *args], cwd=ROOT, env=env | more, capture_output=True, text=True
        )

    typo = run("--model", "resnet-50", "drain", "--wait", "1")
    assert typo.returncode == 1 and "no model 'resnet-50' is served" in typo.stderr and "check --model" in typo.stderr
    assert not list(redis_client.scan_iter(match="*resnet-50*"))  # no stray paused key
    not_an_id = run("--model", "ResNet50", "status")
    assert not_an_id.returncode == 1 and "Traceback" not in not_an_id.stderr and "model id" in not_an_id.stderr
    sharded = run("drain", "--wait", "1", QUEUE_SHARDS="2")
    assert sharded.returncode == 1 and "QUEUE_SHARDS=1, this admin.py with 2" in sharded.stderr
    assert not queue.status().paused
    gone = image_queue.model_queue_name(queue_name, "retired")
    redis_client.set(image_queue.Keys(gone).paused, 1)  # drained long ago, its workers since forgotten
    resumed = run("--model", "retired", "resume")
    assert resumed.returncode == 0 and not redis_client.exists(image_queue.Keys(gone).paused)
    stuck = run("drain", "--wait", "0.5")
    assert stuck.returncode == 1 and "the queue stays paused" in stuck.stderr and queue.status().paused


def test_the_command_line_says_in_one_line_when_redis_cannot_be_reached():
    """The Troubleshooting's first step: a Redis that is not there is one line naming REDIS_URL, not a traceback."""
    from stack import free_port

    env = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "admin.py", "status"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "Redis is unavailable" in done.stderr and "REDIS_URL" in done.stderr
