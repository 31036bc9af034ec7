"""Redis Sentinel: the service on a real master, a replica and three sentinels on loopback, and the
master killed (kill -9) under steady load. The web (gunicorn) and the model worker (ResNet50, seeded
weights) find the master through the sentinels and follow the promotion without a restart; no request
waits past its deadline, none gets a 500 or another image's answer.
"""

import signal
import subprocess
import sys
import time

import pytest
import redis
import requests
from support import ROOT
from support.images import distinct_photos
from support.stacks import StackFactory
from support.traffic import Traffic, expected_top5, wait_for

import stack
from image_queue import connect

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MASTER = "queue-master"
RATE = 5.0  # requests/s, under this CPU's capacity
DEADLINE_SLACK_S = 1.5  # as in test_faults: a 2-core machine answers a little late


class SentinelSet:
    """A master, one replica and three sentinels of the test's own, each stopped by its pid."""

    def __init__(self, workdir, password: str = ""):
        self.workdir, self.password = workdir, password
        self.processes: list[subprocess.Popen] = []
        self.master_port, self.replica_port = stack.free_port(), stack.free_port()
        self.master = self._redis(self.master_port)
        self.replica = self._redis(self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
        self.sentinel_ports = [stack.free_port() for _ in range(3)]
        for port in self.sentinel_ports:
            conf = workdir / f"sentinel-{port}.conf"  # each its own: a sentinel rewrites its file
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                + (f"requirepass {password}\nsentinel sentinel-pass {password}\n" if password else "")
            )
            self._start(["redis-server", str(conf), "--sentinel"])
        wait_for(lambda: self._replica_in_sync() and self._sentinels_agree(), 30)

    def _start(self, argv) -> subprocess.Popen:
        self.processes.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        return self.processes[-1]

    def _redis(self, port: int, *extra: str) -> subprocess.Popen:
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = self._start([*argv, "--dir", str(self.workdir), *extra])
        wait_for(lambda: _answers(port), 10)
        return process

    def _replica_in_sync(self) -> bool:
        info = redis.Redis(host="127.0.0.1", port=self.replica_port, socket_timeout=2).info("replication")
        return info.get("master_link_status") == "up"

    def _sentinels_agree(self) -> bool:
        """Every sentinel knows the replica and its two peers, so a kill can be failed over."""
        for port in self.sentinel_ports:
            sentinel = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, password=self.password or None)
            state = sentinel.sentinel_master(MASTER)
            if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                return False
        return True

    def master_address(self) -> tuple[str, int]:
        host, port = redis.Redis(
            host="127.0.0.1", port=self.sentinel_ports[0], socket_timeout=2
        ).sentinel_get_master_addr_by_name(MASTER)
        return host, int(port)

    @property
    def sentinels_setting(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                process.wait(10)


def _answers(port: int) -> bool:
    try:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping()
    except redis.RedisError:
        return False


@pytest.fixture
def sentinels_with_a_password(tmp_path):
    workdir = tmp_path / "sentinel"
    workdir.mkdir()
    s = SentinelSet(workdir, password="sentinels-own-pass")
    yield s
    s.stop()


@pytest.fixture
def sentinels(tmp_path):
    workdir = tmp_path / "sentinel"
    workdir.mkdir()
    s = SentinelSet(workdir)
    yield s
    s.stop()


def test_the_client_finds_the_master_through_the_sentinels_with_the_urls_password_and_db(sentinels):
    addresses = tuple(("127.0.0.1", port) for port in sentinels.sentinel_ports)
    client = connect("redis://:unused@ignored-host:1/3", 0.5, sentinels=addresses[:1])
    assert client.connection_pool.connection_kwargs["db"] == 3  # the host and port of the URL are ignored
    plain = connect("redis://ignored-host:1/0", 0.5, sentinels=addresses, sentinel_master=MASTER)
    plain.set("k", "v")
    assert redis.Redis(host="127.0.0.1", port=sentinels.master_port).get("k") == b"v"


def test_sentinels_with_their_own_password_are_reached_with_it_and_a_wrong_one_is_a_setting_to_fix(
    sentinels_with_a_password,
):
    """Sentinels with requirepass: REDIS_SENTINEL_PASSWORD reaches them. Without it, redis-py says only that
    it found no master, which read as an outage: the worker retried for ever instead of exiting 2."""
    from image_queue import ImageQueue, client_from_config, redis_trouble, unavailable
    from run_model_server import credentials_accepted

    config = {
        "REDIS_URL": "redis://ignored-host:1/0",
        "REDIS_BLOCK_S": 0.5,
        "REDIS_SENTINELS": [("127.0.0.1", port) for port in sentinels_with_a_password.sentinel_ports],
        "REDIS_SENTINEL_MASTER": MASTER,
    }
    served = client_from_config(config | {"REDIS_SENTINEL_PASSWORD": "sentinels-own-pass"})
    served.set("k", "v")
    assert redis.Redis(host="127.0.0.1", port=sentinels_with_a_password.master_port).get("k") == b"v"
    for wrong in ("", "not-the-pass"):
        client = client_from_config(config | {"REDIS_SENTINEL_PASSWORD": wrong})
        with pytest.raises(redis.ConnectionError) as refused:
            client.ping()
        assert redis_trouble(refused.value) == "configuration"
        assert "REDIS_SENTINEL_PASSWORD" in str(unavailable(refused.value))
        assert not credentials_accepted(ImageQueue(client, "q"))  # the worker exits 2 before loading the model


def test_a_planned_failover_moves_pooled_connections_to_the_new_master_at_once(sentinels):
    """SENTINEL FAILOVER (maintenance) leaves the old master up and writable until the sentinels demote it,
    seconds later: a connection pooled before went on writing there, and the demotion threw that away. The
    client asks the sentinels every SENTINEL_CHECK_S (0.5 s), so its next write goes to the new master."""
    from image_queue import SENTINEL_CHECK_S

    addresses = tuple(("127.0.0.1", port) for port in sentinels.sentinel_ports)
    client = connect("redis://ignored-host:1/0", 0.5, sentinels=addresses, sentinel_master=MASTER)
    client.set("before", 1)  # a connection to the old master, back in the pool
    redis.Redis(host="127.0.0.1", port=sentinels.sentinel_ports[0]).execute_command("SENTINEL", "FAILOVER", MASTER)
    wait_for(lambda: sentinels.master_address()[1] == sentinels.replica_port, 30)
    time.sleep(2 * SENTINEL_CHECK_S + 0.2)
    old = redis.Redis(host="127.0.0.1", port=sentinels.master_port)
    still_writable = old.info("replication")["role"] == "master"  # the window this is about (not yet demoted)
    client.set("after", 1)
    assert redis.Redis(host="127.0.0.1", port=sentinels.replica_port).get("after") == b"1"
    print(f"\nplanned failover: the write went to the new master (old master still a master: {still_writable})")


def test_master_killed_under_load_the_service_follows_the_promotion_without_a_restart(
    sentinels, resnet, resnet_weights, tmp_path
):
    images = distinct_photos(8)
    expected = expected_top5(resnet, images)
    factory = StackFactory("redis://ignored:1/0", resnet_weights, tmp_path)
    try:
        s = factory(REDIS_SENTINELS=sentinels.sentinels_setting, REDIS_SENTINEL_MASTER=MASTER, BATCH_SIZE=8)
        s.start_worker()
        s.start_web()
        s.wait_ready()
        timeout = float(s.env.get("REQUEST_TIMEOUT_S", 10))  # the shipped default
        with Traffic(s.url, images, expected, rate=RATE) as traffic:
            traffic.wait_for_answers(30, 60)
            killed_at = time.monotonic()
            sentinels.master.send_signal(signal.SIGKILL)
            sentinels.master.wait()
            wait_for(lambda: sentinels.master_address()[1] == sentinels.replica_port, 30)
            promoted_at = time.monotonic()
            traffic.wait_for_answers(30, 60)  # served again by the same processes, now on the new master
            # the operators' tools follow the master too: /metrics reads the queue, admin.py shows it
            assert requests.get(s.url + "metrics", timeout=10).status_code == 200
            shown = subprocess.run(
                [sys.executable, "admin.py", "status"], cwd=ROOT, env=s.env | {"PATH": "/usr/bin:/bin"},
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert shown.returncode == 0 and "workers alive: 1" in shown.stdout, shown
        books = traffic.books(s.worker_logs())
        after_kill = [r for r in traffic.replies if r.sent >= killed_at]
        first_ok_after = min(r.sent + r.latency for r in after_kill if r.status == 200 and r.sent >= promoted_at)
        failed = [r for r in traffic.replies if r.status != 200]
        print(
            f"\n{books.line('sentinel failover')}; promoted {promoted_at - killed_at:.1f} s after the kill, "
            f"200s again {first_ok_after - killed_at:.1f} s after it; {len(failed)} not 200"
        )
        assert all(service.alive() for service in [s.web, *s.workers])  # nothing restarted
        assert books.lost == 0 and books.wrong == [], books
        assert set(books.by_status) <= {200, 503, 504}, books.by_status  # never a 500
        assert books.slowest_s <= timeout + DEADLINE_SLACK_S, books.slowest_s
        assert first_ok_after - killed_at < 30
        for reply in failed:
            if reply.status == 503:
                assert reply.retry_after, reply
    finally:
        factory.stop_all()
