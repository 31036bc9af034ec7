"""Images/s through QUEUE_SHARDS=1 and 3 on a real 3-master Redis Cluster on loopback, with the stand-in
model (bench/stand_in.py), so the queue and not a model is what is measured.

    python -m bench.shards [--seconds 15] [--rounds 2] [--clients 48] [--workers 2]

Clients are processes making the web's calls (pick a shard, status, enqueue a 224 x 224 message, wait for
its answer); workers are processes running run_model_server's ModelWorker loop with the stand-in. Each
round runs 1 shard and 3 shards, alternating, on one cluster. Besides images/s it reports each master's
Redis CPU per 1000 images: with one shard, one master carries the queue; with three, each carries a third.
"""

import argparse
import multiprocessing
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stand_in import StandInModel  # noqa: E402
from image_queue import encode_message, queue_from_config  # noqa: E402


def config(port: int, shards: int, name: str) -> dict:
    return {
        "REDIS_URL": f"redis://127.0.0.1:{port}/0", "REDIS_CLUSTER": True, "IMAGE_QUEUE": name,
        "QUEUE_SHARDS": shards, "QUEUE_MAX": 256, "REDIS_BLOCK_S": 1.0, "RESULT_TTL_S": 60, "WORKER_TTL_S": 3.0,
    }  # fmt: skip


def client(settings: dict, threads: int, stop_at: float, counts) -> None:
    """threads closed loops of web calls; adds the answers it got to counts[0] and failures to counts[1]."""
    queue = queue_from_config(settings, 0.5)
    pixels = np.random.default_rng().integers(0, 256, (224, 224, 3), np.uint8)

    def loop():
        ok = failed = 0
        while time.monotonic() < stop_at:
            shard, request_id = queue.pick(), uuid.uuid4().hex
            try:
                status = shard.status()
                shard.enqueue(encode_message(request_id, status.server_time + 10, 5, pixels))
                ok += shard.wait_for(request_id, time.monotonic() + 10) is not None
            except Exception:
                failed += 1
                time.sleep(0.01)
        with counts.get_lock():
            counts[0] += ok
            counts[1] += failed

    running = [threading.Thread(target=loop) for _ in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()


def worker(settings: dict, batch_ms: float) -> None:
    import run_model_server

    queue = queue_from_config(settings)
    run_model_server.ModelWorker(
        queue, StandInModel(batch_ms), batch_size=32, max_wait_s=0, heartbeat_s=0.5
    ).run()  # until terminated


def start_cluster(workdir: str) -> tuple[list[int], list[subprocess.Popen]]:
    ports, processes = [], []
    while len(ports) < 3:
        port = random.randrange(20000, 30000)  # the cluster bus is port + 10000: both must be free
        try:
            for candidate in (port, port + 10000):
                socket.create_server(("127.0.0.1", candidate)).close()
        except OSError:
            continue
        if port in ports:
            continue
        ports.append(port)
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", workdir, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
        processes.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))
    time.sleep(0.5)
    nodes = [f"127.0.0.1:{port}" for port in ports]
    subprocess.run(["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                   check=True, capture_output=True, timeout=30)  # fmt: skip
    for _ in range(100):
        if b"cluster_state:ok" in redis.Redis(port=ports[0]).execute_command("CLUSTER", "INFO"):
            break
        time.sleep(0.1)
    return ports, processes


def redis_cpu(ports: list[int]) -> list[float]:
    cpu = [redis.Redis(port=port).info("cpu") for port in ports]
    return [c["used_cpu_sys"] + c["used_cpu_user"] for c in cpu]


def run(ports, shards: int, args) -> dict:
    settings = config(ports[0], shards, f"bench{uuid.uuid4().hex[:6]}")
    workers = [multiprocessing.Process(target=worker, args=(settings, args.batch_ms)) for _ in range(args.workers)]
    for w in workers:
        w.start()
    time.sleep(2)  # registered and blocking
    counts = multiprocessing.Array("l", 2)
    cpu_before, started = redis_cpu(ports), time.monotonic()
    stop_at = started + args.seconds
    per_process = -(-args.clients // args.client_processes)
    clients = [
        multiprocessing.Process(target=client, args=(settings, per_process, stop_at, counts))
        for _ in range(args.client_processes)
    ]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    elapsed = time.monotonic() - started
    cpu = [after - before for before, after in zip(cpu_before, redis_cpu(ports), strict=True)]
    for w in workers:
        w.terminate()
        w.join()
    images = counts[0]
    return {
        "shards": shards, "images_s": images / elapsed, "failed": counts[1],
        "redis_cpu_ms_per_1000": sorted((c * 1e6 / max(images, 1) for c in cpu), reverse=True),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=48, help="concurrent requests in all")
    parser.add_argument("--client-processes", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="model worker processes")
    parser.add_argument("--batch-ms", type=float, default=0.0, help="the stand-in's time per batch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        ports, processes = start_cluster(workdir)
        try:
            results = []
            for round_ in range(args.rounds):
                for shards in (1, 3) if round_ % 2 == 0 else (3, 1):
                    result = run(ports, shards, args)
                    results.append(result)
                    cpu = ", ".join(f"{ms:.0f}" for ms in result["redis_cpu_ms_per_1000"])
                    print(
                        f"round {round_ + 1}, {shards} shard(s): {result['images_s']:.0f} images/s, "
                        f"{result['failed']} failed; Redis CPU ms per 1000 images, by master: {cpu}",
                        flush=True,
                    )
            for shards in (1, 3):
                rates = [r["images_s"] for r in results if r["shards"] == shards]
                print(f"{shards} shard(s): median {sorted(rates)[len(rates) // 2]:.0f} images/s over {len(rates)}")
        finally:
            for process in processes:
                process.terminate()
                process.wait(10)


if __name__ == "__main__":
    main()
