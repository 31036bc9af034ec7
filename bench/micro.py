"""Tuning micro-benchmark: what each candidate change to the service would save, one section per change.

    python -m bench.micro [--quick] [--only SECTION ...] [--json FILE]   (2-4 min on 2 cores; --quick < 1 min)

Loads ResNet50 with seeded random weights (speed does not depend on the weight values) through
classifier.load_classifier, warms it up as the worker does (warm_up(32)), then measures:
  codec                the queue message (helpers: a JSON header, "\\n", the raw pixels) against the first format,
                       JSON + base64: bytes and encode/decode microseconds, also as a share of one image's inference;
  jpeg_draft           helpers.prepare_image with and without JPEG draft decoding (a small and a 12 MP JPEG),
                       and, when they are installed (not dependencies), libjpeg-turbo's DCT scaling through
                       simplejpeg and OpenCV's decode + INTER_AREA resize (issue 12's candidates: pip install
                       simplejpeg opencv-python-headless, or PYTHONPATH=<a folder with them>);
  padding_vs_retracing whether a new batch size re-traces the model's function, and what padding the batch
                       up to a bucket (1, 2, 4, 8, 16, 32) would cost on every call instead;
  redis_round_trips    commands, round trips and milliseconds of one batch's claim + ack on a private
                       redis-server, against answering with plain commands, one by one or pipelined;
  reply_wait           the web's CPU to receive one answer: today's per-request blocking read of its own result
                       key (ImageQueue.wait_for: BLMOVE onto itself, then DEL) against issue 12's candidate, one
                       reply listener per web process reading a reply list that workers push to (a blocking wake,
                       then LRANGE + LTRIM of every answer there), with 1, 8 and 32 answers per wake;
  claim                a worker's take of up to 32 messages with 0, 1, 32 or a changing number waiting:
                       ImageQueue._take_now (one MULTI of as many moves as the last take saw waiting, a second
                       for any more) against the former single MULTI of 32 moves;
  xla_and_precision    images/s of the default model, the model compiled with XLA (jit_compile=True), and a
                       mixed_bfloat16 model, measured interleaved (A B C A B C): this machine's speed drifts.
Every loop is bounded by a count or a number of seconds, so the script stops by itself. Each section
prints a table; one summary line per section comes at the end, and --json FILE writes all results.
"""

import argparse
import base64
import binascii
import io
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import redis
from PIL import Image, ImageOps

import helpers
import image_queue
import stack
from image_queue import Done, ImageQueue

ROOT = Path(__file__).resolve().parent.parent  # the repository
IMAGE = ROOT / "images" / "chelsea.jpg"
LABELS = ROOT / "models" / "imagenet_class_index.json"
SIZE = (224, 224)
BUCKETS = (1, 2, 4, 8, 16, 32)
BATCH = 32  # the worker's BATCH_SIZE default


@dataclass(frozen=True)
class Plan:
    """How many repetitions or seconds each section spends."""

    codec_reps: int
    jpeg_reps_small: int
    jpeg_reps_large: int
    inference_reps: int
    pad_sizes: tuple[int, ...]
    pad_reps: int
    redis_reps: int
    reply_reps: int
    claim_reps: int
    xla_batches: tuple[int, ...]
    xla_rounds: int
    xla_seconds: float


FULL = Plan(500, 30, 8, 3, (3, 5, 7, 12, 17, 25), 3, 10, 2000, 400, (8, 32), 2, 2.0)
QUICK = Plan(100, 10, 3, 1, (3, 12), 1, 3, 300, 60, (8,), 2, 1.0)


# --- Timing helpers -----------------------------------------------------------------------------


def timed(function, reps: int) -> list[float]:
    """Seconds of each of reps calls of function()."""
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def median_ms(times: list[float]) -> float:
    """The median of a list of seconds, in milliseconds, rounded for a table."""
    return round(statistics.median(times) * 1000, 2)


def random_pixels(n: int, seed: int = 0) -> np.ndarray:
    """n random uint8 images of the model's input size: (n, 224, 224, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (n, *SIZE, 3), dtype=np.uint8)


def build_classifier(tmp: str):
    """ResNet50 with seeded random weights, saved in tmp and loaded through the worker's own seam."""
    import keras

    from classifier import load_classifier

    weights = str(Path(tmp) / "resnet50-seeded.weights.h5")
    keras.utils.set_random_seed(1)
    keras.applications.ResNet50(weights=None).save_weights(weights)
    return load_classifier("ResNet50", weights, labels_path=str(LABELS)), weights


def batch_inference_s(classifier, reps: int) -> float:
    """Median seconds of classifier.predict (preprocessing + predict_on_batch) at the full batch."""
    pixels = random_pixels(BATCH)
    return statistics.median(timed(lambda: classifier.predict(pixels), reps))


# --- 1. codec -----------------------------------------------------------------------------------


