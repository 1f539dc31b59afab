"""Mixture BN (Xie thesis Sec 6.4.2) and AdvProp's auxiliary BN (Xie thesis Sec 7.4.2): one BatchNorm per domain.

Every BN layer keeps one set of statistics AND affine parameters per domain (MBN_clean, MBN_adv; or AdvProp's main and
auxiliary BNs); all other layers (convolutions, activations, classifier) are shared. The routing context
(``atscale.layers.context``) picks the domain of each forward pass: ``domain(name)`` sends the whole batch to one
domain, ``domain_split((d1, n1), (d2, n2), ...)`` sends consecutive slices of a concatenated batch to different
domains, and outside both the layer's ``default`` domain is used (the one evaluated: MBN_clean or MBN_adv, Sec 6.4.2;
AdvProp evaluates with the main BNs and drops the auxiliary ones, Sec 7.4.3).

- ``convert_to_mixture_bn(model)`` replaces every BatchNorm2d (also timm's ``BatchNormAct2d``, our
  ``DistBatchNorm2d`` and torch's ``SyncBatchNorm``) by a ``MixtureBatchNorm2d`` whose domains start as copies of it.
- ``collapse_mixture_bn(model, domain)`` keeps one domain as a plain (unsynchronized) BN: the state dict then has
  exactly the keys of the original timm model, which plain timm loads (what export does).

timm's BN + activation layers (``BatchNormAct2d``) are split: each domain holds a plain ``nn.BatchNorm2d`` and the
MBN layer applies the shared ``drop`` and ``act`` modules after it; collapsing rebuilds a ``BatchNormAct2d``. So the
per-domain BNs are always plain BNs, and ``atscale.layers.sync_bn.convert_sync_bn`` (or timm's / torch's sync-BN
converters) can run before or after ``convert_to_mixture_bn``.
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from timm.layers import BatchNormAct2d
from timm.layers.norm_act import SyncBatchNormAct
from torch import nn

from atscale.layers.context import bn_domain, bn_split
from atscale.layers.swap import swap_modules
from atscale.layers.sync_bn import DistBatchNorm2d, DistBatchNormAct2d

DEFAULT_DOMAINS = ("clean", "adv")
_SYNC_BN = (nn.SyncBatchNorm, DistBatchNorm2d, DistBatchNormAct2d)


def _check_domains(domains: Iterable[str]) -> tuple[str, ...]:
    doms = tuple(domains)
    if not doms:
        raise ValueError("Mixture BN needs at least one domain")
    if len(set(doms)) != len(doms):
        raise ValueError(f"Mixture BN domains {doms} repeat a name; list each domain once")
    reserved = set(dir(nn.ModuleDict()))
    for d in doms:
        if not isinstance(d, str) or not d or "." in d or d in reserved:
            raise ValueError(f"Mixture BN domain {d!r} is not a valid name: a non-empty string without '.' that is "
                             f"not an nn.ModuleDict attribute (such as 'train' or 'forward')")
    return doms


class MixtureBatchNorm2d(nn.Module):
    """One BatchNorm (statistics and affine parameters) per domain; the routing context picks the domain per pass.

    Xie thesis Sec 6.4.2 (Mixture BN: MBN_clean and MBN_adv, all other layers shared) and Sec 7.4.2 (AdvProp's
    auxiliary BN). ``bns`` maps domain -> BN (state-dict keys ``bns.clean.weight``, ``bns.adv.running_mean``, ...).
    ``forward`` routes the whole batch to the BN of ``bn_domain()`` (None -> ``default``), or the slices of a
    ``domain_split`` to their domains; only those BNs update their running statistics (train mode) and receive
    gradients. In eval mode each domain normalizes with its own running statistics. ``default`` is the domain used
    outside any routing context (evaluation); it can be reassigned. ``drop`` and ``act`` (identity unless the layer
    replaces a timm ``BatchNormAct2d``) are shared by all domains and applied after the BN.
    """

    def __init__(self, num_features: int, domains: Sequence[str] = DEFAULT_DOMAINS, default: str = "clean",
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 bn_cls: type[nn.Module] = nn.BatchNorm2d, act: nn.Module | None = None,
                 drop: nn.Module | None = None) -> None:
        super().__init__()
        doms = _check_domains(domains)
        self.num_features = num_features
        self.bns = nn.ModuleDict({d: bn_cls(num_features, eps, momentum, affine, track_running_stats) for d in doms})
        self.norm_act = act is not None or drop is not None  # collapses to timm's BatchNormAct2d
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()
        self._default = ""
        self.default = default

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self.bns.keys())

    @property
    def default(self) -> str:
        return self._default

    @default.setter
    def default(self, name: str) -> None:
        self._check(name)
        self._default = name

    def _check(self, name: str) -> str:
        if name not in self.bns:
            raise ValueError(f"BN domain {name!r} is not one of this Mixture BN layer's domains {self.domains}")
        return name

    @classmethod
    def from_bn(cls, bn: nn.Module, domains: Sequence[str] = DEFAULT_DOMAINS,
                default: str = "clean") -> "MixtureBatchNorm2d":
        """A Mixture BN whose every domain is a copy of ``bn`` (class, process group, weights, statistics, eps,
        momentum, requires_grad, train/eval mode). A timm ``BatchNormAct2d`` / ``SyncBatchNormAct`` gives plain
        ``BatchNorm2d`` / ``SyncBatchNorm`` domains and its ``drop`` and ``act`` modules are kept, shared."""
        norm_act = isinstance(bn, (BatchNormAct2d, SyncBatchNormAct))
        template = _strip_act(bn) if norm_act else bn
        mbn = cls(bn.num_features, domains, default, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  act=getattr(bn, "act", None) if norm_act else None,
                  drop=getattr(bn, "drop", None) if norm_act else None)
        mbn.bns = nn.ModuleDict({d: _copy_bn(template) for d in mbn.domains})
        mbn.norm_act = norm_act
        return mbn.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = bn_split()
        if split is None:
            name = bn_domain()
            y = self.bns[self._check(self._default if name is None else name)](x)
        else:
            sizes = [n for _, n in split]
            if sum(sizes) != x.shape[0]:
                raise ValueError(f"domain_split sizes {tuple(split)} add up to {sum(sizes)}, but the batch has "
                                 f"{x.shape[0]} images")
            # synchronized BNs are collectives: every rank calls each domain, even with no images of it
            parts = [(self.bns[self._check(d)], c) for (d, _), c in zip(split, x.split(sizes))
                     if c.shape[0] > 0 or isinstance(self.bns[d], _SYNC_BN)]
            y = torch.cat([bn(c) for bn, c in parts]) if parts else self.bns[self._default](x)
        return self.act(self.drop(y))

    def collapse(self, domain: str) -> nn.Module:
        """The BN of ``domain`` as a standalone plain layer: timm's ``BatchNormAct2d`` (with the shared drop / act)
        if this layer replaced one, else the domain's BN, synchronized BNs turned into ``nn.BatchNorm2d``."""
        bn = self.bns[self._check(domain)]
        if self.norm_act:
            out = _rebuild(bn, BatchNormAct2d, apply_act=False)
            out.drop, out.act = self.drop, self.act
            return out
        if isinstance(bn, _SYNC_BN):
            return _rebuild(bn, nn.BatchNorm2d)
        return bn

    def extra_repr(self) -> str:
        return f"{self.num_features}, domains={self.domains}, default={self._default!r}"


