"""The path's own ceiling: images/s that gunicorn, Redis and the worker loop carry when the model takes no
time (the stand-in worker, bench/stand_in_worker.py), and the CPU each process spends per answered request.
This is the figure that says whether the service could feed a faster model or a GPU from these cores.

    python -m bench.path_ceiling [--clients 8,32,64] [--seconds 10] [--batch-ms 0] [--depths 1,3 --rounds 3]
                                 [--servers gunicorn,uwsgi] [--load-processes 1] [--requests predict,images:8]
                                 [--model-seconds 2]

--servers alternates the web server (gunicorn with gunicorn_conf.py, uWSGI with uwsgi.ini: the same app and
WEB_WORKERS x WEB_THREADS), so the two shipped HTTP stacks are compared in one run. --depths alternates the
worker's PIPELINE_DEPTH (a fresh web server and stand-in worker per turn, the same Redis), so serial and
pipelined workers are compared in one run; with --batch-ms > 0 the stand-in behaves like an accelerator that
takes that long per batch on cores of its own (it sleeps).

--requests alternates what each request carries, at each concurrency: `predict` (one JPEG, /predict's
multipart form, as curl and the README send it), `images:N` (N JPEGs in one v2 infer request, BYTES, as a
Triton client batches) or `pixels:N` (N images already at the model's input size, v2 UINT8: no decode in the
web). Throughput and CPU are per image, so the three show what the per-request HTTP work costs against the
per-image decode.

--model-seconds S also times the real model (ResNet50 with seeded weights on the worker's default runtime and
precision, loaded as bench.benchmark loads it) in a process of its own before each round and after the last:
S seconds at each batch of 8, 16 and 32, the best of them the model's ceiling then. Each line then says how
many times that ceiling the path carried (the issue's target: 5 x), a ratio within one run.

It starts its own redis-server, web server (the shipped web settings) and one stand-in worker on free ports,
then runs closed loops of the README's photos (images/, full size, as a client sends them) from this
process (or --load-processes of them), whose CPU is reported too: it shares the cores with what it measures.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

import helpers  # noqa: E402
import loadgen  # noqa: E402
import stack  # noqa: E402
from bench.benchmark import children, cpu_seconds  # noqa: E402
from loadgen import LoadRun, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WEB_SERVERS = {"gunicorn": stack.start_web, "uwsgi": stack.start_uwsgi}  # each starts the app with its own ini/conf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="8,32,64", help="closed-loop concurrencies, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency")
    parser.add_argument("--batch-ms", type=float, default=0.0, help="the stand-in model's time per batch")
    parser.add_argument(
        "--depths", default="", help="PIPELINE_DEPTH values to alternate, comma-separated (default: the setting's)"
    )
    parser.add_argument("--servers", default="gunicorn", help="web servers to alternate: gunicorn, uwsgi")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over the variants, who goes first alternating")
    parser.add_argument("--load-processes", type=int, default=1, help="processes the clients are spread over")
    parser.add_argument(
        "--requests", default="predict", help="what a request carries, comma-separated: predict, images:N, pixels:N"
    )
    parser.add_argument("--model-seconds", type=float, default=0.0, help="time the real model too (see above)")
    parser.add_argument("--photos", type=Path, default=ROOT / "images", help="a folder of the JPEGs to send")
    parser.add_argument("--time-model", nargs=2, help=argparse.SUPPRESS)  # SECONDS DIR: the child that does it
    args = parser.parse_args()
    if args.time_model:
        print(json.dumps(time_model(Path(args.time_model[1]), float(args.time_model[0]))))
        return
    try:
        args.requests = [request_shape(r) for r in args.requests.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    images = [path.read_bytes() for path in sorted(args.photos.glob("*.jpg"))]
    if not images:
        parser.error(f"no .jpg in {args.photos}")
    depths = [d for d in args.depths.split(",") if d] or [None]
    servers = args.servers.split(",")
    if unknown := set(servers) - set(WEB_SERVERS):
        parser.error(f"unknown --servers {', '.join(sorted(unknown))}; choose from {', '.join(WEB_SERVERS)}")
    turns = [(server, depth) for server in servers for depth in depths]
    with tempfile.TemporaryDirectory() as workdir:
        redis_port, web_port = stack.free_port(), stack.free_port()
        env = {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "WEB_PORT": str(web_port), "LOG_LEVEL": "WARNING"}
        logs = Path(workdir)
        redis = stack.start_redis(redis_port, workdir, logs / "redis.log")
        try:
            url = stack.web_url("127.0.0.1", web_port)
            print(f"stand-in model at {args.batch_ms:g} ms per batch, {os.cpu_count()} CPUs, photos: "
                  f"{', '.join(f'{len(i) // 1024} KB' for i in images)}")  # fmt: skip
            ceilings = []
            for r in range(args.rounds):
                if args.model_seconds:
                    ceilings.append(model_ceiling(Path(workdir), args.model_seconds))
                for server, depth in turns[r % len(turns) :] + turns[: r % len(turns)]:
                    metrics_dir = tempfile.mkdtemp(dir=workdir)  # each server's own prometheus-client files
                    web = WEB_SERVERS[server](env | {"PROMETHEUS_MULTIPROC_DIR": metrics_dir}, logs / f"{server}.log")
                    worker_env = env | ({"PIPELINE_DEPTH": depth} if depth else {})
                    argv = [sys.executable, "-m", "bench.stand_in_worker", "--batch-ms", str(args.batch_ms)]
                    worker = stack._start("stand-in worker", argv, worker_env, logs / "worker.log")
                    try:
                        stack.wait_until_ready(url, [redis, web, worker], 60)
                        print(f"round {r + 1}, {server}, PIPELINE_DEPTH {depth or 'as set'}:", flush=True)
                        ceiling = ceilings[-1] if ceilings else None
                        measure(url, images, args, {"Redis": redis.pid, "web": web.pid}, worker.pid, ceiling)
                    finally:
                        worker.stop()
                        web.stop()
            if args.model_seconds:
                ceilings.append(model_ceiling(Path(workdir), args.model_seconds))
                print(f"model ceilings: {', '.join(f'{c:.1f}' for c in ceilings)} images/s")
        finally:
            redis.stop()


def model_ceiling(workdir: Path, seconds: float) -> float:
    """The real model's best images/s now, timed in a process of its own (which ends before the path runs)."""
    argv = [sys.executable, "-m", "bench.path_ceiling", "--time-model", str(seconds), str(workdir)]
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    child = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    if child.returncode:
        raise SystemExit(f"timing the model failed:\n{child.stderr[-3000:]}")
    rates = json.loads(child.stdout.splitlines()[-1])
    print(f"model: {', '.join(f'batch {b} {rate:.1f}' for b, rate in rates.items())} images/s", flush=True)
    return max(rates.values())


