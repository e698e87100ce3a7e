"""GPU sampler through NVML (`pynvml` from nvidia-ml-py).

NVML is initialised once and device handles are cached. No library or no
driver means no GPU metrics (absent, not zero) and one info line. A GPU that
disappears (NVML_ERROR_GPU_IS_LOST) is logged once and skipped; the others go
on. Every call blocks, so `sample` runs off the event loop.
"""

from __future__ import annotations

from typing import Any

from agent.log import get_logger
from agent.model import GpuReading

_log = get_logger("gpu")


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class GpuSampler:
    """Reads utilization and memory of every visible GPU."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._devices: list[tuple[int, Any, str, str]] = []
        self._lost: set[int] = set()
        self.available = False
        self.errors = 0
        self._start()

    def _start(self) -> None:
        try:
            import pynvml  # noqa: PLC0415

            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - any NVML failure means "no GPU metrics"
            _log.info("gpu_metrics_unavailable", reason=str(exc) or type(exc).__name__)
            return
        self._nvml = pynvml
        try:
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                self._devices.append((index, handle, _text(pynvml.nvmlDeviceGetUUID(handle)),
                                      _text(pynvml.nvmlDeviceGetName(handle))))
        except pynvml.NVMLError as exc:
            _log.warning("gpu_enumeration_failed", error=str(exc))
        self.available = bool(self._devices)
        _log.info("gpu_metrics_started", gpus=len(self._devices),
                  names=[d[3] for d in self._devices])

    @property
    def count(self) -> int:
        """GPUs still being read."""
        return len(self._devices) - len(self._lost)

    def sample(self) -> list[GpuReading]:
        """Read every GPU that is not lost."""
        if self._nvml is None:
            return []
        nvml = self._nvml
        out = []
        for index, handle, uuid, name in self._devices:
            if index in self._lost:
                continue
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except nvml.NVMLError as exc:
                self.errors += 1
                if exc.value == nvml.NVML_ERROR_GPU_IS_LOST:
                    self._lost.add(index)
                    _log.error("gpu_lost", index=index, uuid=uuid, error=str(exc))
                elif self.errors == 1 or self.errors % 1000 == 0:
                    _log.warning("gpu_read_failed", index=index, error=str(exc), errors=self.errors)
                continue
            out.append(GpuReading(index, uuid, name, float(util.gpu), int(memory.used),
                                  int(memory.total)))
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml = None
