"""Tests of HAR-Net's standalone attention modules against references built from the definitions.

References: torch's own group norm / conv ops, slow loops over (image, group), and manual
re-computations of each module's formula from its parameters.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harnet.modeling import AlignedAttention, CrossLevelGroupNorm, CrossLevelSE, SpatialAttention


def _randomize_(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Non-trivial weights everywhere so the checks below cannot pass by symmetry."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def _levels(shapes, n=2, c=8, dtype=torch.float64):
    # Different mean/scale per level so cross-level and per-level statistics differ.
    return [
        (torch.randn(n, c, h, w, dtype=dtype) * (1 + i) + 2.0 * i)
        for i, (h, w) in enumerate(shapes)
    ]


# --------------------------------------------------------------------------------------------
# CrossLevelGroupNorm
# --------------------------------------------------------------------------------------------
LEVEL_SHAPES = [
    [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)],  # a P3-P7-like pyramid with 1x1 top levels
    [(5, 7), (3, 4)],
    [(1, 1), (1, 1), (1, 1)],
    [(6, 3)],
]


def _clgn_slow(features, num_groups, weight, bias, eps):
    """Mean and biased variance per (image, group) over all levels, by explicit loops."""
    n, c = features[0].shape[:2]
    cg = c // num_groups
    outs = [torch.empty_like(f) for f in features]
    for i in range(n):
        for g in range(num_groups):
            chans = slice(g * cg, (g + 1) * cg)
            values = torch.cat([f[i, chans].reshape(-1) for f in features])
            mean = values.sum() / values.numel()
            var = ((values - mean) ** 2).sum() / values.numel()
            for f, o in zip(features, outs):
                o[i, chans] = (f[i, chans] - mean) / torch.sqrt(var + eps)
    return [o * weight[None, :, None, None] + bias[None, :, None, None] for o in outs]


@pytest.mark.parametrize("shapes", LEVEL_SHAPES)
def test_clgn_equals_group_norm_of_concatenated_levels(shapes):
    c, groups = 8, 4
    norm = _randomize_(CrossLevelGroupNorm(groups, c).double())
    feats = _levels(shapes, c=c)
    out = norm(feats)

    flat = torch.cat([f.reshape(f.shape[0], c, -1) for f in feats], dim=2)
    ref = F.group_norm(flat, groups, norm.weight, norm.bias, 1e-5)
    ref = ref.split([h * w for h, w in shapes], dim=2)
    slow = _clgn_slow(feats, groups, norm.weight, norm.bias, 1e-5)
    assert len(out) == len(feats)
    for o, f, r, s in zip(out, feats, ref, slow):
        assert o.shape == f.shape and o.dtype == f.dtype
        torch.testing.assert_close(o, r.reshape(f.shape))
        torch.testing.assert_close(o, s)


def test_clgn_statistics_are_cross_level_not_per_level():
    norm = CrossLevelGroupNorm(2, 8).double()
    feats = _levels([(4, 4), (2, 2)], c=8)
    per_level = [F.group_norm(f, 2, eps=1e-5) for f in feats]
    out = norm(feats)
    assert not torch.allclose(out[1], per_level[1], atol=1e-3)


def test_clgn_eps_and_affine_false():
    feats = _levels([(3, 3), (1, 1)], c=6)
    norm = CrossLevelGroupNorm(3, 6, eps=0.5, affine=False)
    assert norm.weight is None and norm.bias is None and len(list(norm.parameters())) == 0
    slow = _clgn_slow(feats, 3, torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64), 0.5)
    for o, s in zip(norm(feats), slow):
        torch.testing.assert_close(o, s)


def test_clgn_single_level_is_group_norm_and_mirrors_its_attributes():
    gn = _randomize_(nn.GroupNorm(4, 16, eps=1e-3))
    clgn = CrossLevelGroupNorm(4, 16, eps=1e-3)
    # Same state-dict keys and shapes as nn.GroupNorm: loads strictly.
    clgn.load_state_dict(gn.state_dict(), strict=True)
    assert (clgn.num_groups, clgn.num_channels, clgn.eps, clgn.affine) == (4, 16, 1e-3, True)
    assert clgn.weight.shape == clgn.bias.shape == (16,)
    x = torch.randn(3, 16, 5, 6)
    (out,) = clgn([x])
    torch.testing.assert_close(out, gn(x))
    fresh = CrossLevelGroupNorm(4, 16)
    assert torch.equal(fresh.weight, torch.ones(16)) and torch.equal(fresh.bias, torch.zeros(16))


def test_clgn_affine_shared_and_gradients():
    norm = _randomize_(CrossLevelGroupNorm(2, 4)).double()
    feats = [f.requires_grad_() for f in _levels([(3, 3), (2, 1), (1, 1)], c=4)]
    assert torch.autograd.gradcheck(lambda *fs: tuple(norm(list(fs))), feats)
    out = norm(feats)
    sum(o.sum() * (i + 1) for i, o in enumerate(out)).backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    # d(sum_l k_l * sum(y_l))/d bias_c = sum_l k_l * N * H_l * W_l: one bias for all levels.
    expected = 2 * (1 * 9 + 2 * 2 + 3 * 1)
    torch.testing.assert_close(norm.bias.grad, torch.full((4,), float(expected), dtype=torch.float64))


def test_clgn_bad_inputs():
    with pytest.raises(ValueError, match="num_channels"):
        CrossLevelGroupNorm(3, 8)
    with pytest.raises(ValueError, match="num_groups"):
        CrossLevelGroupNorm(0, 8)
    norm = CrossLevelGroupNorm(2, 8)
    with pytest.raises(ValueError, match="empty"):
        norm([])
    with pytest.raises(ValueError, match=r"features\[1\] has 4 channels"):
        norm([torch.randn(1, 8, 2, 2), torch.randn(1, 4, 2, 2)])
    with pytest.raises(ValueError, match=r"features\[1\] has batch size 2"):
        norm([torch.randn(1, 8, 2, 2), torch.randn(2, 8, 2, 2)])
    with pytest.raises(TypeError, match="list"):
        norm(torch.randn(1, 8, 2, 2))


# --------------------------------------------------------------------------------------------
# SpatialAttention
# --------------------------------------------------------------------------------------------
def _spatial_reference(module: SpatialAttention, x, dilations, norm_groups):
    """The branch rebuilt from its definition with plain nn.Conv2d layers sharing its weights."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(dilations) + 1
    h = x
    for conv, d in zip(convs[:-1], dilations):
        ref = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=d, dilation=d).double()
        ref.load_state_dict(conv.state_dict())
        h = ref(h)
        if norm_groups:
            h = F.group_norm(h, norm_groups, eps=1e-5)
        h = F.relu(h)
    last = convs[-1]
    assert last.kernel_size == (3, 3) and last.out_channels == 1 and last.dilation == (1, 1)
    return torch.sigmoid(F.conv2d(h, last.weight, last.bias, padding=1))


