"""How close the served throughput comes to the model's own, and what a lone request pays on top.

    python benchmark.py [--rounds 5] [--seconds 12] [--clients 8] [--json FILE]     (about 5 minutes)

Starts its own redis-server, model worker (BATCH_SIZE=32) and gunicorn, and loads the same model in
this process. First it compares the call paths (predict_on_batch vs predict at batch 1, 8, 32). Then
each round measures, back to back so that all see the same machine:
  raw     the model alone, predict_on_batch at batch 1, 8 and 32 (images/s; batch-1 call time);
  single  one client, one request at a time: latency percentiles;
  served  --clients clients in a closed loop for --seconds: answers/s, and CPU seconds per process;
  raw     again, so each served figure is compared with the mean of the raw figures around it.
The figures that count are the per-round ratios (served / best raw; single p50 - raw batch-1 time),
reported as medians over the rounds: this machine's speed drifts by 10-20% within minutes. Without
MODEL_WEIGHTS, ResNet50 gets seeded random weights (speed does not depend on the weight values).
"""

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

import helpers
import stack
from stress_test import LoadRun, summarize

ROOT = Path(__file__).resolve().parent
IMAGE = ROOT / "images" / "chelsea.jpg"
LABELS = ROOT / "models" / "imagenet_class_index.json"


def raw_throughput(classifier, batch: int, call: str, seconds: float) -> dict:
    """Images/s of one call path at one batch size, and the median time of one call."""
    height, width = classifier.input_size
    pixels = np.random.default_rng(batch).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    x = classifier.preprocess(pixels.astype(np.float32))
    run = (
        classifier.model.predict_on_batch
        if call == "predict_on_batch"
        else lambda v: classifier.model.predict(v, verbose=0)
    )
    run(x)  # traced by the worker's own warm-up too
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        started = time.perf_counter()
        if call == "predict_on_batch":
            classifier.predict(pixels)  # what the worker runs: preprocessing included
        else:
            classifier.model.predict(classifier.preprocess(pixels.astype(np.float32)), verbose=0)
        times.append(time.perf_counter() - started)
    return {
        "images_per_s": round(batch * len(times) / sum(times), 2),
        "median_call_ms": round(statistics.median(times) * 1000, 1),
    }


def proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {key: value.strip() for key, value in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def web_worker_pids(master_pid: int) -> list[int]:
    """The gunicorn master's children: its worker processes."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return sorted(pid for pid in pids if proc_status(pid).get("PPid") == str(master_pid))


def web_worker_rss_mb(master_pid: int) -> list[float]:
    """Resident memory of each gunicorn worker, from /proc."""
    return [round(int(proc_status(pid)["VmRSS"].split()[0]) / 1024, 1) for pid in web_worker_pids(master_pid)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=12, help="seconds per served measurement (default 12)")
    parser.add_argument("--raw-seconds", type=float, default=3, help="seconds per raw measurement (default 3)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for throughput (default 8)")
    parser.add_argument("--single", type=int, default=30, help="sequential requests for latency (default 30)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from classifier import load_classifier

    image = IMAGE.read_bytes()
    results: dict = {"rounds": [], "machine": {"cpus": os.cpu_count(), "keras_backend": keras.backend.backend()}}
    with tempfile.TemporaryDirectory(prefix="benchmark-") as tmp:
        weights = os.environ.get("MODEL_WEIGHTS") or str(Path(tmp) / "resnet50-seeded.weights.h5")
        if "MODEL_WEIGHTS" not in os.environ:
            keras.utils.set_random_seed(1)
            keras.applications.ResNet50(weights=None).save_weights(weights)
        classifier = load_classifier("ResNet50", weights, labels_path=str(LABELS))
        classifier.warm_up(32)

        port, web_port = stack.free_port(), stack.free_port()
        env = {
            "REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "WEB_PORT": str(web_port),
            "MODEL_WEIGHTS": weights,
            "LABELS_PATH": str(LABELS),
            "BATCH_SIZE": "32",
            "REQUEST_TIMEOUT_S": "60",
        }
        services = [stack.start_redis(port, tmp, Path(tmp) / "redis.log")]
        try:
            services.append(stack.start_model_worker(env, Path(tmp) / "worker.log"))
            services.append(stack.start_web(env, Path(tmp) / "web.log"))
            url = f"http://127.0.0.1:{web_port}/"
            stack.wait_until_ready(url, services)
            print("call paths ...", flush=True)
            results["call_paths"] = call_paths(classifier, args.raw_seconds)
            cpu_pids = {
                "model worker": [services[1].pid],
                "gunicorn workers": web_worker_pids(services[2].pid),
                "redis": [services[0].pid],
                "load generator (this process)": [os.getpid()],
            }
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}", flush=True)
                results["rounds"].append(one_round(classifier, url + "predict", image, args, cpu_pids))
                print("  " + json.dumps(results["rounds"][-1]["summary"]), flush=True)
            results["web_worker_rss_mb"] = web_worker_rss_mb(services[2].pid)
            results["requests_served"] = sum(
                rnd["single"]["succeeded"] + rnd["served"]["succeeded"] for rnd in results["rounds"]
            )
            results["worker_batches"] = batch_histogram(services[1].log_text())
        finally:
            for service in reversed(services):
                service.stop()

    pixels = helpers.prepare_image(helpers.open_image(image, 10**8), (224, 224))
    results["message_bytes_224"] = len(helpers.encode_message("0" * 32, time.time(), 5, pixels))
    results["summary"] = {
        key: round(statistics.median(r["summary"][key] for r in results["rounds"]), 3)
        for key in results["rounds"][0]["summary"]
    }
    answers = sum(r["served"]["succeeded"] for r in results["rounds"])
    results["served_cpu_ms_per_request"] = {
        name: round(sum(r["served_cpu_s"][name] for r in results["rounds"]) / answers * 1000, 1)
        for name in results["rounds"][0]["served_cpu_s"]
    }
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def one_round(classifier, predict_url: str, image: bytes, args, cpu_pids: dict[str, list[int]]) -> dict:
    """raw before -> one client -> N clients -> raw after: each served figure against the raw ones around it."""
    before = {batch: raw_throughput(classifier, batch, "predict_on_batch", args.raw_seconds) for batch in (1, 8, 32)}
    single_run = LoadRun(predict_url, [image])
    single_run.closed_loop(1, count=args.single)
    single = summarize(single_run.results)
    cpu_start = {name: cpu_seconds(pids) for name, pids in cpu_pids.items()}
    served_run = LoadRun(predict_url, [image])
    served_run.closed_loop(args.clients, duration_s=args.seconds)
    served = summarize(served_run.results)
    cpu = {name: round(cpu_seconds(pids) - cpu_start[name], 2) for name, pids in cpu_pids.items()}
    after = {batch: raw_throughput(classifier, batch, "predict_on_batch", args.raw_seconds) for batch in (1, 8, 32)}
    best = statistics.mean(max(r["images_per_s"] for r in side.values()) for side in (before, after))
    batch1_ms = statistics.mean(side[1]["median_call_ms"] for side in (before, after))
    # Drift-free: each request's own latency minus its own batch's inference time in the worker.
    ok = [r for r in single_run.results if r.outcome == "200" and "inference" in r.timing]
    overhead_ms = statistics.median(r.latency * 1000 - r.timing["inference"] for r in ok)
    served_ok = [r for r in served_run.results if r.outcome == "200" and "inference" in r.timing]
    inference_s = sum(r.timing["inference"] / r.timing["batch"] for r in served_ok) / 1000  # each batch once
    return {
        "raw_before": before,
        "raw_after": after,
        "single": single,
        "served": served,
        "served_cpu_s": cpu,
        "summary": {
            "raw_best_images_per_s": round(best, 2),
            "served_images_per_s": served["throughput_per_s"],
            "served_over_raw": round(served["throughput_per_s"] / best, 3),
            "raw_batch1_ms": round(batch1_ms, 1),
            "single_p50_ms": single["latency_ms"]["p50"],
            "single_overhead_ms": round(single["latency_ms"]["p50"] - batch1_ms, 1),
            "single_own_inference_p50_ms": statistics.median(r.timing["inference"] for r in ok),
            "single_overhead_own_ms": round(overhead_ms, 1),
            "served_p99_ms": served["latency_ms"]["p99"],
            "served_mean_batch": round(len(served_ok) / sum(1 / r.timing["batch"] for r in served_ok), 2),
            "served_worker_busy": round(inference_s / served["wall_s"], 3),
            "served_worker_images_per_s": round(len(served_ok) / inference_s, 2),
        },
    }


def call_paths(classifier, seconds: float) -> dict:
    """Images/s of predict_on_batch against predict, at batch 1, 8 and 32: which call path is fastest."""
    return {
        f"{call}@{batch}": raw_throughput(classifier, batch, call, seconds)["images_per_s"]
        for batch in (1, 8, 32)
        for call in ("predict_on_batch", "predict")
    }


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used (/proc/PID/stat; all their threads)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def batch_histogram(worker_log: str) -> dict[int, int]:
    return dict(sorted(Counter(int(n) for n in re.findall(r"batch of (\d+) in", worker_log)).items()))


def print_table(results: dict) -> None:
    print("\nper round (8 clients; busy: share of the time the model ran; own b1: the request's own batch-1 time)")
    print(
        f"{'round':>5} {'raw best/s':>10} {'served/s':>9} {'ratio':>6} {'mean batch':>10} {'busy':>5} {'worker/s':>8}"
        f" | {'raw b1':>6} {'1-client p50':>12} {'+ms':>5} {'own b1':>6} {'+ms own':>7}"
    )
    for i, r in enumerate(results["rounds"], 1):
        s = r["summary"]
        print(
            f"{i:>5} {s['raw_best_images_per_s']:>10.2f} {s['served_images_per_s']:>9.2f} {s['served_over_raw']:>6.3f}"
            f" {s['served_mean_batch']:>10.2f} {s['served_worker_busy']:>5.2f} {s['served_worker_images_per_s']:>8.2f}"
            f" | {s['raw_batch1_ms']:>6.1f} {s['single_p50_ms']:>12.1f} {s['single_overhead_ms']:>5.1f}"
            f" {s['single_own_inference_p50_ms']:>6.1f} {s['single_overhead_own_ms']:>7.1f}"
        )
    s = results["summary"]
    print(
        f"\nmedian: served {s['served_images_per_s']:.2f}/s = {s['served_over_raw']:.3f} x raw best "
        f"({s['raw_best_images_per_s']:.2f}/s); the model ran {s['served_worker_busy']:.0%} of the time, at "
        f"{s['served_worker_images_per_s']:.2f} images/s in batches of {s['served_mean_batch']:.1f} on average.\n"
        f"one client: p50 {s['single_p50_ms']:.1f} ms = raw batch-1 {s['raw_batch1_ms']:.1f} ms "
        f"+ {s['single_overhead_ms']:.1f} ms; per request, latency - its own inference = "
        f"{s['single_overhead_own_ms']:.1f} ms"
    )
    print(f"call paths, images/s: {json.dumps(results['call_paths'])}")
    print(f"CPU ms per answered request while serving (2 cores): {json.dumps(results['served_cpu_ms_per_request'])}")
    print(f"web worker RSS after {results['requests_served']} requests: {results['web_worker_rss_mb']} MB")
    print(f"message bytes for 224x224: {results['message_bytes_224']:,}")
    print(f"worker batch sizes (size: count): {results['worker_batches']}")


if __name__ == "__main__":
    sys.exit(main())
