"""xception_mx: the Xception image classifier (Chollet, CVPR 2017) on MXNet Gluon.

Importing the package does not import MXNet: the CLIs choose MXNet's engine (``MXNET_ENGINE_TYPE``) first, which
MXNet reads once, when it loads. ``from xception_mx import get_model`` loads it.
"""
__all__ = ["Xception", "get_model", "list_models"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'xception_mx' has no attribute {name!r}")
