"""Peers for `python -m bench.benchmark peers`: the suite's model behind BentoML and behind LitServe, side by side
with this service.

Each peer lives in bench/peers/<name>/: its server (service.py or server.py), its requirements.txt (the framework,
OpenVINO, numpy and Pillow, pinned; no TensorFlow) and, once installed, its own virtual environment .venv
(gitignored; ~0.4 GB each), which install() creates on first use and nothing else touches. A peer loads the
OpenVINO IR the suite's classifier converted (classifier.openvino_cache_path: uint8 NHWC in, preprocessing in the
graph), compiles it with the precision hint the service's worker uses, prepares each upload with helpers.py as the
service's web does (bench/peers/common.py) and answers POST /predict, multipart field "image" (what loadgen sends),
with the top 5.

Each peer's settings are here, in PEERS, and reach its server as PEER_* environment variables; the server's
docstring says why each has its value.
"""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import stack

PEERS_DIR = Path(__file__).resolve().parent
ROOT = PEERS_DIR.parent.parent  # the repository
READY_TIMEOUT_S = 180  # a peer's start-up: import its framework, compile the model (~5 s here)
STOP_TIMEOUT_S = 20  # from SIGTERM to SIGKILL of a peer's process group
INSTALL_TIMEOUT_S = 1800  # pip install of a peer's requirements (~1-3 min from a nearby index)
MARKER = ".installed"  # in a peer's .venv: the requirements.txt it was installed from, written last


@dataclass(frozen=True)
class Peer:
    """How to run one peer: its command (argv[0] is a program in its venv's bin/), where it says it is ready,
    where it predicts, and its settings (passed to it as PEER_<NAME> environment variables)."""

    name: str
    argv: tuple[str, ...]  # "{port}" is replaced by its port
    ready_path: str
    predict_path: str
    settings: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # the framework's own environment variables

    @property
    def folder(self) -> Path:
        return PEERS_DIR / self.name


PEERS = {
    "bentoml": Peer(
        "bentoml",
        ("bentoml", "serve", "service:ResNet50", "--host", "127.0.0.1", "--port", "{port}"),
        "/readyz",
        "/predict",
        {"WORKERS": "1", "MAX_BATCH_SIZE": "32", "MAX_LATENCY_MS": "10000"},
        {"BENTOML_DO_NOT_TRACK": "True"},  # no usage tracking; BENTOML_HOME is set per run (start)
    ),
    "litserve": Peer(
        "litserve",
        ("python", "server.py", "--port", "{port}"),
        "/health",
        "/predict",
        {"WORKERS": "1", "MAX_BATCH_SIZE": "32", "BATCH_TIMEOUT_S": "0.01", "TIMEOUT_S": "30"},
    ),
}


def peer_names(text: str) -> list[str]:
    """--peers "bentoml,litserve" -> the names, each one a known peer, in the order given."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown or not names:
        raise SystemExit(f"--peers takes a comma-separated list of {', '.join(PEERS)}; got {text!r}")
    return names


# --- installing -------------------------------------------------------------------------------------


def venv_bin(folder: Path) -> Path:
    return folder / ".venv" / "bin"


def installed(folder: Path) -> bool:
    """Whether folder's .venv was installed, whole, from the requirements.txt that is there now."""
    marker = folder / ".venv" / MARKER
    python = venv_bin(folder) / "python"
    return python.exists() and marker.exists() and marker.read_text() == (folder / "requirements.txt").read_text()


def installed_peers() -> list[str]:
    return [name for name, peer in PEERS.items() if installed(peer.folder)]


def install(name: str, say: Callable[[str], None] = print) -> None:
    """Create the peer's virtual environment and pip install its requirements, unless that was done already.
    Never touches the project's own environment."""
    folder = PEERS[name].folder
    if installed(folder):
        return
    say(f"installing {name} into {folder / '.venv'} (pip; ~0.4 GB, a few minutes) ...")
    log = folder / ".venv-install.log"
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(folder / ".venv")],
        [str(venv_bin(folder) / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-r",
         str(folder / "requirements.txt")],
    ]  # fmt: skip
    with open(log, "wb") as out:
        for argv in steps:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S)
            if done.returncode != 0:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"installing {name} failed ({' '.join(argv[:4])} ...):\n{tail}")
    (folder / ".venv" / MARKER).write_text((folder / "requirements.txt").read_text())
    say(f"  {name} installed")


