"""Real processes for a test: model workers and gunicorn on the private Redis, each on a queue of its own."""

import os
import signal
import uuid
from pathlib import Path

import stack
from image_queue import ImageQueue, Keys, model_queue_name
from support import IMAGENET_INDEX


class Stack:
    """Model workers and a gunicorn on the private Redis, on a queue of the test's own."""

    def __init__(self, env: dict, logdir: Path):
        self.env, self.logdir = env, logdir
        self.url = f"http://127.0.0.1:{env['WEB_PORT']}/"
        self.workers: list[stack.Service] = []
        self.web: stack.Service | None = None

    def queue_name(self, model: str = "resnet50") -> str:
        """The queue a model's workers serve on this stack (the workers' default MODEL_ID: resnet50)."""
        return model_queue_name(self.env["IMAGE_QUEUE"], model)

    def keys(self, model: str = "resnet50") -> Keys:
        return Keys(self.queue_name(model))

    def queue(self, client, model: str = "resnet50", **options) -> ImageQueue:
        """A model's queue on this stack, registering the model as its workers do (for a stand-in worker)."""
        registry = (Keys(self.env["IMAGE_QUEUE"]).models, model)
        return ImageQueue(client, self.queue_name(model), registry=registry, **options)

    def start_worker(self, **env) -> stack.Service:
        log_path = self.logdir / f"worker{len(self.workers)}.log"
        worker = stack.start_model_worker(self.env | env, log_path)
        self.workers.append(worker)
        return worker

    def start_web(self, **env) -> stack.Service:
        self.web = stack.start_web(self.env | env, self.logdir / "web.log")
        return self.web

    def wait_ready(self, timeout_s: float = 180) -> None:
        stack.wait_until_ready(self.url, [s for s in [self.web, *self.workers] if s], timeout_s)

    def worker_logs(self) -> str:
        return "".join(w.log_text() for w in self.workers)

    def stop(self) -> None:
        for service in [self.web, *self.workers]:
            if service and service.alive():
                os.kill(service.pid, signal.SIGCONT)  # in case the test stopped it
            if service:
                service.stop(timeout_s=20)


class StackFactory:
    """make(**env) -> Stack for ResNet50 with seeded weights, each on its own queue and port."""

    def __init__(self, redis_url: str, weights: Path, logdir: Path):
        self.redis_url, self.weights, self.logdir = redis_url, weights, logdir
        self.stacks: list[Stack] = []

    def __call__(self, **env) -> Stack:
        base = {
            "REDIS_URL": self.redis_url,
            "IMAGE_QUEUE": f"q{uuid.uuid4().hex[:10]}",
            "WEB_PORT": str(stack.free_port()),
            "WEB_WORKERS": "2",
            "WEB_THREADS": "32",
            "MODEL_WEIGHTS": str(self.weights),
            "LABELS_PATH": str(IMAGENET_INDEX),
            "BATCH_SIZE": "16",
            "BATCH_TUNE": "off",  # each test's batches up to the size it sets; BATCH_TUNE's own tests turn it on
            "WORKER_HEARTBEAT_S": "0.5",
            "LOG_LEVEL": "DEBUG",
        }
        logdir = self.logdir / f"stack{len(self.stacks)}"
        logdir.mkdir()
        s = Stack(base | {k: str(v) for k, v in env.items()}, logdir)
        self.stacks.append(s)
        return s

    def serve(self, **env) -> Stack:
        """A stack with one model worker and gunicorn, started and ready."""
        s = self(**env)
        s.start_worker()
        s.start_web()
        s.wait_ready()
        return s

    def stop_all(self) -> None:
        for s in self.stacks:
            s.stop()
