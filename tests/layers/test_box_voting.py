"""box_voting / batched_box_voting: cases worked by hand for every scoring rule, and a slow loop
written from the definitions on random sets."""

import math

import pytest
import torch

from harnet.layers import batched_box_voting, batched_soft_nms, box_voting
from harnet.layers.box_voting import VOTING_SCORING_ALIASES, batched_box_voting_scriptable
from harnet_model_utils import iou_by_definition

T = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731


# Candidates of one category. IoUs: (0,1) 90/110, (0,2) 100/200, (0,4) 80/120, (1,4) 90/110,
# (4,5) 90/110, (0,5) 72/128; box 3 overlaps nothing.
CANDS = T(
    [0, 0, 10, 10],  # 0: s .9
    [1, 0, 11, 10],  # 1: s .6
    [0, 0, 10, 20],  # 2: s .3
    [20, 20, 30, 30],  # 3: s .8
    [2, 0, 12, 10],  # 4: s .5
    [2, 1, 12, 11],  # 5: s .3
)
CAND_SCORES = T(0.9, 0.6, 0.3, 0.8, 0.5, 0.3)


def test_max_keep_avg_by_hand():
    kept = CANDS[[0, 3]]
    kept_scores = T(0.7, 0.8)  # box 0 after a soft-NMS decay
    # Box 0's voters at IoU >= 0.6: candidates 0 (.9), 1 (.6), 4 (.5 at IoU 2/3).
    w = T(0.9, 0.6, 0.5)
    mean = (w[:, None] * CANDS[[0, 1, 4]]).sum(0) / w.sum()
    torch.testing.assert_close(mean, T(1.6 / 2.0, 0, (9 + 6.6 + 6) / 2.0, 10))
    for scoring, expected in (("max", 0.9), ("keep", 0.7), ("avg", 2.0 / 3)):
        boxes, scores = box_voting(kept, kept_scores, CANDS, CAND_SCORES, 0.6, scoring)
        torch.testing.assert_close(boxes[0], mean)
        torch.testing.assert_close(boxes[1], CANDS[3])  # only itself votes: unchanged
        torch.testing.assert_close(scores, T(expected, 0.8))
    # A lower threshold lets candidates 2 (IoU 0.5) and 5 (0.56) vote too.
    boxes, scores = box_voting(kept[:1], kept_scores[:1], CANDS, CAND_SCORES, 0.5, "avg")
    w = T(0.9, 0.6, 0.3, 0.5, 0.3)
    torch.testing.assert_close(boxes[0], (w[:, None] * CANDS[[0, 1, 2, 4, 5]]).sum(0) / w.sum())
    torch.testing.assert_close(scores, T(2.6 / 5))


def test_caffe_rule_by_hand():
    # Kept (in soft-NMS order): candidate 0 (decayed .9) then candidate 4 (decayed .4).
    kept, kept_scores = CANDS[[0, 4]], T(0.9, 0.4)
    boxes, scores = box_voting(kept, kept_scores, CANDS, CAND_SCORES, 0.6, "caffe")
    # Kept box 0 claims candidate 1 (IoU .82); candidates 0 and 4 are copies of kept boxes
    # and never vote; 5 overlaps box 0 by only .56. Mean of the kept box (weight .9, its
    # decayed score) and candidate 1 (.6); score (.9 + .6) / 5.
    torch.testing.assert_close(boxes[0], T(0.6 / 1.5, 0, (9 + 6.6) / 1.5, 10))
    # Kept box 4: candidate 1 is already claimed, so only candidate 5 (.3) joins it.
    torch.testing.assert_close(boxes[1], T(2, 0.3 / 0.7, 12, (4 + 3.3) / 0.7))
    torch.testing.assert_close(scores, T(1.5 / 5, 0.7 / 5))

    # Visiting order matters: kept box 4 first claims candidate 1 for itself.
    boxes, scores = box_voting(kept.flip(0), kept_scores.flip(0), CANDS, CAND_SCORES, 0.6, "caffe")
    torch.testing.assert_close(scores, T((0.4 + 0.6 + 0.3) / 5, 0.9))  # box 0 claims nothing
    torch.testing.assert_close(boxes[1], CANDS[0])  # ... and is left unchanged


