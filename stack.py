"""Run the whole stack on one machine: redis-server (unless one is configured), model worker, gunicorn.

    python stack.py [--workers N]        (scripts/stack.sh installs what is missing first)

Ctrl-C (or SIGTERM) stops it in order: gunicorn lets in-flight requests finish, the model worker
finishes its batch, then redis-server. The same functions start the processes for the tests and the
benchmark, so each is started one way everywhere.
"""

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORKER_READY_TIMEOUT_S = 600  # first start on a connected machine downloads ~100 MB of weights


@dataclass
class Service:
    """One child process of the stack, its log file if it has one."""

    name: str
    process: subprocess.Popen
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within timeout_s; returns the exit status."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


try:
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded here: the child must not import
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the process that started us dies (Linux), so nothing lingers."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start(name: str, argv: list[str], env: dict | None, log_path: Path | None) -> Service:
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 (the child keeps it)
    try:
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,  # Ctrl-C reaches the launcher only; it stops the children in order
            preexec_fn=_die_with_parent,
        )
    finally:
        if out:
            out.close()
    return Service(name, process, log_path)


def start_redis(port: int, workdir: str, log_path: Path | None = None, *extra: str) -> Service:
    """A private redis-server on 127.0.0.1:port that keeps nothing on disk."""
    exe = shutil.which("redis-server")
    if not exe:
        raise RuntimeError("redis-server is not installed: run scripts/setup.sh (apt-get install redis-server)")
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    service = _start("redis", [*argv, "--dir", workdir, *extra], None, log_path)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(7) == b"+PONG\r\n":
                    return service
        except OSError:
            if not service.alive():
                break
            time.sleep(0.05)
    service.stop()
    raise RuntimeError(f"redis-server did not start on port {port}")


def start_model_worker(env: dict | None = None, log_path: Path | None = None) -> Service:
    return _start("model worker", [sys.executable, "run_model_server.py"], env, log_path)


def start_web(env: dict | None = None, log_path: Path | None = None) -> Service:
    argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn_conf.py", "run_web_server:app"]
    return _start("gunicorn", argv, env, log_path)


def wait_until_ready(base_url: str, services: list[Service], timeout_s: float = WORKER_READY_TIMEOUT_S) -> None:
    """Wait until GET /readyz answers 200; fail at once, with its log, if a service exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for service in services:
            if not service.alive():
                raise RuntimeError(
                    f"{service.name} exited with {service.process.returncode}:\n{service.log_text()[-3000:]}"
                )
        try:
            with urllib.request.urlopen(base_url + "readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{base_url} was not ready within {timeout_s:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1, help="model worker processes (default 1)")
    args = parser.parse_args()

    import settings

    services: list[Service] = []
    env: dict[str, str] = {}

    def stop_requested(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_requested)
    with tempfile.TemporaryDirectory(prefix="stack-redis-") as redis_dir:
        try:
            if not settings.REDIS_CONFIGURED:
                port = free_port()
                services.append(start_redis(port, redis_dir))
                env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
                print(f"stack: started redis-server on 127.0.0.1:{port} (set REDIS_URL to use your own)", flush=True)
            services += [start_model_worker(env) for _ in range(args.workers)]
            services.append(start_web(env))
            print("stack: " + ", ".join(f"{s.name} pid {s.pid}" for s in services), flush=True)
            host = "127.0.0.1" if settings.WEB_HOST in ("0.0.0.0", "::", "") else settings.WEB_HOST
            host = f"[{host}]" if ":" in host else host
            url = f"http://{host}:{settings.WEB_PORT}/"
            print(f"stack: loading the model; {url} answers once it is ready", flush=True)
            wait_until_ready(url, services)
            print(f"stack: ready. curl -X POST -F image=@images/chelsea.jpg {url}predict  (Ctrl-C stops)", flush=True)
            pid, status = os.wait()  # until a child dies or Ctrl-C
            dead = next((s for s in services if s.pid == pid), None)
            print(f"stack: {dead.name if dead else pid} exited ({status}); stopping the rest", flush=True)
            return 1
        except KeyboardInterrupt:
            print("\nstack: stopping", flush=True)
            return 0
        except RuntimeError as exc:
            print(f"stack: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            for service in reversed(services):  # web first, then workers, then Redis
                service.stop()


if __name__ == "__main__":
    sys.exit(main())
