"""The benchmark suite: the raw model, the in-process baseline and this service, in one interleaved run.

    python -m bench.benchmark [--quick] [--out DIR]                  the suite (~10 min; --quick ~4 min)
    python -m bench.benchmark tune --vary NAME=V1,V2 [--vary ...]     the service under settings variants
    python -m bench.benchmark protocols [--rounds 3]                  /predict vs v2 infer, same service
    python -m bench.benchmark peers [--quick] [--peers bentoml,litserve]  the service vs BentoML and LitServe
    ... --protocol v2                                                the service over v2 (suite and tune)

The suite starts, on free ports: redis-server, one model worker and gunicorn (this service, its
default settings); gunicorn serving bench/baseline_app.py (the in-process design, the same gunicorn
settings); and the same model in this process, for the raw figures. All are idle unless measured, so
they can stay up together, and the measurements alternate between them: this machine's speed drifts by
10-20% within minutes, so the figures that count are ratios taken a few seconds apart.
  0. answers: each photo through the service and the baseline gives the model's own top 5;
  1. call paths: predict vs predict_on_batch at batch 1, 8, 32 and BATCH_SIZE; the best is the ceiling;
  2. one client: requests in a row to each, between raw batch-1 timings, in rounds (the median round counts);
  3. closed loop at 1, 2, 4, 8, 16, 32 clients: raw, service and baseline (order alternating), raw;
  4. rounds at 8 and 32 clients (--rounds), as in 3, with each process's CPU time: the target figures;
  5. open loop at 50%, 90% and 150% of the capacity (the service's best closed-loop rate), each bounded;
  6. the seed's stress pattern (a new request every 0.05 s, each on its own thread) at the seed's load:
     its worker took at most 32 images per 0.25 s sleep + ~0.15 s batch on its GPU, ~80 images/s, so
     its 20 requests/s were ~25% of capacity; here the spacing is 1 / (25% x capacity), for 25 s as the
     seed's 500 requests took (--seed-load, --seed-seconds).
Per scenario: throughput, p50/p95/p99/max, errors by status, batches by size and the mean time split
(prepare / queue / inference / return, from Server-Timing). Writes DIR/benchmark.json and
DIR/benchmark.png, and prints a table with the targets. Without MODEL_WEIGHTS, ResNet50 gets seeded
random weights (speed does not depend on the weight values).

--protocol v2 sends the service's requests over the Open Inference Protocol (POST /v2/models/resnet50/infer,
binary, the top 5 as Triton's classification: as tritonclient does) instead of /predict; the baseline and the
answers check keep /predict's form. `protocols` starts one service and measures /predict and v2 in turn at 8
and 32 clients, round after round, with each round's ratio of their throughputs.

`peers` puts the same model behind BentoML and LitServe (bench/peers: each in its own virtual environment, pip
installed there on first use), each loading the OpenVINO IR this process's classifier converted and compiling it
with the same precision hint, preparing images with helpers.py as the web does. After checking every system's
answers against the model's own, it measures the raw model, the service (its shipped settings) and each peer at
1, 8 and 32 clients, round after round (--rounds; who goes first rotates; the peers not being measured are paused),
with each system's process-tree memory (RSS and PSS, the peak during each run) and CPU time, and writes
DIR/benchmark-peers.json: medians, served/ceiling and service/peer throughput at 8 and 32 clients, and the p99s.

`tune` starts one service stack per variant (each --vary NAME=V1,V2 gives one variant per value, the
other settings at their defaults) and measures them in turn, round after round: one client, 8 and 32
clients in a closed loop, with the raw ceiling between rounds.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import requests

import helpers
import stack
from loadgen import LoadRun, infer_url, post_image, summarize

ROOT = Path(__file__).resolve().parent.parent  # the repository
IMAGES = sorted((ROOT / "images").glob("*.jpg"))
LABELS = ROOT / "models" / "imagenet_class_index.json"
CLIENT_TIMEOUT_S = 60  # longer than any wait the service or the baseline imposes
SAMPLED = ("service 8", "baseline 8", "service 32", "baseline 32", "service open 90%", "baseline open 90%")


# --- the raw model -------------------------------------------------------------------------------


def raw_rate(classifier, batch: int, call: str, seconds: float) -> dict:
    """Images/s of one call path at one batch size, preprocessing included, and the median call time."""
    height, width = classifier.input_size
    pixels = np.random.default_rng(batch).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    if call == "predict_on_batch":
        run = classifier.predict  # what the worker runs
    else:
        run = lambda p: classifier.model.predict(classifier.preprocess(p.astype(np.float32)), verbose=0)  # noqa: E731
    run(pixels)  # a new shape may trace first
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        started = time.perf_counter()
        run(pixels)
        times.append(time.perf_counter() - started)
    return {
        "images_per_s": round(batch * len(times) / sum(times), 2),
        "call_ms": round(statistics.median(times) * 1e3, 1),
    }


def ceiling(classifier, batches: list[int], seconds: float) -> float:
    """The raw model's best images/s now: predict_on_batch (the faster path) at the large batch sizes."""
    return max(raw_rate(classifier, b, "predict_on_batch", seconds)["images_per_s"] for b in batches)


# --- load -----------------------------------------------------------------------------------------


def closed(url: str, images: list[bytes], clients: int, seconds: float, processes: int = 1) -> LoadRun:
    """clients in a closed loop for seconds, from this process's threads or spread over processes (--load-processes)"""
    run = LoadRun(url, images, CLIENT_TIMEOUT_S)
    run.closed_loop(clients, duration_s=seconds, processes=processes)
    return run


def sequential(url: str, images: list[bytes], count: int) -> LoadRun:
    run = LoadRun(url, images, CLIENT_TIMEOUT_S)
    run.closed_loop(1, count=count)
    return run


def open_loop(url: str, images: list[bytes], rate: float, seconds: float) -> LoadRun:
    """rate requests/s for seconds, each on its own thread; bounded by the client timeout after that."""
    run = LoadRun(url, images, CLIENT_TIMEOUT_S)
    run.open_loop(max(1, round(rate * seconds)), 1 / rate)
    return run


def figures(run: LoadRun, **extra) -> dict:
    """A scenario's figures (stress_test.summarize) and what it was."""
    return {**extra, **summarize(run.results)}


