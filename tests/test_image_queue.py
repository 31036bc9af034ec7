"""The queue protocol against a real redis-server, without a model."""

import re
import threading
import time

import pytest
import redis
from redis.crc import key_slot
from support.traffic import replicas_streaming

from image_queue import (
    MODEL_FORGET_S,
    Done,
    ImageQueue,
    Keys,
    ModelDirectory,
    ModelInfo,
    NoModelNamed,
    NoWorker,
    QueueFull,
    QueueUnavailable,
    UnknownModel,
    connect,
)

MODEL = ModelInfo("TestNet", 8, 8)


def answer_all(queue: ImageQueue, worker_id: str, messages: list[bytes], deadline: float = 1e18):
    """Acknowledge messages b"<id>" with the answer b"answer:<id>"."""
    done = [Done(m, m.decode(), b"answer:" + m, deadline) for m in messages]
    return queue.ack(worker_id, done)


def test_keys_share_one_hash_tag_and_cluster_slot():
    keys = Keys("image_queue")
    names = [keys.queue, keys.workers, keys.model, keys.processing("w1"), keys.result("abc")]
    assert names == [
        "{image_queue}:queue",
        "{image_queue}:workers",
        "{image_queue}:model",
        "{image_queue}:processing:w1",
        "{image_queue}:result:abc",
    ]
    assert len({key_slot(n.encode()) for n in names}) == 1


@pytest.mark.parametrize("bad", ["", "a{b", "a}b", "a:b", "a b"])
def test_keys_refuse_names_that_would_break_the_tag(bad):
    with pytest.raises(ValueError):
        Keys(bad)


def test_claim_takes_oldest_first_and_ack_writes_each_answer_once(make_queue, redis_client):
    queue = make_queue()
    for i in range(5):
        queue.enqueue(f"m{i}".encode())
    claim = queue.claim("w1", 3)
    assert claim.messages == [b"m0", b"m1", b"m2"]
    assert abs(claim.server_time - time.time()) < 1
    assert redis_client.llen(queue.keys.processing("w1")) == 3 and redis_client.llen(queue.keys.queue) == 2
    answered, late = answer_all(queue, "w1", claim.messages)
    assert answered == ["m0", "m1", "m2"] and late == []
    assert redis_client.llen(queue.keys.processing("w1")) == 0
    assert redis_client.lrange(queue.keys.result("m1"), 0, -1) == [b"answer:m1"]
    assert 0 < redis_client.ttl(queue.keys.result("m1")) <= 30  # nothing leaks if the client left
    assert queue.wait_for("m0", time.monotonic() + 1) == b"answer:m0"


def test_a_full_queue_refuses_without_pushing(make_queue, redis_client):
    queue = make_queue(queue_max=3)
    for i in range(3):
        assert queue.enqueue(f"m{i}".encode()) == i + 1
    with pytest.raises(QueueFull):
        queue.enqueue(b"one too many")
    assert redis_client.llen(queue.keys.queue) == 3


def test_messages_being_processed_count_against_queue_max_so_redis_holds_at_most_that(make_queue):
    queue = make_queue(queue_max=3)
    for i in range(3):
        queue.enqueue(f"m{i}".encode())
    queue.heartbeat("w1", MODEL)
    assert len(queue.claim("w1", 2).messages) == 2
    status = queue.status()
    assert (status.queue_depth, status.held) == (1, 3)
    with pytest.raises(QueueFull):  # only one waits, but three are in Redis
        queue.enqueue(b"one too many")
    queue.ack("w1", [Done(b"m0", "m0", b"answer:m0", time.time() + 30)])
    assert queue.enqueue(b"m3") == 3  # an answered message frees its place


def test_an_idle_worker_blocks_and_wakes_as_soon_as_a_message_arrives(make_queue):
    queue = make_queue(block_s=5.0)
    got = {}

    def worker():
        started = time.monotonic()
        got["claim"] = queue.claim("w1", 8)
        got["waited"] = time.monotonic() - started

    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(0.3)
    pushed = time.monotonic()
    queue.enqueue(b"lonely")
    thread.join(5)
    assert got["claim"].messages == [b"lonely"]
    assert got["waited"] < 5.0 and time.monotonic() - pushed < 0.2  # woke at once, not at the timeout


def test_an_empty_queue_returns_nothing_after_the_block_timeout(make_queue):
    queue = make_queue(block_s=0.3)
    started = time.monotonic()
    assert queue.claim("w1", 8).messages == []
    assert 0.25 < time.monotonic() - started < 1.5


def test_concurrent_claims_never_take_the_same_message(make_queue, redis_client):
    queue = make_queue(queue_max=1000)
    sent = [f"m{i}".encode() for i in range(600)]
    for message in sent:
        queue.enqueue(message)
    taken: dict[str, list[bytes]] = {}

    def worker(worker_id):
        own = make_queue(queue_max=1000)  # a connection of its own, like a separate process
        mine = taken.setdefault(worker_id, [])
        while claim := own.claim(worker_id, 7).messages:
            mine += claim
            answer_all(own, worker_id, claim)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    everything = [m for ms in taken.values() for m in ms]
    assert len(everything) == len(sent) and set(everything) == set(sent)  # each exactly once
    assert sum(1 for ms in taken.values() if ms) >= 2  # the claims really did run side by side
    assert redis_client.llen(queue.keys.queue) == 0