@pytest.mark.parametrize(
    "dilations,norm_groups", [((1, 2, 5, 2), 4), ((1, 2, 3, 2), 4), ((1, 2, 5, 2), 0), ((3,), 2)]
)
def test_spatial_attention_matches_definition(dilations, norm_groups):
    module = _randomize_(SpatialAttention(6, 8, dilations, norm_groups)).double()
    x = torch.randn(2, 6, 13, 11, dtype=torch.float64)
    mask = module(x)
    assert mask.shape == (2, 1, 13, 11)
    assert mask.min() > 0 and mask.max() < 1 and mask.std() > 1e-3
    torch.testing.assert_close(mask, _spatial_reference(module, x, dilations, norm_groups))


def test_spatial_attention_norm_has_no_affine():
    module = SpatialAttention(256, 16, (1, 2, 5, 2), norm_groups=4)
    norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 4
    assert all(n.num_groups == 4 and not n.affine for n in norms)
    conv_params = sum(
        p.numel() for m in module.modules() if isinstance(m, nn.Conv2d) for p in m.parameters()
    )
    expected = (256 * 9 * 16 + 16) + 3 * (16 * 9 * 16 + 16) + (16 * 9 + 1)
    assert conv_params == expected == sum(p.numel() for p in module.parameters())
    assert not any(isinstance(m, nn.GroupNorm) for m in SpatialAttention(8, 4, norm_groups=0).modules())
    # Fresh weights: the mask starts near 0.5 everywhere.
    mask = module(torch.randn(1, 256, 8, 8))
    assert (mask - 0.5).abs().max() < 0.05