def encode_json_base64(request_id: str, deadline: float, top: int, pixels: np.ndarray) -> bytes:
    """The service's first message format, kept here to compare: one JSON object with the pixels in base64."""
    body = {"id": request_id, "deadline": deadline, "top": top, "shape": list(pixels.shape), "dtype": "uint8"}
    body["data"] = base64.b64encode(np.ascontiguousarray(pixels).tobytes()).decode("ascii")
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def decode_json_base64(raw: bytes) -> image_queue.Message:
    """Parse the first format, as its decode_message did (checks aside)."""
    body = json.loads(raw)
    data = binascii.a2b_base64(body["data"], strict_mode=True)
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(tuple(int(n) for n in body["shape"]))
    return image_queue.Message(body["id"], float(body["deadline"]), int(body["top"]), pixels)


def codec(plan: Plan, image_inference_ms: float) -> dict:
    """The message format (helpers: JSON header + raw pixels) against the first one (JSON + base64): bytes, µs."""
    pixels = random_pixels(1)[0]
    request_id, deadline = uuid.uuid4().hex, time.time() + 60
    formats = {
        "json_base64": (encode_json_base64, decode_json_base64),
        "binary": (image_queue.encode_message, image_queue.decode_message),
    }
    rows = {}
    for name, (encode, decode) in formats.items():
        raw = encode(request_id, deadline, 5, pixels)
        if not np.array_equal(decode(raw).pixels, pixels):
            raise AssertionError(f"{name} does not round-trip")
        encode_us = statistics.median(timed(lambda e=encode: e(request_id, deadline, 5, pixels), plan.codec_reps))
        decode_us = statistics.median(timed(lambda d=decode, r=raw: d(r), plan.codec_reps))
        encode_us, decode_us = encode_us * 1e6, decode_us * 1e6
        rows[name] = {
            "bytes": len(raw),
            "encode_us": round(encode_us, 1),
            "decode_us": round(decode_us, 1),
            "share_of_image_inference": round((encode_us + decode_us) / 1000 / image_inference_ms, 5),
        }
    print(f"\n1. codec (224x224x3; inference {image_inference_ms:.1f} ms per image at batch {BATCH})")
    print(f"{'format':>12} {'bytes':>9} {'encode µs':>10} {'decode µs':>10} {'share of inference':>19}")
    for name, row in rows.items():
        print(
            f"{name:>12} {row['bytes']:>9,} {row['encode_us']:>10.1f} {row['decode_us']:>10.1f}"
            f" {row['share_of_image_inference']:>19.3%}"
        )
    return {"image_inference_ms": round(image_inference_ms, 2), "formats": rows}


# --- 2. jpeg_draft ------------------------------------------------------------------------------


def prepare_without_draft(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """helpers.prepare_image's steps without image.draft: the JPEG is decoded at full size."""
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in ("1", "P", "PA"):
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    if image.size != size:
        gap = None if image.mode.startswith("I;16") else 3.0
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=gap)
    return np.asarray(helpers.to_rgb(image), dtype=np.uint8)


