"""Feature-denoising blocks (Xie thesis Chapter 4, "Feature Denoising for Improving Adversarial Robustness").

A denoising block (Xie thesis Sec 4.4.1, Fig 4.4) is ``y = x + BN(conv1x1(op(x)))``, the BN's gamma initialised to zero
so a freshly inserted block is the identity. The denoising operations (Sec 4.4.2) work on NCHW feature maps (any memory
format, fp32/fp64, and under bf16/fp16 autocast):

- ``gaussian``: non-local means with softmax weights, ``y_i = sum_j softmax_j(theta(x_i) . phi(x_j) / sqrt(d)) x_j``;
  theta/phi are 1x1 convolutions to C/2 channels (d = C/2), or the identity with ``embed=False`` (d = C). The weighted
  mean is over ``x`` itself, not an embedding of it. Runs on ``F.scaled_dot_product_attention`` (one head, N = H*W
  tokens, query dim d, value dim C).
- ``dot``: non-local means with dot-product weights, ``y_i = (1/N) sum_j (x_i . x_j) x_j``, no embedding by default
  (``embed=True`` uses theta/phi as above); computed in whichever matrix-product order is cheaper.
- ``bilateral_gaussian`` / ``bilateral_dot``: the same two weightings over the 3x3 neighbourhood of each position
  (Eqn. 4.2); the Gaussian version embeds to C/2 like the non-local one, the dot version does not.
- ``mean``: 3x3 mean filter (average pooling with stride 1). ``median``: 3x3 per-channel median filter (Eqn. 4.3).
- ``null``: the identity, so the block is just ``x + BN(conv1x1(x))`` (the "null" ablation of Sec 4.6.1).

Borders: the 3x3 operations exclude out-of-image neighbours rather than padding with zeros. The mean divides by the
number of in-image neighbours (9 inside, 6 on an edge, 4 in a corner), ``bilateral_dot`` likewise,
``bilateral_gaussian`` takes its softmax over the in-image neighbours only, and ``median`` is the median of the in-image
neighbours (for an even count the lower of the two middle values, as ``torch.median``).

Subsampling (Sec 4.6.2, used with a block after every residual block): the keys/values ``x_j`` are a 2x2 max-pooled
copy of ``x`` (stride 2, ``ceil_mode=True`` so odd sizes such as ResNet's 7x7 res5 keep their last row/column); ``phi``
is computed on the pooled map, the queries ``x_i`` stay full size. Only the non-local operations accept it; ``dot``
then divides by the number of pooled positions.

``insert_denoise`` adds blocks to a timm ResNet/ResNeXt after the last residual block of res2..res5 (``layer1`` ..
``layer4``, the paper's default of 4 blocks) or after every residual block.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DENOISE_OPS: tuple[str, ...] = ("gaussian", "dot", "bilateral_gaussian", "bilateral_dot", "mean", "median", "null")
NONLOCAL_OPS: tuple[str, ...] = ("gaussian", "dot")
PLACEMENTS: tuple[str, ...] = ("stage_end", "every_block")
STAGES: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")


def _check_op(op: str) -> None:
    if op not in DENOISE_OPS:
        raise ValueError(f"denoise op '{op}' is unknown; allowed: {', '.join(DENOISE_OPS)}")


def _tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C); a view for channels_last inputs."""
    return x.flatten(2).transpose(1, 2)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def subsample_keys(x: Tensor) -> Tensor:
    """2x2 max pooling, stride 2, ceil mode: the subsampled ``x_j`` of Xie thesis Sec 4.6.2."""
    return F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)


