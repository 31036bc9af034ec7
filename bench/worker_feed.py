"""How fast one model worker feeds its model: the worker alone (no web), a queue kept full, the stand-in model
taking a fixed time per batch on cores of its own (it sleeps), as an accelerator does. Serial and pipelined
workers (PIPELINE_DEPTH) in turn, in one run:

    python -m bench.worker_feed [--batch-ms 10,40] [--depths 1,3] [--rounds 2] [--seconds 8] [--batch 32]

For each batch time and depth: images/s, the model's busy share (images/s x batch time / batch size: 1.0 is
an accelerator never idle), and the worker's and Redis's CPU per image. A producer thread in this process
keeps QUEUE_MAX messages of 224 x 224 pixels waiting (LPUSH of prepared messages, as the web's enqueue sends
them); the answers expire unread. Starts its own redis-server on a free port.
"""

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stack  # noqa: E402
from bench.benchmark import cpu_seconds  # noqa: E402
from image_queue import ImageQueue, connect, encode_message, model_queue_name  # noqa: E402

MODEL_ID = "feed"
QUEUE_MAX = 256


def fill(queue: ImageQueue, stop: threading.Event) -> None:
    """Keep the queue near QUEUE_MAX / 2 waiting messages, each with a fresh deadline."""
    pixels = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    n = 0
    while not stop.is_set():
        if queue.redis.llen(queue.keys.queue) >= QUEUE_MAX // 2:
            time.sleep(0.002)
            continue
        messages = [encode_message(f"{n + i:032x}", time.time() + 60, 5, pixels) for i in range(16)]
        n += 16
        queue.redis.lpush(queue.keys.queue, *messages)


def images_run(queue: ImageQueue) -> int:
    return sum(size * count for size, count in queue.stats().batch_sizes.items())


def measure(queue: ImageQueue, worker_pid: int, redis_pid: int, batch: int, batch_ms: float, seconds: float) -> dict:
    stop = threading.Event()
    producer = threading.Thread(target=fill, args=(queue, stop), daemon=True)
    producer.start()
    try:
        time.sleep(1.0)  # the queue fills, the worker reaches its pace
        before = (images_run(queue), cpu_seconds([worker_pid]), cpu_seconds([redis_pid]), time.monotonic())
        time.sleep(seconds)
        after = (images_run(queue), cpu_seconds([worker_pid]), cpu_seconds([redis_pid]), time.monotonic())
    finally:
        stop.set()
        producer.join()
    images = max(1, after[0] - before[0])
    rate = images / (after[3] - before[3])
    return {
        "images_per_s": round(rate, 1),
        "model_busy": round(rate * batch_ms / 1000 / batch, 3),
        "worker_cpu_ms_per_image": round((after[1] - before[1]) * 1000 / images, 3),
        "redis_cpu_ms_per_image": round((after[2] - before[2]) * 1000 / images, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-ms", default="10,40", help="the stand-in's time per batch, comma-separated")
    parser.add_argument("--depths", default="1,3", help="PIPELINE_DEPTH values, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the depths, who goes first alternating")
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--batch", type=int, default=32, help="BATCH_SIZE")
    args = parser.parse_args()
    depths = args.depths.split(",")
    results: dict = {}
    with tempfile.TemporaryDirectory() as workdir:
        port = stack.free_port()
        redis_service = stack.start_redis(port, workdir, Path(workdir) / "redis.log")
        url = f"redis://127.0.0.1:{port}/0"
        queue = ImageQueue(connect(url, 1.0), model_queue_name("image_queue", MODEL_ID), queue_max=QUEUE_MAX)
        env = {"REDIS_URL": url, "MODEL_ID": MODEL_ID, "BATCH_SIZE": str(args.batch), "QUEUE_MAX": str(QUEUE_MAX),
               "LOG_LEVEL": "WARNING"}  # fmt: skip
        print(f"{os.cpu_count()} CPUs; batch {args.batch}; a queue of {QUEUE_MAX // 2} waiting 224x224 messages")
        try:
            for batch_ms in (float(b) for b in args.batch_ms.split(",")):
                for r in range(args.rounds):
                    for depth in depths[r % len(depths) :] + depths[: r % len(depths)]:
                        argv = [sys.executable, "-m", "bench.stand_in_worker", "--batch-ms", str(batch_ms)]
                        worker = stack._start("stand-in worker", argv, env | {"PIPELINE_DEPTH": depth}, None)
                        try:
                            deadline = time.monotonic() + 60
                            while queue.status().live_workers < 1 and time.monotonic() < deadline:
                                time.sleep(0.1)
                            row = measure(queue, worker.pid, redis_service.pid, args.batch, batch_ms, args.seconds)
                        finally:
                            worker.stop()
                            queue.redis.delete(queue.keys.queue, queue.keys.stats)
                        results.setdefault((batch_ms, depth), []).append(row)
                        print(f"batch {batch_ms:g} ms, PIPELINE_DEPTH {depth}, round {r + 1}: {row}", flush=True)
        finally:
            redis_service.stop()
    print("\nbatch ms  depth  images/s  model busy  worker CPU ms/image  Redis CPU ms/image   (medians)")
    for (batch_ms, depth), rows in results.items():
        med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        print(
            f"{batch_ms:>8g} {depth:>6} {med['images_per_s']:>9.0f} {med['model_busy']:>11.2f}"
            f" {med['worker_cpu_ms_per_image']:>20.3f} {med['redis_cpu_ms_per_image']:>19.3f}"
        )


if __name__ == "__main__":
    main()
