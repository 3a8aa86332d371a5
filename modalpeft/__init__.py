"""modalpeft: parameter-efficient fine-tuning across modalities, on one adapter core.

import modalpeft as mp
model = mp.adapt(model, mp.BitFitConfig(), modules_to_save=["head"])
"""

__version__ = "0.1.0"

from .core import *  # noqa: E402,F403
from .core import __all__ as _core_all  # noqa: E402

__all__ = ["__version__", *_core_all]