def _ref_tensor(bn: nn.Module) -> torch.Tensor | None:
    return bn.weight if bn.affine else bn.running_mean


def _rebuild(bn: nn.Module, cls: type[nn.Module], **kwargs) -> nn.Module:
    """A ``cls`` BN with ``bn``'s hyper-parameters, own state (parameters and buffers), requires_grad and mode."""
    ref = _ref_tensor(bn)
    factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    out = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **kwargs, **factory)
    own = {k: v for k, v in bn.state_dict().items() if "." not in k}
    out.load_state_dict(own, strict=False)
    missing = {k for k in out.state_dict() if "." not in k} - own.keys()
    if missing:
        raise ValueError(f"cannot rebuild {type(bn).__name__} as {cls.__name__}: no {sorted(missing)} in its state")
    for name, p in out.named_parameters(recurse=False):
        p.requires_grad_(getattr(bn, name).requires_grad)
    return out.train(bn.training)


def _strip_act(bn: nn.Module) -> nn.Module:
    """timm's BN + activation layer -> the BN alone, of torch's class (SyncBatchNorm keeps its process group)."""
    if isinstance(bn, nn.SyncBatchNorm):
        return _rebuild(bn, nn.SyncBatchNorm, process_group=bn.process_group)
    if isinstance(bn, DistBatchNormAct2d):
        out = _rebuild(bn, DistBatchNorm2d)
        out.process_group = bn.process_group
        return out
    return _rebuild(bn, nn.BatchNorm2d)


