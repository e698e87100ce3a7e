"""GPU sampler through the real pynvml, loading a fake libnvidia-ml.so.1 built with gcc."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import agent_events, base_env, read_calls, run_agent

SOURCE = Path(__file__).parent.parent / "data" / "fake_nvml.c"
PROBE = """
import json, os, subprocess, sys, time
from agent.log import configure_logging
configure_logging("info")
from agent.rules.instance_metrics import instance_figures
from agent.sinks.prometheus import PrometheusSink
from agent.sources.gpu import GpuSampler
from agent.sources.system import CgroupReader, SystemSampler
# PROBE_CHILDREN=n: start n children (the agent's child tree) and put their pids into the state
# file where it says {child0}, {child1}, ...; then sample.
children = [subprocess.Popen(["sleep", "60"]) for _ in range(int(os.environ.get("PROBE_CHILDREN", "0")))]
import atexit
atexit.register(lambda: [child.kill() for child in children])  # also when the probe fails
state = os.environ.get("FAKE_NVML_STATE")
if children and state:
    text = open(state).read()
    for i, child in enumerate(children):
        text = text.replace("{child%d}" % i, str(child.pid))
    open(state, "w").write(text)
sampler = GpuSampler(max_processes=int(os.environ.get("PROBE_MAX_PROCESSES", "32")))
prometheus = PrometheusSink(None)
system = SystemSampler(CgroupReader(), None).sample()
rounds = []
for _ in range(int(sys.argv[1])):
    readings = sampler.sample()
    figures = {f.metric: f.value for f in instance_figures(None, readings) if f.view == "host"}
    prometheus.on_reading(system, readings)
    page = [line for line in prometheus.page().decode().splitlines()
            if line.startswith(("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED",
                                "sagemaker_agent_gpu_process"))]
    rounds.append({"count": len(readings), "figures": figures,
                   "uuids": [r.uuid for r in readings],
                   "readings": [{"util": r.utilization_pct, "used": r.memory_used,
                                 "total": r.memory_total, "mig": r.mig_index,
                                 "processes": [list(p) for p in r.processes]} for r in readings],
                   "page": page})
    if len(sys.argv) > 2 and len(rounds) == 1:  # tell the test, and wait until it changed state
        open(sys.argv[2], "a").close()
        while os.path.exists(sys.argv[2]):
            time.sleep(0.01)
for child in children:
    child.kill()
from agent.stdio import STDERR
STDERR.flush(30)  # the agent's log lines are written by a thread: out before exiting, as cli does
print(json.dumps({"available": sampler.available, "rounds": rounds,
                  "counters": sampler.counters(),
                  "children": [[c.pid, "sleep"] for c in children]}))
