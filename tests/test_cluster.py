"""Redis Cluster (REDIS_CLUSTER=1): the service on a real 3-master cluster on loopback, through redis-py's
cluster client, with REDIS_URL naming any one node. One queue's keys share one hash tag, so they live in
one slot on one master; QUEUE_SHARDS spreads one queue over several masters.

The fast tests run the web app in the test's process (Flask's test client, with the rate limit on, counted
in the cluster) and the real worker loop in a thread, with the stand-in model; the slow one kills a master
that has a replica under load, with gunicorn and the ResNet50 worker as processes.
"""

import itertools
import os
import random
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from urllib.parse import quote

import pytest
import redis
import requests
from redis.cluster import RedisCluster
from support.images import distinct_photos
from support.stacks import StackFactory
from support.stand_in import TEST_MODEL, StandInClassifier, post_concurrently, post_image
from support.traffic import Traffic, expected_top5, replicas_streaming, wait_for

from image_queue import Keys, model_queue_name, queue_from_config, shard_names
from run_model_server import Heartbeat, ModelWorker

pytestmark = pytest.mark.timeout(120)

RATE = 5.0  # requests/s, under this CPU's capacity (as in test_sentinel)
DEADLINE_SLACK_S = 1.5  # as in test_faults: a 2-core machine answers a little late


