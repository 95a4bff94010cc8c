"""dev/count_host_syncs.py: the counter sees the syncs it claims to see, and HARNet's own
code adds none to Detectron2's inference with hard NMS and at most a few per image with
soft-NMS + voting (the CUDA audit's fixes, docs/cuda_audit.md, kept)."""

import os

import torch

from detectron2.config import get_cfg

import harnet
from harnet_model_utils import REPO

from harnet.devtools import count_host_syncs as tool


def test_counter_sees_item_nonzero_bool_index_and_tolist():
    x = torch.arange(6.0)
    with tool.HostSyncCounter() as c:
        float(x.sum())
        x[x > 2]
        torch.nonzero(x)
        x.tolist()
        x * 2 + 1  # no sync
        torch.repeat_interleave(x, torch.ones(6, dtype=torch.long), output_size=6)
    names = sorted(site.split(" @ ")[0] for site in c.counts.elements())
    assert names == ["_local_scalar_dense", "index[bool]", "nonzero", "tolist()"]
    methods = {m: vars(torch.Tensor).get(m) for m in ("tolist", "numpy", "cpu")}
    with tool.HostSyncCounter():
        pass
    assert methods == {m: vars(torch.Tensor).get(m) for m in methods}  # restored


def test_harnet_adds_no_sync_to_hard_nms_inference_and_few_to_soft_nms_voting():
    cfg = get_cfg()
    harnet.add_harnet_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, tool.DEMO_CONFIG))
    cfg.MODEL.DEVICE = "cpu"  # the config names no device; syncs are counted on any
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0  # candidates reach the post-processing

    def own(counts):
        return sum(v for k, v in counts.items() if "harnet/" in k)

    assert own(tool.count(cfg, (96, 128), train=False)) == 0
    cfg.MODEL.HARNET.POSTPROCESS.VOTING.ENABLED = True
    counts = tool.count(cfg, (96, 128), train=False)
    # Box voting after hard NMS, per image: one read of all its input checks, its pair
    # count, the chunks' bounds, and each chunk's selection (on the CPU, chunks of 2^15
    # pairs: several here; on a GPU one).
    harnet_sites = {k: v for k, v in counts.items() if "harnet/" in k}
    per_chunk = sum(
        v for k, v in harnet_sites.items() if "_overlapping_pairs" in k and "nonzero" in k
    )
    assert per_chunk >= 2 and own(counts) - per_chunk <= 2 * 3, harnet_sites
