"""Every Redis reply classified, against real redis-server processes in the states that send them.

Transient (BUSY, LOADING, MISCONF, UNBLOCKED, READONLY, ...): the worker backs off and keeps going, the web
answers 503 + Retry-After, never 500, and both serve again by themselves. Configuration (NOPERM): the worker
exits 2 with one line; the web answers 503 and logs it once. The web app runs in the test's process (Flask's
test client) and the real worker loop in a thread, with the stand-in model.
"""

import logging
import shutil
import subprocess
import threading
import time

import pytest
import redis
from support.stand_in import StandInClassifier, post_image, served_queue
from support.traffic import wait_for

import image_queue
import stack
from image_queue import connect, redis_trouble
from run_model_server import ModelWorker

pytestmark = pytest.mark.timeout(120)


class RedisServer:
    """A redis-server of the test's own on a free port, started and stopped by pid."""

    def __init__(self, workdir, *extra: str):
        self.port, self.workdir, self.extra = stack.free_port(), workdir, extra
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self, *more: str, wait: bool = True) -> "RedisServer":
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "no"]
        argv += ["--dir", str(self.workdir), *self.extra, *more]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        if wait:
            wait_for(lambda: self.answers(), 10)
        return self

    def answers(self) -> bool:
        try:
            return self.client().ping()
        except redis.RedisError:
            return False

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url, **({"socket_timeout": 5} | kwargs))

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def servers(tmp_path):
    started = []

    def make(name: str, *extra: str) -> RedisServer:
        workdir = tmp_path / name
        workdir.mkdir()
        started.append(RedisServer(workdir, *extra))
        return started[-1]

    yield make
    for server in started:
        server.stop()


class Service:
    """The web app and one real worker loop (stand-in model) on one Redis URL."""

    def __init__(self, url: str):
        from run_web_server import create_app

        self.queue = served_queue(connect(url, 0.2), "replies", block_s=0.2, worker_ttl_s=2.0)
        self.worker = ModelWorker(self.queue, StandInClassifier(), batch_size=8, max_wait_s=0, heartbeat_s=0.2)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        config = {"REDIS_URL": url, "IMAGE_QUEUE": "replies", "REDIS_BLOCK_S": 0.2, "REQUEST_TIMEOUT_S": 3}
        self.client = create_app(config | {"WORKER_TTL_S": 2.0, "QUEUE_MAX": 64}).test_client()

    def __enter__(self):
        self.thread.start()
        wait_for(lambda: self.post().status_code == 200, 10)
        return self

    def __exit__(self, *exc):
        self.worker.request_stop()
        self.thread.join(10)

    def post(self):
        return post_image(self.client)

    def statuses_while(self, busy: threading.Thread) -> list:
        """Post one request after another while busy runs; each 503 must say when to retry."""
        replies = []
        while busy.is_alive():
            response = self.post()
            replies.append(response.status_code)
            if response.status_code == 503:
                assert response.headers["Retry-After"] and response.json["success"] is False
            time.sleep(0.05)
        return replies

    def serves_again_within(self, seconds: float) -> float:
        back = time.monotonic()
        wait_for(lambda: self.post().status_code == 200, seconds)
        assert self.thread.is_alive()  # the worker rode it out
        return time.monotonic() - back


def test_reply_codes_are_classified_once_also_inside_a_pipelines_message():
    wrapped = redis.ResponseError("Command # 1 (LPUSH q m) of pipeline caused error: BUSY Redis is busy running")
    assert redis_trouble(wrapped) == "transient"
    for text in ("MISCONF Redis is configured to save", "UNBLOCKED force unblock", "NOREPLICAS Not enough"):
        assert redis_trouble(redis.ResponseError(text)) == "transient"
    assert redis_trouble(redis.exceptions.BusyLoadingError("Redis is loading")) == "transient"
    assert redis_trouble(redis.exceptions.ReadOnlyError("You can't write against a read only replica.")) == "transient"
    assert redis_trouble(redis.exceptions.ClusterDownError("The cluster is down")) == "transient"
    assert redis_trouble(redis.exceptions.TryAgainError("Multiple keys request")) == "transient"
    assert redis_trouble(redis.exceptions.OutOfMemoryError("command not allowed")) == "transient"
    assert redis_trouble(redis.ConnectionError("Connection refused")) == "transient"
    assert redis_trouble(redis.exceptions.NoPermissionError("this user has no permissions")) == "configuration"
    assert redis_trouble(redis.AuthenticationError("invalid username-password pair")) == "configuration"
    assert redis_trouble(redis.ResponseError("WRONGTYPE Operation against a key")) == "unexpected"
    assert redis_trouble(redis.ResponseError("ERR unknown command 'LMOVE'")) == "unexpected"