def test_partial_batch_is_held_for_max_wait_to_fill(make_queue):
    queue = make_queue()
    queue.enqueue(b"first")
    threading.Timer(0.05, queue.enqueue, args=(b"second",)).start()
    claim = queue.claim("w1", 8, wait_s=0.3)
    assert claim.messages == [b"first", b"second"]


def test_an_answer_past_the_deadline_is_not_written(make_queue, redis_client):
    queue = make_queue()
    queue.enqueue(b"slow")
    claim = queue.claim("w1", 8)
    answered, late = answer_all(queue, "w1", claim.messages, deadline=claim.server_time - 1)
    assert answered == [] and late == ["slow"]
    assert not redis_client.exists(queue.keys.result("slow"))
    assert redis_client.llen(queue.keys.processing("w1")) == 0


def test_unreadable_messages_are_released_without_an_answer(make_queue, redis_client):
    queue = make_queue()
    queue.enqueue(b"\x00garbage")
    claim = queue.claim("w1", 8)
    assert queue.ack("w1", [Done(claim.messages[0], None, None)]) == ([], [])
    assert redis_client.llen(queue.keys.processing("w1")) == 0


def test_status_counts_live_workers_and_reports_the_model(make_queue):
    queue = make_queue(worker_ttl_s=1.0)
    empty = queue.status()
    assert empty.live_workers == 0 and empty.model is None and abs(empty.server_time - time.time()) < 1
    queue.heartbeat("w1", MODEL)
    queue.heartbeat("w2", MODEL)
    queue.enqueue(b"x")
    status = queue.status()
    assert status.live_workers == 2 and status.model == MODEL and status.queue_depth == 1
    time.sleep(1.2)
    assert queue.status().live_workers == 0  # heartbeats older than the TTL do not count


def test_enqueue_needing_a_worker_refuses_and_drops_the_messages_when_no_heartbeat_is_fresh(make_queue, redis_client):
    queue = make_queue(worker_ttl_s=1.0)
    with pytest.raises(NoWorker):
        queue.enqueue(b"a", b"b", need_worker=True)
    assert redis_client.llen(queue.keys.queue) == 0  # all or none: both pushed messages were taken off again
    queue.heartbeat("w1", MODEL)
    assert queue.enqueue(b"c", need_worker=True) == 1
    time.sleep(1.2)  # the heartbeat is older than the TTL now
    with pytest.raises(NoWorker):
        queue.enqueue(b"d", need_worker=True)
    assert redis_client.lrange(queue.keys.queue, 0, -1) == [b"c"]
    assert queue.enqueue(b"e") == 2  # without need_worker, as before (tests and tools queue for later workers)


def test_recent_status_reuses_an_open_status_for_its_age_and_never_a_closed_one(make_queue, redis_client):
    queue = make_queue()
    closed = queue.recent_status(10.0)
    assert closed.live_workers == 0
    queue.heartbeat("w1", MODEL)
    first = queue.recent_status(10.0)  # the closed status was not kept: read again, and kept since it is open
    assert first.live_workers == 1 and first.model == MODEL and first.held == 0

    redis_client.set(queue.keys.paused, 1)  # what another web or an operator changes is not seen while reused...
    time.sleep(0.05)
    reused = queue.recent_status(10.0)
    assert not reused.paused and reused.model == MODEL
    assert 0.04 < reused.server_time - first.server_time < 1.0  # ...but the clock moves on
    assert queue.recent_status(0.0).paused  # older than max_age_s: read afresh
    assert queue.recent_status(10.0).paused  # and a closed status is not reused: read afresh each time
    redis_client.delete(queue.keys.paused)

    queue.recent_status(10.0)
    assert queue.enqueue(b"a", b"b", need_worker=True) == 2
    assert queue.recent_status(10.0).held == 2  # the count the last push returned
    for n in range(98):
        queue.enqueue(f"m{n}".encode())
    assert queue.recent_status(10.0).held == 100
    with pytest.raises(QueueFull):
        queue.enqueue(b"over", need_worker=True)
    redis_client.set(queue.keys.paused, 1)
    assert queue.recent_status(10.0).paused  # the refusal dropped the reused status: this one was read afresh


def test_ack_names_each_message_by_its_head_and_length_not_by_sending_its_pixels_back(make_queue, redis_client):
    queue = make_queue()
    pixels = b"p" * 200_000
    same_head = [b'{"id":"a"' + pixels, b'{"id":"a"' + pixels + b"x"]  # alike for 200 KB: the length tells
    for message in same_head:
        queue.enqueue(message)
    queue.heartbeat("w1", MODEL)
    claimed = queue.claim("w1", 8).messages
    sent = []
    script = queue._ack
    queue._ack = lambda keys, args: sent.append(args) or script(keys=keys, args=args)
    queue.ack("w1", [Done(claimed[1], "second", b"answer:second", time.time() + 30)])
    assert sum(len(a) if isinstance(a, (bytes, str)) else len(str(a)) for a in sent[0]) < 200  # not the 200 KB
    assert redis_client.lrange(queue.keys.processing("w1"), 0, -1) == [claimed[0]]  # the right one left
    queue.ack("w1", [Done(claimed[0], None, None)])
    assert redis_client.llen(queue.keys.processing("w1")) == 0


