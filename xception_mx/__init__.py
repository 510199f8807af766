"""xception_mx: the Xception image classifier (Chollet, CVPR 2017) on MXNet Gluon.

Importing the package does not import MXNet: the CLIs choose MXNet's engine (``MXNET_ENGINE_TYPE``) first, which
MXNet reads once, when it loads. ``from xception_mx import get_model`` loads it.
"""
__all__ = ["Xception", "get_model", "list_models"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "Xception":
        from .model import Xception

        return Xception
    if name in ("get_model", "list_models"):
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'xception_mx' has no attribute {name!r}")