def nonlocal_gaussian(theta: Tensor, phi: Tensor, value: Tensor, fused: bool = True) -> Tensor:
    """Gaussian (softmax) non-local means, Xie thesis Sec 4.4.2 Eqn. 4.1.

    ``y_i = sum_j softmax_j(theta_i . phi_j / sqrt(d)) value_j`` with theta (B, d, H, W), phi (B, d, h, w) and value
    (B, C, h, w); returns (B, C, H, W). ``fused``: one ``scaled_dot_product_attention`` call (flash / memory-efficient
    kernels on GPU, no (N, M) weight matrix kept) whose default scale 1/sqrt(d) is the paper's; otherwise the
    explicit softmax over the (N, M) matrix, as the original TensorFlow implementation (the measured baseline).
    """
    b, _, h, w = theta.shape
    dtype = _compute_dtype(theta, phi, value)
    q, k, v = (_tokens(t).unsqueeze(1).to(dtype) for t in (theta, phi, value))
    if fused:
        y = F.scaled_dot_product_attention(q, k, v)
    else:
        y = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
    return y.squeeze(1).transpose(1, 2).reshape(b, value.shape[1], h, w)


def nonlocal_dot(theta: Tensor, phi: Tensor, value: Tensor,
                 order: Literal["auto", "pairs_first", "keys_first"] = "auto") -> Tensor:
    """Dot-product non-local means, Xie thesis Sec 4.4.2: ``y_i = (1/M) sum_j (theta_i . phi_j) value_j``.

    Shapes as ``nonlocal_gaussian``; M = h*w is the number of key positions (N = H*W without subsampling). By
    associativity either ``value @ (phi^T theta)`` (an (M, N) matrix, "pairs_first") or ``(value phi^T) @ theta`` (a
    (C, d) matrix, "keys_first") is formed; "auto" picks the one with fewer multiply-adds.
    """
    b, d, h, w = theta.shape
    c = value.shape[1]
    n, m = h * w, phi.shape[2] * phi.shape[3]
    dtype = _compute_dtype(theta, phi, value)
    q, v = theta.flatten(2).to(dtype), value.flatten(2).to(dtype)
    k = phi.flatten(2).to(dtype) / m
    if order == "auto":
        order = "keys_first" if m * d * c + n * d * c < n * m * (d + c) else "pairs_first"
    if order == "keys_first":
        y = torch.matmul(torch.matmul(v, k.transpose(1, 2)), q)
    elif order == "pairs_first":
        y = torch.matmul(v, torch.matmul(k.transpose(1, 2), q))
    else:
        raise ValueError(f"order must be 'auto', 'pairs_first' or 'keys_first', got '{order}'")
    return y.reshape(b, c, h, w)


def _neighbours(x: Tensor, kernel_size: int, pad_value: float = 0.0) -> list[Tensor]:
    """The k*k shifted copies of x (views of one padded tensor): entry (dy, dx) holds x at (h+dy-r, w+dx-r)."""
    r = kernel_size // 2
    xp = F.pad(x, (r, r, r, r), value=pad_value)
    h, w = x.shape[-2:]
    return [xp[..., dy:dy + h, dx:dx + w] for dy in range(kernel_size) for dx in range(kernel_size)]


def _inside(x: Tensor, kernel_size: int) -> Tensor:
    """(1, k*k, H, W) bool: which neighbours of each position lie inside the image."""
    ones = torch.ones((1, 1) + tuple(x.shape[-2:]), device=x.device, dtype=torch.float32)
    return torch.cat(_neighbours(ones, kernel_size), dim=1) > 0


