"""Feature-denoising ops and blocks (Xie thesis Chapter 4) against naive per-position implementations of their formulas,
plus DenoiseBlock structure/ablations and insertion into real timm ResNet / ResNeXt models."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from atscale.layers.denoise import (DENOISE_OPS, BilateralFilter, DenoiseBlock, MeanFilter, MedianFilter,
                                    NonLocalMeans, bilateral_dot, bilateral_gaussian, insert_denoise, make_denoise_op,
                                    mean_filter, median_filter, nonlocal_dot, nonlocal_gaussian)

B, C, H, W = 2, 4, 5, 6
D64 = torch.float64


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = D64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def embed(conv: nn.Conv2d | None, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution written as a per-position matrix product."""
    return x if conv is None else torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x)


def naive_maxpool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 stride-2 max pooling; a window cut by the border takes the max of what is inside (ceil mode)."""
    h, w = math.ceil(x.shape[2] / 2), math.ceil(x.shape[3] / 2)
    out = torch.empty(x.shape[0], x.shape[1], h, w, dtype=x.dtype)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].amax(dim=(2, 3))
    return out


def positions(h: int, w: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(h) for j in range(w)]


def naive_nonlocal(theta, phi, value, softmax: bool) -> torch.Tensor:
    """Eqn. 4.1, one output position at a time: y_i = (1/C(x)) sum_j f(x_i, x_j) x_j."""
    out = torch.zeros(value.shape[0], value.shape[1], theta.shape[2], theta.shape[3], dtype=value.dtype)
    keys = positions(phi.shape[2], phi.shape[3])
    d = theta.shape[1]
    for b in range(theta.shape[0]):
        for (i, j) in positions(theta.shape[2], theta.shape[3]):
            dots = torch.stack([theta[b, :, i, j] @ phi[b, :, k, m] for (k, m) in keys])
            if softmax:
                f = torch.exp(dots / math.sqrt(d))
                f = f / f.sum()
            else:
                f = dots / len(keys)
            out[b, :, i, j] = sum(f[n] * value[b, :, k, m] for n, (k, m) in enumerate(keys))
    return out


def naive_neighbourhood(h: int, w: int, i: int, j: int) -> list[tuple[int, int]]:
    return [(k, m) for k in range(i - 1, i + 2) for m in range(j - 1, j + 2) if 0 <= k < h and 0 <= m < w]


def naive_bilateral(theta, phi, value, softmax: bool) -> torch.Tensor:
    """Eqn. 4.2 over the in-image 3x3 neighbourhood of each position."""
    out = torch.zeros_like(value)
    h, w = value.shape[2:]
    d = theta.shape[1]
    for b in range(value.shape[0]):
        for (i, j) in positions(h, w):
            nb = naive_neighbourhood(h, w, i, j)
            dots = torch.stack([theta[b, :, i, j] @ phi[b, :, k, m] for (k, m) in nb])
            f = torch.softmax(dots / math.sqrt(d), 0) if softmax else dots / len(nb)
            out[b, :, i, j] = sum(f[n] * value[b, :, k, m] for n, (k, m) in enumerate(nb))
    return out


def naive_local(x: torch.Tensor, reduce) -> torch.Tensor:
    out = torch.zeros_like(x)
    h, w = x.shape[2:]
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            for (i, j) in positions(h, w):
                out[b, c, i, j] = reduce(torch.stack([x[b, c, k, m] for (k, m) in naive_neighbourhood(h, w, i, j)]))
    return out


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------------------- ops


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("subsample", [False, True])
@pytest.mark.parametrize("use_embed", [True, False])
def test_gaussian_nonlocal_matches_softmax_formula(subsample: bool, use_embed: bool, fused: bool) -> None:
    """Both kernels (fused attention, explicit softmax matrix) compute Eqn. 4.1."""
    torch.manual_seed(0)
    op = NonLocalMeans(C, "gaussian", embed=use_embed, subsample=subsample, fused=fused).double()
    if use_embed:
        assert op.theta.out_channels == C // 2 and op.phi.out_channels == C // 2
        for conv in (op.theta, op.phi):
            nn.init.normal_(conv.weight)            # larger than the N(0, 0.01) init, so weights are far from uniform
    x = rand(B, C, H, W)
    keys = naive_maxpool2(x) if subsample else x
    if subsample:
        assert keys.shape[2:] == (3, 3)           # odd H = 5 keeps its last row (ceil mode)
    ref = naive_nonlocal(embed(op.theta, x), embed(op.phi, keys), keys, softmax=True)
    close(op(x), ref)


def test_gaussian_function_value_dim_differs_from_key_dim() -> None:
    theta, phi, value = rand(B, 2, H, W, seed=1), rand(B, 2, 3, 2, seed=2), rand(B, 7, 3, 2, seed=3)
    close(nonlocal_gaussian(theta, phi, value), naive_nonlocal(theta, phi, value, softmax=True))


@pytest.mark.parametrize("order", ["auto", "pairs_first", "keys_first"])
@pytest.mark.parametrize("subsample", [False, True])
def test_dot_nonlocal_matches_formula(order: str, subsample: bool) -> None:
    x = rand(B, C, H, W)
    keys = naive_maxpool2(x) if subsample else x
    ref = naive_nonlocal(x, keys, keys, softmax=False)
    close(nonlocal_dot(x, keys, keys, order=order), ref)
    if order == "auto":
        op = NonLocalMeans(C, "dot", subsample=subsample).double()
        assert op.theta is None and not any(True for _ in op.parameters())     # no extra parameters (Sec 4.4.2)
        close(op(x), ref)


def test_dot_nonlocal_wide_channels_and_embedding() -> None:
    x = rand(1, 64, 2, 2)                                         # C > N: "auto" takes the (N x N) order
    close(nonlocal_dot(x, x, x), naive_nonlocal(x, x, x, softmax=False))
    torch.manual_seed(0)
    op = NonLocalMeans(C, "dot", embed=True).double()
    y = rand(B, C, H, W)
    close(op(y), naive_nonlocal(embed(op.theta, y), embed(op.phi, y), y, softmax=False))


@pytest.mark.parametrize("kind", ["gaussian", "dot"])
def test_bilateral_matches_formula_with_border_exclusion(kind: str) -> None:
    torch.manual_seed(0)
    op = BilateralFilter(C, kind).double()
    assert op.embed == (kind == "gaussian")
    if op.theta is not None:
        nn.init.normal_(op.theta.weight)
        nn.init.normal_(op.phi.weight)
    x = rand(B, C, H, W)
    theta, phi = embed(op.theta, x), embed(op.phi, x)
    ref = naive_bilateral(theta, phi, x, softmax=kind == "gaussian")
    close(op(x), ref)
    fn = bilateral_gaussian if kind == "gaussian" else bilateral_dot
    close(fn(theta, phi, x), ref)


def test_bilateral_dot_corner_divides_by_in_image_count() -> None:
    x = torch.ones(1, 1, 3, 3, dtype=D64)
    y = bilateral_dot(x, x, x)
    close(y, torch.ones_like(y))                  # mean of 4 (corner), 6 (edge), 9 (centre) ones times x_i . x_j = 1


def test_mean_filter_matches_formula() -> None:
    x = rand(B, C, H, W)
    close(mean_filter(x), naive_local(x, torch.mean))
    close(MeanFilter()(x), naive_local(x, torch.mean))


def test_median_filter_matches_formula_and_borders() -> None:
    x = rand(B, C, H, W)
    close(median_filter(x), naive_local(x, torch.median), tol=0)
    close(MedianFilter()(x), naive_local(x, torch.median), tol=0)
    corner = torch.tensor([[[[5.0, 1.0, 9.0], [2.0, 7.0, 9.0], [9.0, 9.0, 9.0]]]])
    y = median_filter(corner)
    assert y[0, 0, 0, 0] == 2.0                   # in-image {5, 1, 2, 7}: lower middle; zero padding would give 0
    assert y[0, 0, 1, 1] == 9.0
    spike = torch.zeros(1, 1, 4, 4)
    spike[0, 0, 1, 2] = 100.0
    assert torch.all(median_filter(spike) == 0)   # salt noise removed


@pytest.mark.parametrize("op", ["gaussian", "dot", "bilateral_gaussian", "bilateral_dot", "mean", "median"])
def test_ops_gradcheck(op: str) -> None:
    torch.manual_seed(0)
    m = make_denoise_op(op, 4, subsample=op in ("gaussian", "dot")).double()
    x = rand(1, 4, 3, 3, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5)


def test_op_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="allowed: gaussian, dot, bilateral_gaussian"):
        DenoiseBlock(8, op="nonlocal")
    for op in ("bilateral_gaussian", "bilateral_dot", "mean", "median", "null"):
        with pytest.raises(ValueError, match="only to the non-local ops"):
            DenoiseBlock(8, op=op, subsample=True)
    with pytest.raises(ValueError, match="embed=True"):
        make_denoise_op("median", 8, embed=True)
    with pytest.raises(ValueError, match="kernel_size"):
        mean_filter(torch.zeros(1, 1, 3, 3), kernel_size=2)


# ---------------------------------------------------------------------------------------------------------- block


@pytest.mark.parametrize("op", DENOISE_OPS)
def test_block_is_identity_at_init_then_matches_formula(op: str) -> None:
    torch.manual_seed(0)
    block = DenoiseBlock(C, op=op).double()
    assert torch.all(block.bn.weight == 0)
    x = rand(B, C, H, W)
    for train in (True, False):
        block.train(train)
        close(block(x), x)
    with torch.no_grad():
        block.bn.weight.normal_()
        block.bn.bias.normal_()
        block.bn.running_mean.normal_()
        block.bn.running_var.uniform_(0.5, 2.0)
    block.eval()
    z = embed(block.conv, block.op(x))
    bn = block.bn
    ref = x + (z - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps) \
        * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    close(block(x), ref)
    block.train()
    mu, var = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
    ref = x + (z - mu) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    close(block(x), ref)


def test_null_block_has_only_the_1x1() -> None:
    block = DenoiseBlock(8, op="null")
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (1, 1)
    assert sum(p.numel() for p in block.parameters()) == sum(p.numel() for p in DenoiseBlock(8, op="dot").parameters())


def test_block_ablations() -> None:
    torch.manual_seed(0)
    x = rand(B, C, H, W)
    no_conv = DenoiseBlock(C, use_conv=False).double().eval()
    assert isinstance(no_conv.conv, nn.Identity) and isinstance(no_conv.bn, nn.BatchNorm2d)
    assert not any(isinstance(m, nn.Conv2d) and m.out_channels == C for m in no_conv.modules())
    close(no_conv(x), x)                                                  # zero gamma: still the identity at init
    with torch.no_grad():
        no_conv.bn.weight.fill_(2.0)
    close(no_conv(x), x + 2.0 * no_conv.op(x) / math.sqrt(1 + no_conv.bn.eps))

    no_res = DenoiseBlock(C, residual=False).double().eval()
    assert torch.all(no_res.bn.weight == 1)                               # no zero-init without the skip
    bn = no_res.bn
    close(no_res(x), bn(no_res.conv(no_res.op(x))))
    close(no_res(x), embed(no_res.conv, no_res.op(x)) / math.sqrt(1 + bn.eps))
    assert torch.all(DenoiseBlock(C, residual=False, zero_init=True).bn.weight == 0)

    gn = DenoiseBlock(8, norm_layer=lambda c: nn.GroupNorm(2, c))
    assert isinstance(gn.bn, nn.GroupNorm) and torch.all(gn.bn.weight == 0)


@pytest.mark.parametrize("op", DENOISE_OPS)
def test_block_channels_last_and_bf16_autocast(op: str) -> None:
    torch.manual_seed(0)
    block = DenoiseBlock(16, op=op, subsample=op in ("gaussian", "dot")).eval()
    with torch.no_grad():
        block.bn.weight.fill_(1.0)
    x = torch.randn(2, 16, 7, 7)
    ref = block(x)
    cl_block = copy.deepcopy(block).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y = cl_block(x_cl)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    assert x_cl.grad is not None and torch.isfinite(x_cl.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = cl_block(x_cl)
    assert y16.dtype == torch.float32                 # residual add keeps the trunk's dtype
    assert torch.isfinite(y16).all()
    err = (y16 - ref).abs().max() / ref.abs().max()
    assert err < 0.1, err
    y16.sum().backward()


# ---------------------------------------------------------------------------------------------------------- models


def tiny_resnet18() -> ResNet:
    return timm.create_model("resnet18", num_classes=10, channels=[8, 16, 32, 64])


def tiny_resnext() -> ResNet:
    return ResNet(block=Bottleneck, layers=(2, 1, 1, 1), cardinality=4, base_width=16, channels=(8, 16, 32, 64),
                  stem_width=8, num_classes=10)


def denoise_blocks(model: nn.Module) -> list[DenoiseBlock]:
    return [m for m in model.modules() if isinstance(m, DenoiseBlock)]


@pytest.mark.parametrize("make,kind,layers", [(tiny_resnet18, BasicBlock, (2, 2, 2, 2)),
                                              (tiny_resnext, Bottleneck, (2, 1, 1, 1))])
@pytest.mark.parametrize("placement", ["stage_end", "every_block"])
def test_insert_denoise(make, kind, layers, placement: str) -> None:
    torch.manual_seed(0)
    base = make().eval()
    if kind is Bottleneck:
        assert base.layer1[0].conv2.groups == 4                             # a real ResNeXt (grouped 3x3)
    model = insert_denoise(copy.deepcopy(base), op="gaussian", placement=placement,
                           subsample=placement == "every_block")
    blocks = denoise_blocks(model)
    assert len(blocks) == (4 if placement == "stage_end" else sum(layers))
    for stage, ch in zip(("layer1", "layer2", "layer3", "layer4"), (8, 16, 32, 64)):
        seq = getattr(model, stage)
        out_ch = ch * (4 if kind is Bottleneck else 1)
        assert isinstance(seq[-1], DenoiseBlock) and seq[-1].channels == out_ch
        if placement == "every_block":
            assert [type(m) for m in seq] == [kind, DenoiseBlock] * (len(seq) // 2)
    keys = set(model.state_dict())
    assert set(base.state_dict()) <= keys                                   # residual blocks keep their names
    assert "layer2.denoise" + str(len(base.layer2) - 1) + ".bn.weight" in keys
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)      # zero-init gamma: same function
    model.train()
    base.train()
    out = model(x)
    torch.testing.assert_close(out, base(x), rtol=1e-6, atol=1e-6)
    out.logsumexp(1).sum().backward()
    for blk in blocks:
        assert blk.bn.weight.grad is not None and blk.bn.weight.grad.abs().sum() > 0
    assert model.conv1.weight.grad.abs().sum() > 0


def test_insert_denoise_channels_last_and_other_ops() -> None:
    model = tiny_resnet18().to(memory_format=torch.channels_last)
    insert_denoise(model, op="median")
    blk = denoise_blocks(model)[0]
    assert blk.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).shape == (2, 10)
    assert len(denoise_blocks(insert_denoise(tiny_resnet18(), op="null", use_conv=True))) == 4


def test_insert_denoise_errors() -> None:
    with pytest.raises(ValueError, match="lacks layer1, layer2, layer3, layer4"):
        insert_denoise(nn.Sequential(nn.Conv2d(3, 8, 3)))
    from atscale.models.normalize import NormalizedModel
    with pytest.raises(ValueError, match="NormalizedModel.net"):
        insert_denoise(NormalizedModel(tiny_resnet18(), [0.5] * 3, [0.5] * 3))
    with pytest.raises(ValueError, match="placement"):
        insert_denoise(tiny_resnet18(), placement="everywhere")
    with pytest.raises(ValueError, match="allowed"):
        insert_denoise(tiny_resnet18(), op="gauss")
    model = insert_denoise(tiny_resnet18())
    with pytest.raises(ValueError, match="already contains"):
        insert_denoise(model)
