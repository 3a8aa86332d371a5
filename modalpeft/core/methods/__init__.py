"""Generic native methods, one file each; importing this package registers them."""

from .adapter import BottleneckConfig
from .bitfit import BitFitConfig
from .krona import KronAConfig

__all__ = ["BitFitConfig", "BottleneckConfig", "KronAConfig"]
