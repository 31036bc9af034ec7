"""bench/locustfile.py run as the README says (headless, --csv) against real gunicorn and a ResNet50 worker.

Locust's own numbers are checked against the service's: the model worker's log must show exactly as many
answers as the CSV counts requests, so the statistics are of real round trips and final (Locust itself
leaves the CSV up to a second behind; locustfile.py makes it wait for one more rewrite at exit).
"""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from support import ROOT
from support.traffic import answered_ids, wait_for

pytestmark = pytest.mark.slow

LOCUST = Path(sys.executable).with_name("locust")  # the venv's console script, as a user runs it
USERS, SECONDS = 4, 8


@pytest.fixture(scope="module")
def served(make_module_stack):
    return make_module_stack.serve(REQUEST_TIMEOUT_S=30, GUNICORN_TIMEOUT_S=60)


def run_locust(url: str, csv_prefix: Path, *options: str) -> subprocess.CompletedProcess:
    argv = [str(LOCUST), "-f", str(ROOT / "bench" / "locustfile.py"), "--headless", "-u", str(USERS), "-r", str(USERS)]
    argv += ["-t", f"{SECONDS}s", "--stop-timeout", "30", "--host", url.rstrip("/"), "--csv", str(csv_prefix)]
    return subprocess.run([*argv, "--only-summary", *options], cwd=ROOT, capture_output=True, text=True, timeout=120)


def stats_row(csv_prefix: Path, name: str) -> dict:
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        return next(row for row in csv.DictReader(f) if row["Name"] == name)


@pytest.mark.parametrize(
    "options, endpoint", [([], "/predict"), (["--protocol", "v2"], "/v2/models/resnet50/infer")], ids=["predict", "v2"]
)
def test_locust_headless_posts_photos_that_all_succeed_and_the_worker_served_each_one(
    served, tmp_path, options, endpoint
):
    before = len(answered_ids(served.worker_logs()))

    result = run_locust(served.url, tmp_path / "locust", *options)

    assert result.returncode == 0, result.stdout + result.stderr  # Locust exits 1 if any request failed
    row = stats_row(tmp_path / "locust", endpoint)
    total = stats_row(tmp_path / "locust", "Aggregated")
    count, failures = int(row["Request Count"]), int(row["Failure Count"])
    assert row["Type"] == "POST" and failures == 0 and int(total["Request Count"]) == count  # one endpoint only
    # Each user waits 0.5-1.5 s between requests that take ~0.1-1 s here: about one request per user-second.
    assert 2 * USERS <= count <= USERS * SECONDS / 0.5 + USERS, count
    assert float(row["Median Response Time"]) > 0 and float(row["Requests/s"]) > 0
    # Every request Locust counted was a real prediction: the worker answered exactly that many (none was
    # cut off uncounted at the end: --stop-timeout lets each user finish the request it is waiting for).
    wait_for(lambda: len(answered_ids(served.worker_logs())) - before >= count, 10)
    assert len(answered_ids(served.worker_logs())) - before == count


def test_locust_records_the_services_json_error_as_the_failure_and_exits_1(make_module_stack, tmp_path):
    """A second gunicorn on a queue no worker serves: every request gets 503 "no model worker is running"."""
    lonely = make_module_stack()
    lonely.start_web()
    wait_for(lambda: requests.get(lonely.url + "healthz", timeout=10).ok, 60)

    result = run_locust(lonely.url, tmp_path / "locust")

    assert result.returncode == 1, result.stdout + result.stderr
    row = stats_row(tmp_path / "locust", "/predict")
    assert int(row["Request Count"]) > 0 and row["Failure Count"] == row["Request Count"]
    with open(tmp_path / "locust_failures.csv", newline="") as f:
        failures = list(csv.DictReader(f))
    # Locust writes the message given to response.failure() as CatchResponseError('<message>').
    assert [(r["Name"], r["Error"]) for r in failures] == [
        ("/predict", "CatchResponseError('503: no model worker is running')")
    ], failures