def _check_kernel(kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")


def _bilateral(theta: Tensor, phi: Tensor, value: Tensor, kernel_size: int, softmax: bool) -> Tensor:
    _check_kernel(kernel_size)
    if theta.shape[-2:] != phi.shape[-2:] or theta.shape[-2:] != value.shape[-2:]:
        raise ValueError("bilateral filters need theta, phi and value of the same spatial size (no subsampling)")
    acc = torch.promote_types(_compute_dtype(theta, phi, value), torch.float32)
    inside = _inside(theta, kernel_size)
    logits = torch.stack([(theta * p).sum(1, dtype=acc) for p in _neighbours(phi, kernel_size)], dim=1)
    if softmax:
        weights = logits.div(math.sqrt(theta.shape[1])).masked_fill(~inside, float("-inf")).softmax(dim=1)
    else:
        weights = logits / inside.sum(1, keepdim=True).to(acc)
    out = None
    for i, v in enumerate(_neighbours(value, kernel_size)):
        term = weights[:, i:i + 1] * v
        out = term if out is None else out + term
    return out.to(_compute_dtype(theta, phi, value))


def bilateral_gaussian(theta: Tensor, phi: Tensor, value: Tensor, kernel_size: int = 3) -> Tensor:
    """Gaussian bilateral filter, Xie thesis Sec 4.4.2 Eqn. 4.2: softmax over the in-image k x k neighbours j of
    ``theta_i . phi_j / sqrt(d)``, then the weighted mean of ``value_j``. Inputs (B, *, H, W) of one spatial size."""
    return _bilateral(theta, phi, value, kernel_size, softmax=True)


def bilateral_dot(theta: Tensor, phi: Tensor, value: Tensor, kernel_size: int = 3) -> Tensor:
    """Dot-product bilateral filter, Xie thesis Sec 4.4.2 Eqn. 4.2: ``y_i = (1/|O(i)|) sum_{j in O(i)} (theta_i .
    phi_j) value_j`` over the in-image k x k neighbourhood O(i)."""
    return _bilateral(theta, phi, value, kernel_size, softmax=False)


def mean_filter(x: Tensor, kernel_size: int = 3) -> Tensor:
    """k x k mean filter (stride-1 average pooling), Xie thesis Sec 4.4.2; out-of-image neighbours excluded."""
    _check_kernel(kernel_size)
    return F.avg_pool2d(x, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=False)


def median_filter(x: Tensor, kernel_size: int = 3) -> Tensor:
    """Per-channel k x k median filter, Xie thesis Sec 4.4.2 Eqn. 4.3; out-of-image neighbours excluded (NaN padding
    and ``nanmedian``, so an even count gives the lower middle value). The gradient goes to the selected element."""
    _check_kernel(kernel_size)
    r = kernel_size // 2
    patches = F.pad(x, (r, r, r, r), value=float("nan")).unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)
    return patches.flatten(-2).nanmedian(dim=-1).values


def _embedding(channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, out_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, std=0.01)
    return conv


