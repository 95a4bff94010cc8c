"""harnet.engine.visualization: mask resampling against its definition, colour overlay,
ground truth and detections drawn at scale in class colours, the picture's layout."""
import numpy as np
import pytest
import torch

from harnet.engine.visualization import (
    attention_panel, compose, display_scale, draw_detections, draw_ground_truth, mask_to_image,
    merge_coincident_labels, overlay_mask, place_label,
)
from harnet_model_utils import iou_by_definition


@pytest.mark.parametrize("stride,input_hw,output_hw", [(8, (64, 80), (128, 160)), (16, (50, 70), (40, 56))])
def test_mask_to_image_is_the_mask_at_each_pixels_position(stride, input_hw, output_hw):
    # A mask linear in the grid coordinates is reproduced exactly by bilinear resampling,
    # so every interior output pixel must equal the ramp at its own position on the grid:
    # output pixel y -> input pixel (y + 0.5) * h / H - 0.5 -> grid (y_in + 0.5) / s - 0.5.
    h, w = input_hw
    H, W = output_hw
    gh, gw = -(-h // stride), -(-w // stride)  # ceil, as HARRetinaNet.attention_maps crops
    a, b, c = 0.013, 0.021, 0.2
    ii, jj = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    mask = torch.tensor(a * ii + b * jj + c, dtype=torch.float32)
    out = mask_to_image(mask, stride, input_hw, output_hw)
    assert out.shape == (H, W)
    y = np.arange(H)[:, None]
    x = np.arange(W)[None, :]
    gy = ((y + 0.5) * h / H - 0.5 + 0.5) / stride - 0.5
    gx = ((x + 0.5) * w / W - 0.5 + 0.5) / stride - 0.5
    expected = a * gy + b * gx + c
    # Away from the borders (where resampling clamps) and inside the grid.
    inner = (gy >= 0.5) & (gy <= gh - 1.5) & (gx >= 0.5) & (gx <= gw - 1.5)
    inner = np.broadcast_to(inner, (H, W))
    assert inner.sum() > 0.3 * H * W
    np.testing.assert_allclose(out[inner], np.broadcast_to(expected, (H, W))[inner], atol=2e-3)


def test_overlay_mask_colours():
    img = np.full((4, 4, 3), 128, np.uint8)
    low = overlay_mask(img, np.zeros((4, 4)), alpha=1.0)
    high = overlay_mask(img, np.ones((4, 4)), alpha=1.0)
    assert low[0, 0, 2] > 100 and low[0, 0, 0] < 10  # blue (RGB)
    assert high[0, 0, 0] > 100 and high[0, 0, 2] < 10  # red
    np.testing.assert_array_equal(overlay_mask(img, np.ones((4, 4)), alpha=0.0), img)
    with pytest.raises(ValueError, match="mask shape"):
        overlay_mask(img, np.ones((3, 4)))


def test_attention_panel_layout():
    img = np.zeros((40, 60, 3), np.uint8)
    masks = [torch.rand(-(-40 // s), -(-60 // s)) for s in (8, 16)]
    panel = attention_panel(img, masks, [8, 16], ["P3", "P4"], input_hw=(40, 60))
    assert panel.shape == (40 + 18, 3 * 60 + 2 * 4, 3) and panel.dtype == np.uint8


def test_display_scale():
    assert display_scale((128, 160), 480) == 3.0
    assert display_scale((600, 400), 480) == 1.0  # never shrinks


def _instances(boxes, classes, scores, hw):
    from detectron2.structures import Boxes, Instances

    inst = Instances(hw)
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.pred_classes = torch.tensor(classes)
    inst.scores = torch.tensor(scores)
    return inst


def test_ground_truth_and_detections_at_scale_in_class_colours():
    # A 60x60 box of class 1 at (20, 20) on a black 100x100 image, drawn 4x: its outline
    # lies at 4x the box coordinates, in class 1's colour, the same in both drawings;
    # class 0 gets another colour, and a detection under the threshold is not drawn.
    from detectron2.data import Metadata
    from detectron2.structures import BoxMode

    meta = Metadata(name="_test_vis", thing_classes=["a", "b"])
    img = np.zeros((100, 100, 3), np.uint8)
    record = {"annotations": [{"bbox": [20, 20, 60, 60], "bbox_mode": BoxMode.XYWH_ABS,
                               "category_id": 1, "segmentation": [[20, 20, 80, 20, 80, 80]]}]}
    gt = draw_ground_truth(img, record, meta, scale=4.0)
    det = draw_detections(img, _instances([[20, 20, 80, 80], [5, 5, 15, 15]], [1, 0], [0.9, 0.1],
                                          (100, 100)), meta, score_thresh=0.3, scale=4.0)
    other = draw_detections(img, _instances([[20, 20, 80, 80]], [0], [0.9], (100, 100)), meta, 0.3, 4.0)
    assert gt.shape == det.shape == (400, 400, 3)
    edge = (np.s_[80, 200], np.s_[320, 200], np.s_[200, 80], np.s_[200, 320])  # top, bottom, left, right
    for e in edge:
        assert gt[e].max() > 40, e
        np.testing.assert_array_equal(gt[e], det[e])
        assert np.abs(other[e].astype(int) - det[e].astype(int)).max() > 20
    # Inside the box (away from the label) and outside it: untouched (no mask is filled).
    assert gt[200, 200].max() == 0 and det[200, 200].max() == 0 and gt[380, 380].max() == 0
    # The low-scoring class-0 detection at (5, 5)-(15, 15) is not drawn.
    assert det[20:60, 20:60].max() == 0


def test_compose_layout():
    det = np.zeros((120, 160, 3), np.uint8)
    gt = np.zeros((120, 160, 3), np.uint8)
    att = np.zeros((50, 300, 3), np.uint8)
    both = compose(det, gt, att)
    # 27 px title bars, ground truth | 8 px | detections, then 8 px, then the attention rows.
    assert both.shape == (27 + 120 + 8 + 50, 160 + 8 + 160, 3)
    assert compose(det).shape == (27 + 120, 160, 3)
    # Ground truth on the left: a white pixel there shows up left of the separator.
    gt[60, 10] = 255
    assert compose(det, gt)[27 + 60, 10].min() == 255 and compose(det, gt)[27 + 60, 168 + 10].max() == 0


def test_attention_panel_in_rows():
    img = np.zeros((40, 60, 3), np.uint8)
    masks = [torch.rand(-(-40 // s), -(-60 // s)) for s in (8, 16, 32, 64, 128)]
    panel = attention_panel(img, masks, [8, 16, 32, 64, 128], ["P3", "P4", "P5", "P6", "P7"],
                            input_hw=(40, 60), columns=3)
    assert panel.shape == (2 * (40 + 18) + 4, 3 * 60 + 2 * 4, 3)


def test_coincident_detections_share_one_legible_label():
    # One object reported as "circle" and "square" on nearly the same box (IoU 0.95 / 0.92),
    # a third box elsewhere and a fourth overlapping the first by IoU ~0.6 (kept apart).
    boxes = np.array([[10, 10, 50, 50], [10, 10, 50, 52], [60, 60, 90, 90],
                      [10, 10, 50, 28], [11, 10, 50, 50]], dtype=np.float64)
    labels = ["circle 58%", "square 35%", "star 90%", "cross 20%", "ellipse 10%"]
    got = merge_coincident_labels(boxes, labels, iou_thresh=0.9)
    assert iou_by_definition(boxes[0], boxes[1]) >= 0.9 > iou_by_definition(boxes[0], boxes[3])
    assert got == ["circle 58% | square 35% | ellipse 10%", "", "star 90%", "cross 20%", ""]
    # Drawn: the merged label is one text; the picture differs from drawing the
    # square alone where the label stands (above the box), and the boxes are all drawn.
    from detectron2.data import Metadata

    meta = Metadata(name="_test_vis_merge", thing_classes=["circle", "square"])
    img = np.zeros((100, 100, 3), np.uint8)
    both = draw_detections(img, _instances([[20, 20, 80, 80], [20, 20, 80, 81]], [0, 1],
                                           [0.58, 0.35], (100, 100)), meta, 0.3, 4.0)
    alone = draw_detections(img, _instances([[20, 20, 80, 81]], [1], [0.35], (100, 100)),
                            meta, 0.3, 4.0)
    assert both.shape == alone.shape == (400, 400, 3)
    assert not np.array_equal(both, alone)


def test_place_label_moves_into_the_picture_and_off_earlier_labels():
    # Cut by the right border: shifted left just enough; by the left border: right.
    assert place_label((90, 10, 130, 20), [], 100, 100) == (-30, 0)
    assert place_label((-5, 10, 20, 20), [], 100, 100) == (5, 0)
    # A free spot: unchanged.
    assert place_label((10, 10, 40, 20), [(50, 10, 80, 20)], 100, 100) == (0, 0)
    # On an earlier label: one label height down; with that taken too, one up.
    assert place_label((10, 30, 40, 40), [(0, 30, 30, 40)], 100, 100) == (0, 10)
    assert place_label((10, 30, 40, 40), [(0, 30, 30, 40), (0, 40, 30, 50)], 100, 100) == (0, -10)
    # At the bottom: never below the picture.
    dx, dy = place_label((10, 90, 40, 100), [(10, 90, 40, 100)], 100, 100)
    assert dy < 0 and 90 + dy >= 0
    # Nowhere free: where it overlaps least, the nearest of equals (the upper half is
    # covered across the label's width, the lower half only over x < 25).
    placed = [(0, 0, 100, 50), (0, 50, 25, 100)]
    assert place_label((10, 20, 40, 30), placed, 100, 100) == (0, 30)
    # A crowded column: the first free place may be many label heights away.
    column = [(0, y, 100, y + 10) for y in range(0, 80, 10)]
    assert place_label((10, 30, 40, 40), column, 100, 100) == (0, 50)


def test_drawn_labels_stay_inside_and_apart():
    # Ground truth of overlapping objects (an occluder on an occluded one: IoU < 0.9, so
    # the labels are not merged) and a box at the right border: every label lies inside
    # the picture and no two overlap, measured on matplotlib's own text extents.
    from detectron2.data import Metadata
    from detectron2.structures import BoxMode

    from harnet.engine.visualization import _visualizer

    meta = Metadata(name="_test_vis_place", thing_classes=["circle", "triangle", "square"])
    img = np.zeros((128, 160, 3), np.uint8)
    boxes = [[10, 10, 70, 70], [12, 14, 60, 66], [14, 12, 50, 80], [150, 40, 160, 60]]
    annos = [{"bbox": b, "bbox_mode": BoxMode.XYXY_ABS, "category_id": c}
             for b, c in zip(boxes, [0, 1, 2, 2])]
    vis = _visualizer(img, meta, 3.0, 22.0)
    vis.draw_dataset_dict({"annotations": annos})
    rects = vis.label_rects
    assert len(rects) == 4
    for r in rects:
        assert r[0] >= -1e-6 and r[2] <= 160 + 1e-6 and r[1] >= -1e-6 and r[3] <= 128 + 1e-6, r
    for i in range(len(rects)):
        for j in range(i):
            assert iou_by_definition(rects[i], rects[j]) == 0.0, (i, j, rects)
    # The recorded rectangles are where matplotlib draws the texts.
    drawn = [vis._extent(t) for t in vis.output.ax.texts]
    np.testing.assert_allclose(np.array(drawn), np.array(rects), atol=1e-3)


def test_merged_label_wider_than_the_picture_is_wrapped_inside_it():
    from detectron2.data import Metadata

    from harnet.engine.visualization import _visualizer

    meta = Metadata(name="_test_vis_wrap", thing_classes=["ellipse", "triangle", "circle"])
    img = np.zeros((60, 60, 3), np.uint8)
    inst = _instances([[5, 5, 55, 55], [5, 5, 55, 56], [5, 5, 56, 55]], [0, 1, 2],
                      [0.38, 0.35, 0.33], (60, 60))
    vis = _visualizer(img, meta, 4.0, 22.0)
    vis.draw_instance_predictions(inst)
    (rect,) = vis.label_rects
    assert rect[0] >= -1e-6 and rect[2] <= 60 + 1e-6, rect
    (text,) = [t.get_text() for t in vis.output.ax.texts]
    assert text.split("\n") == ["ellipse 38%", "triangle 35%", "circle 33%"]