"""


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the fake NVML library (.ci/run installs it)")
    libdir = tmp_path_factory.mktemp("nvml")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(libdir / "libnvidia-ml.so.1"),
                    str(SOURCE)], check=True)
    return libdir


@pytest.fixture(scope="session")
def old_driver_nvml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake library without the MIG and running-process functions (an old driver)."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the fake NVML library (.ci/run installs it)")
    libdir = tmp_path_factory.mktemp("nvml-old")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-DOLD_DRIVER", "-o",
                    str(libdir / "libnvidia-ml.so.1"), str(SOURCE)], check=True)
    return libdir


def probe(libdir: Path, state: str | None, tmp_path: Path, rounds: int = 1,
          mutate: str | None = None, **extra: str) -> tuple[dict[str, object], str]:
    env = dict(os.environ, LD_LIBRARY_PATH=str(libdir), FAKE_NVML_CALLS=str(tmp_path / "calls"),
               **extra)
    if state is not None:
        (tmp_path / "state").write_text(state)
        env["FAKE_NVML_STATE"] = str(tmp_path / "state")
    args = [sys.executable, "-c", PROBE, str(rounds)]
    if mutate is not None:
        # Round one reads `state`; then the probe waits while the test swaps in `mutate`
        # (atomically), so every later round reads the new state however slow either side is.
        tick = tmp_path / "tick"
        proc = subprocess.Popen([*args, str(tick)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not tick.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the probe never finished its first round"
            time.sleep(0.01)
        (tmp_path / "state.new").write_text(mutate)
        (tmp_path / "state.new").replace(tmp_path / "state")
        tick.unlink()
        out, err = proc.communicate(timeout=30)
    else:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30, check=True)
        out, err = done.stdout, done.stderr
    return json.loads(out), err


def gpu_line(util: int, used: int, total: int = 1000, lost: int = 0, n: int = 0) -> str:
    return f"{util} {used} {total} {lost} Tesla-T4 GPU-{n:04d}\n"


class TestFakeNvml:
    def test_two_gpus_sum(self, fake_nvml: Path, tmp_path: Path) -> None:
        """30 % + 70 % -> GPUUtilization 100, normalized 50; memory 50 % + 25 % -> 75,
        normalized 37.5 (the scaled figure over the GPU count)."""
        result, _ = probe(fake_nvml, "2\n" + gpu_line(30, 500, n=0) + gpu_line(70, 250, n=1), tmp_path)
        figures = result["rounds"][0]["figures"]  # type: ignore[index]
        assert figures == {"GPUUtilization": 100.0, "GPUUtilizationNormalized": 50.0,
                           "GPUMemoryUtilization": 75.0, "GPUMemoryUtilizationNormalized": 37.5}

    def test_four_gpus_scale_to_400(self, fake_nvml: Path, tmp_path: Path) -> None:
        """Four busy GPUs read 400 (0-100 per GPU, summed); normalized, 100."""
        state = "4\n" + "".join(gpu_line(100, 1000, n=i) for i in range(4))
        result, _ = probe(fake_nvml, state, tmp_path)
        assert result["rounds"][0]["figures"]["GPUUtilization"] == 400.0  # type: ignore[index]
        assert result["rounds"][0]["figures"]["GPUUtilizationNormalized"] == 100.0  # type: ignore[index]
        assert result["rounds"][0]["uuids"] == [f"GPU-{i:04d}" for i in range(4)]  # type: ignore[index]

    def test_zero_gpus_absent(self, fake_nvml: Path, tmp_path: Path) -> None:
        """A driver with no GPU gives no GPU metrics at all (absent, not zero)."""
        result, _ = probe(fake_nvml, "0\n", tmp_path)
        assert result["rounds"][0]["figures"] == {}  # type: ignore[index]
        assert result["available"] is False

    def test_driver_not_loaded_logs_once(self, fake_nvml: Path, tmp_path: Path) -> None:
        """No driver: metrics absent and one info line, no error loop."""
        result, err = probe(fake_nvml, "driver_not_loaded\n", tmp_path, rounds=5)
        assert all(r["figures"] == {} for r in result["rounds"])  # type: ignore[union-attr]
        assert err.count("gpu_metrics_unavailable") == 1 and "Driver Not Loaded" in err

    def test_missing_library(self, tmp_path: Path) -> None:
        """No libnvidia-ml at all (this machine): absent metrics, one info line."""
        result, err = probe(tmp_path, None, tmp_path, rounds=3)
        assert result["available"] is False and err.count("gpu_metrics_unavailable") == 1

    def test_lost_gpu_logged_once_others_continue(self, fake_nvml: Path, tmp_path: Path) -> None:
        """A GPU lost mid-run is logged once and skipped; the other keeps reporting."""
        healthy = "2\n" + gpu_line(40, 100, n=0) + gpu_line(60, 100, n=1)
        lost = "2\n" + gpu_line(40, 100, n=0) + gpu_line(60, 100, lost=1, n=1)
        result, err = probe(fake_nvml, healthy, tmp_path, rounds=4, mutate=lost)
        rounds = result["rounds"]
        assert rounds[0]["figures"]["GPUUtilization"] == 100.0  # type: ignore[index]
        assert rounds[-1]["count"] == 1  # type: ignore[index]
        assert rounds[-1]["figures"]["GPUUtilization"] == 40.0  # type: ignore[index]
        assert err.count("gpu_lost") == 1


def calls(tmp_path: Path, function: str) -> int:
    """How many times the probe called `function` of the fake NVML."""
    path = tmp_path / "calls"
    return path.read_text().splitlines().count(function) if path.exists() else 0


class TestNotSupportedAndMig:
    def test_utilization_not_supported_asked_once(self, fake_nvml: Path, tmp_path: Path) -> None:
        """A GPU whose utilization NVML does not support (NOT_SUPPORTED, as on vGPUs) keeps its
        memory figures; GPUUtilization counts only the GPU that reports it; the call is made
        once for it, logged once and counted, not retried or logged every second."""
        state = "2\nna 500 1000 0 GRID-T4 GPU-0000\n" + gpu_line(40, 250, n=1)
        result, err = probe(fake_nvml, state, tmp_path, rounds=5)
        rounds = result["rounds"]
        assert all(r["count"] == 2 for r in rounds)  # type: ignore[union-attr]
        assert rounds[-1]["figures"] == {  # type: ignore[index]
            "GPUUtilization": 40.0, "GPUUtilizationNormalized": 40.0,
            "GPUMemoryUtilization": 75.0, "GPUMemoryUtilizationNormalized": 37.5}
        assert [r["util"] for r in rounds[-1]["readings"]] == [None, 40.0]  # type: ignore[index]
        assert result["counters"] == {"gpu_read_errors": 0, "gpu_utilization_unsupported": 1,
                                      "gpu_processes_folded": 0}
        assert calls(tmp_path, "nvmlDeviceGetUtilizationRates") == 1 + 5
        assert err.count("gpu_utilization_not_supported") == 1
        assert "gpu_read_failed" not in err
        util_lines = [line for line in rounds[-1]["page"]  # type: ignore[index]
                      if line.startswith("DCGM_FI_DEV_GPU_UTIL{")]
        assert len(util_lines) == 1 and 'UUID="GPU-0001"' in util_lines[0]

    def test_mig_devices_read_one_by_one(self, fake_nvml: Path, tmp_path: Path) -> None:
        """A GPU in MIG mode is read as its MIG devices: memory of each slice, no utilization
        (NVML has none for MIG: GPUUtilization absent, not 0), processes on their device."""
        state = "1\n0 6000 12000 0 A100 GPU-0000 mig=2 procs={child0}:1000\n"
        result, err = probe(fake_nvml, state, tmp_path, rounds=3, PROBE_CHILDREN="1")
        last = result["rounds"][-1]  # type: ignore[index]
        child = result["children"][0][0]  # type: ignore[index]
        assert last["uuids"] == ["MIG-GPU-0000-0", "MIG-GPU-0000-1"]
        assert last["readings"] == [
            {"util": None, "used": 3000, "total": 6000, "mig": 0,
             "processes": [[child, "sleep", 1000]]},
            {"util": None, "used": 3000, "total": 6000, "mig": 1, "processes": []}]
        assert last["figures"] == {"GPUMemoryUtilization": 100.0,
                                   "GPUMemoryUtilizationNormalized": 50.0}
        assert result["counters"]["gpu_utilization_unsupported"] == 2  # type: ignore[index]
        assert result["counters"]["gpu_read_errors"] == 0  # type: ignore[index]
        assert err.count("gpu_utilization_not_supported") == 2
        assert calls(tmp_path, "nvmlDeviceGetUtilizationRates") == 2
        used = [line for line in last["page"] if line.startswith("DCGM_FI_DEV_FB_USED{")]
        assert len(used) == 2 and 'GPU_I_ID="0"' in used[0] and 'GPU_I_ID="1"' in used[1]
        assert not [line for line in last["page"] if line.startswith("DCGM_FI_DEV_GPU_UTIL{")]


class TestProcessMemory:
    def test_child_tree_processes_only(self, fake_nvml: Path, tmp_path: Path) -> None:
        """NVML's running compute processes are kept for the child's tree only (the probe's
        children here; pid 1 is not one of them), largest first, with their command; a process
        whose memory NVML cannot tell is left out. On Prometheus: one series per process."""
        state = ("1\n50 3000 10000 0 H100 GPU-0000 "
                 "procs={child0}:1000,{child1}:2000,1:500,{child2}:na\n")
        result, _ = probe(fake_nvml, state, tmp_path, PROBE_CHILDREN="3")
        children = [pid for pid, _ in result["children"]]  # type: ignore[union-attr]
        reading = result["rounds"][0]["readings"][0]  # type: ignore[index]
        assert reading["processes"] == [[children[1], "sleep", 2000], [children[0], "sleep", 1000]]
        series = [line for line in result["rounds"][0]["page"]  # type: ignore[index]
                  if line.startswith("sagemaker_agent_gpu_process_memory_used_bytes{")]
        assert len(series) == 2
        assert f'pid="{children[1]}"' in series[0] and 'command="sleep"' in series[0]
        assert series[0].endswith(" 2000.0")

    def test_bounded_series(self, fake_nvml: Path, tmp_path: Path) -> None:
        """More processes than the bound: the largest are kept, the rest summed under pid 0,
        command "other", and counted."""
        state = "1\n50 3000 10000 0 H100 GPU-0000 procs={child0}:100,{child1}:300,{child2}:200\n"
        result, _ = probe(fake_nvml, state, tmp_path, PROBE_CHILDREN="3", PROBE_MAX_PROCESSES="2")
        children = [pid for pid, _ in result["children"]]  # type: ignore[union-attr]
        reading = result["rounds"][0]["readings"][0]  # type: ignore[index]
        assert reading["processes"] == [[children[1], "sleep", 300], [0, "other", 300]]
        assert result["counters"]["gpu_processes_folded"] == 2  # type: ignore[index]

    def test_old_driver_without_process_calls(self, old_driver_nvml: Path, tmp_path: Path) -> None:
        """A driver without the MIG and running-process calls: whole GPUs, utilization and
        memory as before, no per-process series, one info line per GPU, no failed samples."""
        state = "1\n50 3000 10000 0 H100 GPU-0000 procs={child0}:1000\n"
        result, err = probe(old_driver_nvml, state, tmp_path, rounds=3, PROBE_CHILDREN="1")
        assert all(r["readings"] == [{"util": 50.0, "used": 3000, "total": 10000, "mig": None,  # type: ignore[union-attr]
                                       "processes": []}] for r in result["rounds"])  # type: ignore[union-attr]
        assert err.count("gpu_processes_unavailable") == 1
        assert result["counters"]["gpu_read_errors"] == 0  # type: ignore[index]


def test_slow_nvml_start_finishes_before_agent_stopped(fake_nvml: Path, tmp_path: Path) -> None:
    """A driver whose nvmlInit takes 1.5 s, and a child that exits at once: the agent's
    shutdown waits for NVML's start-up (a thread cancelling cannot stop), so its line comes
    before `agent_stopped`, which stays the last line, and the last interval has the GPU.
    Before, `gpu_metrics_started` was logged after `agent_stopped` and the GPU was missing."""
    (tmp_path / "state").write_text("1\n" + gpu_line(30, 500))
    env = base_env(tmp_path, LD_LIBRARY_PATH=str(fake_nvml), FAKE_NVML_INIT_DELAY_MS="1500",
                   FAKE_NVML_STATE=str(tmp_path / "state"))
    done = run_agent([sys.executable, "-c", "pass"], env)
    assert done.returncode == 0, done.stderr
    events = [e["event"] for e in agent_events(done.stderr)]
    assert "gpu_metrics_started" in events and events[-1] == "agent_stopped", events
    datums = [d["MetricName"] for r in read_calls(tmp_path / "calls.jsonl")
              if r["api"] == "PutMetricData" for d in r["params"]["MetricData"]]
    assert "GPUUtilization" in datums, sorted(set(datums))