def test_the_cluster_clients_own_errors_are_classified_by_what_caused_them():
    """redis-py's cluster client raises RedisClusterException (not a RedisError) when no node lets it read the
    slots, from the last node's error: a node down is transient; a refused password or ACL is a setting to fix,
    and says which (the worker exits 2, the web names the setting), not an outage to wait out for ever."""
    from redis.exceptions import CrossSlotTransactionError, RedisClusterException, SlotNotCoveredError

    from image_queue import QueueMisconfigured, unavailable

    def wrapped(cause: Exception) -> RedisClusterException:  # as redis-py raises it: "raise ... from cause"
        exc = RedisClusterException("Redis Cluster cannot be connected. Please provide at least one reachable node")
        exc.__cause__ = cause
        return exc

    assert redis_trouble(wrapped(redis.ConnectionError("Connection refused"))) == "transient"
    assert redis_trouble(SlotNotCoveredError("Slot 12 not covered by the cluster")) == "transient"
    assert redis_trouble(wrapped(redis.AuthenticationError("invalid username-password pair"))) == "configuration"
    assert "check the password" in str(unavailable(wrapped(redis.AuthenticationError("invalid password"))))
    assert redis_trouble(wrapped(redis.exceptions.NoPermissionError("no permissions"))) == "configuration"
    not_a_cluster = RedisClusterException("Cluster mode is not enabled on this node")
    assert redis_trouble(not_a_cluster) == "configuration"
    assert isinstance(unavailable(not_a_cluster), QueueMisconfigured) and "REDIS_CLUSTER" in str(
        unavailable(not_a_cluster)
    )
    assert redis_trouble(CrossSlotTransactionError("keys in request don't hash to the same slot")) == "unexpected"


def test_busy_for_6_s_a_long_script_no_worker_exits_no_500_and_200s_again(servers, caplog):
    server = servers("busy", "--save", "", "--busy-reply-threshold", "100").start()
    script = (
        "local s = tonumber(redis.call('TIME')[1]) + tonumber(ARGV[1]) while tonumber(redis.call('TIME')[1]) < s do end"
    )
    with caplog.at_level(logging.INFO), Service(server.url) as service:
        busy = threading.Thread(target=lambda: server.client(socket_timeout=20).eval(script, 0, 6))
        busy.start()
        time.sleep(0.3)
        replies = service.statuses_while(busy)
        back_s = service.serves_again_within(10)
    print(f"\nBUSY for 6 s: {len(replies)} requests, {replies.count(503)} x 503, 200 again {back_s:.2f} s after")
    assert 503 in replies and set(replies) <= {200, 503, 504}  # never a 500
    assert "Redis unavailable (BUSY" in caplog.text  # the worker met it, backed off and went on


def test_loading_a_big_dataset_after_a_restart_503s_then_serves(servers, caplog):
    server = servers("loading", "--save", "").start()
    with server.client().pipeline(transaction=False) as pipe:
        for i in range(20_000):
            pipe.set(f"filler:{i}", "x" * 16)
        pipe.execute()
    server.client().save()  # dump.rdb: the next start loads it, 200 us per key (key-load-delay): ~4 s of LOADING
    with caplog.at_level(logging.INFO), Service(server.url) as service:
        server.stop()
        server.start("--key-load-delay", "200", "--loading-process-events-interval-bytes", "1024", wait=False)
        wait_for(lambda: "LOADING" in info_or_error(server), 10)
        loader = threading.Thread(target=lambda: wait_for(server.answers, 30))
        loader.start()
        replies = service.statuses_while(loader)
        back_s = service.serves_again_within(10)
    print(f"\nLOADING: {len(replies)} requests, {replies.count(503)} x 503, 200 again {back_s:.2f} s after")
    assert 503 in replies and set(replies) <= {200, 503, 504}
    assert "Redis unavailable" in caplog.text and "loading" in caplog.text.lower()


def info_or_error(server: RedisServer) -> str:
    try:
        return str(server.client().ping())
    except redis.RedisError as exc:
        return f"{type(exc).__name__} LOADING" if isinstance(exc, redis.exceptions.BusyLoadingError) else str(exc)


