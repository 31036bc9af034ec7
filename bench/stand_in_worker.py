"""A model worker serving the stand-in model (bench/stand_in.py): the real worker loop, queue protocol and
heartbeats, with a model of fixed cost per batch (0 ms by default). For benchmarks only, never a serving
option: it answers with made-up labels.

    python -m bench.stand_in_worker [--batch-ms 0]    (settings from the environment, as run_model_server.py)
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import logs  # noqa: E402
import settings  # noqa: E402
from bench.stand_in import StandInModel  # noqa: E402
from image_queue import queue_from_config  # noqa: E402
from run_model_server import serve  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-ms", type=float, default=0.0, help="the stand-in's time per batch")
    args = parser.parse_args()
    logs.configure()
    return serve(
        queue_from_config(settings.current.as_dict(), model_id=settings.MODEL_ID),
        StandInModel(args.batch_ms),
        settings.BATCH_SIZE,
        settings.current.pipeline_depth(model_on_host_cpu=False),  # it stands for an accelerator
    )


if __name__ == "__main__":
    sys.exit(main())