def test_spatial_attention_dilations_set_receptive_field():
    # Without GN (whose statistics couple all positions) the receptive field is exact:
    # radius sum(dilations) + 1 = 11 with (1, 2, 5, 2), but only 5 with undilated convs.
    module = _randomize_(SpatialAttention(2, 4, (1, 2, 5, 2), norm_groups=0), std=0.5).double()
    x = torch.randn(1, 2, 31, 31, dtype=torch.float64)
    base = module(x)[0, 0, 15, 15]

    def changed(dy, dx):
        x2 = x.clone()
        x2[0, :, 15 + dy, 15 + dx] += 10.0
        return (module(x2)[0, 0, 15, 15] - base).abs().item() > 1e-12

    assert changed(0, 8) and changed(-9, 0) and changed(11, 0)
    assert not changed(0, 12) and not changed(-12, 0)


def test_spatial_attention_bad_args():
    with pytest.raises(ValueError, match="norm_groups"):
        SpatialAttention(8, 16, norm_groups=3)
    with pytest.raises(ValueError, match="dilations"):
        SpatialAttention(8, 16, dilations=())
    with pytest.raises(ValueError, match=r"x must have shape \(N, 8, H, W\)"):
        SpatialAttention(8, 16)(torch.randn(1, 4, 5, 5))


# --------------------------------------------------------------------------------------------
# CrossLevelSE
# --------------------------------------------------------------------------------------------
SE_SHAPES = [(8, 6), (4, 3), (2, 2), (1, 1), (1, 1)]


def _se_reference(module: CrossLevelSE, feats):
    """w and g_l computed from the formula with torch.nn.functional ops."""
    if module.extra_conv:
        g = [F.relu(F.conv2d(f, module.conv.weight, module.conv.bias, padding=1)) for f in feats]
    else:
        g = list(feats)
    squeeze = torch.cat([x.mean(dim=(2, 3)) for x in g], dim=1)
    assert squeeze.shape == (feats[0].shape[0], len(feats) * feats[0].shape[1])
    hidden = F.relu(F.linear(squeeze, module.fc1.weight, module.fc1.bias))
    w = torch.sigmoid(F.linear(hidden, module.fc2.weight, module.fc2.bias))
    return g, w


@pytest.mark.parametrize("extra_conv", [True, False])
def test_cross_level_se_matches_formula(extra_conv):
    module = _randomize_(CrossLevelSE(6, len(SE_SHAPES), hidden=4, extra_conv=extra_conv)).double()
    assert (module.conv is not None) == extra_conv
    feats = _levels(SE_SHAPES, n=2, c=6)
    out = module(feats)
    g, w = _se_reference(module, feats)
    assert w.std() > 1e-2  # the vector is not flat, so the checks below have teeth
    torch.testing.assert_close(module.channel_weights(feats), w)
    for o, f, gl in zip(out, feats, g):
        assert o.shape == f.shape
        torch.testing.assert_close(o, gl * w[:, :, None, None])


def test_cross_level_se_one_weight_vector_for_all_levels():
    module = _randomize_(CrossLevelSE(6, len(SE_SHAPES), hidden=4)).double()
    with torch.no_grad():
        module.conv.bias.abs_().add_(0.5)  # keep most of g_l alive after the ReLU
    feats = _levels(SE_SHAPES, n=2, c=6)
    captured = []
    handle = module.conv.register_forward_hook(lambda m, inp, out: captured.append(F.relu(out)))
    out = module(feats)
    handle.remove()
    assert len(captured) == len(feats)
    # Per-level least-squares ratio out_l / g_l per (image, channel); exact if out_l = g_l * w_l.
    ratios = []
    for o, g in zip(out, captured):
        denom = (g * g).sum(dim=(2, 3))
        keep = denom > 1e-12
        ratio = torch.where(keep, (o * g).sum(dim=(2, 3)) / denom.clamp_min(1e-12), torch.nan)
        torch.testing.assert_close(o, torch.nan_to_num(ratio)[:, :, None, None] * g)
        ratios.append(ratio)
    w = module.channel_weights(feats)
    covered = torch.zeros_like(w, dtype=torch.bool)
    for ratio in ratios:
        keep = ~torch.isnan(ratio)
        assert keep.any()
        torch.testing.assert_close(ratio[keep], w[keep])
        covered |= keep
    assert covered.all()
    # The squeeze spans all levels: changing only the top level changes the bottom level's output.
    feats2 = [f.clone() for f in feats]
    feats2[-1] += 5.0
    assert not torch.allclose(module(feats2)[0], out[0])


def test_cross_level_se_bad_inputs():
    module = CrossLevelSE(4, 3, hidden=2)
    with pytest.raises(ValueError, match="num_levels=3"):
        module([torch.randn(1, 4, 2, 2)] * 2)
    with pytest.raises(ValueError, match=r"features\[1\]"):
        module([torch.randn(1, 4, 2, 2), torch.randn(1, 5, 2, 2), torch.randn(1, 4, 2, 2)])
    with pytest.raises(ValueError, match="hidden"):
        CrossLevelSE(4, 3, hidden=0)


