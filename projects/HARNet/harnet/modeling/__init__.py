"""HAR-Net modules and the ``HARRetinaNet`` meta-architecture."""

from .aligned_attention import AlignedAttention  # noqa: F401
from .channel_attention import CrossLevelSE  # noqa: F401
from .clgn import CrossLevelGroupNorm  # noqa: F401
from .spatial_attention import SpatialAttention  # noqa: F401

# HARRetinaNet (registered as META_ARCH "HARRetinaNet") and its backbone (registered as
# BACKBONE "build_harnet_resnet_fpn_backbone") and head.
from .backbone import AlignedResNet, build_harnet_resnet_fpn_backbone  # noqa: F401,E402
from .head import HARRetinaNetHead  # noqa: F401,E402
from .meta_arch import HARRetinaNet  # noqa: F401,E402

# The authors' recipe: ANCHOR_GENERATOR "RoundedAnchorGenerator", BACKBONE
# "build_harnet_resnet_authors_fpn_backbone", per-level loss normaliser, init schemes.
from .anchors import RoundedAnchorGenerator  # noqa: F401,E402
from .fpn import AuthorsFPN, build_harnet_resnet_authors_fpn_backbone  # noqa: F401,E402
from .losses import per_level_normalized_losses  # noqa: F401,E402

# HAR-Net's post-processing on Detectron2's own detectors (RetinaNet, FCOS, R-CNNs).
from .any_detector import apply_harnet_postprocess  # noqa: F401,E402
