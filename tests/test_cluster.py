"""Redis Cluster (REDIS_CLUSTER=1): the service on a real 3-master cluster on loopback, through redis-py's
cluster client, with REDIS_URL naming any one node. One queue's keys share one hash tag, so they live in
one slot on one master; spreading a queue over several masters (QUEUE_SHARDS) is not built yet.

The web app runs in the test's process (Flask's test client, with the rate limit on, counted in the
cluster) and the real worker loop in a thread, with the stand-in model.
"""

import random
import socket
import subprocess
import threading

import pytest
import redis
from redis.cluster import RedisCluster
from support.stand_in import StandInClassifier, post_image
from support.traffic import wait_for

from image_queue import Keys, queue_from_config
from run_model_server import ModelWorker

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path):
    """Three masters (no replicas) of the test's own, joined by redis-cli --cluster create; stopped by pid."""
    ports = [cluster_port() for _ in range(3)]
    processes = []
    for port in ports:
        workdir = tmp_path / str(port)
        workdir.mkdir()
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(workdir), "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
        processes.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))
    try:
        for port in ports:
            wait_for(lambda port=port: _answers(port), 10)
        nodes = [f"127.0.0.1:{port}" for port in ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        wait_for(
            lambda: (
                b"cluster_state:ok" in redis.Redis(host="127.0.0.1", port=ports[0]).execute_command("CLUSTER", "INFO")
            ),
            20,
        )
        yield ports
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


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


def _answers(port: int) -> bool:
    try:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping()
    except redis.RedisError:
        return False


def test_the_service_runs_on_a_cluster_through_any_node_with_the_rate_limit_counted_there(cluster):
    from run_web_server import create_app

    # REDIS_URL names the node that does NOT hold the queue's slot: the client must find the right master
    probe = RedisCluster(host="127.0.0.1", port=cluster[0])
    slot_owner = probe.get_node_from_key(Keys("cq").queue).port
    entry = next(port for port in cluster if port != slot_owner)
    url = f"redis://127.0.0.1:{entry}/0"
    config = {"REDIS_URL": url, "REDIS_CLUSTER": True, "IMAGE_QUEUE": "cq", "REDIS_BLOCK_S": 0.2}
    config |= {"REQUEST_TIMEOUT_S": 3, "WORKER_TTL_S": 2.0, "QUEUE_MAX": 64, "RESULT_TTL_S": 30}
    queue = queue_from_config(config, 0.5)
    worker = ModelWorker(queue, StandInClassifier(), batch_size=8, max_wait_s=0, heartbeat_s=0.2)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        client = create_app(config | {"RATE_LIMIT": "12/minute"}).test_client()
        wait_for(lambda: post_image(client).status_code == 200, 10)
        statuses = [post_image(client).status_code for _ in range(14)]
        assert statuses.count(200) >= 10 and statuses[-1] == 429, statuses  # served, then limited
        # the queue's keys live on the master of their slot, and only there
        owner = redis.Redis(host="127.0.0.1", port=slot_owner)
        assert owner.exists(Keys("cq").workers) and owner.exists(Keys("cq").stats)
        assert any(b"ratelimit" in key for key in owner.scan_iter(match="{cq}:*"))
        for port in cluster:
            if port != slot_owner:
                assert list(redis.Redis(host="127.0.0.1", port=port).scan_iter(match="{cq}:*")) == []
    finally:
        worker.request_stop()
        thread.join(10)
    assert not thread.is_alive()
