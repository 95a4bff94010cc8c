"""Built-in datasets and dataset registration helpers.

Importing this package registers ``harnet_shapes_train`` / ``harnet_shapes_val`` (the
synthetic shapes dataset, generated lazily on first use: see ``harnet.data.shapes``).
Real data: ``harnet.data.coco_format``.
"""

from .shapes_render import CLASS_NAMES as SHAPES_CLASSES, ShapesSpec  # noqa: F401
from .shapes import (  # noqa: F401
    SHAPES_TRAIN,
    SHAPES_VAL,
    ShapesCacheError,
    check_shapes_cache,
    default_shapes_root,
    ensure_shapes,
    register_default_shapes,
    register_shapes,
    register_shapes_from_cfg,
    shapes_cache_dir,
    shapes_specs_from_cfg,
)

from .coco_format import (  # noqa: F401
    check_dataset_files,
    check_datasets_from_cfg,
    register_coco_format,
)

register_default_shapes()
