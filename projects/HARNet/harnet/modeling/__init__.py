"""HAR-Net modules and the ``HARRetinaNet`` meta-architecture."""
from .aligned_attention import AlignedAttention  # noqa: F401
from .channel_attention import CrossLevelSE  # noqa: F401
from .clgn import CrossLevelGroupNorm  # noqa: F401
from .spatial_attention import SpatialAttention  # noqa: F401