def prepare_with_simplejpeg(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """The candidate: libjpeg-turbo decodes at the smallest DCT scale that still covers size, Pillow resizes
    as helpers.prepare_image does. (No EXIF orientation: a real switch would have to add it.)"""
    import simplejpeg

    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=max(size), min_height=max(size))
    image = Image.fromarray(pixels)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def prepare_with_opencv(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """The candidate: OpenCV decodes (libjpeg-turbo, EXIF orientation applied) and resizes with INTER_AREA, its
    antialiased downscale, as Pillow's BILINEAR with reducing_gap is; one thread, as a web worker's would be."""
    import cv2

    cv2.setNumThreads(1)
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


# Other decoders measured beside Pillow when they are installed (not dependencies): name -> (module, prepare)
CANDIDATE_DECODERS = {"simplejpeg": ("simplejpeg", prepare_with_simplejpeg), "opencv": ("cv2", prepare_with_opencv)}


def large_jpeg() -> bytes:
    """A 12-megapixel (4032x3024) quality-90 JPEG made from chelsea.jpg, in memory."""
    buffer = io.BytesIO()
    with Image.open(IMAGE) as source:
        source.convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def jpeg_draft(plan: Plan) -> dict:
    """prepare_image (draft decoding) against the same steps without draft, for a small and a 12 MP JPEG."""
    cases = {"chelsea": (IMAGE.read_bytes(), plan.jpeg_reps_small), "12mp": (large_jpeg(), plan.jpeg_reps_large)}
    candidates = {name: prepare for name, (module, prepare) in CANDIDATE_DECODERS.items() if importable(module)}
    rows = {}
    for name, (data, reps) in cases.items():
        with_draft = lambda d=data: helpers.prepare_image(helpers.open_image(d, 10**8), SIZE)  # noqa: E731
        without = lambda d=data: prepare_without_draft(helpers.open_image(d, 10**8), SIZE)  # noqa: E731
        probe = helpers.open_image(data, 10**8)
        original = probe.size
        probe.draft(None, (max(SIZE), max(SIZE)))
        calls = {other: (lambda d=data, f=prepare: f(d, SIZE)) for other, prepare in candidates.items()}
        draft_ms, plain_ms, other_ms = [], [], {other: [] for other in calls}
        for _ in range(reps):  # interleaved, so drift hits each alike
            draft_ms += timed(with_draft, 1)
            plain_ms += timed(without, 1)
            for other, call in calls.items():
                other_ms[other] += timed(call, 1)
        difference = np.abs(with_draft().astype(np.int16) - without().astype(np.int16))
        rows[name] = {
            "jpeg_bytes": len(data),
            "size": list(original),
            "draft_decodes_at": list(probe.size),
            "draft_ms": median_ms(draft_ms),
            "no_draft_ms": median_ms(plain_ms),
            "speedup": round(statistics.median(plain_ms) / statistics.median(draft_ms), 2),
            "mean_abs_pixel_difference": round(float(difference.mean()), 2),
        }
        for other, call in calls.items():
            other_difference = np.abs(with_draft().astype(np.int16) - call().astype(np.int16))
            rows[name] |= {
                f"{other}_ms": median_ms(other_ms[other]),
                f"{other}_speedup_over_draft": round(
                    statistics.median(draft_ms) / statistics.median(other_ms[other]), 2
                ),
                f"{other}_mean_abs_pixel_difference": round(float(other_difference.mean()), 2),
            }
    print("\n2. jpeg_draft (open_image + prepare_image to 224x224, median ms)")
    header = f"{'image':>8} {'size':>10} {'draft at':>9} {'draft ms':>9} {'no draft ms':>12} {'speedup':>8}"
    print(f"{header} {'pixel diff':>10}")
    for name, row in rows.items():
        print(
            f"{name:>8} {'x'.join(map(str, row['size'])):>10} {'x'.join(map(str, row['draft_decodes_at'])):>9}"
            f" {row['draft_ms']:>9.2f} {row['no_draft_ms']:>12.2f} {row['speedup']:>7.2f}x"
            f" {row['mean_abs_pixel_difference']:>10.2f}"
        )
        for other in candidates:
            print(
                f"{'':>8} {other}: {row[f'{other}_ms']:.2f} ms, {row[f'{other}_speedup_over_draft']:.2f}x draft's, "
                f"mean pixel difference from draft's {row[f'{other}_mean_abs_pixel_difference']:.2f}"
            )
    return rows


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# --- 3. padding_vs_retracing --------------------------------------------------------------------


def tracing_count(model) -> int | None:
    """How often the model's predict function has been traced (None before it exists)."""
    function = getattr(model, "predict_function", None)
    return function.experimental_get_tracing_count() if function is not None else None


def padding_vs_retracing(plan: Plan, classifier) -> dict:
    """First and steady call times at batch sizes warm_up never ran, against running the next bucket size."""
    rows, warmed = {}, set(BUCKETS) & {1, 2, BATCH}
    for n in plan.pad_sizes:
        bucket = min(b for b in BUCKETS if b >= n)
        pixels, padded = random_pixels(n, n), random_pixels(bucket, n)
        traced = tracing_count(classifier.model)
        first_ms = timed(lambda p=pixels: classifier.predict(p), 1)[0] * 1000
        retraced = (tracing_count(classifier.model) or 0) - (traced or 0)
        if bucket not in warmed:  # its own first call is not what padding would cost afterwards
            classifier.predict(padded)
            warmed.add(bucket)
        steady, bucket_steady = [], []
        for _ in range(plan.pad_reps):  # interleaved: n, bucket, n, bucket, ...
            steady += timed(lambda p=pixels: classifier.predict(p), 1)
            bucket_steady += timed(lambda p=padded: classifier.predict(p), 1)
        rows[n] = {
            "bucket": bucket,
            "first_ms": round(first_ms, 1),
            "traces_on_first_call": retraced if traced is not None else None,
            "steady_ms": median_ms(steady),
            "padded_steady_ms": median_ms(bucket_steady),
        }
    print(f"\n3. padding_vs_retracing (after warm_up({BATCH}); tracing count {tracing_count(classifier.model)})")
    print(
        f"{'n':>4} {'bucket':>6} {'first ms':>9} {'traces':>6} {'steady ms':>10} {'padded ms':>10} {'padding +%':>10}"
    )
    for n, row in rows.items():
        extra = row["padded_steady_ms"] / row["steady_ms"] - 1
        print(
            f"{n:>4} {row['bucket']:>6} {row['first_ms']:>9.1f} {str(row['traces_on_first_call']):>6}"
            f" {row['steady_ms']:>10.1f} {row['padded_steady_ms']:>10.1f} {extra:>10.0%}"
        )
    conclusion = padding_conclusion(rows)
    print(conclusion)
    return {"sizes": rows, "conclusion": conclusion}


def padding_conclusion(rows: dict) -> str:
    """One sentence: does a new batch size re-trace, and does padding to a bucket pay for itself."""
    retraced = [n for n, r in rows.items() if r["traces_on_first_call"]]
    first_extra = statistics.median(r["first_ms"] - r["steady_ms"] for r in rows.values())
    pad_extra = statistics.median(r["padded_steady_ms"] - r["steady_ms"] for r in rows.values())
    if retraced:
        trace = f"a new batch size re-traces here (sizes {retraced})"
    else:
        trace = "a new batch size does not re-trace (predict_on_batch's tf.function has reduce_retracing=True)"
    cost = "costs more than it saves" if pad_extra > 0 and not retraced else "may pay for itself"
    return (
        f"conclusion: {trace}; a first call at a new size costs {first_extra:+.0f} ms once (median), padding to the "
        f"bucket {pad_extra:+.0f} ms on every call, so padding {cost}"
    )


# --- 4. redis_round_trips -----------------------------------------------------------------------


class CountingConnection(redis.Connection):
    """A redis-py connection that counts its writes: one per command, one per pipeline, i.e. round trips."""

    sends = 0

    def send_packed_command(self, command, check_health=True):
        """Count, then send as usual."""
        CountingConnection.sends += 1
        return super().send_packed_command(command, check_health)


def command_stats(client: redis.Redis) -> dict[str, int]:
    """Calls per command since CONFIG RESETSTAT (commands run inside scripts and MULTIs included, ours left out)."""
    stats = {name.removeprefix("cmdstat_"): s for name, s in client.info("commandstats").items()}
    return {name: int(s["calls"]) for name, s in sorted(stats.items()) if not name.startswith(("config", "info"))}


def redis_cpu_ms(client: redis.Redis) -> float:
    """CPU milliseconds the redis-server process has used (INFO cpu): all of its work, whatever the commands."""
    cpu = client.info("cpu")
    return (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])) * 1000