def test_misconf_a_snapshot_that_cannot_be_written_503s_until_the_disk_is_back(servers, tmp_path, caplog):
    server = servers("misconf", "--save", "3600 1", "--enable-protected-configs", "yes").start()
    client = server.client()
    with caplog.at_level(logging.INFO), Service(server.url) as service:
        shutil.rmtree(server.workdir)  # as a full or lost disk: the snapshot fails, and Redis refuses writes
        client.bgsave()
        wait_for(lambda: client.info("persistence")["rdb_last_bgsave_status"] == "err", 10)
        refused = [service.post() for _ in range(5)]
        time.sleep(1)
        assert service.thread.is_alive()
        fixed = tmp_path / "new-disk"
        fixed.mkdir()
        client.config_set("dir", str(fixed))
        client.bgsave()
        wait_for(lambda: client.info("persistence")["rdb_last_bgsave_status"] == "ok", 10)
        back_s = service.serves_again_within(10)
    assert [r.status_code for r in refused] == [503] * 5
    assert all("MISCONF" in r.json["error"] and r.headers["Retry-After"] for r in refused)
    assert "Redis unavailable" in caplog.text and "MISCONF" in caplog.text
    print(f"\nMISCONF: 5 x 503, 200 again {back_s:.2f} s after the disk was back")


def test_unblocked_a_master_demoted_under_blocked_clients_both_sides_ride_it_out(servers, caplog):
    master = servers("master", "--save", "").start()
    other = servers("other", "--save", "").start()
    with caplog.at_level(logging.INFO), Service(master.url) as service:
        waiting = {}
        web_wait = served_queue(connect(master.url, 0.2, image_queue.WEB_SOCKET_MARGIN_S), "replies", block_s=0.5)
        waiter = threading.Thread(target=lambda: waiting.update(raw=web_wait.wait_for("w1", time.monotonic() + 15)))
        waiter.start()  # a web request blocked on its result key, as the worker is blocked on the queue
        time.sleep(0.3)
        master.client().replicaof("127.0.0.1", other.port)  # demoted: blocked clients get UNBLOCKED
        time.sleep(1.5)
        demoted = service.post()
        master.client().replicaof("NO", "ONE")  # promoted again (an operator, or Sentinel)
        back_s = service.serves_again_within(10)
        master.client().rpush(web_wait.keys.result("w1"), b'{"predictions": []}')
        waiter.join(15)
    assert waiting["raw"] == b'{"predictions": []}'  # the waiting request got through the demotion
    assert demoted.status_code == 503 and demoted.headers["Retry-After"]  # read-only replica, or no worker
    assert "UNBLOCKED" in caplog.text  # both blocked clients met it and retried
    print(f"\nUNBLOCKED: 200 again {back_s:.2f} s after the promotion")


def test_readonly_a_redis_name_moved_to_the_promoted_replica_is_followed_by_web_and_worker(servers, caplog):
    """A managed Redis or a DNS failover keeps REDIS_URL's name and points it at the promoted replica; the
    demoted master keeps its clients' connections open and answers READONLY. Those connections must be
    dropped, so that the next one goes where the name points now (redis-py does so only for Sentinel's)."""
    from support.proxy import ReplyDroppingProxy

    old, new = servers("old", "--save", "").start(), servers("new", "--save", "").start()
    name = ReplyDroppingProxy(old.port)  # the name: new connections go to its target_port
    try:
        with caplog.at_level(logging.INFO), Service(f"redis://127.0.0.1:{name.port}/0") as service:
            name.target_port = new.port  # the failover: the name now points at the promoted replica ...
            old.client().replicaof("127.0.0.1", new.port)  # ... and the old master is demoted
            back_s = service.serves_again_within(10)
    finally:
        name.close()
    assert "READONLY" in caplog.text or "now a replica" in caplog.text
    print(f"\nREADONLY: 200 again {back_s:.2f} s after the name moved")


def test_noperm_the_worker_exits_2_in_one_line_and_the_web_logs_it_once(servers, caplog):
    server = servers("acl", "--save", "").start()
    server.client().acl_setuser(
        "limited", enabled=True, passwords=["+limited-pass"], keys=["*"], commands=["+@all", "-eval", "-evalsha"]
    )
    url = f"redis://limited:limited-pass@127.0.0.1:{server.port}/0"
    from run_web_server import create_app

    queue = served_queue(connect(url, 0.2), "acl", block_s=0.2, worker_ttl_s=2.0)
    worker = ModelWorker(queue, StandInClassifier(), batch_size=8, max_wait_s=0, heartbeat_s=0.2)
    with caplog.at_level(logging.INFO):
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive() and worker.exit_code == 2
        refusals = [line for line in caplog.text.splitlines() if "Redis refused it" in line]
        assert len(refusals) == 1 and ("NOPERM" in refusals[0] or "permissions" in refusals[0])

        caplog.clear()
        client = create_app({"REDIS_URL": url, "IMAGE_QUEUE": "acl", "REDIS_BLOCK_S": 0.2}).test_client()
        responses = [post_image(client) for _ in range(3)]
    assert [r.status_code for r in responses] == [503] * 3
    assert all("the ACL of REDIS_URL's user must allow it" in r.json["error"] for r in responses)
    assert caplog.text.count("logged once per web process") == 1