def test_a_batch_moves_and_is_released_without_redis_copying_its_pixels_into_lua(make_queue, redis_client):
    """Lua copies each message it touches (~0.4 ms per 200 KB of Redis's one thread): the enqueue pushes it
    outside the script that checks the bound, the take moves messages by LMOVE, and an ack of the whole
    batch releases the list without reading it."""
    queue = make_queue()
    messages = [b'{"id":"m%d"' % i + bytes([i]) * 200_000 for i in range(4)]
    script_args, pipeline = [], queue.redis.pipeline

    def recording_pipeline(*args, **kwargs):  # what the scripts inside each MULTI are given
        pipe = pipeline(*args, **kwargs)
        run = pipe.execute_command

        def recording(*command, **options):
            if command[0] == "EVAL":  # EVAL script numkeys keys... args...
                script_args.append(command[3:])
            return run(*command, **options)

        pipe.execute_command = recording
        return pipe

    queue.redis.pipeline = recording_pipeline
    redis_client.config_resetstat()
    for message in messages:
        queue.enqueue(message)
    queue.heartbeat("w1", MODEL)
    claimed = queue.claim("w1", 8).messages
    assert claimed == messages
    assert len(script_args) == 5 and max(len(str(a)) for args in script_args for a in args) < 100
    # one round trip per enqueue; no SCRIPT EXISTS before a MULTI, no EVALSHA to miss. A fresh worker's first
    # take counts (a MULTI of no moves) then moves what it counted: one LMOVE per message, none answering nil
    assert redis_client.info("commandstats")["cmdstat_exec"]["calls"] == 4 + 2
    stats = redis_client.info("commandstats")
    assert not {"cmdstat_script|exists", "cmdstat_rpop"} & set(stats)
    assert stats["cmdstat_lmove"]["calls"] == 4
    redis_client.config_resetstat()
    answered, late = queue.ack("w1", [Done(m, f"m{i}", b"answer", time.time() + 30) for i, m in enumerate(claimed)])
    assert answered == ["m0", "m1", "m2", "m3"] and late == []
    stats = redis_client.info("commandstats")
    assert not {"cmdstat_lrange", "cmdstat_lrem", "cmdstat_rpop", "cmdstat_lpush"} & set(stats)
    assert redis_client.llen(queue.keys.processing("w1")) == 0 and redis_client.llen(queue.keys.queue) == 0
    assert redis_client.hget(queue.keys.stats, "size:4") is None  # batch_size 0: the model ran nothing here
    for message in messages:
        queue.enqueue(message)
    redis_client.config_resetstat()
    assert queue.claim("w1", 8).messages == messages  # as many waiting as the last take saw: one MULTI
    assert redis_client.info("commandstats")["cmdstat_exec"]["calls"] == 1
    assert redis_client.info("commandstats")["cmdstat_lmove"]["calls"] == 4


def test_a_dead_workers_batch_goes_back_to_the_head_of_the_queue(make_queue, redis_client):
    queue = make_queue(worker_ttl_s=1.0)
    for i in range(5):
        queue.enqueue(f"m{i}".encode())
    queue.heartbeat("dead", MODEL)
    assert queue.claim("dead", 3).messages == [b"m0", b"m1", b"m2"]
    queue.heartbeat("alive", MODEL)
    assert queue.requeue_dead_workers() == 0  # "dead" is only quiet so far
    time.sleep(1.2)
    queue.heartbeat("alive", MODEL)
    assert queue.requeue_dead_workers() == 3
    assert redis_client.zscore(queue.keys.workers, "dead") is None
    assert queue.claim("alive", 10).messages == [b"m0", b"m1", b"m2", b"m3", b"m4"]  # original order


def test_a_stalled_worker_that_wakes_up_cannot_answer_a_requeued_message(make_queue, redis_client):
    queue = make_queue(worker_ttl_s=1.0)
    queue.enqueue(b"m0")
    queue.heartbeat("stalled", MODEL)
    stale = queue.claim("stalled", 8).messages
    time.sleep(1.2)
    queue.heartbeat("peer", MODEL)
    assert queue.requeue_dead_workers() == 1
    fresh = queue.claim("peer", 8).messages
    assert answer_all(queue, "stalled", stale) == ([], [])  # woke up: its claim is no longer its own
    assert answer_all(queue, "peer", fresh) == (["m0"], [])
    assert redis_client.lrange(queue.keys.result("m0"), 0, -1) == [b"answer:m0"]  # exactly one answer


