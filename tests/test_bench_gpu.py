"""bench/gpu.sh, the prepared GPU run (issue 12, part 6): what it carries and what it checks before it runs.

The run itself needs a lent GPU machine (the device tool); here, the lists it installs from are checked against
what the service and each carried wheel require, so a dependency added later cannot break a GPU run that has
only minutes of device time."""

import importlib.metadata as metadata
import os
import re
import subprocess

from packaging.requirements import Requirement
from support import ROOT

SCRIPT = ROOT / "bench" / "gpu.sh"
GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}  # the GPU image's python3


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def script_list(variable: str) -> set[str]:
    match = re.search(rf'^{variable}="([^"]*)"', SCRIPT.read_text(), re.MULTILINE)
    assert match, variable
    return {canonical(name) for name in match.group(1).split()}


def test_the_gpu_run_carries_or_finds_every_package_the_service_and_its_wheels_need():
    carried, on_image = script_list("WHEELS"), script_list("ON_IMAGE")
    assert not carried & on_image  # one version of each: a carried wheel would shadow the image's own
    lines = (ROOT / "requirements-web.txt").read_text().splitlines()
    needed = {canonical(Requirement(line.split("#")[0]).name) for line in lines if line.split("#")[0].strip()}
    needed |= {"keras", "requests"}  # the model worker on Keras 3 / JAX, and the load generator
    for name in sorted(carried):
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(GPU_PYTHON):
                needed.add(canonical(requirement.name))
    assert needed <= carried | on_image, sorted(needed - carried - on_image)


def test_the_gpu_script_says_how_to_call_it_and_refuses_to_run_off_the_gpu_machine():
    usage = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "prepare|run" in usage.stderr
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    run = subprocess.run(["bash", str(SCRIPT), "run"], capture_output=True, text=True, timeout=30, env=env)
    assert run.returncode != 0 and "OUT" in run.stderr and "GPU machine" in run.stderr
