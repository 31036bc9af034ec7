"""Run the whole stack on one machine: redis-server (unless one is configured), model workers, gunicorn.

    python stack.py [--workers N]        (scripts/stack.sh installs what is missing first)

Model workers: one per visible GPU, each with CUDA_VISIBLE_DEVICES set to its GPU, or one on a machine
without a GPU (MODEL_WORKERS=0, the default); MODEL_WORKERS=N or --workers N starts exactly N.
Ctrl-C (or SIGTERM) stops it in order: gunicorn lets in-flight requests finish, the model workers
finish their batches, then redis-server. The same functions start the processes for the tests and the
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
import threading
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
    last_line: str = ""  # the last line it printed, when its output is relayed (relay_output)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def relay_output(self) -> None:
        """Copy the child's piped output to ours, line by line, remembering the last (a thread runs this)."""
        for raw in self.process.stdout:
            line = raw.decode(errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.strip():
                self.last_line = line.strip()

    def exit_report(self) -> str:
        """Why it exited: its status and its last line (a worker's one-line reason), or the end of its log."""
        report = f"{self.name} exited with status {self.process.returncode}"
        if self.last_line:
            return f"{report}: {self.last_line}"
        tail = self.log_text()[-3000:]
        return f"{report}:\n{tail}" if tail else report

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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_can_listen(host: str, port: int) -> None:
    """RuntimeError naming the settings when gunicorn could not listen on host:port (another server there):
    gunicorn itself retries for seconds, and another stack's /readyz would answer for it meanwhile."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds: only a listener is in the way
        try:
            s.bind((host.removeprefix("[").removesuffix("]"), port))
        except OSError as exc:
            raise RuntimeError(f"cannot listen on {host}:{port} ({exc.strerror}): set WEB_PORT or WEB_HOST") from None


def web_url(host: str, port: int) -> str:
    """The URL this machine reaches a web server bound to host:port at: a wildcard address becomes the
    loopback of its family (0.0.0.0 -> 127.0.0.1, :: -> ::1), and an IPv6 address goes in brackets."""
    host = host.removeprefix("[").removesuffix("]")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


# --- Model workers: one per GPU ---------------------------------------------------------------


def visible_gpus(cuda_visible_devices: str | None, nvidia_smi_output: str | None) -> list[str]:
    """The GPUs this stack may use, as CUDA_VISIBLE_DEVICES entries (indices, or GPU-/MIG- UUIDs).

    A CUDA_VISIBLE_DEVICES already set wins: its entries as given, up to the first negative one (CUDA
    ignores everything from an invalid entry on; "" or "-1" hides every GPU). Unset: the indices
    `nvidia-smi --query-gpu=index --format=csv,noheader` printed, one a line; None: no nvidia-smi.
    """
    if cuda_visible_devices is not None:
        gpus = []
        for entry in (e.strip() for e in cuda_visible_devices.split(",")):
            if not entry or entry.startswith("-"):
                break
            gpus.append(entry)
        return gpus
    return [line.strip() for line in (nvidia_smi_output or "").splitlines() if line.strip().isdigit()]


def detect_gpus() -> list[str]:
    """visible_gpus() for this machine: its CUDA_VISIBLE_DEVICES, else what nvidia-smi lists (if installed)."""
    output = None
    if "CUDA_VISIBLE_DEVICES" not in os.environ and shutil.which("nvidia-smi"):
        try:
            query = ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"]
            output = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            output = None  # a broken driver: run on the CPU rather than not at all
    return visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), output)


def worker_environments(count: int, gpus: list[str]) -> list[dict[str, str]]:
    """The environment of each model worker to start: count 0 means one per GPU, or one without a GPU;
    otherwise exactly count, given the GPUs in turn. Each GPU worker sees only its own GPU, so TensorFlow
    in it places the model there and takes no memory on the others."""
    if count == 0:
        count = max(1, len(gpus))
    return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {} for i in range(count)]


try:
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded here: the child must not import
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the process that started us dies (Linux), so nothing lingers."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start(name: str, argv: list[str], env: dict | None, log_path: Path | None, relay: bool = False) -> Service:
    """relay: pipe the child's output through this process (Service.relay_output), so its last line is known."""
    out = open(log_path, "ab") if log_path else (subprocess.PIPE if relay else None)  # noqa: SIM115
    try:
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            bufsize=0,
            start_new_session=True,  # Ctrl-C reaches the launcher only; it stops the children in order
            preexec_fn=_die_with_parent,
        )
    finally:
        if log_path:
            out.close()
    service = Service(name, process, log_path)
    if relay:
        threading.Thread(target=service.relay_output, daemon=True).start()
    return service


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
                if s.recv(64).startswith((b"+PONG\r\n", b"-NOAUTH")):  # up (NOAUTH: up, with --requirepass)
                    return service
        except OSError:
            if not service.alive():
                break
            time.sleep(0.05)
    service.stop()
    raise RuntimeError(f"redis-server did not start on port {port}")