def test_a_worker_written_off_while_stalled_is_counted_and_watched_again_as_soon_as_it_claims(make_queue):
    queue = make_queue(worker_ttl_s=1.0, queue_max=3)
    queue.heartbeat("stalled", MODEL)
    time.sleep(1.2)
    queue.heartbeat("peer", MODEL)
    queue.requeue_dead_workers()  # "stalled" is written off: out of the workers set
    for i in range(3):
        queue.enqueue(f"m{i}".encode())
    assert queue.claim("stalled", 2).messages == [b"m0", b"m1"]  # it wakes and claims before any heartbeat
    assert queue.status().held == 3  # its messages still count against QUEUE_MAX ...
    time.sleep(1.2)
    queue.heartbeat("peer", MODEL)
    assert queue.requeue_dead_workers() == 2  # ... and go back if it dies now


def test_unregister_hands_back_what_a_leaving_worker_holds(make_queue, redis_client):
    queue = make_queue()
    queue.enqueue(b"m0")
    queue.heartbeat("leaving", MODEL)
    queue.claim("leaving", 8)
    assert queue.unregister("leaving") == 1
    assert redis_client.lrange(queue.keys.queue, 0, -1) == [b"m0"]
    assert queue.status().live_workers == 0


def command_calls(redis_client) -> dict[str, int]:
    """Calls of each command since the server's last CONFIG RESETSTAT."""
    return {name.removeprefix("cmdstat_"): row["calls"] for name, row in redis_client.info("commandstats").items()}


@pytest.fixture
def reader(redis_url, monkeypatch):
    """reader(queue): a web-side ImageQueue on the same keys with a client of its own, and the list of what it
    has sent to Redis in one go (a command, or a whole pipeline: one round trip each); others are not counted."""
    from redis.connection import AbstractConnection

    sent = []
    send = AbstractConnection.send_packed_command

    def counted(self, command, *args, **kwargs):
        if self.client_name == "reader":
            sent.append(command)
        return send(self, command, *args, **kwargs)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)

    def make(queue: ImageQueue) -> tuple[ImageQueue, list]:
        web = ImageQueue(connect(f"{redis_url}?client_name=reader", 2.0), queue.keys.name, block_s=2.0)
        web.redis.ping()  # connected (and named) before anything is counted
        sent.clear()
        return web, sent

    return make


def read_all(web: ImageQueue, ids: list[str], sent: list) -> tuple[list, int]:
    """web.answers(ids) read to the end, and the round trips that took."""
    sent.clear()
    got = list(web.answers(ids, time.monotonic() + 3))
    return got, len(sent)


def test_a_batch_of_answers_is_read_in_three_round_trips_in_order_and_deleted(make_queue, redis_client, reader):
    queue = make_queue()
    web, sent = reader(queue)
    ids = [f"r{i}" for i in range(8)]
    queue.enqueue(*(i.encode() for i in ids))
    answer_all(queue, "w1", queue.claim("w1", 8).messages)
    redis_client.config_resetstat()
    got, trips = read_all(web, ids, sent)
    assert got == [f"answer:{i}".encode() for i in ids]
    # a blocking read; DEL of the first + LINDEX of the other 7, pipelined; one DEL of those 7
    assert trips == 3
    calls = command_calls(redis_client)
    assert (calls.get("blmove"), calls.get("lindex"), calls.get("del")) == (1, 7, 2)
    assert not any(redis_client.exists(queue.keys.result(i)) for i in ids)


def test_answers_from_several_batches_cost_no_more_round_trips_than_one_by_one(make_queue, redis_client, reader):
    queue = make_queue()
    web, sent = reader(queue)
    queue.enqueue(b"a", b"b")  # each answered in a batch of its own, the second after the first was read
    answer_all(queue, "w1", queue.claim("w1", 1).messages)
    threading.Timer(0.3, lambda: answer_all(queue, "w1", queue.claim("w1", 1).messages)).start()
    got, trips = read_all(web, ["a", "b"], sent)
    assert got == [b"answer:a", b"answer:b"] and trips == 4  # 2 each, as a lone answer

    queue.enqueue(*(f"m{i}".encode() for i in range(6)))  # two batches of 3, both answered before the read
    answer_all(queue, "w1", queue.claim("w1", 3).messages)
    answer_all(queue, "w1", queue.claim("w1", 3).messages)
    got, trips = read_all(web, [f"m{i}" for i in range(6)], sent)
    assert got == [f"answer:m{i}".encode() for i in range(6)] and trips == 3  # all there: one pipeline reads them

    queue.enqueue(*(f"n{i}".encode() for i in range(6)))
    answer_all(queue, "w1", queue.claim("w1", 3).messages)  # n0-n2 now, n3-n5 a moment later
    threading.Timer(0.3, lambda: answer_all(queue, "w1", queue.claim("w1", 3).messages)).start()
    got, trips = read_all(web, [f"n{i}" for i in range(6)], sent)
    assert got == [f"answer:n{i}".encode() for i in range(6)]
    assert trips == 5  # 2 for the first batch (its DEL rides with the second's reads), 3 for the second
    assert not any(redis_client.exists(queue.keys.result(f"n{i}")) for i in range(6))


