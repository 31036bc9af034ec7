"""What REDIS_WAIT_REPLICAS costs: enqueue of a 224 x 224 message on a master with one replica, without
and with WAIT 1, interleaved (A B A B ...) on one machine.

    python -m bench.replica_wait [--n 400]   (~10 s; starts its own master and replica on free ports)
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stack  # noqa: E402
from image_queue import ImageQueue, connect, encode_message  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400, help="enqueues per variant")
    n = parser.parse_args().n
    with tempfile.TemporaryDirectory() as workdir:
        master_port, replica_port = stack.free_port(), stack.free_port()
        argv = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir]
        processes = [subprocess.Popen([*argv, "--port", str(master_port)], stdout=subprocess.DEVNULL)]
        processes.append(
            subprocess.Popen(
                [*argv, "--port", str(replica_port), "--replicaof", "127.0.0.1", str(master_port)],
                stdout=subprocess.DEVNULL,
            )
        )
        try:
            replica = redis.Redis(port=replica_port)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    if replica.info("replication").get("master_link_status") == "up":
                        break
                except redis.ConnectionError:
                    pass
                time.sleep(0.1)
            url = f"redis://127.0.0.1:{master_port}/0"
            queues = {
                wait: ImageQueue(connect(url, 1.0), "bench", queue_max=10**6, wait_replicas=wait) for wait in (0, 1)
            }
            message = encode_message("0" * 32, time.time() + 60, 5, np.zeros((224, 224, 3), np.uint8))
            times: dict[int, list[float]] = {0: [], 1: []}
            for i in range(2 * n):
                wait = i % 2
                started = time.perf_counter()
                queues[wait].enqueue(message)
                times[wait].append((time.perf_counter() - started) * 1000)
                if i % 50 == 49:
                    queues[0].redis.delete(queues[0].keys.queue)
            for wait, ms in times.items():
                ms.sort()
                print(
                    f"REDIS_WAIT_REPLICAS={wait}: enqueue p50 {statistics.median(ms):.3f} ms, "
                    f"p99 {ms[int(0.99 * len(ms))]:.3f} ms ({len(ms)} enqueues of {len(message):,} bytes)"
                )
        finally:
            for process in processes:
                process.terminate()
                process.wait(10)


if __name__ == "__main__":
    main()