# --- running ----------------------------------------------------------------------------------------


@dataclass
class Running:
    """A started peer: its URL for loadgen, its process (the head of its own process group)."""

    name: str
    url: str  # its /predict
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM to its process group (LitServe's workers outlive a SIGTERM to the parent alone), then SIGKILL
        to what is left of the group after STOP_TIMEOUT_S."""
        try:
            os.killpg(self.pid, signal.SIGTERM)
            os.killpg(self.pid, signal.SIGCONT)  # a paused group acts on SIGTERM once continued
        except ProcessLookupError:
            return
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and group_alive(self.pid):
            time.sleep(0.2)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pause(self) -> None:
        """SIGSTOP its process group: idle, LitServe's batching loop still polls its queue every millisecond
        (~0.15 of a core here), CPU the system being measured would otherwise lose."""
        os.killpg(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)


@contextmanager
def paused(peers: list[Running]) -> Iterator[None]:
    """The peers paused (SIGSTOP) for the duration of the block, continued after it, whatever happens in it."""
    done = []
    try:
        for peer in peers:
            peer.pause()
            done.append(peer)
        yield
    finally:
        for peer in done:
            peer.resume()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def environment(peer: Peer, model_xml: Path, precision: str, labels: Path, home: Path) -> dict[str, str]:
    """The peer server's environment: the model, its precision hint, the labels, the repository (for helpers.py
    and classifier.py), bench/peers on the import path (for common.py) and the peer's settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(peer.env)
    env.update({f"PEER_{key}": value for key, value in peer.settings.items()})
    env.update(
        PEER_MODEL=str(model_xml),
        PEER_PRECISION=precision,
        PEER_LABELS=str(labels),
        PEER_REPO=str(ROOT),
        PYTHONPATH=str(PEERS_DIR),
        PATH=f"{venv_bin(peer.folder)}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    if peer.name == "bentoml":
        env["BENTOML_HOME"] = str(home / "bentoml-home")  # its store of bentos and models, not ~/bentoml
    return env


def start(name: str, model_xml: Path, precision: str, labels: Path, workdir: Path) -> Running:
    """Start the peer on a free loopback port, in its own process group, and wait until it is ready."""
    peer = PEERS[name]
    if not installed(peer.folder):
        raise RuntimeError(f"{name} is not installed (bench.peers.install({name!r}))")
    port = stack.free_port()
    argv = [str(venv_bin(peer.folder) / peer.argv[0]), *(a.replace("{port}", str(port)) for a in peer.argv[1:])]
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            argv,
            cwd=peer.folder,
            env=environment(peer, model_xml, precision, labels, workdir),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends the whole tree
        )
    running = Running(name, f"http://127.0.0.1:{port}{peer.predict_path}", process, log_path)
    try:
        wait_ready(f"http://127.0.0.1:{port}{peer.ready_path}", running)
    except BaseException:
        running.stop()
        raise
    return running


def wait_ready(url: str, running: Running, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until GET url answers 200; fails at once, with the log's end, if the peer exits first."""

    def check_alive() -> None:
        if running.process.poll() is not None:
            raise RuntimeError(
                f"{running.name} exited with {running.process.returncode}:\n{running.log_text()[-3000:]}"
            )

    if not stack.poll_until_ok(url, check_alive, timeout_s):
        raise RuntimeError(
            f"{running.name} was not ready at {url} within {timeout_s:.0f} s:\n{running.log_text()[-3000:]}"
        )


def answer_predictions(body) -> list[dict]:
    """The top 5 in a peer's (or the service's) JSON answer: {"predictions": [...]}, or BentoML's batchable API's
    list of one such object (a request's slice of the batch)."""
    if isinstance(body, list):
        if len(body) != 1:
            raise ValueError(f"expected one answer for one image, got {len(body)}")
        body = body[0]
    return body["predictions"]