def test_caffe_uses_at_most_four_best_neighbours():
    kept = T([0, 0, 100, 100])
    # Six unclaimed neighbours (IoU >= 0.9) with distinct scores; plus a far-away box.
    shifts = torch.arange(1, 7, dtype=torch.float64)
    neigh = torch.stack([shifts, shifts * 0, 100 + shifts, 100 + shifts * 0], dim=1)
    cands = torch.cat([kept, neigh, T([500, 500, 510, 510])])
    cand_scores = T(0.95, 0.1, 0.7, 0.2, 0.6, 0.5, 0.4, 0.9)
    boxes, scores = box_voting(kept, T(0.8), cands, cand_scores, 0.6, "caffe")
    best4 = [2, 4, 5, 6]  # scores .7, .6, .5, .4
    w = torch.cat([T(0.8), cand_scores[best4]])
    expected = (w[:, None] * torch.cat([kept, cands[best4]])).sum(0) / w.sum()
    torch.testing.assert_close(boxes[0], expected)
    torch.testing.assert_close(scores, T((0.8 + 0.7 + 0.6 + 0.5 + 0.4) / 5))


def test_batched_votes_within_category_only():
    # A candidate of another category on top of box 0 must not vote.
    cands = torch.cat([CANDS, CANDS[1:2]])
    cand_scores = torch.cat([CAND_SCORES, T(0.99)])
    cand_classes = torch.tensor([0, 0, 0, 0, 0, 0, 1])
    kept, kept_scores, kept_classes = CANDS[[0, 4]], T(0.9, 0.4), torch.tensor([0, 0])
    for scoring in ("max", "keep", "avg", "caffe"):
        got = batched_box_voting(
            kept, kept_scores, kept_classes, cands, cand_scores, cand_classes, 0.6, scoring
        )
        expected = box_voting(kept, kept_scores, CANDS, CAND_SCORES, 0.6, scoring)
        torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------ slow reference, random sets
def slow_box_voting(boxes, scores, idxs, cboxes, cscores, cidxs, thr, scoring):
    boxes, scores, idxs = boxes.tolist(), scores.tolist(), idxs.tolist()
    cboxes, cscores, cidxs = cboxes.tolist(), cscores.tolist(), cidxs.tolist()
    out_b, out_s = [list(b) for b in boxes], list(scores)
    if scoring in ("caffe", "unclaimed_top4"):
        claimed = [
            any(idxs[n] == cidxs[j] and iou_by_definition(boxes[n], cboxes[j]) == 1.0
                for n in range(len(boxes)))
            for j in range(len(cboxes))
        ]
        for n in range(len(boxes)):
            mine = [
                j
                for j in range(len(cboxes))
                if not claimed[j] and cidxs[j] == idxs[n] and iou_by_definition(boxes[n], cboxes[j]) >= thr
            ]
            if not mine:
                continue
            for j in mine:
                claimed[j] = True
            mine = sorted(mine, key=lambda j: (-cscores[j], j))[:4]
            w = [scores[n]] + [cscores[j] for j in mine]
            bs = [boxes[n]] + [cboxes[j] for j in mine]
            out_b[n] = [sum(wi * b[k] for wi, b in zip(w, bs)) / sum(w) for k in range(4)]
            out_s[n] = sum(w) / 5
        return out_b, out_s
    for n in range(len(boxes)):
        voters = [
            j
            for j in range(len(cboxes))
            if cidxs[j] == idxs[n] and iou_by_definition(boxes[n], cboxes[j]) >= thr
        ]
        w = [cscores[j] for j in voters]
        if not voters or sum(w) == 0:
            continue
        out_b[n] = [sum(cscores[j] * cboxes[j][k] for j in voters) / sum(w) for k in range(4)]
        out_s[n] = {"max": max(w), "avg": sum(w) / len(w), "keep": scores[n]}[scoring]
    return out_b, out_s