def _copy_bn(bn: nn.Module) -> nn.Module:
    """A deep copy that shares the process group (process groups cannot be copied)."""
    group = getattr(bn, "process_group", None)
    return copy.deepcopy(bn, memo={id(group): group} if group is not None else None)


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm))


def convert_to_mixture_bn(model: nn.Module, domains: Sequence[str] = DEFAULT_DOMAINS,
                          default: str = "clean") -> nn.Module:
    """Replace every BN of ``model`` in place by a ``MixtureBatchNorm2d`` whose domains are copies of it
    (Xie thesis Sec 6.4.2 / Sec 7.4.2). Returns ``model`` (or the new layer if ``model`` itself is a BN).

    Handles ``nn.BatchNorm2d`` and subclasses, timm's ``BatchNormAct2d`` (activation kept, shared across domains),
    our ``DistBatchNorm2d`` and torch's ``nn.SyncBatchNorm`` (each domain keeps the class and the process group).
    Existing ``MixtureBatchNorm2d`` layers are left as they are. Synchronized BN can be set up in either order:
    ``convert_sync_bn`` first then ``convert_to_mixture_bn`` (the synced BNs are copied per domain), or
    ``convert_to_mixture_bn`` first then ``convert_sync_bn`` (it swaps the plain per-domain BNs). The second order is
    the cheaper one (plain per-domain BNs are swapped); ``convert_sync_bn`` first works too, including timm's
    ``BatchNormAct2d`` (synchronized with its activation kept, then split per domain).
    """
    doms = _check_domains(domains)
    if default not in doms:
        raise ValueError(f"default BN domain {default!r} is not one of the domains {doms}")
    if _is_bn(model):
        return MixtureBatchNorm2d.from_bn(model, doms, default)
    _convert(model, doms, default)
    return model


def _convert(module: nn.Module, domains: tuple[str, ...], default: str) -> None:
    def mixture(_: str, child: nn.Module) -> nn.Module | None:
        if isinstance(child, MixtureBatchNorm2d):
            return child
        return MixtureBatchNorm2d.from_bn(child, domains, default) if _is_bn(child) else None

    swap_modules(module, mixture)


def collapse_mixture_bn(model: nn.Module, domain: str) -> nn.Module:
    """Replace every ``MixtureBatchNorm2d`` of ``model`` in place by the plain BN of ``domain`` (``nn.BatchNorm2d``,
    or timm's ``BatchNormAct2d`` where the layer replaced one; synchronized BNs become ``nn.BatchNorm2d``), dropping
    the other domains: the state dict then has the original timm model's keys, so plain timm loads it (export keeps
    MBN_clean or MBN_adv, Xie thesis Sec 6.4.2; AdvProp drops the auxiliary BNs at test time, Sec 7.4.2). Returns
    ``model`` (or the collapsed layer if ``model`` itself is a Mixture BN). Unknown domain: ValueError, model untouched.
    """
    layers = [m for m in model.modules() if isinstance(m, MixtureBatchNorm2d)]
    for m in layers:
        m._check(domain)
    if isinstance(model, MixtureBatchNorm2d):
        return model.collapse(domain)
    _collapse(model, domain)
    return model


def _collapse(module: nn.Module, domain: str) -> None:
    for name, child in module.named_children():
        if isinstance(child, MixtureBatchNorm2d):
            setattr(module, name, child.collapse(domain))
        else:
            _collapse(child, domain)


def mixture_domains(model: nn.Module) -> tuple[str, ...]:
    """The domains of the model's Mixture BN layers, in order of first appearance (empty if it has none)."""
    seen: dict[str, None] = {}
    for m in model.modules():
        if isinstance(m, MixtureBatchNorm2d):
            seen.update(dict.fromkeys(m.domains))
    return tuple(seen)


def set_default_domain(model: nn.Module, name: str) -> None:
    """Make ``name`` the default domain (the one used outside a routing context, e.g. for evaluation with MBN_clean
    or MBN_adv) of every Mixture BN layer. ValueError, model untouched, if a layer lacks it or there is no layer."""
    layers = [m for m in model.modules() if isinstance(m, MixtureBatchNorm2d)]
    if not layers:
        raise ValueError(f"cannot set the BN domain to {name!r}: the model has no Mixture BN layers")
    for m in layers:
        m._check(name)
    for m in layers:
        m.default = name
