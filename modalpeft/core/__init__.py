"""The modality-agnostic core: the adapter contract, injection, lifecycle, files and the layer set.

Imports no modality package, ever.
"""

from .api import adapt, load_adapter, save_baseline
from .config import AdapterConfig
from .layer import AdapterLayer, AdapterModule
from .methods import *  # noqa: F403  (registers the generic methods)
from .methods import __all__ as _method_configs
from .model import AdaptedModel, parameter_counts
from .registry import MethodInfo, create_config, get_config_cls, get_method, list_methods, register_method

__all__ = [
    "AdaptedModel",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterModule",
    "MethodInfo",
    "adapt",
    "create_config",
    "get_config_cls",
    "get_method",
    "list_methods",
    "load_adapter",
    "parameter_counts",
    "register_method",
    "save_baseline",
    *_method_configs,
]
