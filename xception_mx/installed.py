"""What the environment must hold, said in one line when it does not: one MXNet build, an OpenCV that loads.

MXNet comes from the ``cpu`` or the ``gpu`` extra (``mxnet`` / ``mxnet-cu112``): the two builds install the same
``mxnet`` package, so with both the last one installed wins, file by file. OpenCV is ``opencv-python`` (gluoncv
requires that build); only im2rec-tools imports ``cv2``, and on a server without ``libGL.so.1`` it cannot load.
Imports nothing heavy (``importlib.metadata`` only).
"""
from __future__ import annotations

from importlib import metadata
from types import ModuleType

from .errors import RunFailed

__all__ = ["mxnet_builds", "check_one_mxnet", "import_cv2", "missing_module_line"]

#: The extras that install MXNet (pyproject.toml), as a user pastes them.
INSTALL_MXNET = "pip install 'xception_mx[cpu]' (or 'xception_mx[gpu]' for CUDA 11.2)"
#: What makes ``import cv2`` work on a server without display libraries.
INSTALL_LIBGL = ("install the system library (Debian/Ubuntu: apt-get install -y libgl1), or swap OpenCV for its "
                 "headless build: pip uninstall -y opencv-python && pip install 'opencv-python-headless<4.12'")

#: The pip names MXNet 1.9 was published under (CPU, oneDNN-only, and each CUDA build): one folder, ``mxnet``.
MXNET_BUILDS = ("mxnet", "mxnet-mkl", "mxnet-native", "mxnet-cu100", "mxnet-cu101", "mxnet-cu102", "mxnet-cu110",
                "mxnet-cu112", "mxnet-cu113", "mxnet-cu114", "mxnet-cu115", "mxnet-cu116", "mxnet-cu117")
_checked = False


def mxnet_builds() -> list[str]:
    """The installed MXNet distributions as ``name version`` (``mxnet``, ``mxnet-cu112``, ...), sorted. Looked up
    by name (about 25 ms), not by reading every installed distribution's metadata (about 90 ms)."""
    return sorted({f"{name} {dist.version}" for name in MXNET_BUILDS for dist in metadata.distributions(name=name)})


def check_one_mxnet(builds: list[str] | None = None) -> None:
    """Refuse an environment with two MXNet builds (one line naming them and the fix); looked up once per process
    unless ``builds`` is given."""
    global _checked
    if builds is None:
        if _checked:
            return
        builds, _checked = mxnet_builds(), True
    if len(builds) > 1:
        names = " ".join(b.split()[0] for b in builds)
        raise RunFailed(f"{len(builds)} MXNet builds are installed ({', '.join(builds)}): they overwrite each "
                        f"other's files; keep one: pip uninstall -y {names}, then {INSTALL_MXNET}")


def import_cv2() -> ModuleType:
    """``cv2``, or one line saying what to install when it is missing or cannot load its system libraries."""
    try:
        import cv2
    except ImportError as exc:
        text = str(exc)
        if ".so" in text:
            raise RunFailed(f"OpenCV (cv2) cannot load: {text.split(':')[0]}: {INSTALL_LIBGL}") from None
        raise RunFailed(f"OpenCV (cv2) is not installed ({text}): pip install 'opencv-python<4.12'") from None
    return cv2


def missing_module_line(exc: ImportError) -> str | None:
    """The one line for an ImportError the user fixes by installing something, else None."""
    if getattr(exc, "name", None) == "mxnet":
        builds = mxnet_builds()
        if builds:
            return (f"MXNet ({', '.join(builds)}) is installed but does not import ({exc}): reinstall it: "
                    f"{INSTALL_MXNET}")
        return f"MXNet is not installed: {INSTALL_MXNET}"
    return None
