"""Generic native methods, one file each; importing this package registers them."""

from .adapter import BottleneckConfig
from .bitfit import BitFitConfig
from .krona import KronAConfig
from .loldu import LoLDUConfig
from .neuroada import NeuroAdaConfig
from .svfit import SVFitConfig

__all__ = ["BitFitConfig", "BottleneckConfig", "KronAConfig"]
__all__ += ["LoLDUConfig", "NeuroAdaConfig", "SVFitConfig"]  # issue 19: weight-space methods
