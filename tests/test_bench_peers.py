"""The peers command (python -m bench.benchmark peers): its pure parts, and one quick real run of the peers that
are installed. The tests never install a peer (bench/peers/<name>/.venv, ~0.4 GB each): the command does that."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import ROOT

from bench import benchmark, peers


def top(*pairs) -> list[dict]:
    return [{"label": label, "probability": p, "index": i} for i, (label, p) in enumerate(pairs)]


OWN = top(("tabby", 0.5), ("tiger_cat", 0.3), ("Egyptian_cat", 0.1), ("lynx", 0.05), ("cougar", 0.01))


def test_an_answer_agrees_when_its_labels_match_in_order_and_its_probabilities_are_close():
    assert benchmark.compare_answer(OWN, OWN) == (True, 0.0)
    near = [{**p, "probability": p["probability"] + 5e-5} for p in OWN]
    same, diff = benchmark.compare_answer(near, OWN)
    assert same and diff == pytest.approx(5e-5)
    far = [{**p, "probability": p["probability"] + 2e-4} for p in OWN]
    assert benchmark.compare_answer(far, OWN)[0] is False
    swapped = [OWN[1], OWN[0], *OWN[2:]]
    assert benchmark.compare_answer(swapped, OWN)[0] is False
    same, diff = benchmark.compare_answer(OWN[:4], OWN)
    assert not same and math.isnan(diff)


def test_the_top_5_is_read_from_the_service_form_and_from_bentomls_list_of_one():
    assert peers.answer_predictions({"predictions": OWN}) == OWN
    assert peers.answer_predictions([{"predictions": OWN}]) == OWN  # a batchable API: the request's slice
    with pytest.raises(ValueError):
        peers.answer_predictions([{"predictions": OWN}, {"predictions": OWN}])


def test_peer_names_are_known_peers_in_the_order_given():
    assert peers.peer_names("litserve, bentoml") == ["litserve", "bentoml"]
    for bad in ("", "bentoml,ray", ","):
        with pytest.raises(SystemExit):
            peers.peer_names(bad)


def test_a_peer_counts_as_installed_only_from_the_requirements_it_has_now(tmp_path):
    (tmp_path / "requirements.txt").write_text("litserve==0.2.19\n")
    assert not peers.installed(tmp_path)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").touch()
    assert not peers.installed(tmp_path)  # a venv without the marker: an install that did not finish
    (tmp_path / ".venv" / peers.MARKER).write_text("litserve==0.2.19\n")
    assert peers.installed(tmp_path)
    (tmp_path / "requirements.txt").write_text("litserve==0.2.20\n")
    assert not peers.installed(tmp_path)  # the pins changed: install again


def test_a_peer_gets_the_model_its_settings_and_bench_peers_on_its_path_but_not_the_projects_venv(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("VIRTUAL_ENV", str(ROOT / ".venv"))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    model = tmp_path / "m.xml"
    env = peers.environment(peers.PEERS["bentoml"], model, "bf16", ROOT / "models" / "x.json", tmp_path)
    assert env["PEER_MODEL"] == str(model) and env["PEER_PRECISION"] == "bf16" and env["PEER_REPO"] == str(ROOT)
    assert env["PYTHONPATH"] == str(peers.PEERS_DIR) and "VIRTUAL_ENV" not in env
    assert env["PATH"].startswith(str(peers.PEERS["bentoml"].folder / ".venv" / "bin"))
    assert env["PEER_MAX_BATCH_SIZE"] == "32" and env["BENTOML_DO_NOT_TRACK"] == "True"
    assert env["BENTOML_HOME"].startswith(str(tmp_path))
    lit = peers.environment(peers.PEERS["litserve"], model, "f32", ROOT / "models" / "x.json", tmp_path)
    assert lit["PEER_BATCH_TIMEOUT_S"] == "0.01" and "BENTOML_HOME" not in lit


def test_a_process_tree_is_found_and_its_memory_summed(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run(['sleep', '30'])"])
    try:
        deadline = time.monotonic() + 10
        while len(benchmark.descendants(child.pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchildren = benchmark.descendants(child.pid)
        assert len(grandchildren) == 1
        assert child.pid in benchmark.descendants(os.getpid())
        assert grandchildren[0] in benchmark.descendants(os.getpid())  # their children too
        alone, both = benchmark.tree_memory_mb([child.pid]), benchmark.tree_memory_mb([child.pid, *grandchildren])
        assert 0 < alone["pss_mb"] <= alone["rss_mb"]
        assert both["rss_mb"] > alone["rss_mb"]
    finally:
        for pid in benchmark.descendants(child.pid):
            os.kill(pid, 15)
        child.wait(10)
    assert benchmark.tree_memory_mb([child.pid]) == {"rss_mb": 0.0, "pss_mb": 0.0}  # gone: nothing counted


def test_peak_memory_keeps_the_largest_sample():
    with benchmark.PeakMemory([os.getpid()], interval_s=0.02) as memory:
        block = bytearray(64 * 2**20)  # 64 MB, touched
        time.sleep(0.2)
        del block
        time.sleep(0.1)
    now = benchmark.tree_memory_mb([os.getpid()])
    assert memory.peak["rss_mb"] >= now["rss_mb"] + 32


def figures(throughput: float, p50: float, p99: float, rss: float = 500.0, failed=None) -> dict:
    return {
        "throughput_per_s": throughput,
        "latency_ms": {"p50": p50, "p95": p99, "p99": p99, "max": p99},
        "failed": failed or {},
        "memory_mb": {"rss_mb": rss, "pss_mb": rss * 0.8},
    }


def test_the_peers_summary_takes_medians_and_ratios_within_each_round():
    rounds = []
    for r, (ceiling, service, bento, rss) in enumerate(((100, 60, 50, 900), (80, 40, 50, 950), (90, 54, 45, 920))):
        rounds.append(
            {
                "round": r + 1,
                "clients": 1,
                "raw": {"images_per_s": 50.0 + r, "call_ms": 20.0},
                "service": figures(40, 25 + r, 40),
                "bentoml": figures(20, 50, 90 + r),
            }
        )
        for clients in (8, 32):
            rounds.append(
                {
                    "round": r + 1,
                    "clients": clients,
                    "raw": {"ceiling_per_s": float(ceiling)},
                    "service": figures(service, 100, 200 + 10 * r, rss),
                    "bentoml": figures(bento, 120, 400, 600, {"503": 1} if r == 2 else None),
                }
            )
    summary = benchmark.peers_summary(rounds, ["service", "bentoml"])
    # service/peer per round 1.2, 0.8, 1.2: their median 1.2, not the medians' ratio (54 / 50 = 1.08)
    assert summary["served_over_ceiling_8"] == {"service": 0.6, "bentoml": 0.5}  # 0.6 0.5 0.6; 0.5 0.625 0.5
    assert summary["service_over_peer_32"] == {"bentoml": 1.2}
    assert summary["p99_ms_8"] == {"service": 210, "bentoml": 400}
    assert summary["service_p99_over_peer_p99_32"] == {"bentoml": 0.525}
    assert summary["service_p50_over_peer_p50_1"] == {"bentoml": 0.52}
    level = summary["levels"]["32"]
    assert level["raw"] == {"ceiling_per_s": 90}
    assert level["service"]["peak_rss_mb"] == 950 and level["bentoml"]["failed"] == 1
    assert summary["levels"]["1"]["raw"] == {"images_per_s": 51, "call_ms": 20}
    assert "over_ceiling" not in summary["levels"]["1"]["service"]


def peer_processes(names: list[str]) -> list[str]:
    """Command lines of running processes started from a peer's venv."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(str(peers.PEERS[name].folder / ".venv") in text for name in names):
            found.append(text)
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~3 min on a 2-core Xeon: the model converts here, the service and each peer start
def test_the_peers_command_checks_and_measures_the_service_and_each_installed_peer(tmp_path):
    """python -m bench.benchmark peers --quick with the peers installed here (never installed by the tests)."""
    names = peers.installed_peers()
    if not names:
        pytest.skip(
            "no peer is installed (bench/peers/<name>/.venv): `python -m bench.benchmark peers --quick` installs "
            "BentoML and LitServe (~0.4 GB each) and runs this comparison"
        )
    argv = [sys.executable, "-m", "bench.benchmark", "peers", "--quick", "--seconds", "2", "--raw-seconds", "0.3",
            "--peers", ",".join(names), "--out", str(tmp_path)]  # fmt: skip
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=860)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "benchmark-peers.json").read_text())
    systems = ["service", *names]
    assert {name: a["agree"] for name, a in report["answers"].items()} == dict.fromkeys(systems, True)
    assert all(a["max_probability_difference"] <= benchmark.ANSWER_TOLERANCE for a in report["answers"].values())
    assert report["runtime"].startswith("openvino") and set(report["peers"]) == set(names)
    assert [level["clients"] for level in report["rounds"]] == [1, 8, 32]
    for level in report["rounds"]:
        raw = level["raw"]
        assert (raw["images_per_s"] if level["clients"] == 1 else raw["ceiling_per_s"]) > 0
        for system in systems:
            f = level[system]
            assert f["succeeded"] > 0 and f["throughput_per_s"] > 0 and f["failed"] == {}, (system, f)
            assert f["memory_mb"]["rss_mb"] > 100 and f["memory_mb"]["pss_mb"] > 50, (system, f["memory_mb"])
    assert all(report["one_client_fresh"][system]["succeeded"] > 0 for system in systems)
    summary = report["summary"]
    for clients in (8, 32):
        assert set(summary[f"served_over_ceiling_{clients}"]) == set(systems)
        assert all(0 < x < 2 for x in summary[f"served_over_ceiling_{clients}"].values())
        assert set(summary[f"service_over_peer_{clients}"]) == set(names)
        assert all(p99 > 0 for p99 in summary[f"p99_ms_{clients}"].values())
        assert set(summary[f"service_p99_over_peer_p99_{clients}"]) == set(names)
    assert "ratios (each taken within a round, then the median)" in run.stdout
    assert not peer_processes(names), "a peer outlived the command"