def test_answers_wait_for_each_one_still_missing_and_stop_at_the_deadline(make_queue, redis_client):
    queue = make_queue(block_s=0.2)
    queue.enqueue(b"a", b"b", b"c")
    first = queue.claim("w1", 1).messages  # a: answered now; b: a moment later, by another batch; c: never
    answer_all(queue, "w1", first)
    later = queue.claim("w1", 1).messages
    threading.Timer(0.3, answer_all, (queue, "w1", later)).start()
    started = time.monotonic()
    got = list(queue.answers(["a", "b", "c"], started + 1.0))
    assert got == [b"answer:a", b"answer:b", None]
    assert 0.95 < time.monotonic() - started < 1.4  # c was waited for until the deadline
    assert not redis_client.exists(queue.keys.result("a")) and not redis_client.exists(queue.keys.result("b"))


def test_a_reader_that_stops_early_reads_no_further(make_queue, redis_client):
    queue = make_queue(block_s=0.2)
    queue.enqueue(b"x", b"y")
    answer_all(queue, "w1", queue.claim("w1", 1).messages)  # x answered; y still queued
    redis_client.config_resetstat()
    answers = queue.answers(["x", "y"], time.monotonic() + 5)
    started = time.monotonic()
    assert next(answers) == b"answer:x"  # (a web request whose first answer is an error stops here)
    answers.close()
    assert time.monotonic() - started < 0.15  # no wait for y
    calls = command_calls(redis_client)
    assert (calls.get("blmove"), calls.get("lindex"), calls.get("del")) == (1, 1, 1)  # y looked at once, not waited on
    assert not redis_client.exists(queue.keys.result("x")) and redis_client.llen(queue.keys.queue) == 1


def test_later_answers_whose_read_is_lost_on_the_way_are_read_again_in_order(redis_server, queue_name, redis_client):
    """The pipelined read of the later answers loses its reply (the connection drops after Redis ran it):
    nothing was taken, so each answer is then waited for on its own, and none is lost or repeated."""
    from support.proxy import ReplyDroppingProxy

    proxy = ReplyDroppingProxy(redis_server["port"])
    try:
        queue = ImageQueue(connect(f"redis://127.0.0.1:{proxy.port}/0", 0.2), queue_name, block_s=0.2)
        for request_id in ("r0", "r1", "r2"):
            redis_client.rpush(queue.keys.result(request_id), f"answer:{request_id}".encode())
        proxy.drop_reply_containing(b"answer:r1")  # the pipeline's reply: r0's DEL, r1's and r2's LINDEX
        assert list(queue.answers(["r0", "r1", "r2"], time.monotonic() + 3)) == [
            b"answer:r0",
            b"answer:r1",
            b"answer:r2",
        ]
        assert proxy.dropped == 1
        assert not any(redis_client.exists(queue.keys.result(r)) for r in ("r0", "r1", "r2"))
    finally:
        proxy.close()