def start_model_worker(env: dict | None = None, log_path: Path | None = None, relay: bool = False) -> Service:
    return _start("model worker", [sys.executable, "run_model_server.py"], env, log_path, relay)


def start_web(env: dict | None = None, log_path: Path | None = None, app: str = "run_web_server:app") -> Service:
    """gunicorn with gunicorn_conf.py serving app (the benchmark serves 'bench.baseline_app:create_app()' so).
    Its own program beside this Python, as systemd and the image start it: a binary upgrade (USR2) re-executes
    what started the master, and 'python .../gunicorn/__main__.py' would import gunicorn's http package as
    the standard library's (its workers then fail to boot)."""
    program = Path(sys.executable).parent / "gunicorn"
    found = str(program) if program.exists() else shutil.which("gunicorn")  # pip --user: ~/.local/bin
    command = [found] if found else [sys.executable, "-m", "gunicorn"]  # no program: as a module (no USR2)
    argv = [*command, "-c", "gunicorn_conf.py", app]
    return _start("gunicorn", argv, env, log_path)


def start_uwsgi(env: dict | None = None, log_path: Path | None = None) -> Service:
    """The web tier under uWSGI instead of gunicorn (uwsgi.ini; the uwsgi program beside this Python)."""
    return _start("uwsgi", [str(Path(sys.executable).parent / "uwsgi"), "--ini", "uwsgi.ini"], env, log_path)


def wait_until_ready(base_url: str, services: list[Service], timeout_s: float = WORKER_READY_TIMEOUT_S) -> None:
    """Wait until GET /readyz answers 200; fail at once, with its log, if a service exits first."""

    def check_alive() -> None:
        for service in services:
            if not service.alive():
                service.process.wait()
                time.sleep(0.1)  # let a relay thread copy the last line out
                raise RuntimeError(service.exit_report())

    if not poll_until_ok(base_url + "readyz", check_alive, timeout_s):
        raise RuntimeError(f"{base_url} was not ready within {timeout_s:.0f} s")


def poll_until_ok(url: str, check_alive, timeout_s: float) -> bool:
    """GET url every 0.2 s until it answers 200 (True) or timeout_s passes (False). check_alive() runs before
    each try and raises when a process behind url has exited (bench/peers waits for its peers with this too)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check_alive()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workers", type=int, metavar="N", help="model workers; 0: one per visible GPU, or 1 without (MODEL_WORKERS)"
    )
    args = parser.parse_args()
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be 0 (one per GPU) or more")

    try:
        import settings
    except ValueError as exc:  # settings.SettingError: one line naming the setting, not a traceback
        print(f"stack: {exc}", file=sys.stderr, flush=True)
        return 1

    count = settings.MODEL_WORKERS if args.workers is None else args.workers
    gpus = detect_gpus()
    workers = worker_environments(count, gpus)

    services: list[Service] = []
    env: dict[str, str] = {}
    failure = ""

    def stop_requested(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_requested)
    # Explicitly: a shell starts a background job (`python stack.py &`) with SIGINT ignored, and Python then
    # leaves it ignored, so Ctrl-C's signal (kill -INT) would do nothing.
    signal.signal(signal.SIGINT, stop_requested)
    with tempfile.TemporaryDirectory(prefix="stack-redis-") as redis_dir:
        try:
            check_can_listen(settings.WEB_HOST, settings.WEB_PORT)
            if not settings.REDIS_CONFIGURED:
                port = free_port()
                services.append(start_redis(port, redis_dir))
                env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
                print(
                    f"stack: started redis-server on 127.0.0.1:{port} (admin.py: REDIS_URL={env['REDIS_URL']}; "
                    "set REDIS_URL to use your own)",
                    flush=True,
                )
            for worker_env in workers:
                services.append(start_model_worker(env | worker_env, relay=True))
            where = f"on GPUs {', '.join(w['CUDA_VISIBLE_DEVICES'] for w in workers)}" if gpus else "on the CPU"
            print(f"stack: {len(workers)} model worker(s) {where}", flush=True)
            services.append(start_web(env))
            print("stack: " + ", ".join(f"{s.name} pid {s.pid}" for s in services), flush=True)
            url = web_url(settings.WEB_HOST, settings.WEB_PORT)
            print(f"stack: loading the model; {url} answers once it is ready", flush=True)
            wait_until_ready(url, services)
            print(f"stack: ready. curl -X POST -F image=@images/chelsea.jpg {url}predict  (Ctrl-C stops)", flush=True)
            pid, status = os.wait()  # until a child dies or Ctrl-C
            dead = next((s for s in services if s.pid == pid), None)
            code = os.waitstatus_to_exitcode(status)  # a signal's is negative
            print(f"stack: {dead.name if dead else pid} exited ({code}); stopping the rest", flush=True)
            return 1
        except KeyboardInterrupt:
            print("\nstack: stopping", flush=True)
            return 0
        except RuntimeError as exc:
            failure = str(exc)
            return 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            for service in reversed(services):  # web first, then workers, then Redis
                service.stop()
            if failure:  # after gunicorn's shutdown lines, so that the reason is what the user sees last
                print(f"stack: {failure}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
