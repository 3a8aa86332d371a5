"""modalpeft: parameter-efficient fine-tuning across modalities, on one adapter core.

    import modalpeft as mp
    model = mp.adapt(model, mp.SSFConfig(), modules_to_save=["head"])

The top level re-exports the core API and every modality's method configs, so that ``mp.list_methods()``
lists them all and ``mp.load_adapter`` reads any saved method. (Importing a modality's methods loads only
the core, torch and the modality's model library; data modules and Lightning tasks load on demand.)
"""

__version__ = "0.1.0"

from .audio import MusicAdapterConfig  # noqa: E402  (registers music_adapter)
from .core import *  # noqa: E402,F403
from .core import __all__ as _core_all  # noqa: E402
from .diffusion import DiffuseKronAConfig  # noqa: E402  (registers diffusekrona)
from .pointcloud import PointGSTConfig, PointPEFTConfig  # noqa: E402  (registers pointgst, point_peft)
from .text import (  # noqa: E402  (registers houlsby, pfeiffer, parallel_adapter, compacter, llm_adapters, sora, lofit)
    CompacterConfig,
    DePTConfig,
    HoulsbyConfig,
    LLMAdaptersConfig,
    LoFiTConfig,
    MAMConfig,
    ParallelAdapterConfig,
    PfeifferConfig,
    SoRAConfig,
)
from .tracking import TMoEConfig  # noqa: E402  (registers tmoe)
from .vision import *  # noqa: E402,F403  (registers vpt, ssf, spt)
from .vision import __all__ as _vision_all  # noqa: E402

__all__ = [
    "__version__",
    *_core_all,
    *_vision_all,
    "DiffuseKronAConfig",
    "MusicAdapterConfig",
    "PointGSTConfig",
    "PointPEFTConfig",
    "CompacterConfig",
    "DePTConfig",
    "HoulsbyConfig",
    "LLMAdaptersConfig",
    "LoFiTConfig",
    "MAMConfig",
    "ParallelAdapterConfig",
    "PfeifferConfig",
    "SoRAConfig",
    "TMoEConfig",
]
