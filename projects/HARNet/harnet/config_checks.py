"""``check_harnet_config(cfg)``: element types and ranges of ``cfg.MODEL.HARNET`` that yacs
cannot check.

yacs rejects unknown keys and a value whose type differs from the default's (``ENABLED:
"yes"``, ``CHANNELS: 16.5``), with the key in the message. It does not look inside lists:
``SPATIAL.DILATIONS: [1, 2, 5, 2]`` (a flat list), ``[[1, 2.5, 5, 2]]`` (silently truncated
to 2 by ``int()``), ``ALIGN.MID_CHANNELS: ["256"]`` or ``CHANNEL.LOSS_WEIGHTS: ["a", "b"]``
reach the model builders and fail there, if at all, with messages that do not name the key.
Ranges no module checks (a negative ``ALIGN.OFFSET_LR_FACTOR`` would make the offsets
ascend their gradient) are checked here too. Everything a module checks itself (positive
sizes, rows of dilations vs. head levels, groups vs. channels) lives in its constructor;
the builders add the key to its error (``harnet.modeling.config_keys``): one home per rule.
"""

import math
import numbers

__all__ = ["check_harnet_config", "check_solver_config", "check_test_aug_config"]


def _fail(key, expected, value):
    raise ValueError(f"cfg.{key} must be {expected}, got {value!r}")


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(key, v):
    if not (_is_int(v) and v > 0):
        _fail(key, "a positive int", v)


def _finite(key, v, minimum=None):
    if not _is_real(v) or (minimum is not None and v < minimum):
        _fail(key, "a finite number" + (f" >= {minimum}" if minimum is not None else ""), v)


def check_harnet_config(cfg):
    """Raise ``ValueError`` naming the key for an invalid ``cfg.MODEL.HARNET`` value.

    Args:
        cfg (CfgNode): a config with ``harnet.add_harnet_config`` applied.
    """
    h = cfg.MODEL.HARNET
    a, k = h.ALIGN, "MODEL.HARNET.ALIGN."
    feats = list(a.IN_FEATURES)
    if not all(isinstance(f, str) for f in feats):
        _fail(k + "IN_FEATURES", "a list of backbone output names (str)", a.IN_FEATURES)
    if a.ENABLED and not feats:
        _fail(k + "IN_FEATURES", "non-empty with ALIGN.ENABLED (or set ENABLED False)", feats)
    mids = list(a.MID_CHANNELS)
    if not all(_is_int(m) for m in mids) or len(mids) not in (1, len(feats)):
        _fail(k + "MID_CHANNELS", f"one int, or one per IN_FEATURES entry ({len(feats)})", mids)
    _finite(k + "LAST_NORM_INIT", a.LAST_NORM_INIT)
    _finite(k + "OFFSET_LR_FACTOR", a.OFFSET_LR_FACTOR, minimum=0)

    # NUM_GROUPS 0 would build no CLGN at all, silently: the module cannot tell.
    if h.CLGN.ENABLED:
        _positive_int("MODEL.HARNET.CLGN.NUM_GROUPS", h.CLGN.NUM_GROUPS)
        # Checked here, not only by the head: Detectron2's RetinaNet.from_config first builds
        # a plain RetinaNetHead, whose GroupNorm may fail on it without naming the key.
        if cfg.MODEL.RETINANET.NORM:
            _fail(
                "MODEL.RETINANET.NORM",
                "'' with MODEL.HARNET.CLGN.ENABLED (both normalise the towers; set one off)",
                cfg.MODEL.RETINANET.NORM,
            )
    _finite("MODEL.HARNET.CLGN.LAST_NORM_INIT", h.CLGN.LAST_NORM_INIT)

    rows = h.SPATIAL.DILATIONS
    ok = isinstance(rows, (list, tuple)) and all(
        isinstance(r, (list, tuple)) and all(_is_int(d) for d in r) for r in rows
    )
    if not ok:
        _fail(
            "MODEL.HARNET.SPATIAL.DILATIONS",
            "a list of lists of ints, one per head level or one for all (e.g. [[1, 2, 5, 2]])",
            rows,
        )

    weights = list(h.CHANNEL.LOSS_WEIGHTS)
    if len(weights) != 2 or not all(_is_real(w) and w >= 0 for w in weights):
        _fail(
            "MODEL.HARNET.CHANNEL.LOSS_WEIGHTS",
            "two finite numbers >= 0 (predictors A and B)",
            h.CHANNEL.LOSS_WEIGHTS,
        )


