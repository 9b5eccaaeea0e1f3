"""GPU utilisation from NVML, for the replicas' Load reports.

Import-guarded: on a machine without an NVIDIA driver (or without ``nvidia-ml-py``) every call
answers None, which the contract spells "no GPU".
"""

from __future__ import annotations

import functools
import os


@functools.cache
def _nvml():  # -> pynvml module or None
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # ImportError, or NVMLError when there is no driver
        return None


def _device_index() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(visible) if visible.isdigit() else 0


def gpu_utilization() -> float | None:
    """Fraction (0-1) of the last sample period the replica's GPU was busy, or None."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(_device_index())
        return nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
    except Exception:
        return None
