"""Load the service and report what it did: sent, succeeded, failed by status, throughput, latency.

By default the seed's pattern: 500 requests, a new one every 0.05 s, each from its own thread (open
loop); it waits for every answer, then prints a summary. --concurrency N runs a closed loop instead:
N clients, each sending its next request as soon as its last is answered.

    python stress_test.py [--count 500] [--spacing 0.05] [--concurrency N [--processes P]] [--url URL]
                          [--image FILE ...] [--model ID] [--protocol predict|v2] [--json FILE] [--plot FILE.png]

--processes spreads the closed loop's clients over P processes: one Python process spends ~1.4 ms of CPU per
request, so alone it caps the load near 700 requests/s, below what a GPU box serves (no progress lines then).

--model picks one of several models the service serves (/predict?model=ID); --protocol v2 sends the same
images over the Open Inference Protocol instead (POST /v2/models/ID/infer, as tritonclient does; without
--model, to the one model the service serves). --api-key KEY (or API_KEY=KEY in the environment) sends one of
the service's API_KEYS as X-API-Key.
"""

import argparse
import json
import os
import sys
import threading
from pathlib import Path

from loadgen import API_KEY_VARIABLE, TIMEOUT_S, LoadRun, format_summary, summarize, target_url

DEFAULT_URL = "http://127.0.0.1:5000/predict"
DEFAULT_IMAGE = Path(__file__).resolve().parent / "images" / "chelsea.jpg"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the /predict endpoint (default {DEFAULT_URL})")
    parser.add_argument("--image", action="append", type=Path, help="image file; repeat to rotate through several")
    parser.add_argument("--count", "-n", type=int, default=500, help="requests to send (default 500)")
    parser.add_argument("--spacing", type=float, default=0.05, help="seconds between new requests (default 0.05)")
    parser.add_argument("--concurrency", type=int, help="closed loop with this many clients instead of --spacing")
    parser.add_argument("--processes", type=int, default=1, help="with --concurrency: processes to spread it over")
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT_S, help=f"client timeout, seconds (default {TIMEOUT_S})"
    )
    parser.add_argument("--model", help="the model's id, when the service serves several (GET /readyz lists them)")
    parser.add_argument("--protocol", choices=("predict", "v2"), default="predict", help="/predict or v2 infer")
    parser.add_argument("--api-key", help="one of the service's API_KEYS, sent as X-API-Key (default: $API_KEY)")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON to this file")
    parser.add_argument("--plot", type=Path, help="also draw latency over the run and its histogram to this PNG")
    args = parser.parse_args(argv)
    if args.processes > 1 and not args.concurrency:
        parser.error("--processes spreads a closed loop: give --concurrency too")

    try:
        images = [path.read_bytes() for path in (args.image or [DEFAULT_IMAGE])]
    except OSError as exc:
        parser.error(f"cannot read {exc.filename}: {exc.strerror}")
    if args.api_key:  # read by loadgen, in this process and in those a closed loop spreads over
        os.environ[API_KEY_VARIABLE] = args.api_key
    url = target_url(args.url, args.model, args.protocol)
    run = LoadRun(url, images, args.timeout)
    if args.processes == 1:  # other processes' answers arrive only when they end
        threading.Thread(target=run.print_progress, args=(args.count,), daemon=True).start()
    if args.concurrency:
        spread = f" over {args.processes} processes" if args.processes > 1 else ""
        print(
            f"stress test: {args.count} requests to {url} from {args.concurrency} clients in a closed loop{spread}",
            flush=True,
        )
        run.closed_loop(args.concurrency, count=args.count, processes=args.processes)
    else:
        print(
            f"stress test: {args.count} requests to {url}, one every {args.spacing} s, each in its own thread",
            flush=True,
        )
        run.open_loop(args.count, args.spacing)
    summary = summarize(run.results)
    print(format_summary(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.plot:
        try:
            from bench.plots import plot_run  # matplotlib only when asked for
        except ImportError as exc:
            print(f"--plot needs matplotlib ({exc}): pip install -r requirements-dev.txt", file=sys.stderr)
            return 2

        plot_run(run.results, args.plot, f"stress test: {args.count} requests to {url}")
        print(f"plot written to {args.plot}")
    return 0 if summary["succeeded"] == summary["sent"] else 1


if __name__ == "__main__":
    sys.exit(main())