class _Embedded(nn.Module):
    """Holds the optional theta/phi 1x1 embeddings to C/2 channels (Xie thesis Sec 4.4.2; no bias, N(0, 0.01^2) init
    as in the authors' released code)."""

    def __init__(self, channels: int, embed: bool):
        super().__init__()
        self.channels, self.embed = channels, embed
        if embed:
            d = max(1, channels // 2)
            self.theta, self.phi = _embedding(channels, d), _embedding(channels, d)
        else:
            self.theta = self.phi = None

    def embeddings(self, x: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        if self.theta is None:
            return x, keys
        return self.theta(x), self.phi(keys)


class NonLocalMeans(_Embedded):
    """Non-local means denoising operation (Xie thesis Sec 4.4.2 Eqn. 4.1, Fig 4.5): Gaussian/softmax weights on
    embedded features (``kind="gaussian"``) or dot-product weights divided by N (``kind="dot"``); optional 2x2
    max-pool subsampling of the keys/values x_j (Sec 4.6.2)."""

    def __init__(self, channels: int, kind: Literal["gaussian", "dot"] = "gaussian", embed: bool | None = None,
                 subsample: bool = False, fused: bool = True):
        if kind not in NONLOCAL_OPS:
            raise ValueError(f"non-local kind must be one of {NONLOCAL_OPS}, got '{kind}'")
        super().__init__(channels, kind == "gaussian" if embed is None else embed)
        self.kind, self.subsample, self.fused = kind, subsample, fused

    def forward(self, x: Tensor) -> Tensor:
        keys = subsample_keys(x) if self.subsample else x
        theta, phi = self.embeddings(x, keys)
        if self.kind == "gaussian":
            return nonlocal_gaussian(theta, phi, keys, self.fused)
        return nonlocal_dot(theta, phi, keys)

    def extra_repr(self) -> str:
        return f"{self.channels}, kind={self.kind}, embed={self.embed}, subsample={self.subsample}"


class BilateralFilter(_Embedded):
    """3x3 bilateral filter (Xie thesis Sec 4.4.2 Eqn. 4.2) with Gaussian (embedded, softmax) or dot-product weights;
    out-of-image neighbours excluded."""

    def __init__(self, channels: int, kind: Literal["gaussian", "dot"] = "gaussian", embed: bool | None = None,
                 kernel_size: int = 3):
        if kind not in NONLOCAL_OPS:
            raise ValueError(f"bilateral kind must be one of {NONLOCAL_OPS}, got '{kind}'")
        _check_kernel(kernel_size)
        super().__init__(channels, kind == "gaussian" if embed is None else embed)
        self.kind, self.kernel_size = kind, kernel_size

    def forward(self, x: Tensor) -> Tensor:
        theta, phi = self.embeddings(x, x)
        fn = bilateral_gaussian if self.kind == "gaussian" else bilateral_dot
        return fn(theta, phi, x, self.kernel_size)

    def extra_repr(self) -> str:
        return f"{self.channels}, kind={self.kind}, embed={self.embed}, kernel_size={self.kernel_size}"


class MeanFilter(nn.Module):
    """3x3 mean filter (Xie thesis Sec 4.4.2)."""

    def __init__(self, kernel_size: int = 3):
        super().__init__()
        _check_kernel(kernel_size)
        self.kernel_size = kernel_size

    def forward(self, x: Tensor) -> Tensor:
        return mean_filter(x, self.kernel_size)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


class MedianFilter(MeanFilter):
    """3x3 per-channel median filter (Xie thesis Sec 4.4.2 Eqn. 4.3)."""

    def forward(self, x: Tensor) -> Tensor:
        return median_filter(x, self.kernel_size)


def make_denoise_op(op: str, channels: int, embed: bool | None = None, subsample: bool = False,
                    fused: bool = True) -> nn.Module:
    """The denoising operation ``op`` (one of ``DENOISE_OPS``) for ``channels``-channel features (Xie thesis Sec 4.4.2).

    ``embed=None`` is the paper's choice: theta/phi embeddings for the Gaussian versions, none for the dot-product
    versions; ``embed=True`` is refused for ops without weights to embed (mean, median, null). ``subsample`` (Sec
    4.6.2) only applies to the non-local ops; ``fused`` picks the Gaussian non-local op's attention kernel.
    """
    _check_op(op)
    if subsample and op not in NONLOCAL_OPS:
        raise ValueError(f"subsample=True (2x2 max-pool of the x_j) applies only to the non-local ops "
                         f"{NONLOCAL_OPS}, not to '{op}'")
    if embed and op in ("mean", "median", "null"):
        raise ValueError(f"embed=True needs an op with pairwise weights (gaussian, dot, bilateral_*), not '{op}'")
    if op in NONLOCAL_OPS:
        return NonLocalMeans(channels, op, embed, subsample, fused)
    if op.startswith("bilateral_"):
        return BilateralFilter(channels, op.removeprefix("bilateral_"), embed)
    if op == "mean":
        return MeanFilter()
    if op == "median":
        return MedianFilter()
    return nn.Identity()


class DenoiseBlock(nn.Module):
    """Denoising block, Xie thesis Sec 4.4.1 Fig 4.4: ``y = x + BN(conv1x1(op(x)))``.

    The BN's gamma starts at zero (with the residual), so the block is the identity at initialisation. Ablations of
    Sec 4.6.1 Table 4.1: ``use_conv=False`` removes the 1x1 convolution only (``y = x + BN(op(x))``; the BN stays, so
    the block still starts as the identity), ``residual=False`` removes the identity skip (``y = BN(conv1x1(op(x)))``).
    ``zero_init`` defaults to ``residual``: without the skip a zero gamma would zero the whole feature map, so the BN
    then starts at gamma = 1. ``op="null"`` is the 1x1-only block of Sec 4.6.1.
    """

    def __init__(self, channels: int, op: str = "gaussian", embed: bool | None = None, use_conv: bool = True,
                 residual: bool = True, subsample: bool = False,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, zero_init: bool | None = None,
                 fused: bool = True):
        super().__init__()
        self.channels, self.op_name, self.use_conv, self.residual = channels, op, use_conv, residual
        self.op = make_denoise_op(op, channels, embed, subsample, fused)
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
            nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        else:
            self.conv = nn.Identity()
        self.bn = norm_layer(channels)
        if residual if zero_init is None else zero_init:
            nn.init.zeros_(self.bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(self.op(x)))
        return x + y if self.residual else y

    def extra_repr(self) -> str:
        return f"{self.channels}, op={self.op_name}, use_conv={self.use_conv}, residual={self.residual}"


def _out_channels(block: nn.Module) -> int:
    for name in ("conv3", "conv2"):
        conv = getattr(block, name, None)
        if isinstance(conv, nn.Conv2d):
            return conv.out_channels
    raise ValueError(f"cannot read the output channels of {type(block).__name__} (expected timm Bottleneck or "
                     "BasicBlock with conv3/conv2)")


def insert_denoise(model: nn.Module, op: str = "gaussian", placement: str = "stage_end",
                   **block_kwargs) -> nn.Module:
    """Add ``DenoiseBlock``s to a timm ResNet/ResNeXt in place and return it (Xie thesis Sec 4.6).

    ``placement="stage_end"``: one block after the last residual block of each of res2..res5 (``layer1`` ..
    ``layer4``), the paper's default 4 blocks; ``"every_block"``: one after every residual block (Sec 4.6.2, usually
    with ``subsample=True``). Blocks go inside the stages' ``nn.Sequential``, so ``forward`` and timm's feature
    extraction are unchanged; they take the device, dtype and memory format of the model's parameters. Other keyword
    arguments go to ``DenoiseBlock``. The residual blocks keep their names (``layer1.0`` ...), the new ones are named
    ``layer1.denoise0`` ..., so a plain timm state dict loads with ``strict=False``.
    """
    _check_op(op)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement '{placement}' is unknown; allowed: {', '.join(PLACEMENTS)}")
    missing = [s for s in STAGES if not isinstance(getattr(model, s, None), nn.Sequential)]
    if missing:
        hint = " (pass the inner timm model, e.g. NormalizedModel.net)" if hasattr(model, "net") else ""
        raise ValueError(f"insert_denoise needs a timm ResNet/ResNeXt with nn.Sequential stages {', '.join(STAGES)}; "
                         f"{type(model).__name__} lacks {', '.join(missing)}{hint}")
    if any(isinstance(m, DenoiseBlock) for s in STAGES for m in getattr(model, s)):
        raise ValueError("model already contains denoise blocks; insert_denoise would add a second set")
    ref = next(model.parameters(), None)
    to_kwargs: dict = {}
    channels_last = False
    if ref is not None:
        to_kwargs = {"device": ref.device, "dtype": ref.dtype}
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        w = conv.weight if conv is not None else None
        channels_last = w is not None and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
    for stage in STAGES:
        blocks = list(getattr(model, stage).named_children())
        new: dict[str, nn.Module] = {}
        for i, (name, block) in enumerate(blocks):
            new[name] = block
            if placement == "every_block" or i == len(blocks) - 1:
                dn = DenoiseBlock(_out_channels(block), op=op, **block_kwargs).to(**to_kwargs)
                new[f"denoise{name}"] = dn.to(memory_format=torch.channels_last) if channels_last else dn
        setattr(model, stage, nn.Sequential(OrderedDict(new)))
    return model
