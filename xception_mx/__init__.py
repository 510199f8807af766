"""xception_mx: the Xception image classifier (Chollet, CVPR 2017) on MXNet Gluon."""
from .model import Xception, get_model, list_models

__all__ = ["Xception", "get_model", "list_models"]
__version__ = "0.1.0"