@pytest.mark.parametrize("scoring", ["max", "keep", "avg", "caffe"])
def test_matches_slow_definition_on_random_sets(scoring):
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        n = [1, 5, 30, 80][trial % 4]
        ctr = torch.rand(max(1, n // 5), 2, generator=g) * 80
        ctr = ctr[torch.randint(len(ctr), (n,), generator=g)] + torch.randn(n, 2, generator=g) * 2
        wh = 10 + torch.rand(n, 2, generator=g) * 10
        cands = torch.cat([ctr - wh / 2, ctr + wh / 2], 1).double()
        cscores = torch.rand(n, generator=g).double()
        cidxs = torch.randint(3, (n,), generator=g)
        if n > 2:
            cands[1], cidxs[1] = cands[0], cidxs[0]  # an exact copy
        keep, kscores = batched_soft_nms(cands, cscores, cidxs, "gaussian", 0.5)
        if trial % 3 == 0:
            # A kept box that is not a candidate (only others may vote for it).
            extra = cands[:1] + 0.5
            kept = torch.cat([cands[keep], extra])
            kscores, kidxs = torch.cat([kscores, T(0.5)]), torch.cat([cidxs[keep], cidxs[:1]])
        else:
            kept, kidxs = cands[keep], cidxs[keep]
        thr = [0.6, 0.5, 0.8][trial % 3]
        got_b, got_s = batched_box_voting(kept, kscores, kidxs, cands, cscores, cidxs, thr, scoring)
        ref_b, ref_s = slow_box_voting(kept, kscores, kidxs, cands, cscores, cidxs, thr, scoring)
        torch.testing.assert_close(got_b, torch.tensor(ref_b, dtype=got_b.dtype))
        torch.testing.assert_close(got_s, torch.tensor(ref_s, dtype=got_s.dtype))


def test_chunked_pairs_give_the_same_result():
    g = torch.Generator().manual_seed(1)
    n = 60
    xy = torch.rand(n, 2, generator=g) * 50
    cands = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 10], 1)
    cscores, cidxs = torch.rand(n, generator=g), torch.randint(4, (n,), generator=g)
    keep, ks = batched_soft_nms(cands, cscores, cidxs)
    args = (cands[keep], ks, cidxs[keep], cands, cscores, cidxs)
    for s in ("max", "avg", "unclaimed_top4"):
        for thr in (0.0, 0.5):
            expected = batched_box_voting(*args, thr, s)
            # Chunks of about 7 pairs (one kept box's pairs are never split; at t = 0 one
            # has its whole category), chunks spanning category boundaries.
            chunked = batched_box_voting_scriptable(*args, thr, s, 7)
            torch.testing.assert_close(chunked, expected)  # float sums: other order


def dense_scene(n, num_classes, seed):
    """Crowded-scene candidates (as dev/benchmark_postprocess.py's dense case)."""
    g = torch.Generator().manual_seed(seed)
    num_clusters = max(1, n // 20)
    centres = torch.rand(num_clusters, 2, generator=g) * torch.tensor([1333.0, 800.0])
    cluster = torch.randint(num_clusters, (n,), generator=g)
    ctr = centres[cluster] + torch.randn(n, 2, generator=g) * 15
    wh = torch.exp(math.log(20) + math.log(15) * torch.rand(n, 2, generator=g))
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1).double()
    scores = (0.05 + 0.95 * torch.rand(n, generator=g)).double()
    return boxes, scores, torch.randint(num_classes, (num_clusters,), generator=g)[cluster]


@pytest.mark.parametrize("scoring", ["max", "avg", "unclaimed_top4"])
def test_dense_scene_matches_slow_definition(scoring):
    # Hundreds of kept boxes among a thousand candidates: the (category, x1) windows must
    # keep every voter, in one category and in several, at any threshold.
    scripted = torch.jit.script(batched_box_voting_scriptable)
    for n, num_classes, thr in ((1000, 1, 0.6), (600, 3, 0.0), (600, 3, 1.0), (600, 3, 0.9)):
        cands, cscores, cidxs = dense_scene(n, num_classes, seed=n + num_classes)
        if thr >= 0.9:  # exact copies (IoU 1 voters) or near copies
            cands[1::7] = cands[0::7][: len(cands[1::7])] + (0.0 if thr == 1.0 else 0.5)
        keep, kscores = batched_soft_nms(cands, cscores, cidxs, "gaussian", 0.5)
        args = (cands[keep], kscores, cidxs[keep], cands, cscores, cidxs, thr)
        got_b, got_s = batched_box_voting(*args, scoring)
        ref_b, ref_s = slow_box_voting(*args, scoring)
        torch.testing.assert_close(got_b, torch.tensor(ref_b, dtype=got_b.dtype))
        torch.testing.assert_close(got_s, torch.tensor(ref_s, dtype=got_s.dtype))
        assert thr == 1.0 or not torch.equal(got_b, cands[keep])  # voting moved boxes
        torch.testing.assert_close(scripted(*args, scoring), (got_b, got_s), rtol=0, atol=0)


