"""What this CPU can do, from ``/proc/cpuinfo`` (no MXNet): the checks of --amp bfloat16 and INT8, and the CPU line
every benchmark table records."""
from __future__ import annotations

import os

__all__ = ["cpu_flags", "cpu_model", "cpu_line", "BENCH_FLAGS"]

#: The SIMD flags that decide which oneDNN kernels run: what a benchmark table names.
BENCH_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16")


def _field(name: str, path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(name) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The first processor's feature flags (empty where /proc/cpuinfo is missing)."""
    return set((_field("flags", path) or "").split())


def cpu_model(path: str = "/proc/cpuinfo") -> str:
    return _field("model name", path) or "unknown CPU"


def cpu_line(path: str = "/proc/cpuinfo") -> str:
    """'<model>, <N> cores, flags: ...' for benchmark tables."""
    flags = cpu_flags(path)
    return f"{cpu_model(path)}, {os.cpu_count()} cores, flags: {' '.join(f for f in BENCH_FLAGS if f in flags)}"
