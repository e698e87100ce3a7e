"""GPU sampler through NVML (`pynvml` from nvidia-ml-py).

NVML is initialised once and device handles are cached. No library or no
driver means no GPU metrics (absent, not zero) and one info line. A GPU that
disappears (NVML_ERROR_GPU_IS_LOST) is logged once and skipped; the others go
on. Every call blocks, so `sample` runs off the event loop.

MIG: a GPU in MIG mode is read as its MIG devices (one reading each, memory of
its slice); NVML gives no utilization for them. A device whose utilization NVML
does not support (MIG, some vGPUs) is logged once, counted, and not asked again;
its memory is still read.

Per-process memory: NVML's running compute processes, kept only for the child's
process tree (the agent's descendants), at most `max_processes` per device, the
rest folded into one pid-0 "other" entry and counted. Older drivers give host
PIDs inside a container's PID namespace; those match nothing here and are left
out (nothing is reported rather than another container's processes).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import psutil

from agent.log import first_or_every, get_logger
from agent.model import GpuProcess, GpuReading

_log = get_logger("gpu")
MAX_PROCESSES = 32


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class _Device(NamedTuple):
    index: int
    mig_index: int | None
    handle: Any
    uuid: str
    name: str


class GpuSampler:
    """Reads utilization, memory and the child's per-process memory of every visible GPU.

    Args:
        tree_root: the process whose descendants count as the child's tree (the agent).
        max_processes: processes kept per device; the rest are folded into pid 0.
    """

    def __init__(self, *, tree_root: int | None = None, max_processes: int = MAX_PROCESSES) -> None:
        self._nvml: Any = None
        self._devices: list[_Device] = []
        self._lost: set[int] = set()
        self._no_utilization: set[str] = set()
        self._no_processes: set[str] = set()
        self._root = os.getpid() if tree_root is None else tree_root
        self._max_processes = max_processes
        self.available = False
        self.errors = 0
        self.folded = 0
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
                migs = self._mig_devices(index, handle)
                self._devices.extend(migs or [self._describe(index, None, handle)])
        except pynvml.NVMLError as exc:
            _log.warning("gpu_enumeration_failed", error=str(exc))
        self.available = bool(self._devices)
        _log.info("gpu_metrics_started", gpus=len(self._devices),
                  names=[d.name for d in self._devices],
                  mig=sum(d.mig_index is not None for d in self._devices))

    def _describe(self, index: int, mig_index: int | None, handle: Any) -> _Device:
        nvml = self._nvml
        return _Device(index, mig_index, handle, _text(nvml.nvmlDeviceGetUUID(handle)),
                       _text(nvml.nvmlDeviceGetName(handle)))

    def _mig_devices(self, index: int, handle: Any) -> list[_Device]:
        """The MIG devices of GPU `index` that this process can see; [] when MIG is off or
        not supported (most GPUs: NOT_SUPPORTED, old drivers: FUNCTION_NOT_FOUND)."""
        nvml = self._nvml
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
            if current != nvml.NVML_DEVICE_MIG_ENABLE:
                return []
            slots = nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
        except nvml.NVMLError:
            return []
        out = []
        for slot in range(slots):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nvml.NVMLError:  # NOT_FOUND: an empty slot; NO_PERMISSION: not ours
                continue
            out.append(self._describe(index, slot, mig))
        return out

    @property
    def count(self) -> int:
        """GPUs still being read."""
        return sum(d.index not in self._lost for d in self._devices)

    def sample(self) -> list[GpuReading]:
        """Read every device that is not lost."""
        if self._nvml is None:
            return []
        nvml = self._nvml
        out = []
        tree: dict[int, str] | None = None
        for device in self._devices:
            if device.index in self._lost:
                continue
            try:
                util = self._utilization(device)
                memory = nvml.nvmlDeviceGetMemoryInfo(device.handle)
                running = self._running(device)
            except nvml.NVMLError as exc:
                self.errors += 1
                if exc.value == nvml.NVML_ERROR_GPU_IS_LOST:
                    self._lost.add(device.index)
                    _log.error("gpu_lost", index=device.index, uuid=device.uuid, error=str(exc))
                elif first_or_every(self.errors, 1000):
                    _log.warning("gpu_read_failed", index=device.index, error=str(exc),
                                 errors=self.errors)
                continue
            processes: tuple[GpuProcess, ...] = ()
            if running:
                if tree is None:
                    tree = _descendants(self._root)
                processes = self._ours(running, tree)
            out.append(GpuReading(device.index, device.uuid, device.name, util,
                                  int(memory.used), int(memory.total), device.mig_index,
                                  processes))
        return out

    def _utilization(self, device: _Device) -> float | None:
        """Percent busy, or None where NVML does not support it (asked once, then not again)."""
        nvml = self._nvml
        if device.uuid in self._no_utilization:
            return None
        try:
            return float(nvml.nvmlDeviceGetUtilizationRates(device.handle).gpu)
        except nvml.NVMLError as exc:
            if exc.value != nvml.NVML_ERROR_NOT_SUPPORTED:
                raise
        self._no_utilization.add(device.uuid)
        _log.info("gpu_utilization_not_supported", index=device.index, mig=device.mig_index,
                  uuid=device.uuid, hint="GPUUtilization leaves this device out")
        return None

    def _running(self, device: _Device) -> list[tuple[int, int]]:
        """(pid, bytes) of the device's compute processes; [] where NVML cannot say."""
        nvml = self._nvml
        if device.uuid in self._no_processes:
            return []
        try:
            procs = nvml.nvmlDeviceGetComputeRunningProcesses(device.handle)
        except Exception as exc:  # noqa: BLE001 - also pynvml's NVMLLibraryMismatchError (an
            # old driver without the _v3 call): per-process memory is optional, the rest is not
            if isinstance(exc, nvml.NVMLError) and exc.value == nvml.NVML_ERROR_GPU_IS_LOST:
                raise
            self._no_processes.add(device.uuid)
            _log.info("gpu_processes_unavailable", index=device.index, uuid=device.uuid,
                      error=str(exc))
            return []
        return [(int(p.pid), int(p.usedGpuMemory)) for p in procs
                if p.usedGpuMemory is not None]

    def _ours(self, running: list[tuple[int, int]], tree: dict[int, str]) -> tuple[GpuProcess, ...]:
        """The child's tree's processes, largest first, at most `max_processes`; the rest
        are summed into pid 0 "other" (and counted), so the series stay bounded."""
        mine = sorted((GpuProcess(pid, tree[pid], used) for pid, used in running if pid in tree),
                      key=lambda p: -p.memory_used)
        if len(mine) <= self._max_processes:
            return tuple(mine)
        kept, rest = mine[:self._max_processes - 1], mine[self._max_processes - 1:]
        self.folded += len(rest)
        return (*kept, GpuProcess(0, "other", sum(p.memory_used for p in rest)))

    def counters(self) -> dict[str, int]:
        return {"gpu_read_errors": self.errors,
                "gpu_utilization_unsupported": len(self._no_utilization),
                "gpu_processes_folded": self.folded}

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml = None


def _descendants(root: int) -> dict[int, str]:
    """{pid: command name} of `root`'s descendants (the child and everything it started)."""
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return {}
    out = {}
    for child in children:
        try:
            out[child.pid] = child.name()
        except psutil.Error:
            continue
    return out
