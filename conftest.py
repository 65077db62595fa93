"""Test-wide settings for tests/ and the notebooks nbval runs: CPU size, no progress bars, no hub."""
import os

os.environ.setdefault("IMELODIST_PROFILE", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