def test_a_user_that_may_not_lindex_gets_queue_unavailable_not_a_silent_slow_path(
    redis_server, queue_name, redis_client
):
    redis_client.acl_setuser("no-lindex", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-lindex"])
    try:
        url = f"redis://no-lindex:pw@127.0.0.1:{redis_server['port']}/0"
        queue = ImageQueue(connect(url, 0.2), queue_name, block_s=0.2)
        for request_id in ("r0", "r1"):
            redis_client.rpush(queue.keys.result(request_id), b"answer")
        with pytest.raises(QueueUnavailable, match="ACL"):
            list(queue.answers(["r0", "r1"], time.monotonic() + 2))
        assert queue.wait_for("r1", time.monotonic() + 2) == b"answer"  # one answer needs no LINDEX
    finally:
        redis_client.acl_deluser("no-lindex")


def test_wait_for_gives_up_at_its_deadline(make_queue):
    queue = make_queue(block_s=0.2)
    started = time.monotonic()
    assert queue.wait_for("nobody-answers", started + 0.5) is None
    assert 0.45 < time.monotonic() - started < 0.8  # the deadline, plus at most a Redis clock tick


def test_requeue_own_hands_back_what_a_failed_call_left_and_keeps_the_worker_alive(make_queue, redis_client):
    queue = make_queue()
    queue.heartbeat("w1", MODEL)
    queue.enqueue(b"m0")
    queue.claim("w1", 8)  # pretend the reply was lost: the worker does not have m0 in hand
    assert queue.requeue_own("w1") == 1
    assert redis_client.lrange(queue.keys.queue, 0, -1) == [b"m0"]
    assert queue.status().live_workers == 1  # still registered


@pytest.fixture
def stallable_redis(tmp_path):
    """A redis-server of the test's own, which the test may SIGSTOP."""
    import signal

    import stack

    port = stack.free_port()
    server = stack.start_redis(port, str(tmp_path))
    yield f"redis://127.0.0.1:{port}/0", server
    server.process.send_signal(signal.SIGCONT)
    server.stop()


def test_a_stalled_redis_delays_a_503_or_504_by_at_most_one_block_plus_the_margin(stallable_redis):
    import signal

    from image_queue import WEB_SOCKET_MARGIN_S, QueueUnavailable

    url, server = stallable_redis
    block_s = 0.5
    queue = ImageQueue(connect(url, block_s, WEB_SOCKET_MARGIN_S), "stall", block_s=block_s)
    queue.status()  # a pooled connection, as a busy web worker has
    server.process.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(QueueUnavailable):
        queue.status()
    assert time.monotonic() - started < block_s + WEB_SOCKET_MARGIN_S + 0.3  # one socket timeout: no retry
    started = time.monotonic()
    assert queue.wait_for("anything", started + 1.2) is None
    assert time.monotonic() - started < 1.2 + block_s + WEB_SOCKET_MARGIN_S + 0.3


def test_a_push_that_fails_on_redis_drops_the_reused_status_so_the_next_request_reads_afresh(stallable_redis):
    """With QUEUE_SHARDS the web passes over a shard whose status read fails; a status reused after that
    shard's Redis failed would send the next requests into it for the rest of STATUS_REUSE_S."""
    import signal

    import redis

    from image_queue import WEB_SOCKET_MARGIN_S, QueueUnavailable

    url, server = stallable_redis
    block_s = 0.3
    queue = ImageQueue(connect(url, block_s, WEB_SOCKET_MARGIN_S), "failing", block_s=block_s)
    queue.heartbeat("w1", MODEL)
    assert queue.recent_status(60.0).model == MODEL  # open: kept for reuse
    server.process.send_signal(signal.SIGSTOP)
    with pytest.raises(QueueUnavailable):
        queue.enqueue(b"m0", need_worker=True)
    server.process.send_signal(signal.SIGCONT)
    redis.Redis.from_url(url).set(queue.keys.paused, 1)
    assert queue.recent_status(60.0).paused  # read afresh, not the open status from before the failure


def test_an_answer_whose_reply_is_lost_on_the_way_is_read_again_not_lost(redis_server, queue_name, redis_client):
    """The web's read of its answer must not destroy it: if the connection drops after Redis sent the
    answer, the retry finds it still there (a blocking read that leaves it, then a delete)."""
    from support.proxy import ReplyDroppingProxy

    proxy = ReplyDroppingProxy(redis_server["port"])
    try:
        queue = ImageQueue(connect(f"redis://127.0.0.1:{proxy.port}/0", 0.2), queue_name, block_s=0.2)
        redis_client.rpush(queue.keys.result("r1"), b'{"answer": "the one"}')
        proxy.drop_reply_containing(b"the one")
        assert queue.wait_for("r1", time.monotonic() + 3) == b'{"answer": "the one"}'
        assert proxy.dropped == 1
        assert not redis_client.exists(queue.keys.result("r1"))  # read, then deleted
    finally:
        proxy.close()


def test_wait_replicas_holds_the_enqueue_for_the_replicas_then_goes_on_saying_so(make_queue, caplog):
    queue = make_queue(wait_replicas=1, block_s=0.3)  # the tests' Redis has no replica: WAIT times out
    started = time.monotonic()
    queue.enqueue(b"message")
    assert 0.25 <= time.monotonic() - started < 2  # WAIT held it up to REDIS_BLOCK_S, no longer
    assert queue.status().queue_depth == 1  # queued on the master either way
    assert "only 0 of 1 replicas had the message" in caplog.text


def test_after_a_replica_shortfall_pushes_do_not_wait_for_a_while_then_try_again(make_queue, caplog, monkeypatch):
    """A promoted replica has no replica of its own for a long time: each push waiting REDIS_BLOCK_S would hold
    a web thread per request. After a shortfall, pushes skip WAIT for REPLICAS_SHORT_S; then one waits again."""
    import image_queue

    monkeypatch.setattr(image_queue, "REPLICAS_SHORT_S", 0.6)
    queue = make_queue(wait_replicas=1, block_s=0.3)  # no replica
    took = []
    for pause in (0, 0, 0, 0.7):
        time.sleep(pause)
        started = time.monotonic()
        queue.enqueue(b"message")
        took.append(time.monotonic() - started)
    assert took[0] >= 0.25 and max(took[1:3]) < 0.1 and took[3] >= 0.25  # waited, skipped twice, tried again
    assert caplog.text.count("replicas had the message") == 1  # one warning for the shortfall
    assert queue.status().queue_depth == 4


def test_wait_replicas_never_waits_past_the_requests_deadline(make_queue, caplog):
    """A request pushed with less than REDIS_BLOCK_S left waits for the replicas only until its deadline (its
    504 is not held up), and one with no time left does not wait at all (WAIT 0 would wait for ever)."""
    queue = make_queue(wait_replicas=1, block_s=2.0)  # no replica: WAIT waits its whole timeout
    started = time.monotonic()
    queue.enqueue(b"late", deadline=started + 0.3)
    assert 0.25 <= time.monotonic() - started < 1.0
    assert re.search(r"only 0 of 1 replicas had the message within 0\.(3|2\d) s", caplog.text)  # 0.3 s, less its start
    started = time.monotonic()
    queue.enqueue(b"later", deadline=started - 1)
    assert time.monotonic() - started < 0.2
    assert queue.status().queue_depth == 2  # queued on the master either way


@pytest.fixture
def master_and_replica(tmp_path):
    """(the master's URL, the replica's server): two redis-servers of the test's own, the replica in sync."""
    import redis

    import stack

    ports = stack.free_port(), stack.free_port()
    for name in ("master", "replica"):
        (tmp_path / name).mkdir()
    master = stack.start_redis(ports[0], str(tmp_path / "master"), None, "--repl-diskless-sync-delay", "0")
    replica = stack.start_redis(ports[1], str(tmp_path / "replica"), None, "--replicaof", "127.0.0.1", str(ports[0]))
    try:
        link = lambda: redis.Redis(port=ports[1]).info("replication").get("master_link_status") == "up"  # noqa: E731
        deadline = time.monotonic() + 10
        while not link() and time.monotonic() < deadline:
            time.sleep(0.05)
        replicas_streaming(redis.Redis(port=ports[0]), "synced", 1)
        yield f"redis://127.0.0.1:{ports[0]}/0", replica
    finally:
        import signal

        replica.process.send_signal(signal.SIGCONT)
        replica.stop()
        master.stop()


def test_wait_replicas_waits_for_the_push_made_on_its_own_connection(master_and_replica, caplog):
    """Redis WAIT counts the replicas that have the writes of the connection it runs on. Here the pool holds a
    second connection whose last write (another request's) the replica has, another thread takes the push's
    connection the moment it is released (as under load), and the replica is stopped: only a WAIT on the
    push's own connection sees that the replica lacks the message; on the other it answers 1 at once."""
    import signal

    url, replica = master_and_replica
    queue = ImageQueue(connect(url, 0.5), "waitq", block_s=0.5, wait_replicas=1)
    started = time.monotonic()
    queue.enqueue(b"first")
    assert time.monotonic() - started < 0.4 and "replicas had" not in caplog.text  # the replica has it
    pool, taken = queue.redis.connection_pool, []
    pooled = [pool.get_connection() for _ in range(2)]
    for command in (("SET", "another-request", 1), ("WAIT", 1, 2000)):
        pooled[1].send_command(*command)
        assert pooled[1].read_response() in (True, b"OK", 1)  # its write is on the replica
    for connection in reversed(pooled):
        pool.release(connection)  # pooled[0] is the next one taken
    release = pool.release

    def released_then_taken(connection):
        release(connection)
        taken.append(pool.get_connection())  # another request's thread

    pool.release = released_then_taken
    replica.process.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    queue.enqueue(b"second")
    assert time.monotonic() - started >= 0.45  # WAIT held it up to REDIS_BLOCK_S
    assert "only 0 of 1 replicas had the message" in caplog.text
    assert queue.status().queue_depth == 2  # queued on the master either way
    started = time.monotonic()
    with pytest.raises(NoWorker):
        queue.enqueue(b"third", need_worker=True)  # refused: nothing stays for a replica to have, so no wait
    assert time.monotonic() - started < 0.3


# --- The model registry: ModelDirectory --------------------------------------------------------


def test_the_directory_lists_registered_models_and_forgets_one_silent_for_model_forget_s(
    make_queue, redis_url, queue_name, redis_client
):
    config = {"REDIS_URL": redis_url, "IMAGE_QUEUE": queue_name, "REDIS_BLOCK_S": 0.2, "QUEUE_MAX": 10}
    config |= {"RESULT_TTL_S": 30, "WORKER_TTL_S": 2.0}
    directory = ModelDirectory(config, 0.5, refresh_s=0.2)
    assert directory.ids() == []
    with pytest.raises(UnknownModel, match="none yet"):
        directory.queue("alpha")
    make_queue("alpha").heartbeat("w1", MODEL)
    make_queue("beta").heartbeat("w2", MODEL)
    time.sleep(ModelDirectory.FORCED_S)
    assert directory.queue("alpha").keys.name == f"{queue_name}.alpha"  # a new id: read at once
    assert directory.ids() == ["alpha", "beta"]
    with pytest.raises(NoModelNamed, match="several models"):
        directory.default_id()
    registry = Keys(queue_name).models
    now = float(redis_client.time()[0])
    redis_client.zadd(registry, {"alpha": now - MODEL_FORGET_S - 5})  # alpha's workers went silent a day ago
    time.sleep(0.2)  # the list is read again
    with pytest.raises(UnknownModel, match="models: beta"):
        directory.queue("alpha")  # known before, and its queue made: forgotten all the same
    assert directory.default_id() == "beta"  # the only one now
    make_queue("beta").heartbeat("w2", MODEL)  # a registration prunes the forgotten
    assert redis_client.zrange(registry, 0, -1) == [b"beta"]
    with_default = ModelDirectory(config | {"DEFAULT_MODEL": "gamma"}, 0.5)
    with pytest.raises(NoWorker, match="default model 'gamma'"):  # 503, not 404: this web is meant to serve it
        with_default.queue("gamma")


def test_requests_for_a_new_model_arriving_together_all_find_it_while_one_of_them_reads_the_registry(
    make_queue, redis_url, queue_name
):
    """A second model's workers register while the web's list holds the first only; requests for the new one
    arrive together (a web process under load). One of them reads the registry; the others must wait for that
    read, not answer 404 from the list it is replacing (seen as a flaky 404 under 32-way concurrency)."""
    config = {"REDIS_URL": redis_url, "IMAGE_QUEUE": queue_name, "REDIS_BLOCK_S": 0.2, "QUEUE_MAX": 10}
    config |= {"RESULT_TTL_S": 30, "WORKER_TTL_S": 2.0}
    make_queue("alpha").heartbeat("w1", MODEL)
    directory = ModelDirectory(config, 0.5)
    assert directory.ids() == ["alpha"]
    make_queue("beta").heartbeat("w2", MODEL)
    read = directory._read_known

    def slow_read(*args, **kwargs):
        time.sleep(0.3)  # a read in flight while the other requests arrive
        return read(*args, **kwargs)

    directory._read_known = slow_read
    time.sleep(ModelDirectory.FORCED_S)
    found, errors = [], []

    def request_beta():
        try:
            found.append(directory.queue("beta").keys.name)
        except UnknownModel as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=request_beta) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert errors == [] and found == [f"{queue_name}.beta"] * 8


