"""Classify one image with the service and print the predictions; exits 1 on any error.

python simple_request.py images/chelsea.jpg [--url http://127.0.0.1:5000/predict] [--top 5] [--model resnet50]
    [--api-key KEY]   (or API_KEY=KEY in the environment, when the service has API_KEYS)
"""

import argparse
import os
import sys

import requests

DEFAULT_URL = "http://127.0.0.1:5000/predict"
TIMEOUT_S = 60  # longer than the service's own deadline (REQUEST_TIMEOUT_S) and gunicorn's timeout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", help="path of the image to classify")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the /predict endpoint (default {DEFAULT_URL})")
    parser.add_argument("--top", type=int, help="how many predictions (1-20; the service's TOP_K by default)")
    parser.add_argument("--model", help="the model's id, when the service serves several (GET /readyz lists them)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help=f"seconds to wait (default {TIMEOUT_S})")
    parser.add_argument(
        "--api-key", default=os.environ.get("API_KEY"), help="one of the service's API_KEYS (default: $API_KEY)"
    )
    args = parser.parse_args(argv)

    try:
        with open(args.image, "rb") as f:
            response = requests.post(
                args.url,
                files={"image": (args.image, f)},
                params={"top": args.top, "model": args.model},  # None values are left out
                headers={"X-API-Key": args.api_key} if args.api_key else {},
                timeout=args.timeout,
            )
    except OSError as exc:  # an unreadable file, or the service unreachable (requests' errors are OSErrors)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        body = response.json()
    except ValueError:
        print(f"error: HTTP {response.status_code}, not JSON: {response.text[:200]}", file=sys.stderr)
        return 1
    if response.status_code != 200 or not body.get("success"):
        print(f"error: HTTP {response.status_code}: {body.get('error', body)}", file=sys.stderr)
        return 1
    for rank, prediction in enumerate(body["predictions"], 1):
        print(f"{rank}. {prediction['label']}: {prediction['probability']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