# --------------------------------------------------------------------------------------------
# AlignedAttention
# --------------------------------------------------------------------------------------------
def _small_aligned(**kw):
    args = dict(in_channels=16, mid_channels=8, deform_groups=2, norm_groups=4)
    args.update(kw)
    return AlignedAttention(**args)


def _aligned_with_plain_conv(module: AlignedAttention, x, shift=None):
    """The block with an ordinary 3x3 conv in place of the deformable one (same weights).

    ``shift``: optional per-offset-group integer (dy, dx) applied to the conv's input, the
    regular-conv equivalent of a constant integer offset for that group's channels.
    """
    a = F.relu(F.group_norm(F.conv2d(x, module.conv1.weight), 4, module.norm1.weight, module.norm1.bias))
    if shift is None:
        b = F.conv2d(a, module.conv2.weight, padding=1)
    else:
        # Tap k of output p reads a[p + k - 1 + s] (zero outside the map, as deform_conv2d
        # samples): a valid conv over the 2-padded map, window starting at 1 + s.
        a_pad = F.pad(a, (2, 2, 2, 2))
        h, w = a.shape[2:]
        cg = a.shape[1] // len(shift)
        parts = [
            a_pad[:, g * cg : (g + 1) * cg, 1 + dy : 3 + dy + h, 1 + dx : 3 + dx + w]
            for g, (dy, dx) in enumerate(shift)
        ]
        b = F.conv2d(torch.cat(parts, dim=1), module.conv2.weight)
    b = F.relu(F.group_norm(b, 4, module.norm2.weight, module.norm2.bias))
    c = F.group_norm(F.conv2d(b, module.conv3.weight), 4, module.norm3.weight, module.norm3.bias)
    return x + F.relu(c)


def test_aligned_attention_init():
    module = AlignedAttention(1024)
    assert module.conv2_offset.out_channels == 2 * 4 * 9 == 72
    assert module.conv2_offset.lr_factor == 0.1
    assert torch.count_nonzero(module.conv2_offset.weight) == 0
    assert torch.count_nonzero(module.conv2_offset.bias) == 0
    assert torch.equal(module.norm3.weight, torch.full((1024,), 0.1))
    norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and all(n.num_groups == 32 and n.affine for n in norms)
    assert torch.equal(module.norm1.weight, torch.ones(256))
    # MSRA fill (fan_out, relu gain): std sqrt(2 / fan_out) for the 1x1 conv1 (fan_out 256).
    assert abs(module.conv1.weight.std().item() - (2 / 256) ** 0.5) < 0.005
    other = AlignedAttention(2048, mid_channels=512, last_norm_init=0.0, offset_lr_factor=0.5)
    assert torch.count_nonzero(other.norm3.weight) == 0 and other.conv2_offset.lr_factor == 0.5
    # Both backbone widths run (tiny spatial size) and keep the input's shape.
    for m in (module, other):
        x = torch.randn(1, m.in_channels, 3, 4)
        assert m(x).shape == x.shape


def test_aligned_attention_zero_offsets_equal_plain_conv():
    module = _randomize_(_small_aligned()).double()
    with torch.no_grad():
        module.conv2_offset.weight.zero_()
        module.conv2_offset.bias.zero_()
    x = torch.randn(2, 16, 9, 11, dtype=torch.float64)
    out = module(x)
    assert out.shape == x.shape
    ref = _aligned_with_plain_conv(module, x)
    torch.testing.assert_close(out, ref)
    assert (out - x).abs().max() > 1e-2  # the residual branch is not negligible here


def test_aligned_attention_offsets_are_used_per_group():
    module = _randomize_(_small_aligned()).double()
    x = torch.randn(2, 16, 9, 11, dtype=torch.float64)
    # Constant integer offsets through the offset conv's bias: group 0 looks one pixel to the
    # right (dx=+1), group 1 one pixel up (dy=-1); layout per group is (dy, dx) per tap.
    offsets = torch.zeros(2, 9, 2, dtype=torch.float64)
    offsets[0, :, 1] = 1.0
    offsets[1, :, 0] = -1.0
    with torch.no_grad():
        module.conv2_offset.weight.zero_()
        module.conv2_offset.bias.copy_(offsets.reshape(-1))
    out = module(x)
    torch.testing.assert_close(out, _aligned_with_plain_conv(module, x, shift=[(0, 1), (-1, 0)]))
    assert not torch.allclose(out, _aligned_with_plain_conv(module, x), atol=1e-3)
    # Generic (fractional, position-dependent) offsets also change the output.
    with torch.no_grad():
        module.conv2_offset.weight.normal_(0, 0.3)
    assert not torch.allclose(module(x), _aligned_with_plain_conv(module, x), atol=1e-3)


