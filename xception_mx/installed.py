"""What the environment must hold, said in one line when it does not: one MXNet build, an OpenCV that loads.

MXNet comes from the ``cpu`` or the ``gpu`` extra (``mxnet`` / ``mxnet-cu112``): the two builds install the same
``mxnet`` package, so with both the last one installed wins, file by file. OpenCV is ``opencv-python`` (gluoncv
requires that build); only im2rec-tools imports ``cv2``, and on a server without ``libGL.so.1`` it cannot load.
Imports nothing heavy (``importlib.metadata`` only).
"""
from __future__ import annotations

import re
from importlib import metadata
from types import ModuleType

from .errors import RunFailed

__all__ = ["mxnet_builds", "check_one_mxnet", "import_cv2", "missing_module_line"]

#: The extras that install MXNet (pyproject.toml), as a user pastes them.
INSTALL_MXNET = "pip install 'xception_mx[cpu]' (or 'xception_mx[gpu]' for CUDA 11.2)"
#: What makes ``import cv2`` work on a server without display libraries.
INSTALL_LIBGL = ("install the system library (Debian/Ubuntu: apt-get install -y libgl1), or swap OpenCV for its "
                 "headless build: pip uninstall -y opencv-python && pip install 'opencv-python-headless<4.12'")

_MXNET_BUILD = re.compile(r"^mxnet(-(cu\d+\w*|mkl|native))?$")


def mxnet_builds() -> list[str]:
    """The installed MXNet distributions as ``name version`` (``mxnet``, ``mxnet-cu112``, ...), sorted."""
    found = {(dist.metadata["Name"] or "").lower(): dist.version for dist in metadata.distributions()}
    return sorted(f"{name} {version}" for name, version in found.items() if _MXNET_BUILD.match(name))


def check_one_mxnet(builds: list[str] | None = None) -> None:
    """Refuse an environment with two MXNet builds (one line naming them and the fix)."""
    builds = mxnet_builds() if builds is None else builds
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
