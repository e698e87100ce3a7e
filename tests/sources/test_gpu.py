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

SOURCE = Path(__file__).parent.parent / "data" / "fake_nvml.c"
PROBE = """
import json, os, sys, time
from agent.log import configure_logging
configure_logging("info")
from agent.rules.instance_metrics import instance_figures
from agent.sources.gpu import GpuSampler
sampler = GpuSampler()
rounds = []
for _ in range(int(sys.argv[1])):
    readings = sampler.sample()
    figures = {f.metric: f.value for f in instance_figures(None, readings) if f.view == "host"}
    rounds.append({"count": len(readings), "figures": figures,
                   "uuids": [r.uuid for r in readings]})
    if len(sys.argv) > 2 and len(rounds) == 1:  # tell the test, and wait until it changed state
        open(sys.argv[2], "a").close()
        while os.path.exists(sys.argv[2]):
            time.sleep(0.01)
print(json.dumps({"available": sampler.available, "rounds": rounds}))
"""


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the fake NVML library (.ci/run installs it)")
    libdir = tmp_path_factory.mktemp("nvml")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(libdir / "libnvidia-ml.so.1"),
                    str(SOURCE)], check=True)
    return libdir


def probe(libdir: Path, state: str | None, tmp_path: Path, rounds: int = 1,
          mutate: str | None = None) -> tuple[dict[str, object], str]:
    env = dict(os.environ, LD_LIBRARY_PATH=str(libdir))
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
        """30 % + 70 % -> GPUUtilization 100; memory 50 % + 25 % -> 75."""
        result, _ = probe(fake_nvml, "2\n" + gpu_line(30, 500, n=0) + gpu_line(70, 250, n=1), tmp_path)
        figures = result["rounds"][0]["figures"]  # type: ignore[index]
        assert figures == {"GPUUtilization": 100.0, "GPUMemoryUtilization": 75.0}

    def test_four_gpus_scale_to_400(self, fake_nvml: Path, tmp_path: Path) -> None:
        """Four busy GPUs read 400 (0-100 per GPU, summed)."""
        state = "4\n" + "".join(gpu_line(100, 1000, n=i) for i in range(4))
        result, _ = probe(fake_nvml, state, tmp_path)
        assert result["rounds"][0]["figures"]["GPUUtilization"] == 400.0  # type: ignore[index]
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
