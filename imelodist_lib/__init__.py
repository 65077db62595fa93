"""IMelodist workbench library: the machine behind the notebooks (see docs/ARCHITECTURE.md)."""
from imelodist_lib.profiles import SYSTEM_PROMPT, Profile, get_profile

__all__ = ["SYSTEM_PROMPT", "Profile", "get_profile"]
__version__ = "0.1.0"