def test_aligned_attention_backward_and_offset_learning():
    module = _small_aligned(last_norm_init=0.5)
    x = torch.randn(2, 16, 7, 9, requires_grad=True)
    out = module(x)
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # One SGD step from the zero init makes the offsets non-zero.
    with torch.no_grad():
        for p in module.parameters():
            p -= 0.1 * p.grad
    a = F.relu(module.norm1(module.conv1(x)))
    assert module.conv2_offset(a).abs().max() > 0


def test_aligned_attention_bad_args():
    with pytest.raises(ValueError, match=r"norm_groups \(32\) must divide mid_channels \(48\)"):
        AlignedAttention(64, mid_channels=48)
    with pytest.raises(ValueError, match=r"norm_groups \(4\) must divide in_channels \(18\)"):
        AlignedAttention(18, mid_channels=8, deform_groups=2, norm_groups=4)
    with pytest.raises(ValueError, match="deform_groups"):
        AlignedAttention(16, mid_channels=8, deform_groups=3, norm_groups=4)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 16, H, W\)"):
        _small_aligned()(torch.randn(1, 8, 4, 4))


@pytest.mark.cuda
def test_aligned_attention_cuda_matches_cpu():
    module = _randomize_(_small_aligned(), std=0.2)
    x = torch.randn(2, 16, 7, 9)
    out = module(x)
    out_cuda = module.cuda()(x.cuda())
    torch.testing.assert_close(out_cuda.cpu(), out, atol=1e-4, rtol=1e-4)
    out_cuda.sum().backward()
    assert all(p.grad is not None for p in module.parameters())


# --------------------------------------------------------------------------------------------
# Every module: gradients reach every parameter
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build,inputs",
    [
        (lambda: CrossLevelGroupNorm(4, 8), lambda: [torch.randn(2, 8, 4, 4), torch.randn(2, 8, 1, 1)]),
        (lambda: SpatialAttention(8, 4, norm_groups=2), lambda: torch.randn(2, 8, 9, 9)),
        (lambda: SpatialAttention(8, 4, norm_groups=0), lambda: torch.randn(2, 8, 9, 9)),
        (lambda: CrossLevelSE(8, 2, hidden=4), lambda: [torch.randn(2, 8, 4, 4), torch.randn(2, 8, 1, 1)]),
        (
            lambda: CrossLevelSE(8, 2, hidden=4, extra_conv=False),
            lambda: [torch.randn(2, 8, 4, 4), torch.randn(2, 8, 1, 1)],
        ),
        (lambda: _small_aligned(), lambda: torch.randn(2, 16, 5, 6)),
    ],
    ids=["clgn", "spatial", "spatial_nogn", "se", "se_noconv", "aligned"],
)
def test_gradients_reach_every_parameter(build, inputs):
    module = build()
    out = module(inputs())
    outs = out if isinstance(out, list) else [out]
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    params = dict(module.named_parameters())
    assert params
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------ TorchScript
@pytest.mark.parametrize("name", ["aligned", "spatial", "clgn", "se"])
def test_attention_modules_script_save_reload_and_match_eager(name, tmp_path):
    import io
    import warnings

    torch.manual_seed(0)
    levels = [torch.randn(2, 64, s, s + 1) for s in (16, 8, 4, 2, 1)]
    module, inputs = {
        "aligned": (AlignedAttention(64, 32, 4, 8), torch.randn(2, 64, 9, 11)),
        "spatial": (SpatialAttention(64, 16), torch.randn(2, 64, 9, 11)),
        "clgn": (CrossLevelGroupNorm(8, 64), levels),
        "se": (CrossLevelSE(64, 5, 16), levels),
    }[name]
    module.eval()
    with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(module)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        reloaded = torch.jit.load(buffer)
    with torch.no_grad():
        expected = module(inputs)
        for got in (scripted(inputs), reloaded(inputs)):
            if isinstance(expected, torch.Tensor):
                assert torch.equal(got, expected)
            else:
                assert all(torch.equal(g, e) for g, e in zip(got, expected))
