"""Operate a running service's queues: look at them, drain them for maintenance, purge them safely.

    python admin.py [--model ID] COMMAND   every served model's queue, or model ID's alone:
    python admin.py status            what is waiting, being processed, and which workers are alive
    python admin.py drain [--wait S]  refuse new requests (503 + Retry-After) and wait until every held
                                      message is answered; then stop or upgrade the workers
    python admin.py resume            accept requests again
    python admin.py purge --yes       answer every waiting request with 503 at once and drop its message

Uses the same settings as the service (REDIS_URL, IMAGE_QUEUE, ...); the models are those the workers
registered (ModelDirectory). Purge touches this queue's waiting
list only: requests being processed finish, and nothing else in Redis is deleted (never FLUSHALL a
Redis that holds a queue: waiting clients would hang until their deadline and other data would go).
"""

import argparse
import sys
import time

import settings
from image_queue import REDIS_ERRORS, ImageQueue, ModelDirectory, QueueUnavailable, ShardedQueue


def show(queue: ImageQueue | ShardedQueue) -> None:
    status, stats = queue.status(), queue.stats()
    model = f"{status.model.name} {status.model.width}x{status.model.height}" if status.model else "none yet"
    print(
        f"queue {queue.keys.name!r}: {status.queue_depth} waiting, {status.held - status.queue_depth} being processed"
    )
    for shard, (waiting, in_progress) in stats.shards.items():  # QUEUE_SHARDS > 1
        print(f"  shard {shard!r}: {waiting} waiting, {in_progress} being processed")
    print(f"{'draining: new requests are refused' if status.paused else 'accepting requests'}; model {model}")
    print(f"workers alive: {status.live_workers}")
    for worker, beat in sorted(stats.heartbeats.items()):
        age = stats.server_time - beat
        state = "alive" if age <= queue.worker_ttl_s else "silent (its messages go back to the queue)"
        print(f"  {worker}: last heartbeat {age:.1f} s ago, {state}")


def held_now(queues: list[ImageQueue | ShardedQueue]) -> int:
    """Messages waiting or being processed, from every shard: stats() raises when one cannot be read, where
    status() adds up the shards that answer (readiness), which could call a queue drained that is not."""
    return sum(stats.queue_depth + stats.in_progress for stats in (queue.stats() for queue in queues))


def drain(queues: list[ImageQueue | ShardedQueue], wait_s: float) -> int:
    for queue in queues:
        queue.pause()
    print("draining: new requests get 503 with Retry-After; waiting for held messages to be answered")
    deadline = time.monotonic() + wait_s
    while (held := held_now(queues)) and time.monotonic() < deadline:
        print(f"  {held} held", flush=True)
        time.sleep(1)
    if held:
        print(
            f"{held} messages still held after {wait_s:g} s (are the workers running?); the queue stays paused: "
            "new requests get 503 until `python admin.py resume`",
            file=sys.stderr,
        )
        return 1
    print("drained: nothing is held; stop or upgrade the workers, then `python admin.py resume`")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except (QueueUnavailable, *REDIS_ERRORS) as exc:  # one line that says which setting to check
        print(f"admin.py: {exc}; is REDIS_URL set to the service's Redis?", file=sys.stderr)
        return 1
    except ValueError as exc:  # a --model that cannot be a model id
        print(f"admin.py: {exc}", file=sys.stderr)
        return 1


def wrong_queues(model_ids: list[str], queues: list, served: list[str], explicit: bool) -> str | None:
    """Why admin.py must not act on these queues, or None: a --model no worker registered (a typo would drain
    or purge a queue nobody serves and say "drained"), unless its queue is paused (a model drained and left
    stopped is still resumed); or a QUEUE_SHARDS other than the one the model's workers run with (it would
    see and act on some of the shards only)."""
    for model_id, queue in zip(model_ids, queues, strict=True):
        status = queue.status()
        if explicit and model_id not in served and not status.paused:
            return (
                f"no model {model_id!r} is served on this Redis (models: {', '.join(served) or 'none'}): check --model"
            )
        shards = status.model.shards if status.model else 0
        if shards and shards != settings.QUEUE_SHARDS:
            return (
                f"model {model_id!r}: its workers run with QUEUE_SHARDS={shards}, this admin.py with "
                f"{settings.QUEUE_SHARDS}: give it the service's settings (QUEUE_SHARDS, IMAGE_QUEUE, REDIS_URL)"
            )
    return None


def run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="act on this model's queue only (default: every model served)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="waiting and held messages, workers")
    drain_parser = commands.add_parser("drain", help="refuse new requests and wait until nothing is held")
    drain_parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait (default 60)")
    commands.add_parser("resume", help="accept requests again")
    purge_parser = commands.add_parser("purge", help="answer every waiting request with 503 and drop it")
    purge_parser.add_argument("--yes", action="store_true", help="really purge")
    args = parser.parse_args(argv)

    directory = ModelDirectory(settings.current.as_dict())
    served = directory.ids()
    model_ids = [args.model] if args.model else served
    if not model_ids:
        print("no model is served: no model worker has registered on this Redis", file=sys.stderr)
        return 1
    queues = [directory.queue_for(model_id) for model_id in model_ids]
    if refusal := wrong_queues(model_ids, queues, served, explicit=bool(args.model)):
        print(f"admin.py: {refusal}", file=sys.stderr)
        return 1
    if args.command == "status":
        for model_id, queue in zip(model_ids, queues, strict=True):
            print(f"model {model_id!r}:")
            show(queue)
    elif args.command == "drain":
        return drain(queues, args.wait)
    elif args.command == "resume":
        for queue in queues:
            queue.resume()
        print("accepting requests")
    elif args.command == "purge":
        if not args.yes:
            waiting = sum(queue.stats().queue_depth for queue in queues)
            print(f"{waiting} requests are waiting; purge answers each with 503 at once: run again with --yes")
            return 2
        purged = sum(queue.purge("admin.py purge") for queue in queues)
        print(f"purged {purged} waiting messages; requests being processed finish")
    return 0


if __name__ == "__main__":
    sys.exit(main())
