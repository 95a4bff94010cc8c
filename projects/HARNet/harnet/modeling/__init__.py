"""HAR-Net modules and the ``HARRetinaNet`` meta-architecture."""