class Cluster:
    """A Redis Cluster of the test's own on loopback: masters (and replicas) joined by redis-cli --cluster
    create, each node stopped by its pid. A node is written off after 1 s of silence, so a dead master's
    replica is promoted within a few seconds."""

    def __init__(self, workdir, masters: int = 3, replicas: int = 0, full_coverage: bool = True, password: str = ""):
        self.ports = [cluster_port() for _ in range(masters * (1 + replicas))]
        self.password = password
        self.workdir, self.full_coverage = workdir, full_coverage
        self.processes: dict[int, subprocess.Popen] = {}
        for port in self.ports:
            self._start(port)
        for port in self.ports:
            wait_for(lambda port=port: _answers(port, password), 10)
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        auth = {"REDISCLI_AUTH": password} if password else {}  # empty, redis-cli would send AUTH ""
        subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=30, env=os.environ | auth,
        )  # fmt: skip
        wait_for(lambda: self.ok(self.ports[0]) and self._replicas_in_sync(replicas), 30)
        if replicas:
            self._replicas_streaming(replicas)

    def _start(self, port: int) -> None:
        node_dir = self.workdir / str(port)
        node_dir.mkdir()
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(node_dir), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        argv += ["--cluster-node-timeout", "1000"]
        # no: the masters that are up serve their slots while one fails over (what a sharded queue wants)
        argv += ["--cluster-require-full-coverage", "yes" if self.full_coverage else "no"]
        argv += ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
        self.processes[port] = subprocess.Popen(argv, stdout=subprocess.DEVNULL)

    def add_master(self) -> int:
        """A scale-out's first step: a new, empty master joins the cluster (CLUSTER MEET), holding no slot yet.
        Returns its port once every node knows it."""
        port = cluster_port()
        self._start(port)
        wait_for(lambda: _answers(port, self.password), 10)
        self.node(self.ports[0]).execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        new_id = self.node(port).execute_command("CLUSTER", "MYID")
        self.ports.append(port)
        wait_for(lambda: all(new_id in self.node(p).execute_command("CLUSTER", "NODES") for p in self.ports), 10)
        wait_for(lambda: self.ok(port), 10)  # it has learnt which master serves each slot
        return port

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=self.password or None)

    def ok(self, port: int) -> bool:
        return b"cluster_state:ok" in self.node(port).execute_command("CLUSTER", "INFO")

    def _replicas_in_sync(self, replicas: int) -> bool:
        up = sum(self.node(p).info("replication").get("master_link_status") == "up" for p in self.ports)
        return up == len(self.ports) - len(self.ports) // (1 + replicas)

    def _replicas_streaming(self, replicas: int) -> None:
        """A write on each master, acknowledged by its replicas."""
        masters = {port for port in self.ports if self.node(port).info("replication")["role"] == "master"}
        keys = (f"synced{n}" for n in itertools.count())
        while masters:
            key = next(keys)
            port = self.master_of(key)
            if port in masters:
                replicas_streaming(self.node(port), key, replicas)
                masters.discard(port)

    def master_of(self, key: str, via: int | None = None) -> int:
        """The port of the master that holds key's slot now, as a node asked afresh sees it."""
        cluster = RedisCluster(host="127.0.0.1", port=via or self.ports[0], password=self.password or None)
        return cluster.get_node_from_key(key).port

    def migrate(self, slot: int, source: int, target: int) -> None:
        """Start moving a slot between two masters as a resharding does (IMPORTING, MIGRATING, MIGRATE of its
        keys): the source now answers ASK for those keys, pointing at the target."""
        ids = {port: self.node(port).execute_command("CLUSTER", "MYID") for port in (source, target)}
        self.node(target).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        self.node(source).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        keys = self.node(source).execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        if keys:
            self.node(source).execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)

    def finish_migration(self, slot: int, target: int) -> None:
        """End a migration: every master assigns the slot to the target, so the source answers MOVED."""
        target_id = self.node(target).execute_command("CLUSTER", "MYID")
        for port in self.ports:
            self.node(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
                process.wait(10)


@pytest.fixture
def cluster(tmp_path):
    """Three masters, no replicas."""
    c = Cluster(tmp_path)
    yield c
    c.stop()


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a port too, and free."""
    while True:
        port = random.randrange(20000, 30000)
        try:
            for candidate in (port, port + 10000):
                socket.create_server(("127.0.0.1", candidate)).close()
        except OSError:
            continue
        return port


def _answers(port: int, password: str = "") -> bool:
    try:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, password=password or None).ping()
    except redis.RedisError:
        return False


def cluster_config(url: str, image_queue: str, **more) -> dict:
    """Settings for the fast tests' service on a cluster: short timeouts, the queue named image_queue."""
    config = {"REDIS_URL": url, "REDIS_CLUSTER": True, "IMAGE_QUEUE": image_queue, "REDIS_BLOCK_S": 0.2}
    return config | {"REQUEST_TIMEOUT_S": 3, "WORKER_TTL_S": 2.0, "QUEUE_MAX": 64, "RESULT_TTL_S": 30} | more


@contextmanager
def worker_thread(config: dict):
    """The real worker loop with the stand-in model serving config's queue, in a thread; stopped after."""
    worker = ModelWorker(queue_from_config(config, 0.5, TEST_MODEL), StandInClassifier(), batch_size=8, max_wait_s=0,
                         heartbeat_s=0.2)  # fmt: skip
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.request_stop()
        thread.join(10)
    assert not thread.is_alive()


def test_the_service_runs_on_a_cluster_through_any_node_with_the_rate_limit_counted_there(cluster):
    from run_web_server import create_app

    # REDIS_URL names the node that does NOT hold the queue's slot: the client must find the right master
    probe = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    name = model_queue_name("cq", TEST_MODEL)  # the model's queue: {cq.standin}; registry, rate limit: {cq}
    slot_owner = probe.get_node_from_key(Keys(name).queue).port
    service_owner = probe.get_node_from_key(Keys("cq").models).port
    entry = next(port for port in cluster.ports if port != slot_owner)
    config = cluster_config(f"redis://127.0.0.1:{entry}/0", "cq")
    with worker_thread(config):
        client = create_app(config | {"RATE_LIMIT": "12/minute"}).test_client()
        wait_for(lambda: post_image(client).status_code == 200, 10)
        statuses = [post_image(client).status_code for _ in range(14)]
        assert statuses.count(200) >= 10 and statuses[-1] == 429, statuses  # served, then limited
        # the queue's keys live on the master of their slot, and only there; so do the service's own
        owner = redis.Redis(host="127.0.0.1", port=slot_owner)
        assert owner.exists(Keys(name).workers) and owner.exists(Keys(name).stats)
        service = redis.Redis(host="127.0.0.1", port=service_owner)
        assert service.exists(Keys("cq").models)
        assert any(b"ratelimit" in key for key in service.scan_iter(match="{cq}:*"))
        for port in cluster.ports:
            node = redis.Redis(host="127.0.0.1", port=port)
            if port != slot_owner:
                assert list(node.scan_iter(match=f"{{{name}}}:*")) == []
            if port != service_owner:
                assert list(node.scan_iter(match="{cq}:*")) == []


def test_three_shards_spread_one_queue_over_the_three_masters_and_every_request_is_served(cluster):
    from run_web_server import create_app

    names = shard_names(model_queue_name("sq", TEST_MODEL), 3)
    owners = [cluster.master_of(Keys(name).queue) for name in names]
    assert sorted(owners) == sorted(cluster.ports)  # one shard on each master
    config = cluster_config(f"redis://127.0.0.1:{cluster.ports[0]}/0", "sq", QUEUE_SHARDS=3)
    with worker_thread(config) as worker:
        client = create_app(config).test_client()
        wait_for(lambda: post_image(client).status_code == 200, 10)
        assert [r.status_code for r in post_concurrently(client, 12)] == [200] * 12
        for name, owner in zip(names, owners, strict=True):  # each shard's keys on its master, and only there
            node = redis.Redis(host="127.0.0.1", port=owner)
            assert node.exists(Keys(name).workers)
            for other in set(cluster.ports) - {owner}:
                assert list(redis.Redis(host="127.0.0.1", port=other).scan_iter(match=f"{{{name}}}:*")) == []
        stats = worker.queue.stats()
        assert sum(n * count for n, count in stats.batch_sizes.items()) == 13 and stats.in_progress == 0
        assert set(stats.shards) == set(names) and stats.live_workers == 1


def test_the_rate_limit_reaches_a_cluster_with_the_password_as_the_queue_does(tmp_path):
    """REDIS_URL's password is percent-encoded ("@" and "/" in it): redis-py decodes it for the queue's client,
    and the rate limiter's cluster client must get the same decoded password (it failed to authenticate, and the
    web to start, when limits was given the URL's netloc as written)."""
    from run_web_server import create_app

    password = "p@ss/w rd"
    c = Cluster(tmp_path, password=password)
    try:
        config = cluster_config(f"redis://:{quote(password, safe='')}@127.0.0.1:{c.ports[0]}/0", "pq")
        with worker_thread(config):
            client = create_app(config | {"RATE_LIMIT": "3/minute"}).test_client()
            wait_for(lambda: post_image(client).status_code == 200, 10)
            statuses = [post_image(client).status_code for _ in range(3)]
            assert statuses[-1] == 429, statuses
            owner = c.node(c.master_of(Keys("pq").models))
            assert any(b"ratelimit" in key for key in owner.scan_iter(match="{pq}:*"))  # counted in the cluster
    finally:
        c.stop()


def test_wait_replicas_on_a_cluster_waits_on_the_queues_own_master(tmp_path, caplog):
    """REDIS_WAIT_REPLICAS=1 on a cluster: WAIT must go to the master that holds the queue (the cluster client
    sends a keyless command to its default node, whose WAIT would count that node's writes: none). With the
    queue master's replica stopped, the enqueue waits REDIS_BLOCK_S and says the replica lacks the message."""
    from image_queue import ImageQueue, connect

    c = Cluster(tmp_path, masters=3, replicas=1)
    try:
        url = f"redis://127.0.0.1:{c.ports[0]}/0"
        client = connect(url, 0.5, cluster=True)
        default = client.get_default_node().port
        name = next(f"wq{i}" for i in range(100) if c.master_of(Keys(f"wq{i}").queue) != default)
        queue = ImageQueue(client, name, block_s=0.5, wait_replicas=1)
        started = time.monotonic()
        queue.enqueue(b"first")
        assert time.monotonic() - started < 0.4 and "replicas had" not in caplog.text  # its replica has it
        master = redis.Redis(host="127.0.0.1", port=c.master_of(Keys(name).queue))
        replica_port = int(master.info("replication")["slave0"]["port"])
        c.processes[replica_port].send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            queue.enqueue(b"second")
            assert time.monotonic() - started >= 0.45
        finally:
            c.processes[replica_port].send_signal(signal.SIGCONT)
        assert "only 0 of 1 replicas had the message" in caplog.text
        assert master.llen(Keys(name).queue) == 2
    finally:
        c.stop()


def test_a_hung_shard_master_stalls_the_workers_claims_once_then_is_probed_on_its_own_node(tmp_path):
    """QUEUE_SHARDS=3 on a cluster, one shard's master SIGSTOPped: the worker's first take there times out, then
    it serves the other shards while that shard is probed by a PING sent to its own master. Every shard shares
    one cluster client, whose plain PING goes to its default node: that one answered for the hung master, and
    each retry stalled every shard's claims for a socket timeout (1.5 s)."""
    c = Cluster(tmp_path, full_coverage=False)
    try:
        config = cluster_config(f"redis://127.0.0.1:{c.ports[0]}/0", "hq", QUEUE_SHARDS=3, REDIS_BLOCK_S=0.5)
        web = queue_from_config(config, 0.5, TEST_MODEL)
        masters = [c.master_of(shard.keys.queue) for shard in web.shards]
        default = web.redis.get_default_node().port
        hung = next(s for s in range(3) if masters[s] not in (default, c.ports[0]))  # not the node asked for slots
        with worker_thread(config) as worker:
            wait_for(lambda: all(shard.status().live_workers for shard in web.shards), 10)
            c.processes[masters[hung]].send_signal(signal.SIGSTOP)
            try:
                wait_for(lambda: hung in worker.queue._down, 10)  # its first take timed out (1 s)
                slowest, until, n = 0.0, time.monotonic() + 6.0, 0  # past several backoffs (2 s at most)
                while time.monotonic() < until:
                    shard = web.shards[[s for s in range(3) if s != hung][n % 2]]
                    started = time.monotonic()
                    shard.enqueue(_stand_in_message(f"{n:032x}"))
                    assert shard.wait_for(f"{n:032x}", started + 5) is not None
                    slowest, n = max(slowest, time.monotonic() - started), n + 1
                down = list(worker.queue._down)
            finally:
                c.processes[masters[hung]].send_signal(signal.SIGCONT)
        # Pinging the default node instead, the first request was not answered within 5 s. (1,800+ in 6 s here.)
        assert n > 300 and slowest < 0.9, (n, slowest)
        assert down == [hung]  # the other shards' calls did not fail with it
    finally:
        c.stop()


def test_a_hung_registry_master_holds_back_neither_the_heartbeat_nor_the_requeue(tmp_path, caplog):
    """The model registry ({IMAGE_QUEUE}:models) and the queue ({IMAGE_QUEUE.MODEL}) are in two slots, here on
    two masters. With the registry's master SIGSTOPped, a worker's beat still says it is alive and requeues a
    dead peer's batch on the queue's master, without waiting on the registry (its own thread registers the
    model), and the registry's failure is logged. Raised after the heartbeat, it skipped the requeue, cost the
    heartbeat thread a socket timeout each round, and with QUEUE_SHARDS put the healthy shard 0 down. The
    requeue's script, never run on that master yet, is loaded there alone (EVAL): redis-py's SCRIPT LOAD went
    to every master, the hung one too."""
    from image_queue import ModelInfo

    c = Cluster(tmp_path, full_coverage=False)
    try:
        url = f"redis://127.0.0.1:{c.ports[0]}/0"
        default = connect_cluster(url).get_default_node().port

        def registry_apart(name: str) -> bool:
            registry = c.master_of(Keys(name).models)
            return registry not in (c.ports[0], default, c.master_of(Keys(model_queue_name(name, TEST_MODEL)).queue))

        name = next(f"rq{i}" for i in range(200) if registry_apart(f"rq{i}"))
        config = cluster_config(url, name, WORKER_TTL_S=1.0)
        queue, dead = queue_from_config(config, 0.5, TEST_MODEL), queue_from_config(config, 0.5, TEST_MODEL)
        model = ModelInfo("StandIn", 4, 4)
        dead.heartbeat("dead", model)
        queue.enqueue(_stand_in_message("a" * 32))
        assert len(dead.claim("dead", 8).messages) == 1  # ... and the worker dies holding it
        registry_master = c.processes[c.master_of(Keys(name).models)]
        registry_master.send_signal(signal.SIGSTOP)
        try:
            time.sleep(1.2)  # WORKER_TTL_S
            started = time.monotonic()
            Heartbeat(queue, "w", model, every_s=0.5).beat()  # the worker loop's, after an outage
            assert queue.status().queue_depth == 1  # the dead worker's message is back on the queue
            assert "w" in queue.stats().heartbeats
            assert time.monotonic() - started < 5
            started = time.monotonic()
            queue.beat("w", model)  # a heartbeat thread's round: the registry has a thread of its own
            assert time.monotonic() - started < 0.5
        finally:
            registry_master.send_signal(signal.SIGCONT)
        assert "could not register the model" in caplog.text
    finally:
        c.stop()


def connect_cluster(url: str) -> RedisCluster:
    from image_queue import connect

    return connect(url, 0.5, cluster=True)


def _stand_in_message(request_id: str) -> bytes:
    import numpy as np

    from image_queue import encode_message

    return encode_message(request_id, 1e10, 1, np.zeros((4, 4, 3), np.uint8))


@pytest.mark.parametrize("wait_replicas", [0, 1])
def test_a_push_follows_the_queues_slot_while_it_is_migrated_and_after(cluster, wait_replicas, caplog):
    """Resharding moves the queue's slot to another master: while its keys are migrated the old master answers
    ASK and the new one TRYAGAIN (the admission reads keys that exist nowhere, as the pause flag), and after,
    MOVED. The web's push follows all three (nothing runs of a refused MULTI, so it is sent again), with and
    without REDIS_WAIT_REPLICAS: each request is queued, none refused with a 503."""
    from redis.crc import key_slot

    from image_queue import ImageQueue, connect

    queue = ImageQueue(connect(f"redis://127.0.0.1:{cluster.ports[0]}/0", 0.5, cluster=True), "mq", block_s=0.5,
                       wait_replicas=wait_replicas)  # fmt: skip
    queue.enqueue(b"one")  # the client has learnt the slot's master
    key = Keys("mq").queue
    source = cluster.master_of(key)
    target = next(port for port in cluster.ports if port != source)
    cluster.migrate(key_slot(key.encode()), source, target)
    finish = threading.Timer(0.2, cluster.finish_migration, args=(key_slot(key.encode()), target))
    finish.start()
    started = time.monotonic()
    queue.enqueue(b"two")  # ASK, then TRYAGAIN until the migration ends, then MOVED
    finish.join()
    assert time.monotonic() - started >= 0.15
    queue.enqueue(b"three")  # the client knows the new master
    assert cluster.master_of(key) == target
    assert cluster.node(target).lrange(key, 0, -1) == [b"three", b"two", b"one"]
    assert queue.status().queue_depth == 3


def test_a_scale_out_moves_the_queues_slot_to_a_master_the_client_has_never_met(cluster):
    """Scaling a cluster out: a new master joins and the queue's slot is resharded onto it. Clients made before
    it joined first hear of it in an ASK (a slot table lists only masters that hold a slot, so refreshing it
    would not help): a web thread's wait for its answer (redis-py's own ASK handling, which failed with an
    AttributeError, a 500) and the push (refused with a 503) follow it there; nothing is refused or lost."""
    from redis.crc import key_slot

    from image_queue import ImageQueue, connect

    def queue() -> ImageQueue:
        return ImageQueue(connect(f"redis://127.0.0.1:{cluster.ports[0]}/0", 0.5, cluster=True), "sq", block_s=0.5)

    reader, pusher = queue(), queue()
    reader.enqueue(b"one")  # both clients have learnt the slot's master
    pusher.status()
    key, slot = Keys("sq").queue, key_slot(Keys("sq").queue.encode())
    source = cluster.master_of(key)
    cluster.node(source).lpush(Keys("sq").result("r1"), b"answer")  # a worker answered request r1
    new = cluster.add_master()
    assert reader.redis.nodes_manager.get_node(host="127.0.0.1", port=new) is None
    cluster.migrate(slot, source, new)  # the queue and the answer are on the new master now
    assert reader.wait_for("r1", time.monotonic() + 2) == b"answer"  # ASK, then the read there
    assert pusher.redis.nodes_manager.get_node(host="127.0.0.1", port=new) is None
    finish = threading.Timer(0.2, cluster.finish_migration, args=(slot, new))
    finish.start()
    pusher.enqueue(b"two")  # ASK, TRYAGAIN until the migration ends (a multi-key script), then MOVED
    finish.join()
    pusher.enqueue(b"three")
    assert cluster.master_of(key) == new
    assert cluster.node(new).lrange(key, 0, -1) == [b"three", b"two", b"one"]
    assert reader.status().queue_depth == pusher.status().queue_depth == 3


def test_the_whole_cluster_down_for_a_moment_ends_neither_the_worker_nor_its_heartbeat(tmp_path, caplog):
    """With no node reachable, redis-py's cluster client cannot read the slots and raises its own
    RedisClusterException, which is not a RedisError: the worker caught only RedisErrors, so it exited ("the
    feeder failed; stopping") or a heartbeat thread died silently, leaving a worker that served but looked dead
    to its peers. Both now back off as in any Redis outage, and serve again once the cluster is back."""
    from run_web_server import create_app

    port, node_dir = cluster_port(), tmp_path / "node"
    node_dir.mkdir()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(node_dir), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]  # fmt: skip
    node = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: _answers(port), 10)
        redis.Redis(port=port).execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)  # a cluster of one master
        wait_for(lambda: b"cluster_state:ok" in redis.Redis(port=port).execute_command("CLUSTER", "INFO"), 10)
        config = cluster_config(f"redis://127.0.0.1:{port}/0", "dq")
        with worker_thread(config) as worker:
            client = create_app(config).test_client()
            wait_for(lambda: post_image(client).status_code == 200, 10)
            node.terminate()
            node.wait(10)
            wait_for(lambda: "RedisClusterException" in caplog.text or "cannot be connected" in caplog.text, 10)
            time.sleep(0.5)  # a few more rounds of every thread against the cluster client's own error
            node = subprocess.Popen(argv, stdout=subprocess.DEVNULL)  # its nodes.conf keeps the slots
            wait_for(lambda: post_image(client).status_code == 200, 20)
            assert all(thread.is_alive() for thread in worker._heartbeat._threads)
            assert "; stopping" not in caplog.text
    finally:
        if node.poll() is None:
            node.terminate()
            node.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_master_killed_under_load_its_replica_takes_over_and_the_other_shards_serve_on(
    tmp_path, resnet, resnet_weights
):
    """Three masters with a replica each, QUEUE_SHARDS=3, the web in gunicorn and the ResNet50 worker:
    kill -9 the master of one shard under steady load. The other two shards serve throughout, the web
    passes over the dead one, the replica is promoted, and the same processes serve all three again;
    no request waits past its deadline, none gets a 500 or another image's answer."""
    workdir = tmp_path / "cluster"
    workdir.mkdir()
    c = Cluster(workdir, masters=3, replicas=1, full_coverage=False)
    images = distinct_photos(8)
    expected = expected_top5(resnet, images)
    factory = StackFactory(f"redis://127.0.0.1:{c.ports[0]}/0", resnet_weights, tmp_path)
    try:
        s = factory(REDIS_CLUSTER=1, QUEUE_SHARDS=3, BATCH_SIZE=8)
        names = shard_names(s.queue_name(), 3)
        victim = c.master_of(Keys(names[1]).queue)
        survivor = c.master_of(Keys(names[0]).queue)  # another master: one shard on each
        s.start_worker()
        s.start_web()
        s.wait_ready()
        timeout = float(s.env.get("REQUEST_TIMEOUT_S", 10))  # the shipped default
        with Traffic(s.url, images, expected, rate=RATE) as traffic:
            traffic.wait_for_answers(30, 60)
            killed_at = time.monotonic()
            c.processes[victim].send_signal(signal.SIGKILL)
            c.processes[victim].wait()
            wait_for(lambda: _promoted(c, Keys(names[1]).queue, victim, survivor), 30)
            promoted_at = time.monotonic()
            traffic.wait_for_answers(30, 60)  # served again by the same processes, all three shards
            assert requests.get(s.url + "metrics", timeout=10).status_code == 200
        books = traffic.books(s.worker_logs())
        during = [r for r in traffic.replies if killed_at <= r.sent < promoted_at]
        after = [r for r in traffic.replies if r.sent >= promoted_at]
        failed = [r for r in traffic.replies if r.status != 200]
        print(
            f"\n{books.line('cluster failover, 3 shards')}; replica promoted {promoted_at - killed_at:.1f} s after "
            f"the kill; sent in between: {len(during)}, {sum(r.status == 200 for r in during)} x 200; "
            f"after: {len(after)}, {sum(r.status == 200 for r in after)} x 200; {len(failed)} not 200 in all"
        )
        for r in failed:
            print(f"  {r.status} at {r.sent - killed_at:+.2f} s: {r.body.get('error')}")
        assert all(service.alive() for service in [s.web, *s.workers])  # nothing restarted
        assert books.lost == 0 and books.wrong == [], books
        assert set(books.by_status) <= {200, 503, 504}, books.by_status  # never a 500
        assert books.slowest_s <= timeout + DEADLINE_SLACK_S, books.slowest_s
        assert during and sum(r.status == 200 for r in during) >= len(during) / 2  # the other shards served on
        assert after[-10:] and all(r.status == 200 for r in after[-10:])
        for reply in failed:
            if reply.status == 503:
                assert reply.retry_after, reply
    finally:
        factory.stop_all()
        c.stop()


def _promoted(c: Cluster, key: str, dead: int, via: int) -> bool:
    try:
        return c.ok(via) and c.master_of(key, via) != dead
    except redis.RedisError:
        return False
