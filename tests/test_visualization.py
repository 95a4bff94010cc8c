"""harnet.engine.visualization: mask resampling against its definition, colour overlay."""
import numpy as np
import pytest
import torch

from harnet.engine.visualization import attention_panel, mask_to_image, overlay_mask


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