def measured(client: redis.Redis, step) -> dict:
    """Run step() once: its milliseconds, round trips (writes), Redis commands by name and Redis busy time."""
    client.config_resetstat()
    cpu_before = redis_cpu_ms(client)
    sends = CountingConnection.sends
    started = time.perf_counter()
    step()
    ms = (time.perf_counter() - started) * 1000
    round_trips = CountingConnection.sends - sends
    busy_ms = redis_cpu_ms(client) - cpu_before  # includes one INFO call (~0.05 ms)
    counts = command_stats(client)
    return {
        "ms": ms,
        "round_trips": round_trips,
        "commands": sum(counts.values()),
        "by_command": counts,
        "redis_busy_ms": busy_ms,
    }


def claimed_batch(queue: ImageQueue, worker: str, messages: list[bytes]) -> list[bytes]:
    """Enqueue the messages and claim them as one batch (not timed: the setup of an answering path)."""
    for message in messages:
        queue.enqueue(message)
    claim = queue.claim(worker, len(messages))
    if len(claim.messages) != len(messages):
        raise AssertionError(f"claimed {len(claim.messages)} of {len(messages)} messages")
    return claim.messages


def answer_plain(client: redis.Redis, queue: ImageQueue, worker: str, claimed: list[tuple[bytes, str]], answer, pipe):
    """Answer each (message, request id) with RPUSH + EXPIRE + LREM of the whole message, on client or a pipeline."""
    target = client.pipeline(transaction=False) if pipe else client
    processing = queue.keys.processing(worker)
    for raw, request_id in claimed:
        key = queue.keys.result(request_id)
        target.rpush(key, answer)
        target.expire(key, queue.result_ttl_s)
        target.lrem(processing, 1, raw)
    if pipe:
        target.execute()


def one_batch(client: redis.Redis, queue: ImageQueue, worker: str, messages: list[bytes], answer: bytes) -> dict:
    """One batch through each path: the project's enqueue (all 32) + claim + ack, then plain and pipelined answers."""
    processing = queue.keys.processing(worker)
    enqueue = measured(client, lambda: [queue.enqueue(message) for message in messages])
    holder: dict = {}
    claim = measured(client, lambda: holder.update(claim=queue.claim(worker, len(messages))))
    claimed = holder["claim"].messages
    done = [Done(raw, image_queue.decode_message(raw).request_id, answer, time.time() + 3600) for raw in claimed]
    ack = measured(client, lambda: holder.update(ack=queue.ack(worker, done, len(done), 3.0)))
    if len(holder["ack"][0]) != len(messages) or client.llen(processing):
        raise AssertionError(f"the ack answered {len(holder['ack'][0])} of {len(messages)} messages")
    paths = {"enqueue x32": enqueue, "claim": claim, "ack": ack}
    for name, pipe in (("plain", False), ("pipelined", True)):
        claimed = [(raw, image_queue.decode_message(raw).request_id) for raw in claimed_batch(queue, worker, messages)]
        paths[name] = measured(client, lambda c=claimed, p=pipe: answer_plain(client, queue, worker, c, answer, p))
        if client.llen(processing):
            raise AssertionError(f"{name} left messages on the processing list")
    client.delete(*(queue.keys.result(d.request_id) for d in done))
    return paths