def latencies_ms(run: LoadRun) -> list[float]:
    return [round(r.latency * 1000, 1) for r in run.results if r.outcome == "200"]


def cpu_name() -> str:
    """This machine's CPU and its bf16 support, e.g. "AMD EPYC (avx512_bf16)": figures compare only within one."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return f"{name} ({', '.join(f for f in ('amx_bf16', 'avx512_bf16') if f in flags) or 'no bf16'})"


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


def rss_mb(pid: int) -> float:
    """A process's resident memory, MB (/proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def children(pid: int) -> list[int]:
    """A process's children (gunicorn's workers)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"PPid:\t{pid}\n" in status.read_text():
                found.append(int(status.parent.name))
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """A process's children, their children, and so on (one pass over /proc)."""
    parents: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = next(line for line in status.read_text().splitlines() if line.startswith("PPid:"))
        except (OSError, StopIteration):
            continue
        parents.setdefault(int(ppid.split()[1]), []).append(int(status.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def tree_memory_mb(pids: list[int]) -> dict[str, float]:
    """Resident (RSS) and proportional (PSS: shared pages divided among their sharers) memory of the processes,
    MB, summed; processes that have exited count 0. RSS sums count a page every process shares once per process."""
    rss = pss = 0.0
    for pid in pids:
        for name, field in (("status", "VmRSS:"), ("smaps_rollup", "Pss:")):
            try:
                line = next(x for x in Path(f"/proc/{pid}/{name}").read_text().splitlines() if x.startswith(field))
            except (OSError, StopIteration):
                continue
            if field == "VmRSS:":
                rss += int(line.split()[1]) / 1024
            else:
                pss += int(line.split()[1]) / 1024
    return {"rss_mb": round(rss, 1), "pss_mb": round(pss, 1)}


class PeakMemory:
    """Samples tree_memory_mb(pids) every interval_s on a thread while in the with block; .peak: the largest."""

    def __init__(self, pids: list[int], interval_s: float = 0.5):
        self.pids, self.interval_s = pids, interval_s
        self.peak = {"rss_mb": 0.0, "pss_mb": 0.0}
        self._done = threading.Event()

    def _sample(self) -> None:
        while True:
            now = tree_memory_mb(self.pids)
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
            if self._done.wait(self.interval_s):
                return

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


# --- the processes ----------------------------------------------------------------------------------


class Lab:
    """The model in this process, and the stacks under test on free ports, stopped on exit."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.services: list[stack.Service] = []
        self.weights = os.environ.get("MODEL_WEIGHTS") or str(tmp / "resnet50-seeded.weights.h5")
        if "MODEL_WEIGHTS" not in os.environ:  # weights made for this run: so is their converted model
            os.environ.setdefault("MODEL_CACHE_DIR", str(tmp / "model-cache"))

    def load_model(self):
        import keras

        from classifier import choose_runtime, load_classifier

        if "MODEL_WEIGHTS" not in os.environ:
            keras.utils.set_random_seed(1)
            keras.applications.ResNet50(weights=None).save_weights(self.weights)
        # the runtime and precision the stacks get from the same environment (settings' defaults: auto)
        runtime, _ = choose_runtime(os.environ.get("MODEL_RUNTIME", "auto").strip().lower())
        self.precision = os.environ.get("MODEL_PRECISION", "auto").strip().lower()
        self.classifier = load_classifier(
            "ResNet50", self.weights, labels_path=str(LABELS), precision=self.precision, runtime=runtime,
            cache_dir=os.environ.get("MODEL_CACHE_DIR", ""),
        )  # fmt: skip
        self.classifier.warm_up(32)
        return self.classifier

    def env(self, **overrides) -> dict:
        return {
            "MODEL_WEIGHTS": self.weights,
            "LABELS_PATH": str(LABELS),
            "WEB_PORT": str(stack.free_port()),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            **{k: str(v) for k, v in overrides.items()},
        }

    def service(self, name: str, protocol: str = "predict", **settings) -> dict:
        """redis-server + model worker + gunicorn; returns its /predict URL (or over v2, its infer URL) and
        its processes' pids."""
        port = stack.free_port()
        env = self.env(REDIS_URL=f"redis://127.0.0.1:{port}/0", **settings)
        redis = self._keep(stack.start_redis(port, str(self.tmp), self.tmp / f"{name}-redis.log"))
        worker = self._keep(stack.start_model_worker(env, self.tmp / f"{name}-worker.log"))
        web = self._keep(stack.start_web(env, self.tmp / f"{name}-web.log"))
        url = f"http://127.0.0.1:{env['WEB_PORT']}/"
        stack.wait_until_ready(url, [redis, worker, web])
        return {
            "url": url + "predict" if protocol == "predict" else infer_url(url + "predict", "resnet50"),
            "pids": {"model worker": [worker.pid], "web": children(web.pid), "redis": [redis.pid]},
            "processes": [redis.pid, worker.pid, web.pid],  # the heads of its process trees
        }

    def baseline(self, name: str = "baseline", **settings) -> dict:
        """gunicorn serving bench/baseline_app.py (the service's gunicorn settings unless overridden), once every
        gunicorn worker has loaded its model: a late one would load it while the others are measured."""
        env = self.env(**settings)
        log = self.tmp / f"{name}.log"
        web = self._keep(stack.start_web(env, log, app="bench.baseline_app:create_app()"))
        url = f"http://127.0.0.1:{env['WEB_PORT']}/"
        stack.wait_until_ready(url, [web])
        workers = int(env.get("WEB_WORKERS", os.environ.get("WEB_WORKERS", "2")))
        deadline = time.monotonic() + stack.WORKER_READY_TIMEOUT_S
        while log.read_text(errors="replace").count(baseline_app_ready_line()) < workers:
            if time.monotonic() > deadline or not web.alive():
                raise RuntimeError(f"{name}: not every gunicorn worker loaded the model:\n{web.log_text()[-3000:]}")
            time.sleep(0.2)
        return {"url": url + "predict", "pids": {"web + model": children(web.pid)}}

    def openvino_ir(self) -> Path:
        """The OpenVINO IR (.xml) load_model's classifier was converted to and cached as, for the peers to load."""
        from classifier import cache_source, default_cache_dir, openvino_cache_path

        source = cache_source(self.classifier.name, self.weights, "", "")
        cache_dir = os.environ.get("MODEL_CACHE_DIR") or default_cache_dir()
        path = Path(openvino_cache_path(cache_dir, self.classifier.name, source))
        if self.classifier.runtime != "openvino" or not path.exists():
            raise SystemExit(
                f"the peers load the OpenVINO model the suite converts; there is none at {path} (runtime "
                f"{self.classifier.runtime}): run with OpenVINO installed, MODEL_RUNTIME auto or openvino, and "
                "MODEL_WEIGHTS unset or a weights file"
            )
        return path

    def _keep(self, service: stack.Service) -> stack.Service:
        self.services.append(service)
        return service

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()


def baseline_app_ready_line() -> str:
    from bench.baseline_app import READY

    return READY


def check_answers(classifier, urls: dict[str, str], images: list[bytes]) -> dict:
    """Each photo through each system: the model's own top 5 (labels in order, probabilities to 1e-4)?

    Under Keras mixed precision a batch's results depend a little on its size: then the top label and its
    probability to 0.05 (bfloat16 keeps ~3 significant digits). OpenVINO's answer for an image is the same
    whatever the batch, at bf16 too.
    """
    exact = classifier.runtime == "openvino" or classifier.precision == "float32"
    height, width = classifier.input_size
    agree = {}
    for name, url in urls.items():
        agree[name] = True
        for image in images:
            pixels = helpers.prepare_image(helpers.open_image(image, 10**8), (width, height))
            own = classifier.top_k(classifier.predict(pixels[None])[0], 5)
            got = requests.post(url, files={"image": ("photo.jpg", image)}, timeout=CLIENT_TIMEOUT_S).json()
            compared, tolerance = (own, 1e-4) if exact else (own[:1], 0.05)
            same = all(
                a["label"] == b["label"] and abs(a["probability"] - b["probability"]) < tolerance
                for a, b in zip(got["predictions"], compared, strict=False)
            )
            agree[name] = agree[name] and same
    return agree


# --- the suite --------------------------------------------------------------------------------------


def suite(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    images = [path.read_bytes() for path in IMAGES]
    batch_size = int(os.environ.get("BATCH_SIZE", "32"))
    report: dict = {"names": {"service": "this service", "baseline": "in-process baseline"}}
    samples: dict[str, list[float]] = {}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="benchmark-") as tmp, ExitStack() as cleanup:
        lab = Lab(Path(tmp))
        cleanup.callback(lab.stop)
        say("loading the model here, starting the service and the baseline ...")
        classifier = lab.load_model()
        service = lab.service("service", args.protocol, BATCH_SIZE=batch_size)
        baseline = lab.baseline()
        # The baseline with the service's 32 threads per worker runs up to 64 forward passes at once; with
        # one thread each, requests queue in gunicorn instead, in order: its best case, in the rounds only.
        one_thread = lab.baseline("baseline-1-thread", WEB_THREADS=1)["url"]
        urls = {"service": service["url"], "baseline": baseline["url"]}
        report["answers_agree"] = check_answers(classifier, urls, images)
        say(f"answers equal the model's own: {report['answers_agree']}")

        say("1. call paths")
        batches = sorted({1, 8, 32, batch_size})
        report["call_paths"] = {
            f"{call}@{b}": raw_rate(classifier, b, call, args.raw_seconds)
            for b in batches
            for call in call_paths(classifier)
        }
        large = [b for b in batches if b >= 8]

        say("2. one client")
        # --rounds of --single requests in a row per system, who goes first rotating, raw batch-1 timings
        # between: 40 requests take ~1 s, short enough for this machine's drift to decide one round alone.
        batch1 = [fastest_batch1(classifier, args.raw_seconds)]
        single = {name: [] for name in urls}
        for r in range(args.rounds):
            for name in ordered(urls, r):
                single[name].append(figures(sequential(urls[name], images, args.single)))
            batch1.append(fastest_batch1(classifier, args.raw_seconds))
        report["one_client"] = {
            "fastest_batch1_ms": round(statistics.mean(batch1), 1),
            **{name: median_round(runs) for name, runs in single.items()},
            "rounds": single,
        }

        say("3. closed loop")
        report["closed_loop"] = []
        before = ceiling(classifier, large, args.raw_seconds)
        for i, clients in enumerate(args.clients):
            level: dict = {"clients": clients}
            for name in ordered(urls, i):
                run = closed(urls[name], images, clients, args.seconds, args.load_processes)
                level[name] = figures(run)
                if f"{name} {clients}" in SAMPLED:
                    samples[f"{name} {clients} clients"] = latencies_ms(run)
            after = ceiling(classifier, large, args.raw_seconds)
            level["raw_ceiling_per_s"] = round((before + after) / 2, 2)
            before = after
            say(f"  {clients:>2} clients: " + short(level))
            report["closed_loop"].append(level)

        say("4. rounds at 8 and 32 clients")
        pids = {**service["pids"], "load generator (this process)": [os.getpid()]}
        report["rounds"] = []
        for r in range(args.rounds):
            for clients in (8, 32):
                level = {"clients": clients}
                start_ceiling = ceiling(classifier, large, args.raw_seconds)
                systems = {**urls, "baseline_1_thread": one_thread}
                for name in ordered(systems, r):
                    cpu_before = {proc: cpu_seconds(p) for proc, p in pids.items()}
                    run = closed(systems[name], images, clients, args.seconds, args.load_processes)
                    level[name] = figures(run)
                    if name == "service":
                        cpu = {proc: cpu_seconds(p) - cpu_before[proc] for proc, p in pids.items()}
                        cpu["load generator (this process)"] += run.children_cpu_s  # and its own, if any
                        level["service_cpu_ms_per_answer"] = {
                            proc: round(seconds * 1000 / max(1, level[name]["succeeded"]), 1)
                            for proc, seconds in cpu.items()
                        }
                level["raw_ceiling_per_s"] = round(
                    (start_ceiling + ceiling(classifier, large, args.raw_seconds)) / 2, 2
                )
                say(f"  round {r + 1}, {clients} clients: " + short(level))
                report["rounds"].append(level)

        capacity = max(level["service"]["throughput_per_s"] for level in report["closed_loop"])
        report["capacity_per_s"] = capacity
        say(f"5. open loop (capacity {capacity:.1f}/s)")
        report["open_loop"] = []
        for i, load in enumerate((0.5, 0.9, 1.5)):
            level = {"load": load, "offered_per_s": round(load * capacity, 2), "seconds": args.open_seconds}
            for name in ordered(urls, i):
                run = open_loop(urls[name], images, load * capacity, args.open_seconds)
                level[name] = figures(run)
                if f"{name} open {load:.0%}" in SAMPLED:
                    samples[f"{name} open {load:.0%}"] = latencies_ms(run)
            say(f"  {load:.0%}: " + short(level))
            report["open_loop"].append(level)

        say("6. the seed's stress pattern")
        rate = args.seed_load * capacity
        report["seed_pattern"] = {
            "load": args.seed_load,
            "spacing_s": round(1 / rate, 6),
            "requests": max(1, round(rate * args.seed_seconds)),
        }
        for name in urls:
            report["seed_pattern"][name] = figures(open_loop(urls[name], images, rate, args.seed_seconds))
        say("  " + short(report["seed_pattern"]))
        report["web_worker_rss_mb"] = [rss_mb(pid) for pid in service["pids"]["web"]]
        report["worker_log_tail"] = (Path(tmp) / "service-worker.log").read_text()[-2000:]

    report["latency_samples_ms"] = samples
    report["targets"] = targets(report)
    report["machine"] = {"cpus": os.cpu_count(), "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
                         "runtime": f"{classifier.runtime} {classifier.precision}"}  # fmt: skip
    report["title"] = (
        f"ResNet50, {report['machine']['cpus']} CPUs, {report['machine']['runtime']}: "
        f"this service vs the in-process baseline vs the raw model"
    )
    (args.out / "benchmark.json").write_text(json.dumps(report, indent=1))
    from bench.plots import plot_benchmark

    plot_benchmark(report, args.out / "benchmark.png")
    print_report(report)
    print(f"\nwritten: {args.out / 'benchmark.json'}, {args.out / 'benchmark.png'}")
    return 0 if all(report["answers_agree"].values()) else 1


def call_paths(classifier) -> tuple[str, ...]:
    """The worker's call (Classifier.predict, predict_on_batch) and, on Keras, model.predict to compare."""
    return ("predict_on_batch", "predict") if classifier.runtime == "keras" else ("predict_on_batch",)


def fastest_batch1(classifier, seconds: float) -> float:
    """The model's fastest batch-1 call, ms: the fastest of its call paths."""
    return min(raw_rate(classifier, 1, call, seconds)["call_ms"] for call in call_paths(classifier))


def median_round(runs: list[dict]) -> dict:
    """Of a scenario's rounds, the one with the median p50 (the lower middle of an even count)."""
    return sorted(runs, key=lambda run: run["latency_ms"]["p50"])[(len(runs) - 1) // 2]


def ordered(urls: dict, i: int) -> list[str]:
    """The systems in turn, rotating who goes first so that none always runs on the warmer machine."""
    names = list(urls)
    return names[i % len(names) :] + names[: i % len(names)]


SERVED_OVER_CEILING = 0.85  # issue 12: served images/s at 8 and 32 clients over the fastest raw runtime, same run


def targets(report: dict) -> dict:
    """The issue's targets, each with its figure (medians over the rounds) and whether it is met."""
    result = {}
    for clients in (8, 32):
        rounds = [lv for lv in report["rounds"] if lv["clients"] == clients]
        if not rounds:
            continue
        over_ceiling = statistics.median(lv["service"]["throughput_per_s"] / lv["raw_ceiling_per_s"] for lv in rounds)
        over_baseline = statistics.median(
            lv["service"]["throughput_per_s"] / lv["baseline"]["throughput_per_s"] for lv in rounds
        )
        p99 = {
            name: statistics.median(lv[name]["latency_ms"]["p99"] for lv in rounds) for name in ("service", "baseline")
        }
        result[f"served_over_ceiling_{clients}"] = {
            "figure": round(over_ceiling, 3),
            "target": SERVED_OVER_CEILING,
            "met": over_ceiling >= SERVED_OVER_CEILING,
        }
        result[f"served_over_baseline_{clients}"] = {
            "figure": round(over_baseline, 3),
            "p99_ms": p99,
            "target": ">= 1.1 with a lower p99",
            "met": over_baseline >= 1.1 and p99["service"] < p99["baseline"],
        }
        if all("baseline_1_thread" in lv for lv in rounds):  # not a target: the baseline at its best
            one = [lv["baseline_1_thread"] for lv in rounds]
            result[f"served_over_baseline_1_thread_{clients}"] = {
                "figure": round(
                    statistics.median(
                        lv["service"]["throughput_per_s"] / b["throughput_per_s"]
                        for lv, b in zip(rounds, one, strict=True)
                    ),
                    3,
                ),  # fmt: skip
                "p99_ms": {
                    "service": p99["service"],
                    "baseline_1_thread": statistics.median(b["latency_ms"]["p99"] for b in one),
                },  # fmt: skip
                "target": "(none: the in-process design with one thread per gunicorn worker)",
                "met": True,
            }
    one = report["one_client"]
    limit = one["fastest_batch1_ms"] + 10
    result["one_client_p50_ms"] = {
        "figure": one["service"]["latency_ms"]["p50"],
        "target": f"<= {limit:.1f} (fastest batch-1 {one['fastest_batch1_ms']} ms + 10)",
        "met": one["service"]["latency_ms"]["p50"] <= limit,
    }
    at90 = next(lv for lv in report["open_loop"] if lv["load"] == 0.9)["service"]
    batches = at90["batches_by_size"]
    if batches:
        typical = max(batches, key=batches.get)  # the batch size it ran at most often
        inference = at90["time_split_ms"].get("inference", float("nan"))
        result["open_loop_90_p99_ms"] = {
            "figure": at90["latency_ms"]["p99"],
            "target": f"<= 3 x inference of its batches ({inference:.0f} ms mean; most often batch {typical})",
            "met": at90["latency_ms"]["p99"] <= 3 * inference,
        }
    return result


def short(level: dict) -> str:
    parts = []
    for name in ("service", "baseline"):
        if name in level:
            f = level[name]
            errors = f" {f['failed']}" if f["failed"] else ""
            parts.append(f"{name} {f['throughput_per_s']:.1f}/s p99 {f['latency_ms']['p99']:.0f} ms{errors}")
    if "raw_ceiling_per_s" in level:
        parts.append(f"raw {level['raw_ceiling_per_s']:.1f}/s")
    return ", ".join(parts)


def say(text: str) -> None:
    print(text, flush=True)


def print_report(report: dict) -> None:
    print("\ncall paths (images/s; median call ms):")
    for name, f in report["call_paths"].items():
        print(f"  {name:<22} {f['images_per_s']:>7.2f}/s {f['call_ms']:>8.1f} ms")
    print(f"\n{'scenario':<30}answers/s    p50    p95    p99    max  errors    mean batch  ms: prep/queue/inf/ret")
    rows = [(f"one client, {n}", report["one_client"][n]) for n in ("service", "baseline")]
    for level in [*report["closed_loop"], *report["rounds"]]:
        rows += [(f"closed {level['clients']:>2}, {n}", level[n]) for n in ("service", "baseline") if n in level]
        if "baseline_1_thread" in level:
            rows.append((f"closed {level['clients']:>2}, baseline 1 thr", level["baseline_1_thread"]))
    for level in report["open_loop"]:
        rows += [
            (f"open {level['load']:.0%} ({level['offered_per_s']:.1f}/s), {n}", level[n])
            for n in ("service", "baseline")
        ]
    rows += [(f"seed pattern, {n}", report["seed_pattern"][n]) for n in ("service", "baseline")]
    for name, f in rows:
        lat, split = f["latency_ms"], f["time_split_ms"]
        errors = ",".join(f"{k}:{v}" for k, v in f["failed"].items()) or "-"
        mean_batch = sum(s * n for s, n in f["batches_by_size"].items()) / max(1, sum(f["batches_by_size"].values()))
        split_text = "/".join(f"{split[p]:.0f}" for p in ("prepare", "queue", "inference", "return")) if split else "-"
        print(
            f"{name:<30}{f['throughput_per_s']:>9.2f}{lat['p50']:>7.0f}{lat['p95']:>7.0f}{lat['p99']:>7.0f}"
            f"{lat['max']:>7.0f}  {errors:<10}{mean_batch:>7.1f}  {split_text}"
        )
    print("\ntargets (medians over the rounds):")
    for name, t in report["targets"].items():
        status = "info   " if str(t["target"]).startswith("(none") else "met    " if t["met"] else "MISSED "
        print(f"  {status} {name}: {t['figure']} (target {t['target']})")
    print(f"  service web workers' resident memory at the end: {report['web_worker_rss_mb']} MB")
    cpu = [lv["service_cpu_ms_per_answer"] for lv in report["rounds"] if lv["clients"] == 8]
    if cpu:
        print(f"  CPU ms per answer at 8 clients: { {k: statistics.median(c[k] for c in cpu) for k in cpu[0]} }")


# --- tune ------------------------------------------------------------------------------------------


def variants(vary: list[str]) -> list[dict[str, str]]:
    """["MAX_BATCH_WAIT_MS=0,10", "BATCH_SIZE=16"] -> [{MAX_BATCH_WAIT_MS: 0}, {..: 10}, {BATCH_SIZE: 16}]"""
    result = []
    for item in vary:
        name, _, values = item.partition("=")
        if not name or not values:
            raise SystemExit(f"--vary takes NAME=V1,V2,...; got {item!r}")
        result += [{name: value} for value in values.split(",")]
    return result


def tune(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    images = [path.read_bytes() for path in IMAGES]
    chosen = variants(args.vary)
    names = [" ".join(f"{k}={v}" for k, v in v.items()) for v in chosen]
    results: dict = {name: [] for name in names}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tune-") as tmp, ExitStack() as cleanup:
        lab = Lab(Path(tmp))
        cleanup.callback(lab.stop)
        classifier = lab.load_model()
        say(f"starting {len(chosen)} service stacks ...")
        urls = {
            name: lab.service(f"v{i}", args.protocol, **v)["url"]
            for i, (name, v) in enumerate(zip(names, chosen, strict=True))
        }
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
                before = ceiling(classifier, [8, 32], args.raw_seconds)
                one = figures(sequential(urls[name], images, args.single))
                at8 = figures(closed(urls[name], images, 8, args.seconds, args.load_processes))
                at32 = figures(closed(urls[name], images, 32, args.seconds, args.load_processes))
                raw = (before + ceiling(classifier, [8, 32], args.raw_seconds)) / 2
                results[name].append({"raw": raw, "one": one, "8": at8, "32": at32})
                say(
                    f"round {r + 1} {name}: 1 client p50 {one['latency_ms']['p50']:.0f} ms; "
                    f"8: {at8['throughput_per_s'] / raw:.3f} x raw, p99 {at8['latency_ms']['p99']:.0f} ms; "
                    f"32: {at32['throughput_per_s'] / raw:.3f} x raw, p99 {at32['latency_ms']['p99']:.0f} ms"
                )
    summary = {
        name: {
            "one_client_p50_ms": statistics.median(x["one"]["latency_ms"]["p50"] for x in runs),
            **{
                f"{c}_over_raw": round(statistics.median(x[c]["throughput_per_s"] / x["raw"] for x in runs), 3)
                for c in ("8", "32")
            },
            **{f"{c}_p99_ms": statistics.median(x[c]["latency_ms"]["p99"] for x in runs) for c in ("8", "32")},
            "errors": sum(sum(x[c]["failed"].values()) for x in runs for c in ("one", "8", "32")),
        }
        for name, runs in results.items()
    }
    print("\nvariant                        1-client p50   8: x raw   p99    32: x raw   p99   errors")
    for name, s in summary.items():
        print(
            f"{name:<30} {s['one_client_p50_ms']:>10.1f} {s['8_over_raw']:>10.3f} {s['8_p99_ms']:>6.0f}"
            f" {s['32_over_raw']:>11.3f} {s['32_p99_ms']:>6.0f} {s['errors']:>7}"
        )
    (args.out / "tune.json").write_text(json.dumps({"summary": summary, "rounds": results}, indent=1))
    return 0


def protocols(args) -> int:
    """One service, the same photos over /predict and over v2 in turn (who goes first alternates), at 8 and
    32 clients: v2's throughput over /predict's, per round, and the median."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    images = [path.read_bytes() for path in IMAGES]
    args.out.mkdir(parents=True, exist_ok=True)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="protocols-") as tmp, ExitStack() as cleanup:
        lab = Lab(Path(tmp))
        cleanup.callback(lab.stop)
        classifier = lab.load_model()
        predict_url = lab.service("service")["url"]
        urls = {"predict": predict_url, "v2": infer_url(predict_url, "resnet50")}
        agree = check_answers(classifier, {"predict": predict_url}, images)
        for url in urls.values():  # warm both paths (web imports, Redis scripts) before measuring
            sequential(url, images, 5)
        for r in range(args.rounds):
            order = list(urls) if r % 2 == 0 else list(urls)[::-1]
            runs = {
                (name, c): figures(closed(urls[name], images, c, args.seconds, args.load_processes))
                for c in (8, 32)
                for name in order
            }
            ratio = {c: runs["v2", c]["throughput_per_s"] / runs["predict", c]["throughput_per_s"] for c in (8, 32)}
            rounds.append({"runs": {f"{n} {c}": f for (n, c), f in runs.items()}, "v2_over_predict": ratio})
            say(
                f"round {r + 1}: " + "; ".join(
                    f"{c} clients: /predict {runs['predict', c]['throughput_per_s']:.1f}/s,"
                    f" v2 {runs['v2', c]['throughput_per_s']:.1f}/s, v2 / predict {ratio[c]:.3f}" for c in (8, 32)
                )
            )  # fmt: skip
    errors = sum(sum(f["failed"].values()) for r in rounds for f in r["runs"].values())
    summary = {
        "answers_agree": agree["predict"],
        **{
            f"v2_over_predict_{c}": round(statistics.median(r["v2_over_predict"][c] for r in rounds), 3)
            for c in (8, 32)
        },
        "errors": errors,
        "cpu": cpu_name(),
    }
    print(json.dumps(summary, indent=1))
    (args.out / "protocols.json").write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=1))
    return 0 if errors == 0 else 1


# --- peers -----------------------------------------------------------------------------------------

PEER_CLIENTS = (1, 8, 32)  # closed-loop clients per level of the peers command
ANSWER_TOLERANCE = 1e-4  # largest probability difference from the model's own answer (same runtime, same hint)


def compare_answer(got: list[dict], own: list[dict], tolerance: float = ANSWER_TOLERANCE) -> tuple[bool, float]:
    """A system's top 5 against the model's own: (the same labels in the same order with every probability within
    tolerance, the largest probability difference; nan when the lists differ in length)."""
    if len(got) != len(own):
        return False, float("nan")
    worst = max((abs(g["probability"] - o["probability"]) for g, o in zip(got, own, strict=True)), default=0.0)
    return [g["label"] for g in got] == [o["label"] for o in own] and worst <= tolerance, worst


def peer_answers(classifier, urls: dict[str, str], images: list[bytes]) -> dict:
    """Each photo through each system as loadgen sends it: the model's own top 5? And how close, at worst."""
    from bench.peers import answer_predictions

    height, width = classifier.input_size
    pixels = [helpers.prepare_image(helpers.open_image(image, 10**8), (width, height)) for image in images]
    own = [classifier.top_k(classifier.predict(p[None])[0], 5) for p in pixels]
    result = {}
    for name, url in urls.items():
        checks, top1 = [], []
        for image, expected in zip(images, own, strict=True):
            response = post_image(url, image, CLIENT_TIMEOUT_S)
            response.raise_for_status()
            got = answer_predictions(response.json())
            checks.append(compare_answer(got, expected))
            top1.append(got[0]["label"])
        result[name] = {
            "agree": all(same for same, _ in checks),
            "max_probability_difference": max(diff for _, diff in checks),
            "top1": top1,  # per photo, in IMAGES' order
        }
    return result


def raw_figure(classifier, clients: int, seconds: float) -> dict:
    """The raw model in this process: at one client its batch-1 rate and call time, else its ceiling (the best of
    batch 8 and 32)."""
    if clients == 1:
        one = raw_rate(classifier, 1, "predict_on_batch", seconds)
        return {"images_per_s": one["images_per_s"], "call_ms": one["call_ms"]}
    return {"ceiling_per_s": ceiling(classifier, [8, 32], seconds)}


def mean_figure(a: dict, b: dict) -> dict:
    return {key: round((a[key] + b[key]) / 2, 2) for key in a}


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def median_of(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def over(levels: list[dict], peer: str, figure: str) -> float | None:
    """The service's figure (throughput, p50 or p99) over the peer's, per round; the median of those."""

    def value(f: dict) -> float:
        return f["throughput_per_s"] if figure == "throughput" else f["latency_ms"][figure]

    return median_of([ratio(value(lv["service"]), value(lv[peer])) for lv in levels])


def peers_summary(rounds: list[dict], systems: list[str]) -> dict:
    """Medians over the rounds per level and system (throughput, p50, p99; memory: the peak of any run), and the
    ratios each taken within a round, then their median: served/ceiling and service/peer at 8 and 32 clients,
    the service's p99 (and at one client its p50) over each peer's."""
    peers = [name for name in systems if name != "service"]
    summary: dict = {"levels": {}}
    for clients in PEER_CLIENTS:
        levels = [lv for lv in rounds if lv["clients"] == clients]
        if not levels:
            continue
        level: dict = {"raw": {key: median_of([lv["raw"][key] for lv in levels]) for key in levels[0]["raw"]}}
        for name in systems:
            runs = [lv[name] for lv in levels]
            level[name] = {
                "throughput_per_s": median_of([r["throughput_per_s"] for r in runs]),
                "p50_ms": median_of([r["latency_ms"]["p50"] for r in runs]),
                "p99_ms": median_of([r["latency_ms"]["p99"] for r in runs]),
                "peak_rss_mb": max(r["memory_mb"]["rss_mb"] for r in runs),
                "peak_pss_mb": max(r["memory_mb"]["pss_mb"] for r in runs),
                "failed": sum(sum(r["failed"].values()) for r in runs),
            }
            if clients > 1:
                level[name]["over_ceiling"] = median_of(
                    [ratio(lv[name]["throughput_per_s"], lv["raw"]["ceiling_per_s"]) for lv in levels]
                )
        for name in systems:
            if all("cpu_s" in lv[name] for lv in levels):
                level[name]["cpu_ms_per_answer"] = median_of(
                    [lv[name]["cpu_s"][name] * 1000 / max(1, lv[name]["succeeded"]) for lv in levels]
                )
        summary["levels"][str(clients)] = level
        if clients == 1:
            summary["service_p50_over_peer_p50_1"] = {peer: over(levels, peer, "p50") for peer in peers}
            continue
        summary[f"served_over_ceiling_{clients}"] = {name: level[name]["over_ceiling"] for name in systems}
        summary[f"service_over_peer_{clients}"] = {peer: over(levels, peer, "throughput") for peer in peers}
        summary[f"p99_ms_{clients}"] = {name: level[name]["p99_ms"] for name in systems}
        summary[f"service_p99_over_peer_p99_{clients}"] = {peer: over(levels, peer, "p99") for peer in peers}
    runs = [(name, lv[name]) for lv in rounds for name in systems if "cpu_s" in lv.get(name, {})]
    if runs:  # the CPU an idle system takes while another is measured: it slows that one down
        summary["idle_cpu_share"] = {
            name: median_of([run["cpu_s"][name] / run["wall_s"] for measured, run in runs if measured != name])
            for name in systems
        }
    return summary


def log_tail(path: Path, chars: int = 1500) -> str:
    """The end of a peer's log without its line per request: its start-up, warnings and errors."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if "/predict" not in line]
    return "\n".join(lines)[-chars:]


def peers_command(args) -> int:
    """The raw model, the service (its shipped defaults) and each peer, at 1, 8 and 32 clients, round after round,
    who goes first rotating; each system's answers checked first. Writes DIR/benchmark-peers.json."""
    from bench import peers as peer_lab

    names = peer_lab.peer_names(args.peers)
    for name in names:  # before anything is loaded: an install is pip's work, not a measurement's neighbour
        peer_lab.install(name, say)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    images = [path.read_bytes() for path in IMAGES]
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "clients": list(PEER_CLIENTS),
        "seconds": args.seconds,
        "rounds_asked": args.rounds,
        "peers": {
            name: {
                "settings": peer_lab.PEERS[name].settings,
                "requirements": [
                    line.split("#")[0].strip()
                    for line in (peer_lab.PEERS[name].folder / "requirements.txt").read_text().splitlines()
                    if line.split("#")[0].strip()
                ],
            }
            for name in names
        },
    }
    out = args.out / "benchmark-peers.json"
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp, ExitStack() as cleanup:
        lab = Lab(Path(tmp))
        cleanup.callback(lab.stop)
        say("loading the model here (converted to OpenVINO, as the service's worker loads it) ...")
        classifier = lab.load_model()
        model_xml = lab.openvino_ir()
        report["runtime"] = f"{classifier.runtime} {classifier.precision}"
        say("starting the service (its shipped settings) ...")
        service = lab.service("service")
        urls, heads = {"service": service["url"]}, {"service": service["processes"]}
        running: dict[str, peer_lab.Running] = {}
        for name in names:
            say(f"starting {name} (its own venv; the model from {model_xml.name}) ...")
            peer = peer_lab.start(name, model_xml, classifier.precision, LABELS, Path(tmp))
            cleanup.callback(peer.stop)
            urls[name], heads[name], running[name] = peer.url, [peer.pid], peer
        report["answers"] = peer_answers(classifier, urls, images)
        agree = {name: "same" if a["agree"] else "DIFFERENT" for name, a in report["answers"].items()}
        say(f"answers (the model's own top 5?): {agree}")
        if not all(a["agree"] for a in report["answers"].values()):
            out.write_text(json.dumps(report, indent=1))
            say(f"not measured: a system's answers differ from the model's own ({out})")
            return 1
        trees = {name: [*pids, *(d for pid in pids for d in descendants(pid))] for name, pids in heads.items()}
        report["processes"] = {name: len(pids) for name, pids in trees.items()}

        # One client before any load has been: BentoML's dispatcher learns how long to hold a batch open from its
        # last 50 batches, so after a burst it keeps waiting at one client for a while (the rounds show that).
        # While one system is measured the other peers are paused (SIGSTOP): idle, LitServe polls its queue
        # every millisecond, ~0.15 of a core here. The service is never paused (its worker's heartbeat has a TTL);
        # idle it takes ~0.01 of a core (idle_cpu_share shows what each took).
        def others(name: str) -> list:
            return [peer for other, peer in running.items() if other != name]

        report["one_client_fresh"] = {}
        for name in urls:
            with peer_lab.paused(others(name)):
                sequential(urls[name], images, 8)  # first requests: allocations, BentoML's dispatcher's training
                report["one_client_fresh"][name] = figures(closed(urls[name], images, 1, args.seconds))
        say("  one client, before any load: " + ", ".join(
            f"{name} {f['throughput_per_s']:.1f}/s p50 {f['latency_ms']['p50']:.0f} ms"
            for name, f in report["one_client_fresh"].items()
        ))  # fmt: skip
        report["idle_memory_mb"] = {name: tree_memory_mb(pids) for name, pids in trees.items()}
        for url in urls.values():  # a full batch's memory, before the rounds
            closed(url, images, 32, min(args.seconds, 3))
        # CPU seconds of every system during each run: the one measured, and what the idle ones take meanwhile
        cpu_trees = {**trees, "load generator and raw model (this process)": [os.getpid()]}
        report["rounds"] = []
        for r in range(args.rounds):
            for i, clients in enumerate(PEER_CLIENTS):
                level: dict = {"round": r + 1, "clients": clients}
                with peer_lab.paused(list(running.values())):
                    before = raw_figure(classifier, clients, args.raw_seconds)
                for name in ordered(urls, r * len(PEER_CLIENTS) + i):
                    cpu_before = {system: cpu_seconds(pids) for system, pids in cpu_trees.items()}
                    with peer_lab.paused(others(name)), PeakMemory(trees[name]) as memory:
                        run = closed(urls[name], images, clients, args.seconds, args.load_processes)
                    cpu = {system: round(cpu_seconds(p) - cpu_before[system], 2) for system, p in cpu_trees.items()}
                    cpu["load generator and raw model (this process)"] += round(run.children_cpu_s, 2)
                    level[name] = {**figures(run), "memory_mb": memory.peak, "cpu_s": cpu}
                with peer_lab.paused(list(running.values())):
                    level["raw"] = mean_figure(before, raw_figure(classifier, clients, args.raw_seconds))
                say(f"  round {r + 1}, {clients:>2} clients: " + ", ".join(
                    f"{name} {level[name]['throughput_per_s']:.1f}/s p99 {level[name]['latency_ms']['p99']:.0f} ms"
                    + (f" ({sum(level[name]['failed'].values())} failed)" if level[name]["failed"] else "")
                    for name in urls
                ) + f", raw {next(iter(level['raw'].values())):.1f}/s")  # fmt: skip
                report["rounds"].append(level)
        report["logs_tail"] = {name: log_tail(Path(tmp) / f"{name}.log") for name in names}
    report["summary"] = peers_summary(report["rounds"], list(urls))
    out.write_text(json.dumps(report, indent=1))
    print_peers(report)
    print(f"\nwritten: {out}")
    levels = report["summary"]["levels"].values()
    return 0 if all(f["failed"] == 0 for level in levels for name, f in level.items() if name != "raw") else 1


RATIOS = (
    "served_over_ceiling_8",
    "served_over_ceiling_32",
    "service_over_peer_8",
    "service_over_peer_32",
    "service_p99_over_peer_p99_8",
    "service_p99_over_peer_p99_32",
    "service_p50_over_peer_p50_1",
)


def print_peers(report: dict) -> None:
    summary = report["summary"]
    print(f"\n{report['cpu']}, {report['cpus']} CPUs, {report['runtime']}; medians of {len(report['rounds']) // 3} "
          f"round(s) of {report['seconds']:g} s per system and level")  # fmt: skip
    print(f"\n{'clients':>7}  {'system':<10}{'answers/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'x ceiling':>11}"
          f"{'peak RSS MB':>13}{'peak PSS MB':>13}{'CPU ms/answer':>15}{'failed':>8}")  # fmt: skip
    for clients, level in summary["levels"].items():
        raw = level["raw"]
        if "call_ms" in raw:
            print(f"{clients:>7}  {'raw':<10}{raw['images_per_s']:>10.1f}{raw['call_ms']:>9.1f}  (batch 1: one call)")
        else:
            print(f"{clients:>7}  {'raw':<10}{raw['ceiling_per_s']:>10.1f}{'':>18}{1:>11.3f}  (best of batch 8, 32)")
        for name, f in level.items():
            if name == "raw":
                continue
            x = f"{f['over_ceiling']:.3f}" if f.get("over_ceiling") is not None else ""
            cpu = f.get("cpu_ms_per_answer") or float("nan")
            print(
                f"{clients:>7}  {name:<10}{f['throughput_per_s']:>10.1f}{f['p50_ms']:>9.0f}{f['p99_ms']:>9.0f}{x:>11}"
                f"{f['peak_rss_mb']:>13.0f}{f['peak_pss_mb']:>13.0f}{cpu:>15.1f}{f['failed']:>8}"
            )
    print("\none client before any load (one run each):")
    for name, f in report["one_client_fresh"].items():
        lat = f["latency_ms"]
        print(f"  {name:<10}{f['throughput_per_s']:>8.1f}/s  p50 {lat['p50']:.0f} ms  p99 {lat['p99']:.0f} ms")
    print("\nratios (each taken within a round, then the median):")
    for key in RATIOS:
        if key in summary:
            print(f"  {key}: " + ", ".join(f"{n} {v}" for n, v in summary[key].items()))
    print("  memory: RSS sums each process's resident pages (shared ones once per process); PSS divides them")
    print(f"  processes per system: {report['processes']}")
    if "idle_cpu_share" in summary:
        print(f"  CPU an idle system takes while another is measured (cores): {summary['idle_cpu_share']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=("suite", "tune", "protocols", "peers"), default="suite")
    parser.add_argument("--protocol", choices=("predict", "v2"), default="predict", help="the service's requests")
    parser.add_argument("--quick", action="store_true", help="shorter runs (~4 min): a check, not the figures")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"), help="where to write JSON and PNG")
    parser.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")], default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--seconds", type=float, help="seconds per closed-loop run (default 10; quick 4)")
    parser.add_argument("--raw-seconds", type=float, help="seconds per raw measurement (default 2; quick 1)")
    parser.add_argument(
        "--open-seconds", type=float, help="seconds of offered load per open-loop run (default 15; quick 5)"
    )
    parser.add_argument("--seed-seconds", type=float, help="seconds of the seed pattern (default 25; quick 8)")
    parser.add_argument("--seed-load", type=float, default=0.25, help="the seed pattern's share of capacity (0.25)")
    parser.add_argument("--rounds", type=int, help="rounds at 8 and 32 clients (default 3; quick 1)")
    parser.add_argument("--single", type=int, help="requests in a row for one-client latency (default 40; quick 15)")
    parser.add_argument("--vary", action="append", default=[], help="tune: NAME=V1,V2 (repeat for more settings)")
    parser.add_argument("--peers", default="bentoml,litserve", help="peers: which, comma-separated (bench/peers)")
    parser.add_argument(
        "--load-processes",
        type=int,
        default=1,
        help="spread each closed loop's clients over this many processes (default 1): for a box where one Python "
        "process would cap the load (~1.4 ms of its CPU per request on the 2-core Xeon: a GPU box)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX: several model processes share a GPU
    defaults = {"seconds": (10, 4), "raw_seconds": (2, 1), "open_seconds": (15, 5), "seed_seconds": (25, 8),
                "rounds": (3, 1), "single": (40, 15)}  # fmt: skip
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.command == "tune":
        if not args.vary:
            parser.error("tune needs at least one --vary NAME=V1,V2")
        return tune(args)
    if args.command == "protocols":
        return protocols(args)
    if args.command == "peers":
        return peers_command(args)
    return suite(args)


if __name__ == "__main__":
    sys.exit(main())
