"""QUEUE_SHARDS: one queue spread over several hash tags (ShardedQueue), on one real redis-server.

The cluster side (each shard on its own master, a master failing over) is in test_cluster.py; here the
shards share one Redis, which is enough to show how requests are spread, claimed, answered, requeued,
drained and counted.
"""

import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import redis
from redis.crc import key_slot
from support.stand_in import TEST_MODEL, StandInClassifier, app_queue, post_concurrently, post_image
from support.traffic import wait_for

import admin
import metrics
import stack
from image_queue import (
    WEB_SOCKET_MARGIN_S,
    WORKER_SOCKET_MARGIN_S,
    Done,
    ImageQueue,
    Keys,
    ModelDirectory,
    ModelInfo,
    ShardedQueue,
    connect,
    encode_message,
    model_queue_name,
    queue_from_config,
    shard_names,
)  # fmt: skip
from run_model_server import Heartbeat, ModelWorker

MODEL = ModelInfo("StandIn", 4, 4)


@pytest.fixture
def sharded(redis_url, redis_client, queue_name):
    """make(shards, **config): a ShardedQueue as queue_from_config builds it; every shard's keys deleted after."""
    made = []

    def make(shards: int = 3, **config) -> ShardedQueue:
        config = {"REDIS_URL": redis_url, "IMAGE_QUEUE": queue_name, "QUEUE_SHARDS": shards, "QUEUE_MAX": 90,
                  "REDIS_BLOCK_S": 0.5, "RESULT_TTL_S": 30, "WORKER_TTL_S": 2.0} | config  # fmt: skip
        queue = queue_from_config(config, 0.5, TEST_MODEL)
        made.append(queue)
        make.directory = lambda: ModelDirectory(config, 0.5)  # the web's and admin.py's view of the same Redis
        return queue

    yield make
    for key in redis_client.scan_iter(match=f"{{{queue_name}*"):
        redis_client.delete(key)


def message(request_id: str, deadline: float = 1e10) -> bytes:
    return encode_message(request_id, deadline, 1, np.zeros((4, 4, 3), np.uint8))


def answer_all(queue, worker_id: str, messages: list[bytes]) -> tuple[list[str], list[str]]:
    done = [Done(raw, raw[7:39].decode(), b'{"predictions": []}') for raw in messages]
    return queue.ack(worker_id, done, len(done), 0.01)


