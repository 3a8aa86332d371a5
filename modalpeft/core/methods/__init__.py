"""Generic native methods, one file each; importing this package registers them."""

from .adapter import BottleneckConfig
from .bitfit import BitFitConfig
from .increlora import IncreLoRAConfig
from .krona import KronAConfig
from .loldu import LoLDUConfig
from .mtlora import MTLoRAConfig
from .neuroada import NeuroAdaConfig
from .paca import PaCAConfig
from .svfit import SVFitConfig

__all__ = ["BitFitConfig", "BottleneckConfig", "KronAConfig"]
__all__ += [
    "IncreLoRAConfig",
    "LoLDUConfig",
    "MTLoRAConfig",
    "NeuroAdaConfig",
    "PaCAConfig",
    "SVFitConfig",
]  # issue 19: weight-space methods
