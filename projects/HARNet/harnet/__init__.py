"""HARNet: HAR-Net (hybrid attention for single-stage detection) for Detectron2.

Importing ``harnet`` registers the META_ARCH ``HARRetinaNet`` (and its backbone) in
Detectron2's registries and the built-in datasets in ``DatasetCatalog``.
"""
from .config import add_harnet_config  # noqa: F401

# Each import below registers something with Detectron2; keep them at package import.
from . import modeling  # noqa: F401,E402
from . import layers  # noqa: F401,E402
from . import data  # noqa: F401,E402  (registers harnet_shapes_train/val)
from .tta import (  # noqa: F401,E402
    DenseDetectorWithTTA,
    GeneralizedRCNNWithHARNetTTA,
    HARRetinaNetWithTTA,
    build_tta_model,
)

__version__ = "0.1.0"