def test_caffe_is_an_alias_of_unclaimed_top4():
    kept, kept_scores = CANDS[[0, 4]], T(0.9, 0.4)
    assert VOTING_SCORING_ALIASES == {"caffe": "unclaimed_top4"}
    torch.testing.assert_close(
        box_voting(kept, kept_scores, CANDS, CAND_SCORES, 0.6, "caffe"),
        box_voting(kept, kept_scores, CANDS, CAND_SCORES, 0.6, "unclaimed_top4"),
    )


@pytest.mark.parametrize("scoring", ["max", "avg", "caffe"])
def test_huge_coordinates_scale_exactly(scoring):
    # Voting commutes with a power-of-two scaling, even where float32 areas would overflow.
    kept, ks = CANDS[[0, 4]].float(), T(0.9, 0.4).float()
    small = box_voting(kept, ks, CANDS.float(), CAND_SCORES.float(), 0.6, scoring)
    huge = box_voting(
        kept * 2.0**80, ks, CANDS.float() * 2.0**80, CAND_SCORES.float(), 0.6, scoring
    )
    assert torch.equal(huge[0], small[0] * 2.0**80) and torch.equal(huge[1], small[1])


def test_empty_inputs_and_dtypes():
    boxes, scores = box_voting(
        torch.zeros(0, 4), torch.zeros(0), CANDS.float(), CAND_SCORES.float()
    )
    assert boxes.shape == (0, 4) and scores.shape == (0,)
    kept = CANDS[:1].half()
    boxes, scores = box_voting(kept, T(0.9).half(), torch.zeros(0, 4).half(), torch.zeros(0).half())
    assert boxes.dtype == torch.float16 and torch.equal(boxes, kept)
    boxes, scores = box_voting(kept, T(0.9).half(), CANDS.half(), CAND_SCORES.half(), 0.6, "max")
    assert boxes.dtype == torch.float16 and scores.dtype == torch.float16


@pytest.mark.cuda
@pytest.mark.parametrize("scoring", ["max", "caffe"])
def test_gpu_matches_cpu(scoring):
    kept, ks = CANDS[[0, 4]], T(0.9, 0.4)
    cpu = box_voting(kept, ks, CANDS, CAND_SCORES, 0.6, scoring)
    gpu = box_voting(kept.cuda(), ks.cuda(), CANDS.cuda(), CAND_SCORES.cuda(), 0.6, scoring)
    torch.testing.assert_close(tuple(x.cpu() for x in gpu), cpu)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(scoring="median"), ValueError, "scoring must be one of"),
        (dict(iou_threshold=1.2), ValueError, "iou_threshold must be in"),
        (dict(scores=T(0.9, 0.8, 0.7)), ValueError, "scores must have shape"),
        (dict(candidate_scores=T(0.9)), ValueError, "candidate_scores must have shape"),
        (
            dict(candidate_boxes=CANDS[:, :3]),
            ValueError,
            r"candidate_boxes must have shape \[N, 4\]",
        ),
        (
            dict(boxes=T([0, 0, float("nan"), 1], [0, 0, 1, 1])),
            ValueError,
            "boxes contains non-finite",
        ),
        (dict(candidate_scores=-CAND_SCORES), ValueError, "non-negative"),
    ],
)
def test_invalid_inputs_raise(kwargs, error, match):
    args = dict(
        boxes=CANDS[:2], scores=T(0.9, 0.6), candidate_boxes=CANDS, candidate_scores=CAND_SCORES
    )
    args.update(kwargs)
    with pytest.raises(error, match=match):
        box_voting(**args)


def test_invalid_category_indices_raise():
    with pytest.raises(ValueError, match="candidate_idxs must have shape"):
        batched_box_voting(
            CANDS[:1], T(0.9), torch.tensor([0]), CANDS, CAND_SCORES, torch.tensor([0, 1])
        )
    with pytest.raises(TypeError, match="idxs must be an integer tensor"):
        batched_box_voting(
            CANDS[:1], T(0.9), T(0.0), CANDS, CAND_SCORES, torch.zeros(6, dtype=torch.int64)
        )