def test_shard_names_fall_in_equal_slot_ranges_so_a_fresh_cluster_puts_one_shard_on_each_master():
    assert shard_names("image_queue", 1) == ["image_queue"]  # one shard: the queue's keys are unchanged
    for n in (2, 3, 4, 8, 16):
        names = shard_names("image_queue", n)
        assert names[0] == "image_queue" and len(set(names)) == n
        assert sorted(key_slot(name.encode()) * n // 16384 for name in names) == list(range(n))
    assert shard_names("image_queue", 3) != ["image_queue", "image_queue-1", "image_queue-2"]  # 2 of 3 in one range


def test_requests_go_round_robin_and_one_claim_takes_from_every_shard(sharded):
    web, worker = sharded(3), sharded(3)
    worker.heartbeat("w", MODEL)
    picked = [web.pick() for _ in range(6)]
    assert [q.keys.name for q in picked[:3]] == [q.keys.name for q in web.shards]  # each in turn
    for i, shard in enumerate(picked):
        shard.enqueue(message(f"{i:032x}"))
    assert [shard.status().queue_depth for shard in web.shards] == [2, 2, 2]
    status = web.status()
    assert (status.queue_depth, status.held, status.live_workers, status.model) == (6, 6, 1, MODEL)
    claim = worker.claim("w", 32)
    assert len(claim.messages) == 6
    answered, late = answer_all(worker, "w", claim.messages)
    assert sorted(answered) == [f"{i:032x}" for i in range(6)] and late == []
    for i, shard in enumerate(picked):  # each answer waits under its own shard's key
        assert shard.wait_for(f"{i:032x}", time.monotonic() + 1) == b'{"predictions": []}'
    stats = web.stats()
    assert stats.batch_sizes == {6: 1} and stats.queue_depth == stats.in_progress == 0  # the batch counted once
    assert set(stats.heartbeats) == {"w"} and stats.live_workers == 1


def test_claims_start_from_the_next_shard_each_time_so_a_backlog_on_one_does_not_starve_another(sharded):
    queue = sharded(3)
    queue.heartbeat("w", MODEL)
    for i in range(20):
        queue.shards[0].enqueue(message(f"a{i:031x}"))
    queue.shards[2].enqueue(message(f"b{0:031x}"))
    first, second = queue.claim("w", 8), queue.claim("w", 8)
    taken = [raw[7:8] for raw in first.messages + second.messages]
    assert b"b" in taken  # shard 2's lone request went out in the first two batches, not after shard 0's 20


def test_an_idle_worker_blocks_on_every_shard_at_once_and_takes_a_lone_request_on_any_at_once(sharded):
    queue, web = sharded(3, REDIS_BLOCK_S=1.0), sharded(3, REDIS_BLOCK_S=1.0)
    queue.heartbeat("w", MODEL)
    got = {}

    def claim():
        started = time.monotonic()
        got["claim"], got["took"] = queue.claim("w", 8), time.monotonic() - started

    for s in (2, 1, 0):
        thread = threading.Thread(target=claim)
        thread.start()
        time.sleep(0.3)  # the claim is blocked by now
        sent = time.monotonic()
        web.shards[s].enqueue(message(f"{s:032x}"))
        thread.join(3)
        assert len(got["claim"].messages) == 1 and got["took"] < 1.0
        assert time.monotonic() - sent < 0.5  # woken by the push, not by the 1 s block ending
        assert answer_all(queue, "w", got["claim"].messages)[0] == [f"{s:032x}"]
        # the other shards' blocking takes run on into the next claim, which waits on them again


def test_a_message_a_blocking_take_moves_after_the_claim_returned_is_in_the_next_claim_or_handed_back(sharded):
    queue, web = sharded(2, REDIS_BLOCK_S=1.0), sharded(2, REDIS_BLOCK_S=1.0)
    queue.heartbeat("w", MODEL)
    threading.Timer(0.2, web.shards[0].enqueue, [message(f"{1:032x}")]).start()
    first = queue.claim("w", 8)  # returns with shard 0's message; shard 1's take still blocks
    web.shards[1].enqueue(message(f"{2:032x}"))  # ... and moves this one onto the worker's list there
    wait_for(lambda: queue.shards[1].status().held == 1 and queue.shards[1].status().queue_depth == 0, 2)
    second = queue.claim("w", 8)
    assert [len(first.messages), len(second.messages)] == [1, 1]
    assert answer_all(queue, "w", first.messages + second.messages)[0] == [f"{1:032x}", f"{2:032x}"]
    # a worker that stops while a blocking take runs: unregister waits for it, then hands back what it took
    threading.Timer(0.2, web.shards[0].enqueue, [message(f"{3:032x}")]).start()
    third = queue.claim("w", 8)
    web.shards[1].enqueue(message(f"{4:032x}"))
    assert answer_all(queue, "w", third.messages)[0] == [f"{3:032x}"]
    queue.unregister("w")
    assert (queue.shards[1].status().queue_depth, queue.status().held) == (1, 1)  # back on its shard's queue


def test_a_dead_workers_batch_is_requeued_on_every_shard_and_admin_steps_add_up(sharded, capsys):
    queue, peer = sharded(3), sharded(3)
    queue.heartbeat("dead", MODEL)
    for shard in queue.shards:
        for i in range(2):
            shard.enqueue(message(f"{shard.keys.name[-1]}{i:031x}"))
    assert len(queue.claim("dead", 32).messages) == 6  # ... and the worker dies holding them
    peer.heartbeat("peer", MODEL)
    time.sleep(2.2)  # WORKER_TTL_S 2
    assert peer.requeue_dead_workers() == 6
    assert [shard.status().queue_depth for shard in peer.shards] == [2, 2, 2]  # each back on its own shard
    assert peer.stats().requeued == 6 and "dead" not in peer.stats().heartbeats
    for shard in peer.shards:
        shard.enqueue(message(f"c{shard.keys.name[-1]:031}"))  # a third on each
    body, _ = metrics.exposition(sharded.directory(), None)
    for shard in peer.shards:
        assert f'queue_shard_depth{{model="standin",shard="{shard.keys.name}"}} 3.0' in body.decode()
    assert 'queue_depth{model="standin"} 9.0' in body.decode()
    admin.show(peer)
    shown = capsys.readouterr().out
    assert "9 waiting, 0 being processed" in shown and all(
        f"shard '{q.keys.name}': 3 waiting" in shown for q in peer.shards
    )
    peer.pause()
    assert peer.status().paused and all(shard.status().paused for shard in peer.shards)
    assert peer.purge("test") == 9 and peer.status().held == 0
    peer.resume()
    assert not peer.status().paused


def test_queue_max_is_shared_out_among_the_shards(sharded):
    queue = sharded(3, QUEUE_MAX=7)
    assert [shard.queue_max for shard in queue.shards] == [3, 3, 3] and queue.queue_max == 9  # rounded up
    assert isinstance(sharded(1), ImageQueue)  # one shard: the plain queue, keys unchanged


def test_the_app_and_the_worker_loop_serve_through_three_shards(sharded, make_app, redis_url, queue_name):
    config = {"QUEUE_SHARDS": 3, "REDIS_BLOCK_S": 0.5}
    worker = ModelWorker(sharded(3), StandInClassifier(), batch_size=8, max_wait_s=0, heartbeat_s=0.2)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        app = make_app(**config)
        client = app.test_client()
        wait_for(lambda: post_image(client).status_code == 200, 10)
        assert [r.status_code for r in post_concurrently(client, 12)] == [200] * 12
        stats = worker.queue.stats()
        assert sum(n * count for n, count in stats.batch_sizes.items()) >= 13 and stats.in_progress == 0
        assert client.get("/readyz").get_json()["ready"] is True
        web_queue = app_queue(app)
        assert isinstance(web_queue, ShardedQueue) and next(web_queue._turn) >= 13  # each request picked a shard
    finally:
        worker.request_stop()
        thread.join(10)
    assert not thread.is_alive()


@pytest.fixture
def one_shard_down(redis_url, queue_name, redis_client):
    """make(): a ShardedQueue of three shards whose second has no Redis (nothing listens on its port)."""
    good, names = connect(redis_url, 0.3), shard_names(model_queue_name(queue_name, TEST_MODEL), 3)
    dead = connect(f"redis://127.0.0.1:{stack.free_port()}/0", 0.3)
    options = {"block_s": 0.3, "worker_ttl_s": 2.0}
    registry = (Keys(queue_name).models, TEST_MODEL)

    def make() -> ShardedQueue:
        return ShardedQueue([ImageQueue(good, names[0], registry=registry, **options),
                             ImageQueue(dead, names[1], **options), ImageQueue(good, names[2], **options)])  # fmt: skip

    yield make
    for key in redis_client.scan_iter(match=f"{{{queue_name}*"):
        redis_client.delete(key)


@pytest.fixture
def one_shard_hung(redis_url, queue_name, redis_client):
    """make(margin_s): a ShardedQueue of three shards with the shipped timeouts (REDIS_BLOCK_S 1, WORKER_TTL_S 3,
    the worker's socket margin unless margin_s) whose second Redis hangs: its port accepts connections and never
    answers, as a stalled master or a network partition without resets does."""
    silent = socket.create_server(("127.0.0.1", 0), backlog=64)  # the kernel completes handshakes; nothing replies
    names = shard_names(model_queue_name(queue_name, TEST_MODEL), 3)
    options, registry = {"block_s": 1.0, "worker_ttl_s": 3.0}, (Keys(queue_name).models, TEST_MODEL)

    def make(margin_s: float = WORKER_SOCKET_MARGIN_S) -> ShardedQueue:
        good = connect(redis_url, 1.0, margin_s)
        hung = connect(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", 1.0, margin_s)
        return ShardedQueue([ImageQueue(good, names[0], registry=registry, **options),
                             ImageQueue(hung, names[1], **options), ImageQueue(good, names[2], **options)])  # fmt: skip

    yield make
    silent.close()
    for key in redis_client.scan_iter(match=f"{{{queue_name}*"):
        redis_client.delete(key)


def test_a_hung_shard_holds_back_no_other_shards_heartbeat(one_shard_hung):
    """Each shard is beaten from a thread of its own: a shard whose Redis hangs costs its own thread a socket
    timeout (3 s, as long as WORKER_TTL_S), while the others' heartbeats stay fresh. Beaten in turn, the
    others' went 3.5 s without one, so peers wrote this live worker off there and the web answered 503."""
    queue = one_shard_hung()
    heartbeat = Heartbeat(queue, "w", MODEL, every_s=0.5)  # WORKER_HEARTBEAT_S's default
    heartbeat.start()
    oldest, until = 0.0, time.monotonic() + 7.0  # two socket timeouts of the hung shard
    try:
        while time.monotonic() < until:
            for s in (0, 2):
                stats = queue.shards[s].stats()
                if "w" in stats.heartbeats:
                    oldest = max(oldest, stats.server_time - stats.heartbeats["w"])
                    assert stats.live_workers == 1
            time.sleep(0.05)
    finally:
        heartbeat.stop()
    assert all("w" in queue.shards[s].stats().heartbeats for s in (0, 2))
    assert oldest < 1.5  # a beat every 0.5 s, against a WORKER_TTL_S of 3


def test_a_hung_shard_stalls_the_claims_once_then_is_probed_in_the_background(one_shard_hung):
    """Once a take on the hung shard has timed out, the worker serves the others without waiting on it again:
    the shard is retried by a probe from another thread, and claims go back to it only when the probe answers.
    Retried by the claim itself, each retry (every 2 s at most) stalled every shard's requests for 3 s."""
    queue = one_shard_hung()
    worker = ModelWorker(queue, StandInClassifier(), batch_size=8, max_wait_s=0, heartbeat_s=0.5)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: 1 in queue._down, 10)  # the first take on it timed out (3 s)
        slowest, until, n = 0.0, time.monotonic() + 8.0, 0  # past several backoffs (2 s at most)
        while time.monotonic() < until:
            shard = queue.shards[2 * (n % 2)]
            request_id = f"{n:032x}"
            started = time.monotonic()
            shard.enqueue(message(request_id))
            assert shard.wait_for(request_id, started + 10) is not None
            slowest, n = max(slowest, time.monotonic() - started), n + 1
            time.sleep(0.05)
    finally:
        worker.request_stop()
        thread.join(10)
    assert not thread.is_alive()
    assert n > 50 and slowest < 1.0, (n, slowest)


def test_a_shard_whose_redis_is_down_is_skipped_while_the_others_are_served(one_shard_down, redis_client):
    queue = one_shard_down()
    names = [q.keys.name for q in queue.shards]
    good, options = queue.shards[0].redis, {"block_s": 0.3, "worker_ttl_s": 2.0}
    with pytest.raises(redis.ConnectionError):
        queue.heartbeat("w", MODEL)  # the outage is reported ...
    assert [redis_client.zscore(q.keys.workers, "w") is not None for q in queue.shards] == [True, False, True]
    for s in (0, 2):  # ... after the shards that answer got their heartbeat
        queue.shards[s].enqueue(message(f"{s:032x}"))
    claim = queue.claim("w", 8)
    assert sorted(raw[7:39].decode() for raw in claim.messages) == [f"{0:032x}", f"{2:032x}"]
    assert answer_all(queue, "w", claim.messages)[0] == [f"{0:032x}", f"{2:032x}"]
    started = time.monotonic()
    assert queue.claim("w", 8).messages == []  # an idle claim blocks on the live shards, not a spin
    assert time.monotonic() - started >= 0.25
    queue.shards[1] = ImageQueue(good, names[1], **options)  # its Redis is back
    queue._down[1] = (queue._down[1][0], 0.0)  # its backoff is due
    queue.shards[1].enqueue(message(f"{1:032x}"))
    assert [raw[7:39].decode() for raw in queue.claim("w", 8).messages] == [f"{1:032x}"]


def test_with_one_shard_down_a_dead_workers_batches_on_the_others_are_still_requeued(one_shard_down):
    """The heartbeat raises for the shard that is down, after beating the others; the requeue of dead peers
    must still run on the shards that answer, or their batches wait there until the shard comes back."""
    dead, peer = one_shard_down(), one_shard_down()
    with pytest.raises(redis.ConnectionError):
        dead.heartbeat("dead", MODEL)
    for s in (0, 2):
        dead.shards[s].enqueue(message(f"{s:032x}"))
    assert len(dead.claim("dead", 8).messages) == 2  # ... and the worker dies holding them
    time.sleep(2.2)  # WORKER_TTL_S 2
    Heartbeat(peer, "peer", MODEL, every_s=1.0).beat()  # the worker loop's beat after an outage
    assert [peer.shards[s].status().queue_depth for s in (0, 2)] == [1, 1]  # the batch is back
    assert 1 in peer._down  # the shard that failed is backed off, as a failed take would have it


def test_with_one_shard_down_a_lane_left_dirty_is_handed_back_on_the_others_and_claims_go_on(one_shard_down):
    """A failed ack leaves its lane dirty; the worker loop then requeues what the lane's lists hold. A shard that
    is down is handed back when it answers again (_hand_back): raising for it kept the worker from claiming on
    every shard until it came back."""
    queue = one_shard_down()
    queue._take_round("w", 8, 0)  # shard 1 fails: backing off
    queue.shards[0].enqueue(message(f"{0:032x}"))
    queue.shards[0].claim("w", 8, lane=1)  # an ack that failed left this on lane 1's list
    assert queue.requeue_own("w", 1) == 1  # no error for the shard that is down
    assert [raw[7:39].decode() for raw in queue.claim("w", 8, lane=1).messages] == [f"{0:032x}"]
    queue.shards[0].enqueue(message(f"{2:032x}"))
    queue.shards[0].claim("w", 8, lane=2)
    for s in (0, 2):  # every shard marked down (a total outage): each is asked again
        queue._down[s] = queue._down[1]
    assert queue.requeue_own("w", 2) == 1


def test_a_shard_answering_again_hands_back_free_lanes_but_not_a_batch_in_flight(one_shard_down, redis_client):
    """When a shard that failed answers again, what failed calls left on this worker's lists there goes back
    to its queue, except on a lane whose batch is still in flight: that batch keeps its messages, so they
    are not run twice and its ack answers them; what else is on that lane goes back after the ack."""
    queue = one_shard_down()
    good, names, options = queue.shards[0].redis, [q.keys.name for q in queue.shards], {"block_s": 0.3}
    revived = ImageQueue(good, names[1], worker_ttl_s=2.0, **options)
    revived.enqueue(message(f"{1:032x}"))
    revived.heartbeat("w", MODEL)
    in_flight = revived.claim("w", 8, lane=1).messages  # lane 1's batch, taken before the shard failed
    revived.enqueue(message(f"{2:032x}"))
    revived.claim("w", 8, lane=2)  # a take whose reply was lost: lane 2 holds a message nobody has in hand
    revived.enqueue(message(f"{3:032x}"))
    revived.claim("w", 8, lane=1)  # a top-up whose reply was lost: beside lane 1's batch, nobody has it in hand
    queue._origin.update((id(raw), (1, 1, raw)) for raw in in_flight)  # the sharded queue's view of lane 1
    queue._take_round("w", 8, 0)  # shard 1 fails: backing off
    queue.shards[1] = revived  # its Redis is back
    queue._down[1] = (queue._down[1][0], 0.0)  # its backoff is due
    taken = queue.claim("w", 8, lane=0).messages
    assert [raw[7:39].decode() for raw in taken] == [f"{2:032x}"]  # lane 2's leftover, handed back and taken
    assert redis_client.llen(revived.keys.processing("w", 1)) == 2  # lane 1's batch kept its message
    assert queue.ack("w", [Done(raw, f"{1:032x}", b"answer", 1e18) for raw in in_flight], lane=1)[0] == [f"{1:032x}"]
    assert redis_client.llen(revived.keys.processing("w", 1)) == 0  # its ack done, the lane was handed back:
    assert revived.status().queue_depth == 1  # the top-up's leftover waits on the queue again


def test_with_one_shard_down_the_status_adds_up_the_others_and_the_web_stays_ready(one_shard_down, make_app):
    queue = one_shard_down()
    with pytest.raises(redis.ConnectionError):
        queue.heartbeat("w", MODEL)
    queue.shards[0].enqueue(message(f"{0:032x}"))
    assert queue.status().queue_depth == 1 and queue.status().live_workers == 1
    app = make_app(QUEUE_SHARDS=3)
    app.extensions["models"]._queues[TEST_MODEL] = one_shard_down()
    assert app.test_client().get("/readyz").get_json()["ready"] is True
    with pytest.raises(redis.ConnectionError):  # admin.py drain counts every shard: never "drained" without one
        admin.held_now([queue])


def test_the_web_passes_over_a_shard_whose_redis_is_down_and_every_request_is_served(one_shard_down, make_app):
    worker = ModelWorker(one_shard_down(), StandInClassifier(), batch_size=8, max_wait_s=0, heartbeat_s=0.2)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        app = make_app(QUEUE_SHARDS=3)
        app.extensions["models"]._queues[TEST_MODEL] = one_shard_down()  # the web's queue of that model
        client = app.test_client()
        wait_for(lambda: post_image(client).status_code == 200, 10)
        assert [post_image(client).status_code for _ in range(9)] == [200] * 9  # 3 of them picked the dead shard
    finally:
        worker.request_stop()
        thread.join(10)
    assert not thread.is_alive()


@contextmanager
def serving_with_a_hung_shard(one_shard_hung, make_app):
    """The app and the real worker loop (the stand-in model) on three shards, the second hung, with the shipped
    timeouts; yields the app once the worker's first take on the hung shard has timed out."""
    worker = ModelWorker(one_shard_hung(), StandInClassifier(), batch_size=8, max_wait_s=0, heartbeat_s=0.5)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        app = make_app(QUEUE_SHARDS=3, REDIS_BLOCK_S=1.0, WORKER_TTL_S=3.0, REQUEST_TIMEOUT_S=10.0)  # shipped
        app.extensions["models"]._queues[TEST_MODEL] = one_shard_hung(WEB_SOCKET_MARGIN_S)  # the web's queue
        wait_for(lambda: worker.queue._down, 10)
        yield app
    finally:
        worker.request_stop()
        thread.join(10)
    assert not thread.is_alive()


def test_the_web_passes_over_a_hung_shard_for_a_while_instead_of_waiting_on_it_every_third_request(
    one_shard_hung, make_app
):
    """A shard whose Redis hangs costs the request that finds it a socket timeout (REDIS_BLOCK_S + 0.5 s)
    before it goes to the next shard; the web then passes that shard over for a backoff, and /readyz does not
    ask it either. Picked in turn regardless, every other request waited the timeout."""
    with serving_with_a_hung_shard(one_shard_hung, make_app) as app:
        client, took = app.test_client(), []
        for _ in range(8):  # within the first backoff (0.5-1 s)
            started = time.monotonic()
            response = post_image(client)
            assert response.status_code == 200, response.get_json()
            took.append(time.monotonic() - started)
        hung = app_queue(app).shards[1]
        hung.failed_until = max(hung.failed_until, time.monotonic() + 60)  # still passed over, however slow this box
        started = time.monotonic()
        assert client.get("/readyz").get_json()["ready"] is True
        assert time.monotonic() - started < 1.0  # the shard passed over is not asked either
    # the request that found it hung, and (on a slow box, past the first backoff of 0.5-1 s) one more at most
    assert 1 <= sum(t > 1.0 for t in took) <= 2, took


def test_under_load_a_hung_shard_holds_requests_only_until_a_call_on_it_is_overdue(one_shard_hung, make_app):
    """16 clients in closed loops, one shard's Redis hung, the shipped timeouts. Once a status read or push of
    the web's on that shard has gone unanswered for OVERDUE_S, the other threads pass it over, and after the
    first socket timeout (REDIS_BLOCK_S + 0.5 s) only a probe of its own asks it again: no request that
    started after the first half second waits that timeout. Before, every web thread picked the hung shard in
    turn within a few requests and waited it out, and again each time the backoff ended (19 requests over 1 s
    in 6 s, the last ones started 1-4 s in)."""
    with serving_with_a_hung_shard(one_shard_hung, make_app) as app:
        client, requests, begin = app.test_client(), [], time.monotonic()

        def closed_loop():
            while (started := time.monotonic()) < begin + 6.0:
                status = post_image(client).status_code
                requests.append((round(started - begin, 2), round(time.monotonic() - started, 2), status))

        clients = [threading.Thread(target=closed_loop) for _ in range(16)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(20)
    assert {status for _, _, status in requests} == {200} and len(requests) >= 100
    slow = [(started, took) for started, took, _ in requests if took > 1.0]  # (start s, took s)
    assert [(started, took) for started, took in slow if started > 0.5] == [], (slow, len(requests))


def shards_never_asked(n: int) -> ShardedQueue:
    """A ShardedQueue whose shards' Redis is never reached (the tests below set their state by hand)."""
    client = connect(f"redis://127.0.0.1:{stack.free_port()}/0", 0.3)
    return ShardedQueue([ImageQueue(client, f"never-{s}") for s in range(n)])


def test_when_every_working_shard_is_overdue_the_web_picks_the_least_stalled_never_one_that_failed():
    """Every shard that has not failed is overdue (a busy moment: threads waiting for the GIL, a large push):
    the web picks the least stalled of them, never the shard whose Redis failed (until its probe answers), nor
    one whose call has gone unanswered longest (a hung shard's stall only grows: before it first fails, it would
    otherwise be picked again whenever the others were slow at once)."""
    queue = shards_never_asked(3)
    fine, failed, slow = queue.shards
    failed.failed_until = time.monotonic() + 60
    fine._calls[-1] = time.monotonic() - 0.3  # unanswered for 0.3 s: a slow moment
    slow._calls[-1] = time.monotonic() - 1.2  # for 1.2 s: it may hang
    assert queue._answering() == [fine]
    assert {queue.pick().keys.name for _ in range(6)} == {fine.keys.name}
    fine._calls.clear()
    slow._calls.clear()
    assert queue._answering() == [fine, slow]
    failed.failed_until = 0.0
    assert queue._answering() == [fine, failed, slow]


def test_a_probe_that_cannot_start_or_fails_outside_redis_errors_backs_off_and_is_tried_again(monkeypatch):
    """A probe thread that cannot start, or a PING that fails with the cluster client's own error (not a
    RedisError), leaves the shard failed for another backoff and free to be probed again: not left out for good
    (its lock held), nor probed by every request at once."""
    from redis.exceptions import RedisClusterException

    shard = shards_never_asked(1).shards[0]
    shard.failed_until = time.monotonic() - 0.01  # the backoff is due

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patched:
        patched.setattr(threading.Thread, "start", no_thread)
        assert shard.failing(time.monotonic()) is True
    assert not shard._probing.locked() and shard.failed_until > time.monotonic()

    def cluster_error():
        raise RedisClusterException("Redis Cluster cannot be connected")

    shard.ping = cluster_error
    shard.failed_until = time.monotonic() - 0.01
    assert shard.failing(time.monotonic()) is True  # starts the probe
    wait_for(lambda: not shard._probing.locked(), 5)
    assert shard.failed_until > time.monotonic()  # backed off again, not due at once
    shard.ping = lambda: None
    shard.failed_until = time.monotonic() - 0.01
    shard.failing(time.monotonic())
    wait_for(lambda: not shard.failing(time.monotonic()), 5)  # the probe answered: the shard is back


def test_a_blocking_take_that_lands_after_its_claim_is_moved_to_the_lane_that_claims_it(sharded, redis_client):
    """An idle worker blocks on every shard for lane 0; the claim returns with one message while the other
    shards' takes still wait. A message one of them moves later is taken by the next claim, on lane 1: it is
    moved onto lane 1's list first, so lane 1's ack releases it and lane 0's list is left empty."""
    queue = sharded(3, REDIS_BLOCK_S=1.0)
    queue.heartbeat("w1", MODEL)
    first = {}
    thread = threading.Thread(target=lambda: first.update(claim=queue.claim("w1", 8, lane=0)))
    thread.start()
    time.sleep(0.2)  # blocked on all three shards
    queue.shards[0].enqueue(message("a"))
    thread.join(5)
    assert [m.split(b",")[0] for m in first["claim"].messages] == [b'{"id":"a"']
    queue.shards[1].enqueue(message("b"))  # a still-blocked take on shard 1 moves it onto lane 0's list
    wait_for(lambda: redis_client.llen(queue.shards[1].keys.processing("w1", 0)), 2)
    time.sleep(0.05)
    second = queue.claim("w1", 8, lane=1)
    assert len(second.messages) == 1 and redis_client.llen(queue.shards[1].keys.processing("w1", 0)) == 0
    assert redis_client.llen(queue.shards[1].keys.processing("w1", 1)) == 1
    done = [Done(m, "b", b"answer:b", 1e18) for m in second.messages]
    assert queue.ack("w1", done, lane=1) == (["b"], [])
    assert queue.ack("w1", [Done(m, "a", b"answer:a", 1e18) for m in first["claim"].messages], lane=0)[0] == ["a"]
    assert not any(redis_client.llen(k) for s in queue.shards for k in s.keys.lanes("w1"))
    queue.unregister("w1")