def test_the_peers_summary_counts_cpu_per_answer_and_what_idle_systems_take():
    def run(name: str, own_s: float, other_s: float) -> dict:
        other = "bentoml" if name == "service" else "service"
        return {**figures(50, 100, 200), "succeeded": 100, "wall_s": 10.0, "cpu_s": {name: own_s, other: other_s}}

    rounds = [{"clients": 8, "raw": {"ceiling_per_s": 100.0}, "service": run("service", 15.0, 1.0 + r),
               "bentoml": run("bentoml", 18.0, 0.5)} for r in range(3)]  # fmt: skip
    summary = benchmark.peers_summary(rounds, ["service", "bentoml"])
    assert summary["levels"]["8"]["service"]["cpu_ms_per_answer"] == 150  # 15 CPU s for 100 answers
    assert summary["levels"]["8"]["bentoml"]["cpu_ms_per_answer"] == 180
    # bentoml idle while the service ran: 1, 2, 3 s of 10 -> 0.2 cores; the service idle: 0.05 cores
    assert summary["idle_cpu_share"] == {"service": 0.05, "bentoml": 0.2}


def process_state(pid: int, expected: str) -> str:
    """The process's state letter, once it is one of expected or 2 s have passed (a signal is delivered
    asynchronously: read at once, the state can still be the one before it)."""
    deadline = time.monotonic() + 2
    while True:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in expected or time.monotonic() > deadline:
            return state
        time.sleep(0.01)


def test_a_peer_is_paused_for_a_block_and_a_paused_peer_still_stops_at_once(tmp_path):
    """What the peers command does to the peers it is not measuring, and its cleanup if it fails meanwhile."""
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    peer = peers.Running("sleeper", "http://127.0.0.1:1/predict", process, tmp_path / "sleeper.log")
    try:
        with peers.paused([peer]):
            assert process_state(process.pid, "T") == "T"
        assert process_state(process.pid, "SR") in "SR"
        peer.pause()
        started = time.monotonic()
        peer.stop()
        assert process.returncode == -15 and time.monotonic() - started < 5  # SIGTERM, acted on once continued
    finally:
        if process.poll() is None:
            process.kill()
