"""Post-processing ops: soft-NMS, box voting, weighted boxes fusion (pure tensor functions,
CPU and GPU)."""

from .box_voting import VOTING_SCORINGS, batched_box_voting, box_voting  # noqa: F401
from .postprocess import postprocess_params_from_cfg, suppress_detections  # noqa: F401
from .soft_nms import SOFT_NMS_METHODS, batched_soft_nms, soft_nms  # noqa: F401
from .wbf import WBF_CONF_TYPES, weighted_boxes_fusion  # noqa: F401
from .suppress_op import suppress_detections_op  # noqa: F401  (torch.ops.harnet.*)