def test_requests_waiting_for_a_registry_read_that_failed_do_not_read_again_each(make_queue, redis_url, queue_name):
    """Redis stalls while requests name a model not in the list: one of them reads (and fails, slowly); the ones
    that waited for it take its outcome instead of each waiting out a read of their own."""
    config = {"REDIS_URL": redis_url, "IMAGE_QUEUE": queue_name, "REDIS_BLOCK_S": 0.2, "QUEUE_MAX": 10}
    config |= {"RESULT_TTL_S": 30, "WORKER_TTL_S": 2.0}
    make_queue("alpha").heartbeat("w1", MODEL)
    directory = ModelDirectory(config, 0.5)
    assert directory.ids() == ["alpha"]
    calls = []

    def stalled_read(*args, **kwargs):
        calls.append(1)
        time.sleep(0.3)
        raise redis.TimeoutError("Timeout reading from socket")

    directory._read_known = stalled_read
    time.sleep(ModelDirectory.FORCED_S)
    errors = []

    def request_beta():
        try:
            directory.queue("beta")
        except UnknownModel as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=request_beta) for _ in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(calls) == 1 and len(errors) == 4 and time.monotonic() - started < 0.6


# --- Lanes: a pipelined worker holds a batch on each of its processing lists -----------------------


def test_each_lane_is_a_processing_list_of_its_own_acked_whole_and_counted_as_held(make_queue, redis_client):
    queue = make_queue(queue_max=6)
    assert queue.keys.lanes("w1") == [f"{{{queue.keys.name}}}:processing:w1" + s for s in ("", "/1", "/2")]
    for i in range(6):
        queue.enqueue(f"m{i}".encode())
    first, second = queue.claim("w1", 2, lane=0), queue.claim("w1", 2, lane=1)
    third = queue.top_up("w1", 2, lane=2)
    assert (first.messages, second.messages, third.messages) == ([b"m0", b"m1"], [b"m2", b"m3"], [b"m4", b"m5"])
    assert [redis_client.llen(k) for k in queue.keys.lanes("w1")] == [2, 2, 2]
    with pytest.raises(QueueFull):  # every lane's messages are held: the bound counts them all
        queue.enqueue(b"one-too-many")
    done = [Done(m, m.decode(), b"answer:" + m, 1e18) for m in second.messages]
    assert queue.ack("w1", done, lane=1) == (["m2", "m3"], [])  # whole-list: DEL of lane 1 only
    assert [redis_client.llen(k) for k in queue.keys.lanes("w1")] == [2, 0, 2]
    assert queue.status().held == 4


