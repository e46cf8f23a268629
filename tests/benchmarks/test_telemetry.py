"""The benchmarks' GPU telemetry (benchmarks/telemetry.py) on a scripted NVML: which samples a
window takes, the reasons' shares, and the power source's fallback."""

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from telemetry import GpuSampler, Sample, reason_names, summarise


def test_reason_names_decode_nvml_bits():
    assert reason_names(0) == []
    assert reason_names(0x4 | 0x1) == ["idle", "power-cap"]
    assert reason_names(0x4 | 0x10000) == ["power-cap", "0x10000"]


def test_summarise_takes_only_the_window_and_shares_reasons():
    samples = [
        Sample(0.0, 1980, 300, 40, 0x1),  # before the window
        Sample(1.0, 1980, 650, 50, 0),
        Sample(1.5, 1800, 700, 52, 0x4),
        Sample(2.0, 1740, 700, 54, 0x4 | 0x20),
        Sample(2.5, 1980, 200, 45, 0x1),  # after it
    ]
    window = summarise(samples, 1.0, 2.0)
    assert window.samples == 3
    assert window.sm_mhz == pytest.approx((1980 + 1800 + 1740) / 3)
    assert window.sm_mhz_min == 1740
    assert window.power_w == pytest.approx(2050 / 3)
    assert window.reason_share == pytest.approx({"power-cap": 2 / 3, "sw-thermal": 1 / 3})
    assert window.brief() == "1840 MHz (min 1740), 683 W, power-cap 67%, sw-thermal 33%"
    assert summarise(samples, 3.0, 4.0) is None


def _fake_nvml(instant_power_return: int):
    def field_values(handle, fields):
        assert fields == [186]
        return [SimpleNamespace(nvmlReturn=instant_power_return, value=SimpleNamespace(uiVal=612_000))]

    return SimpleNamespace(
        NVML_CLOCK_SM=1,
        NVML_TEMPERATURE_GPU=0,
        NVML_FI_DEV_POWER_INSTANT=186,
        nvmlDeviceGetClockInfo=lambda handle, clock: 1755,
        nvmlDeviceGetPowerUsage=lambda handle: 598_000,  # milliwatts, a 1 s average
        nvmlDeviceGetTemperature=lambda handle, sensor: 61,
        nvmlDeviceGetFieldValues=field_values,
        nvmlDeviceGetCurrentClocksEventReasons=lambda handle: 0x4,
    )


def test_sampler_reads_on_its_thread_and_prefers_instant_power():
    sampler = GpuSampler(_fake_nvml(instant_power_return=0), handle=None, interval_s=0.001)
    start = time.perf_counter()
    with sampler:
        time.sleep(0.05)
    end = time.perf_counter()
    assert len(sampler.samples) >= 3
    window = sampler.window(start, end)
    assert (window.sm_mhz, window.power_w, window.temperature_c) == (1755, 612.0, 61)
    assert window.reason_share == {"power-cap": 1.0}
    assert sampler.power_source == "instantaneous"


def test_sampler_falls_back_to_the_average_power_where_instant_is_missing():
    sampler = GpuSampler(_fake_nvml(instant_power_return=3), handle=None)  # NVML_ERROR_NOT_SUPPORTED
    assert sampler.read().power_w == 598.0
    assert sampler.power_source == "NVML's 1 s average"


def test_open_without_nvml_returns_none(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert GpuSampler.open() is None
    assert "nvidia-ml-py" in capsys.readouterr().out
