"""Generic native methods, one file each; importing this package registers them."""

from .bitfit import BitFitConfig

__all__ = ["BitFitConfig"]