def check_solver_config(cfg):
    """Raise ``ValueError`` naming the key for a training schedule that cannot run
    (Detectron2 fails later, e.g. ``MAX_ITER <= 0`` in its lr scheduler, without naming
    the key): ``MAX_ITER``, ``IMS_PER_BATCH`` and ``CHECKPOINT_PERIOD`` positive ints,
    ``STEPS`` and ``WARMUP_ITERS`` ints >= 0, ``BASE_LR`` a finite number >= 0. (Steps
    beyond ``MAX_ITER`` stay a Detectron2 warning.)"""
    sv = cfg.SOLVER
    _positive_int("SOLVER.MAX_ITER", sv.MAX_ITER)
    _positive_int("SOLVER.IMS_PER_BATCH", sv.IMS_PER_BATCH)
    _positive_int("SOLVER.CHECKPOINT_PERIOD", sv.CHECKPOINT_PERIOD)
    if not all(_is_int(x) and x >= 0 for x in sv.STEPS):
        _fail("SOLVER.STEPS", "a list of ints >= 0", sv.STEPS)
    _finite("SOLVER.BASE_LR", sv.BASE_LR, minimum=0)
    if not (_is_int(sv.WARMUP_ITERS) and sv.WARMUP_ITERS >= 0):
        _fail("SOLVER.WARMUP_ITERS", "an int >= 0", sv.WARMUP_ITERS)
    two = sv.get("TWO_STEP", None)
    if two is not None and two.ENABLED:
        _positive_int("SOLVER.TWO_STEP.STEP1_MAX_ITER", two.STEP1_MAX_ITER)


def check_test_aug_config(cfg):
    """Raise ``ValueError`` naming the key for a ``TEST.AUG`` (test-time augmentation)
    setting that would fail only when the augmented evaluation runs, after the plain one:
    ``MIN_SIZES`` a non-empty list of positive ints, ``MAX_SIZE`` a positive int, ``FLIP``
    a bool, and HARNet's ``MERGE`` / ``SIZE_SELECT`` / ``WBF`` (see :mod:`harnet.tta`).
    Nothing is checked when ``TEST.AUG.ENABLED`` is false."""
    aug = cfg.TEST.AUG
    if not aug.ENABLED:
        return
    sizes = aug.MIN_SIZES
    if not (
        isinstance(sizes, (list, tuple)) and sizes and all(_is_int(x) and x > 0 for x in sizes)
    ):
        _fail("TEST.AUG.MIN_SIZES", "a non-empty list of positive ints (short sides)", sizes)
    _positive_int("TEST.AUG.MAX_SIZE", aug.MAX_SIZE)
    if not isinstance(aug.FLIP, bool):
        _fail("TEST.AUG.FLIP", "a bool", aug.FLIP)
    from .tta import TTA_MERGES  # late: tta imports the model code

    merge = aug.get("MERGE", "suppress")
    if merge not in TTA_MERGES:
        _fail("TEST.AUG.MERGE", f"one of {TTA_MERGES}", merge)
    select = aug.get("SIZE_SELECT", None)
    if select is not None and select.ENABLED:
        for key in ("SMALL_AREA", "LARGE_AREA"):
            _finite("TEST.AUG.SIZE_SELECT." + key, select[key], minimum=0)
        if select.SMALL_AREA > select.LARGE_AREA:
            _fail("TEST.AUG.SIZE_SELECT.SMALL_AREA", "<= LARGE_AREA", select.SMALL_AREA)
    if merge == "wbf":
        from . import tta

        tta._wbf_params_from_cfg(cfg)  # raises naming the TEST.AUG.WBF key
