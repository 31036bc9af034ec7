"""Load test of POST /predict with Locust: each simulated user sends one of the photos in images/ at a time,
waits 0.5-1.5 s, and sends another. A request counts as failed unless it gets 200 with five predictions;
a failure is recorded with its status and the service's JSON error ("503: the queue holds 128 images"), so
Locust's failure table says why.

    locust -f bench/locustfile.py --headless -u 8 -r 4 -t 30s --host http://127.0.0.1:5000 --csv results/locust -s 30

-u users at once, started -r per second, for -t; -s (--stop-timeout) lets each user finish the request it
is waiting for; --csv writes results/locust_stats.csv (count, failures, percentiles, requests/s) and
results/locust_failures.csv. Without --headless, Locust serves its own web UI on http://127.0.0.1:8089.
With API_KEYS set on the service, add --api-key KEY (or set LOCUST_API_KEY). --model ID picks one of several
models (/predict?model=ID); --protocol v2 sends the same photos over the Open Inference Protocol instead
(POST /v2/models/ID/infer, binary, the top 5 as Triton's classification; ID default resnet50, the default
model's id). Locust exits 1 when any
request failed. stress_test.py is the project's own, dependency-free load tool;
this file is for those who already use Locust (its UI, distributed runs, ramp-up shapes).
"""

import random
import sys
from pathlib import Path

import gevent
import locust.stats
from locust import HttpUser, between, events, task

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # Locust puts only this file's folder on the path; open_inference.py is at the top
import open_inference  # noqa: E402

IMAGES = [(path.name, path.read_bytes()) for path in sorted((ROOT / "images").glob("*.jpg"))]
TOP = 5  # the service's default top-k: an answer with any other count is a failure
TIMEOUT_S = 60  # longer than the service's REQUEST_TIMEOUT_S: the service always answers first


@events.init_command_line_parser.add_listener
def add_arguments(parser):
    parser.add_argument("--api-key", default="", env_var="LOCUST_API_KEY", help="sent as X-API-Key (for API_KEYS)")
    parser.add_argument("--model", default="", help="the model's id (default: the service's default model)")
    parser.add_argument("--protocol", choices=["predict", "v2"], default="predict", help="/predict or v2 infer")


@events.init.add_listener
def complete_csv_at_exit(environment, **kwargs):
    """Locust rewrites the --csv files once a second while it runs and not again at exit, so they would miss
    the requests of the last second (and those finished during --stop-timeout). At exit, once every user has
    stopped, wait for its writer's next turn, so that the CSV holds the same final numbers as the summary."""
    if environment.parsed_options and environment.parsed_options.csv_prefix:
        environment.events.quit.add_listener(lambda **_: gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.5))


class PredictUser(HttpUser):
    wait_time = between(0.5, 1.5)

    def on_start(self):
        options = self.environment.parsed_options
        if options and options.api_key:
            self.client.headers["X-API-Key"] = options.api_key
        self.v2 = bool(options and options.protocol == "v2")
        self.model = (options.model if options else "") or ("resnet50" if self.v2 else "")

    @task
    def predict(self):
        name, data = random.choice(IMAGES)
        if self.v2:
            path = f"/v2/models/{self.model}/infer"
            body, headers = open_inference.encode_infer_request([data], TOP)
            request = {"data": body, "headers": headers}
        else:
            path, request = "/predict", {"files": {"image": (name, data, "image/jpeg")}}
            request["params"] = {"model": self.model} if self.model else None
        # One name for every image, so Locust's statistics count all uploads as one endpoint.
        with self.client.post(path, name=path, timeout=TIMEOUT_S, catch_response=True, **request) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {error_message(response)}")
                return
            try:
                predictions = (
                    open_inference.decode_classification(
                        response.content, response.headers.get(open_inference.HEADER_LENGTH)
                    )[0]
                    if self.v2
                    else response.json()["predictions"]
                )
            except (ValueError, KeyError, TypeError, IndexError):
                response.failure(f"200 without predictions: {response.text[:200]}")
                return
            if len(predictions) != TOP:
                response.failure(f"200 with {len(predictions)} predictions, not {TOP}")


def error_message(response) -> str:
    """The service's JSON error message, else the start of whatever came back (a proxy's HTML page)."""
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return (response.text or str(response.error or "no answer"))[:200]