def test_a_dead_workers_batches_on_every_lane_go_back_on_the_queue(make_queue, redis_client):
    queue = make_queue(worker_ttl_s=1.0)
    for i in range(6):
        queue.enqueue(f"m{i}".encode())
    queue.heartbeat("dead", MODEL)
    queue.claim("dead", 2, lane=0)  # being acked
    queue.claim("dead", 2, lane=1)  # running
    queue.claim("dead", 1, lane=2)  # the next batch, claimed
    time.sleep(1.2)
    queue.heartbeat("alive", MODEL)
    assert queue.requeue_dead_workers() == 5
    assert not any(redis_client.llen(k) for k in queue.keys.lanes("dead"))
    assert sorted(queue.claim("alive", 10).messages) == [f"m{i}".encode() for i in range(6)]


def test_a_lane_handed_back_alone_leaves_the_others_in_hand(make_queue, redis_client):
    queue = make_queue()
    for i in range(4):
        queue.enqueue(f"m{i}".encode())
    queue.claim("w1", 2, lane=0)
    queue.claim("w1", 2, lane=2)
    assert queue.requeue_own("w1", lane=2) == 2  # the lane whose call failed
    assert redis_client.llen(queue.keys.processing("w1", 0)) == 2 and redis_client.llen(queue.keys.queue) == 2
    assert queue.requeue_own("w1") == 2  # every lane
