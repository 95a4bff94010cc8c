"""Errors of modules built from a config, named by the config keys that set them.

One home per rule: a module's constructor checks its own arguments (shapes, divisibility,
ranges) and names the argument; :mod:`harnet.config_checks` checks what only the config can
see (element types inside lists, which ``int()`` would silently truncate). A builder wraps
the construction in :func:`naming_config_keys`, which adds the keys of the arguments an
error mentions, so a user who set a bad value reads the key to fix.
"""

import contextlib
import re
from typing import Dict, Iterator

__all__ = ["naming_config_keys", "HEAD_KEYS", "ALIGN_KEYS"]

# Argument names in HARRetinaNetHead's and its submodules' errors -> the keys setting them.
HEAD_KEYS = {
    "spatial_dilations": "MODEL.HARNET.SPATIAL.DILATIONS",
    "dilations": "MODEL.HARNET.SPATIAL.DILATIONS",
    "shared": "MODEL.HARNET.SPATIAL.SHARED",
    "spatial_mode": "MODEL.HARNET.SPATIAL.MODE",
    "norm_groups": "MODEL.HARNET.SPATIAL.NORM_GROUPS",
    "mid_channels": "MODEL.HARNET.SPATIAL.CHANNELS",
    "clgn_num_groups": "MODEL.HARNET.CLGN.NUM_GROUPS",
    "num_groups": "MODEL.HARNET.CLGN.NUM_GROUPS",
    "hidden": "MODEL.HARNET.CHANNEL.HIDDEN",
    "num_levels": "MODEL.RETINANET.IN_FEATURES",
}
# ... and in the aligned-attention backbone's (AlignedResNet, AlignedAttention).
ALIGN_KEYS = {
    "in_features": "MODEL.HARNET.ALIGN.IN_FEATURES",
    "mid_channels": "MODEL.HARNET.ALIGN.MID_CHANNELS",
    "deform_groups": "MODEL.HARNET.ALIGN.DEFORM_GROUPS",
    "norm_groups": "MODEL.HARNET.ALIGN.NORM_GROUPS",
}


@contextlib.contextmanager
def naming_config_keys(arg_keys: Dict[str, str]) -> Iterator[None]:
    """Re-raise a ``ValueError`` raised inside, with ``(cfg.KEY, ...)`` appended for each
    argument name of ``arg_keys`` that its message mentions (as a whole word); other errors
    pass unchanged."""
    try:
        yield
    except ValueError as e:
        message = str(e)
        keys = [
            key
            for arg, key in arg_keys.items()
            if re.search(rf"\b{re.escape(arg)}\b", message) and key not in message
        ]
        if not keys:
            raise
        named = ", ".join("cfg." + key for key in dict.fromkeys(keys))
        raise ValueError(f"{message} (set by {named})") from e