def redis_round_trips(plan: Plan, tmp: str, batch_s: float, classifier) -> dict:
    """Claim + ack of a 32-image batch on a private redis-server, against answering without a script."""
    port = stack.free_port()
    server = stack.start_redis(port, tmp, Path(tmp) / "redis.log")
    try:
        client = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0", connection_class=CountingConnection)
        queue = ImageQueue(client, "micro", queue_max=128, block_s=0.2, result_ttl_s=60, worker_ttl_s=10.0)
        pixels = random_pixels(1)[0]
        messages = [image_queue.encode_message(uuid.uuid4().hex, time.time() + 3600, 5, pixels) for _ in range(BATCH)]
        top = classifier.top_k(np.random.default_rng(0).dirichlet(np.ones(len(classifier.labels))), 5)
        answer = image_queue.encode_answer(top, BATCH, batch_s * 1000, time.time())
        one_batch(client, queue, "micro-worker", messages, answer)  # loads the scripts, opens the connection
        runs = [one_batch(client, queue, "micro-worker", messages, answer) for _ in range(plan.redis_reps)]
        server_version = client.info("server")["redis_version"]
    finally:
        server.stop()
    rows = {}
    for name in ("enqueue x32", "claim", "ack", "plain", "pipelined"):
        ms = median_ms([r[name]["ms"] / 1000 for r in runs])
        last = runs[-1][name]
        rows[name] = {
            "median_ms": ms,
            "redis_busy_ms": median_ms([r[name]["redis_busy_ms"] / 1000 for r in runs]),
            "round_trips": last["round_trips"],
            "commands": last["commands"],
            "by_command": last["by_command"],
            "share_of_batch_inference": round(ms / (batch_s * 1000), 5),
        }
    project_ms = round(rows["claim"]["median_ms"] + rows["ack"]["median_ms"], 2)
    print(f"\n4. redis_round_trips (batch of {BATCH}, {len(messages[0]):,}-byte messages; redis {server_version};")
    print(
        f"   batch-{BATCH} inference {batch_s * 1000:.0f} ms; plain/pipelined: answering only, LREM sends the message)"
    )
    print(f"{'path':>11} {'ms':>8} {'redis busy':>10} {'round trips':>11} {'commands':>8} {'share':>7}  commands")
    for name, row in rows.items():
        print(
            f"{name:>11} {row['median_ms']:>8.2f} {row['redis_busy_ms']:>10.2f} {row['round_trips']:>11}"
            f" {row['commands']:>8}"
            f" {row['share_of_batch_inference']:>7.2%}  {json.dumps(row['by_command'])}"
        )
    return {
        "redis_version": server_version,
        "message_bytes": len(messages[0]),
        "answer_bytes": len(answer),
        "batch_inference_ms": round(batch_s * 1000, 1),
        "paths": rows,
        "claim_plus_ack_ms": project_ms,
    }


# --- 5. xla_and_precision -----------------------------------------------------------------------