def time_model(workdir: Path, seconds: float) -> dict[int, float]:
    """The child's part: ResNet50 loaded as the suite loads it (its weights and converted model kept in
    workdir, so later rounds load from there), then images/s at each batch size."""
    from bench.benchmark import Lab, raw_rate

    classifier = Lab(workdir).load_model()
    return {b: raw_rate(classifier, b, "predict_on_batch", seconds)["images_per_s"] for b in (8, 16, 32)}


def request_shape(text: str) -> tuple[str, int]:
    """'predict' -> ("predict", 1); 'images:8' -> ("images", 8); 'pixels:8' -> ("pixels", 8)."""
    kind, _, n = text.partition(":")
    if kind == "predict" and not n:
        return kind, 1
    if kind in ("images", "pixels") and n.isdigit() and int(n) >= 1:
        return kind, int(n)
    raise ValueError(f"--requests: {text!r} is not predict, images:N or pixels:N")


def label(shape: tuple[str, int]) -> str:
    """A request shape as --requests names it."""
    kind, n = shape
    return kind if kind == "predict" else f"{kind}:{n}"


def load_run(url: str, images: list[bytes], shape: tuple[str, int]) -> LoadRun:
    """A LoadRun sending the photos as the request shape says (see --requests)."""
    kind, n = shape
    if kind == "predict":
        return LoadRun(url + "predict", images)
    infer = loadgen.target_url(url + "predict", None, "v2")
    if kind == "images":
        return LoadRun(infer, images, per_request=n)
    height, width = requests.get(infer.removesuffix("/infer"), timeout=10).json()["inputs"][1]["shape"][1:3]
    pixels = [helpers.prepare_image(helpers.open_image(i, 10**8), (width, height)).tobytes() for i in images]
    return LoadRun(infer, pixels, per_request=n, pixels=(height, width))


def measure(url: str, images: list[bytes], args, pids: dict, worker_pid: int, ceiling: float | None) -> None:
    """Closed loops at each concurrency and request shape: images/s (with the model's ceiling, also as a
    multiple of it), latency, and each process's CPU per answered image."""
    redis_pid, web_pid = pids["Redis"], pids["web"]
    processes = {
        "web": lambda: [web_pid, *children(web_pid)],
        "Redis": lambda: [redis_pid],
        "worker (stand-in)": lambda: [worker_pid],
        "load generator": lambda: [os.getpid()],
    }
    for shape in args.requests:
        load_run(url, images, shape).closed_loop(8, duration_s=2)  # warm: connections, first requests
    for clients in (int(c) for c in args.clients.split(",")):
        for shape in args.requests:
            run = load_run(url, images, shape)  # (its set-up, a pixels decode, not counted)
            before = {name: cpu_seconds(pids()) for name, pids in processes.items()}
            started = time.monotonic()
            run.start = started
            run.closed_loop(clients, duration_s=args.seconds, processes=args.load_processes)
            summary = summarize(run.results)
            ok = max(1, sum(r.images for r in run.results if r.outcome == "200"))
            cpu = {name: (cpu_seconds(pids()) - before[name]) * 1000 / ok for name, pids in processes.items()}
            cpu["load generator"] += run.children_cpu_s * 1000 / ok
            service_cpu = sum(v for k, v in cpu.items() if k != "load generator")
            times = f" ({summary['images_per_s'] / ceiling:.1f} x the model)" if ceiling else ""
            print(
                f"{clients:>3} clients, {label(shape)}: {summary['images_per_s']:.0f} images/s{times}, p50 "
                f"{summary['latency_ms']['p50']:.0f} ms, p99 {summary['latency_ms']['p99']:.0f} ms, "
                f"failed {summary['failed'] or 0}, {time.monotonic() - started:.0f} s; CPU ms per image: "
                + ", ".join(f"{name} {ms:.2f}" for name, ms in cpu.items())
                + f"; service {service_cpu:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
