"""The GPU's clocks and power while a benchmark runs: NVML sampled on a thread (nvidia-ml-py).

A step's time follows the SM clock, which the GPU lowers on its own under a power or thermal
cap. Two readings of the same code minutes apart, or two rounds of it, can then differ by the
clock alone; `GpuSampler` tells that apart from the code: each timed window gets the mean SM
clock, power and the clock-event reasons NVML reported while it ran.

    sampler = GpuSampler.open()  # None without NVML
    with sampler:
        start = time.perf_counter(); run(); end = time.perf_counter()
    print(sampler.window(start, end).brief())

Without nvidia-ml-py or a GPU `GpuSampler.open()` returns None and the caller goes on without it.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time

# NVML's clock-event ("throttle") reason bits (nvml.h, nvmlClocksEventReason*): why the SM clock
# is below its maximum. Idle and the application-clock setting are not slowdowns.
REASONS = {
    0x1: "idle",
    0x2: "app-clocks",
    0x4: "power-cap",
    0x8: "hw-slowdown",
    0x10: "sync-boost",
    0x20: "sw-thermal",
    0x40: "hw-thermal",
    0x80: "power-brake",
    0x100: "display",
}


@dataclasses.dataclass(frozen=True)
class Sample:
    time_s: float  # time.perf_counter()
    sm_mhz: float
    power_w: float
    temperature_c: float
    reasons: int  # NVML's bit mask


@dataclasses.dataclass(frozen=True)
class Window:
    """What the samples between two host times say: the means, the lowest clock, and the share of
    samples under each clock-event reason."""

    samples: int
    sm_mhz: float
    sm_mhz_min: float
    power_w: float
    temperature_c: float
    reason_share: dict[str, float]

    def brief(self) -> str:
        reasons = ", ".join(f"{name} {share:.0%}" for name, share in self.reason_share.items() if share)
        return f"{self.sm_mhz:.0f} MHz (min {self.sm_mhz_min:.0f}), {self.power_w:.0f} W" + (
            f", {reasons}" if reasons else ""
        )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def reason_names(mask: int) -> list[str]:
    """NVML's clock-event bit mask -> the reasons' names (unknown bits as hex)."""
    names = [name for bit, name in REASONS.items() if mask & bit]
    unknown = mask & ~sum(REASONS)
    return names + ([hex(unknown)] if unknown else [])


def summarise(samples: list[Sample], start_s: float, end_s: float) -> Window | None:
    """The samples taken in [start_s, end_s] as one Window; None where there are none."""
    inside = [s for s in samples if start_s <= s.time_s <= end_s]
    if not inside:
        return None
    counts: dict[str, int] = {}
    for sample in inside:
        for name in reason_names(sample.reasons):
            counts[name] = counts.get(name, 0) + 1
    return Window(
        samples=len(inside),
        sm_mhz=statistics.fmean(s.sm_mhz for s in inside),
        sm_mhz_min=min(s.sm_mhz for s in inside),
        power_w=statistics.fmean(s.power_w for s in inside),
        temperature_c=statistics.fmean(s.temperature_c for s in inside),
        reason_share={name: counts[name] / len(inside) for name in sorted(counts)},
    )


class GpuSampler:
    """NVML read every `interval_s` on a daemon thread between __enter__ and __exit__. NVML's
    calls go through ctypes, which releases the GIL, so the benchmark's thread keeps queuing."""

    def __init__(self, nvml, handle, interval_s: float = 0.002) -> None:
        self._nvml, self._handle, self.interval_s = nvml, handle, interval_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._instant_power = True
        self._thread: threading.Thread | None = None
        # nvmlDeviceGetCurrentClocksEventReasons replaced ...ThrottleReasons (same bits) in NVML 12.2.
        self._reasons = (
            getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
            or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        )

    @classmethod
    def open(cls, device_index: int = 0, interval_s: float = 0.002) -> GpuSampler | None:
        """A sampler of GPU `device_index` (NVML's numbering), or None where NVML cannot be used."""
        try:
            import pynvml

            pynvml.nvmlInit()
            return cls(pynvml, pynvml.nvmlDeviceGetHandleByIndex(device_index), interval_s)
        except Exception as error:  # no nvidia-ml-py, no driver: run without telemetry
            print(
                f"GPU telemetry off ({type(error).__name__}: {error}): pip install nvidia-ml-py",
                flush=True,
            )
            return None

    def _power_w(self) -> float:
        """The instantaneous board power where the driver reports it: nvmlDeviceGetPowerUsage is
        an average over the last second on Ampere and newer, too slow for a round of 0.2 s."""
        nvml, handle = self._nvml, self._handle
        if self._instant_power:
            try:
                (field,) = nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_POWER_INSTANT])
                if field.nvmlReturn == 0:
                    return field.value.uiVal / 1000.0
            except Exception:  # an older driver or nvidia-ml-py without the field
                pass
            self._instant_power = False
        return nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0

    @property
    def power_source(self) -> str:
        return "instantaneous" if self._instant_power else "NVML's 1 s average"

    def read(self) -> Sample:
        nvml, handle = self._nvml, self._handle
        return Sample(
            time_s=time.perf_counter(),
            sm_mhz=float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
            power_w=self._power_w(),
            temperature_c=float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            reasons=int(self._reasons(handle)),
        )

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.read())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GpuSampler:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def window(self, start_s: float, end_s: float) -> Window | None:
        return summarise(list(self.samples), start_s, end_s)