def reply_wait(plan: Plan, tmp: str) -> dict:
    """Client CPU (this thread) per answer received: the per-request read against a reply listener's batched read."""
    port = stack.free_port()
    server = stack.start_redis(port, tmp)
    try:
        client = image_queue.connect(f"redis://127.0.0.1:{port}/0", 1.0)
        queue = ImageQueue(client, "micro-replies")
        answer = image_queue.encode_answer([{"label": "tabby", "probability": 0.9, "index": 281}] * 5, 8, 20.0, 1.0)
        per_request = []
        for i in range(plan.reply_reps):
            request_id = f"r{i}"
            client.rpush(queue.keys.result(request_id), answer)  # the worker's ack, already done
            started = time.thread_time()
            queue.wait_for(request_id, time.monotonic() + 5)
            per_request.append(time.thread_time() - started)
        rows = {"per_request_wait_for": {"cpu_us_per_answer": round(statistics.median(per_request) * 1e6, 1)}}
        replies = "{micro-replies}:replies:web-1"
        for per_wake in (1, 8, 32):
            times = []
            for _ in range(max(1, plan.reply_reps // per_wake)):
                client.rpush(replies, *[b"r " + answer] * per_wake)  # one ack script's pushes
                started = time.thread_time()
                client.blmove(replies, replies, 1, "RIGHT", "RIGHT")  # wake: something is there (left in place)
                got = client.lrange(replies, 0, 255)
                client.ltrim(replies, len(got), -1)
                times.append((time.thread_time() - started) / len(got))
            rows[f"listener_{per_wake}_per_wake"] = {"cpu_us_per_answer": round(statistics.median(times) * 1e6, 1)}
    finally:
        server.stop()
    print("\nreply_wait: the web's CPU to receive one answer (this thread, median)")
    for name, row in rows.items():
        print(f"  {name:<24} {row['cpu_us_per_answer']:>7.1f} µs")
    return rows


def multi_take(queue: ImageQueue, worker_id: str, count: int) -> tuple[float, list[bytes]]:
    """The worker's take before 2026-12-06, for comparison: register, clock and count moves in one MULTI."""
    register = "local t = redis.call('TIME') redis.call('ZADD', KEYS[1], t[1], ARGV[1]) return {t[1], t[2]}"
    with queue.redis.pipeline(transaction=True) as pipe:
        pipe.execute_command("EVAL", register, 1, queue.keys.workers, worker_id)
        for _ in range(count):
            pipe.lmove(queue.keys.queue, queue.keys.processing(worker_id), "RIGHT", "LEFT")
        (sec, usec), *moved = pipe.execute()
    return int(sec) + int(usec) / 1e6, [m for m in moved if m is not None]


def claim(plan: Plan, tmp: str) -> dict:
    """A worker's take of up to BATCH messages with 0, 1 and BATCH waiting, each level held for every take:
    ImageQueue._take_now (one MULTI of as many moves as the last take saw waiting, a second for any more)
    against the former single MULTI of BATCH moves, in turn; wall time and this thread's CPU per take
    (medians); then a level that changes at every take (0, 32, 1, 32, ...: the worst for a guess)."""
    port = stack.free_port()
    server = stack.start_redis(port, tmp)
    try:
        client = image_queue.connect(f"redis://127.0.0.1:{port}/0", 1.0)
        queue = ImageQueue(client, "micro-claim")
        message = image_queue.encode_message(uuid.uuid4().hex, time.time() + 3600, 5, random_pixels(1)[0])
        takes = {"today": lambda: queue._take_now("w", BATCH), "one_multi": lambda: multi_take(queue, "w", BATCH)}
        rows = {}
        for level in ("0", "1", str(BATCH), "changing"):
            walls, cpus = {name: [] for name in takes}, {name: [] for name in takes}
            for i in range(plan.claim_reps):
                waiting = int(level) if level != "changing" else (0, BATCH, 1, BATCH)[i % 4]
                for name, take in takes.items():
                    client.delete(queue.keys.processing("w"))
                    if waiting:
                        client.rpush(queue.keys.queue, *[message] * waiting)
                    wall, cpu = time.perf_counter(), time.thread_time()
                    _, got = take()
                    walls[name].append(time.perf_counter() - wall)
                    cpus[name].append(time.thread_time() - cpu)
                    assert len(got) == waiting, (name, len(got), waiting)
            rows[f"{level}_waiting"] = {
                name: {"wall_us": round(statistics.median(walls[name]) * 1e6, 1),
                       "cpu_us": round(statistics.median(cpus[name]) * 1e6, 1)}
                for name in takes
            }  # fmt: skip
    finally:
        server.stop()
    print(f"\nclaim: a worker's take of up to {BATCH} messages, µs per take (median wall / this thread's CPU)")
    for waiting, row in rows.items():
        print(f"  {waiting:<12} " + ", ".join(f"{n} {v['wall_us']:.0f} / {v['cpu_us']:.0f}" for n, v in row.items()))
    return rows


def xla_classifier(weights: str):
    """A second copy of the classifier, its model compiled with jit_compile=True (XLA)."""
    from classifier import load_classifier

    classifier = load_classifier("ResNet50", weights, labels_path=str(LABELS))
    classifier.model.compile(jit_compile=True)
    return classifier


def bfloat16_classifier(weights: str):
    """A third copy of the classifier, built under the mixed_bfloat16 policy (restored to float32 after)."""
    import keras

    from classifier import load_classifier

    try:
        return load_classifier("ResNet50", weights, labels_path=str(LABELS), precision="mixed_bfloat16")
    finally:
        keras.mixed_precision.set_global_policy("float32")


def throughput(classifier, pixels: np.ndarray, seconds: float) -> tuple[int, float]:
    """Calls of classifier.predict for about seconds (at least one): (calls, total seconds)."""
    calls, total = 0, 0.0
    while total < seconds or calls == 0:
        total += timed(lambda: classifier.predict(pixels), 1)[0]
        calls += 1
    return calls, total


def new_size_probe(classifier) -> dict:
    """First and second call at batch 9, after batch 6 (so a plain tf.function has generalized): XLA compiles
    every new shape, so only there is the first call much slower without any re-trace."""
    classifier.predict(random_pixels(6, 6))
    pixels = random_pixels(9, 9)
    traced = tracing_count(classifier.model)
    first, second = timed(lambda: classifier.predict(pixels), 2)
    return {
        "batch": 9,
        "first_ms": round(first * 1000, 1),
        "second_ms": round(second * 1000, 1),
        "traces": (tracing_count(classifier.model) or 0) - (traced or 0),
        "compiles_per_shape": first > 1.5 * second,
    }


def setup_variants(default, weights: str, batches: tuple[int, ...]) -> dict:
    """Build each variant and make its first call per batch size (compiling, if it does): or its error."""
    import keras

    makers = {
        "default": lambda: default,
        "xla": lambda: xla_classifier(weights),
        "mixed_bfloat16": lambda: bfloat16_classifier(weights),
    }
    variants, reference = {}, {}
    for name, make in makers.items():
        info: dict = {}
        try:
            started = time.perf_counter()
            classifier = make()
            info["build_s"] = round(time.perf_counter() - started, 1)
            info["jit_compile"] = bool(classifier.model.jit_compile)
            info["compute_dtype"] = str(classifier.model.layers[-1].compute_dtype)
            info["first_call_ms"], info["traces"] = {}, {}
            for batch in batches:
                pixels = random_pixels(batch, 99)
                traced = tracing_count(classifier.model)
                started = time.perf_counter()
                probabilities = classifier.predict(pixels)
                info["first_call_ms"][batch] = round((time.perf_counter() - started) * 1000, 1)
                info["traces"][batch] = (tracing_count(classifier.model) or 0) - (traced or 0)
                info["output_dtype"] = str(probabilities.dtype)
                probabilities = np.asarray(probabilities, np.float32)
                if name == "default":
                    reference[batch] = probabilities
                else:
                    info.setdefault("max_abs_diff_vs_default", {})[batch] = float(
                        np.abs(probabilities - reference[batch]).max()
                    )
                    info.setdefault("top1_agreement", {})[batch] = float(
                        np.mean(probabilities.argmax(1) == reference[batch].argmax(1))
                    )
            info["new_size"] = new_size_probe(classifier)
            info["classifier"] = classifier
        except Exception as exc:  # a variant this machine cannot run is a result, not a crash
            info["error"] = f"{type(exc).__name__}: {exc}"[:500]
            keras.mixed_precision.set_global_policy("float32")
        variants[name] = info
    return variants


def xla_and_precision(plan: Plan, classifier, weights: str) -> dict:
    """Images/s of default, XLA and mixed_bfloat16 inference at each batch size, measured interleaved."""
    variants = setup_variants(classifier, weights, plan.xla_batches)
    runnable = {name: v for name, v in variants.items() if "classifier" in v}
    totals = {(name, b): [0, 0.0] for name in runnable for b in plan.xla_batches}
    ratios: dict = {(name, b): [] for name in runnable for b in plan.xla_batches}
    for _ in range(plan.xla_rounds):
        for batch in plan.xla_batches:
            pixels = random_pixels(batch, batch)
            rates = {}
            for name, variant in list(runnable.items()):  # A B C, A B C: each round sees one machine
                try:
                    calls, seconds = throughput(variant["classifier"], pixels, plan.xla_seconds)
                except Exception as exc:
                    variant["error"] = f"{type(exc).__name__}: {exc}"[:500]
                    del runnable[name]
                    continue
                totals[name, batch][0] += calls
                totals[name, batch][1] += seconds
                rates[name] = batch * calls / seconds
            for name, rate in rates.items():
                if "default" in rates:
                    ratios[name, batch].append(rate / rates["default"])
    results = {}
    for name, variant in variants.items():
        variant.pop("classifier", None)
        per_batch = {}
        for batch in plan.xla_batches:
            calls, seconds = totals.get((name, batch), (0, 0.0))
            if calls:
                per_batch[batch] = {
                    "images_per_s": round(batch * calls / seconds, 2),
                    "calls": calls,
                    "vs_default": round(statistics.median(ratios[name, batch]), 3) if ratios[name, batch] else None,
                    "vs_default_per_round": [round(r, 3) for r in ratios[name, batch]],
                }
        results[name] = variant | {"throughput": per_batch}
    print_xla(results, plan)
    return results


def print_xla(results: dict, plan: Plan) -> None:
    """The xla_and_precision table: one row per variant and batch size, errors on their own line."""
    print(f"\n5. xla_and_precision ({plan.xla_rounds} interleaved rounds of ~{plan.xla_seconds:g} s per variant)")
    print(f"{'variant':>15} {'batch':>5} {'first ms':>9} {'traces':>6} {'images/s':>9} {'vs default':>10}  dtype")
    for name, r in results.items():
        if "error" in r and not r["throughput"]:
            print(f"{name:>15}  failed: {r['error']}")
            continue
        for batch, t in r["throughput"].items():
            ratio = f"{t['vs_default']:.3f}" if t["vs_default"] is not None else "-"
            print(
                f"{name:>15} {batch:>5} {r['first_call_ms'][batch]:>9.1f} {r['traces'][batch]:>6}"
                f" {t['images_per_s']:>9.2f} {ratio:>10}  {r['compute_dtype']} -> {r['output_dtype']}"
                f"{' (jit_compile)' if r['jit_compile'] else ''}"
            )
    for name, r in results.items():
        if "new_size" in r:
            probe = r["new_size"]
            print(
                f"{name:>15} new batch size {probe['batch']}: first {probe['first_ms']:.0f} ms, then"
                f" {probe['second_ms']:.0f} ms, {probe['traces']} re-traces"
                f"{' -> compiles every new shape (XLA)' if probe['compiles_per_shape'] else ''}"
            )


# --- Summary ------------------------------------------------------------------------------------


def summary_lines(results: dict) -> list[str]:
    """One line per section, for the end of the output and the JSON."""
    lines = []
    c = results.get("codec")
    if c:
        j, b = c["formats"]["json_base64"], c["formats"]["binary"]
        lines.append(
            f"codec: JSON+base64 {j['bytes']:,} B, {j['encode_us'] + j['decode_us']:.0f} µs "
            f"({j['share_of_image_inference']:.2%} of an image's inference); binary {b['bytes']:,} B, "
            f"{b['encode_us'] + b['decode_us']:.0f} µs ({b['share_of_image_inference']:.2%})"
        )
    d = results.get("jpeg_draft")
    if d:
        parts = [
            f"{name} {r['draft_ms']:.1f} vs {r['no_draft_ms']:.1f} ms ({r['speedup']:.1f}x)" for name, r in d.items()
        ]
        lines.append("jpeg_draft: with vs without draft: " + "; ".join(parts))
        for other in CANDIDATE_DECODERS:
            times = [f"{n} {r[f'{other}_ms']:.1f} ms ({r[f'{other}_speedup_over_draft']:.2f}x draft)"
                     for n, r in d.items() if f"{other}_ms" in r]  # fmt: skip
            if times:
                lines.append(f"jpeg_draft: {other}: " + "; ".join(times))
    p = results.get("padding_vs_retracing")
    if p:
        lines.append("padding_vs_retracing: " + p["conclusion"].removeprefix("conclusion: "))
    r = results.get("redis_round_trips")
    if r:
        paths = r["paths"]
        lines.append(
            f"redis_round_trips: claim+ack {r['claim_plus_ack_ms']:.1f} ms in "
            f"{paths['claim']['round_trips'] + paths['ack']['round_trips']} round trips "
            f"({(paths['claim']['share_of_batch_inference'] + paths['ack']['share_of_batch_inference']):.2%} of "
            f"batch inference); answering plain {paths['plain']['median_ms']:.1f} ms / "
            f"{paths['plain']['round_trips']} round trips, pipelined {paths['pipelined']['median_ms']:.1f} ms / "
            f"{paths['pipelined']['round_trips']}"
        )
    w = results.get("reply_wait")
    if w:
        lines.append(
            "reply_wait: µs of web CPU per answer: per-request wait_for "
            + f"{w['per_request_wait_for']['cpu_us_per_answer']:.0f}; reply listener at 1 / 8 / 32 answers per wake "
            + " / ".join(f"{w[f'listener_{n}_per_wake']['cpu_us_per_answer']:.0f}" for n in (1, 8, 32))
        )
    c = results.get("claim")
    if c:
        lines.append(
            "claim: µs per take (wall) at 0 / 1 / 32 / changing waiting: today "
            + " / ".join(f"{row['today']['wall_us']:.0f}" for row in c.values())
            + ", one MULTI of 32 moves "
            + " / ".join(f"{row['one_multi']['wall_us']:.0f}" for row in c.values())
        )
    x = results.get("xla_and_precision")
    if x:
        parts = []
        for name, v in x.items():
            if not v["throughput"]:
                parts.append(f"{name} failed")
                continue
            rates = ", ".join(f"b{b} {t['images_per_s']:.1f}/s" for b, t in v["throughput"].items())
            compiles = " (compiles each new batch size)" if v.get("new_size", {}).get("compiles_per_shape") else ""
            parts.append(f"{name} {rates}{compiles}")
        lines.append("xla_and_precision: " + "; ".join(parts))
    return lines


def machine_info() -> dict:
    """Versions and load: the CPU is shared, so the load average says how much to trust the figures."""
    from importlib.metadata import PackageNotFoundError, version

    import keras
    import PIL

    try:
        tensorflow = version("tensorflow")
    except PackageNotFoundError:  # another Keras backend
        tensorflow = None
    return {
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "keras_backend": keras.backend.backend(),
        "tensorflow": tensorflow,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "redis_py": redis.__version__,
    }


SECTIONS = (
    "codec", "jpeg_draft", "padding_vs_retracing", "redis_round_trips", "reply_wait", "claim", "xla_and_precision"
)  # fmt: skip


def main() -> int:
    """Build and warm the model, run the six sections in order (or --only some), print the summary, write --json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes (about 1 minute)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write all results here as JSON")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run this section only (repeatable)")
    args = parser.parse_args()
    only = set(args.only or SECTIONS)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stdout.reconfigure(line_buffering=True)  # tables appear as each section ends, also through a pipe
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    results: dict = {"mode": "quick" if args.quick else "full", "plan": asdict(plan), "machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="benchmark-micro-") as tmp:
        classifier, weights = build_classifier(tmp)
        warm = classifier.warm_up(BATCH)
        results["warm_up_ms"] = {n: round(s * 1000, 1) for n, s in warm.items()}
        batch_s = batch_inference_s(classifier, plan.inference_reps)
        print(
            f"model ready in {time.perf_counter() - started:.0f} s; batch {BATCH}: {batch_s * 1000:.0f} ms", flush=True
        )
        if "codec" in only:
            results["codec"] = codec(plan, batch_s * 1000 / BATCH)
        if "jpeg_draft" in only:
            results["jpeg_draft"] = jpeg_draft(plan)
        if "padding_vs_retracing" in only:
            results["padding_vs_retracing"] = padding_vs_retracing(plan, classifier)
        if "redis_round_trips" in only:
            results["redis_round_trips"] = redis_round_trips(plan, tmp, batch_s, classifier)
        if "reply_wait" in only:
            results["reply_wait"] = reply_wait(plan, tmp)
        if "claim" in only:
            results["claim"] = claim(plan, tmp)
        if "xla_and_precision" in only:
            results["xla_and_precision"] = xla_and_precision(plan, classifier, weights)
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["summary"] = summary_lines(results)
    print(f"\nsummary ({results['mode']}, {results['seconds']:.0f} s, load {results['machine']['load_average']})")
    for line in results["summary"]:
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
