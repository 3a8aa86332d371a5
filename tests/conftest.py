"""Test-wide settings. Nothing in the tests may download: the Hugging Face libraries are put offline here,
at import time, before any test module imports huggingface_hub (which reads these variables on import)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
