"""What this CPU can do, from ``/proc/cpuinfo`` (no MXNet): the checks of --amp bfloat16 and INT8, and the CPU line
every benchmark table records."""
from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import MutableMapping

__all__ = ["cpu_flags", "cpu_model", "cpu_line", "enable_amx", "BENCH_FLAGS", "BLOCKED_CHANNELS",
           "auto_channel_multiple"]

#: oneDNN's blocked layouts hold channels in groups of 16 (AVX-512); MXNet 1.9.1 refuses them for other widths
#: (``padding.py``), so a depthwise bf16 convolution of another width is slow (``precision.py``).
BLOCKED_CHANNELS = 16


def auto_channel_multiple(on_gpu: bool) -> int:
    """What ``--channel-multiple auto`` means, for training and at load alike: 16 on CPUs, 1 on GPUs (cuDNN needs
    no padding)."""
    return 1 if on_gpu else BLOCKED_CHANNELS

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


#: Linux x86_64: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) asks the kernel (5.16+) for AMX tile state.
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


def enable_amx(environ: MutableMapping[str, str]) -> str:
    """Let oneDNN use AMX for bfloat16 in this process; call before MXNet loads. Returns what was done, for the log.

    Workaround: MXNet 1.9.1's oneDNN 2.4 neither asks Linux for AMX's tile state (a process must, since Linux 5.16)
    nor uses AMX unless ``DNNL_MAX_CPU_ISA=AVX512_CORE_AMX``; setting the variable without the permission kills the
    process with SIGILL, so it is set only when the request succeeded. A value the user set is kept.
    """
    if "amx_bf16" not in cpu_flags():
        return "no AMX on this CPU (amx_bf16): oneDNN's AVX-512 bfloat16 kernels"
    if "DNNL_MAX_CPU_ISA" in environ:
        return f"DNNL_MAX_CPU_ISA={environ['DNNL_MAX_CPU_ISA']} as set"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return "AMX not requested (Linux x86_64 only)"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        return f"the kernel refused AMX tile state (errno {ctypes.get_errno()}): AVX-512 bfloat16 kernels"
    environ["DNNL_MAX_CPU_ISA"] = "AVX512_CORE_AMX"
    return "AMX on (arch_prctl tile permission, DNNL_MAX_CPU_ISA=AVX512_CORE_AMX)"
