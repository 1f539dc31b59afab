"""Mixture BN / auxiliary BN (Xie thesis Sec 6.4.2, Sec 7.4.2): routing by the context, equivalence with plain BN,
conversion of real timm models (ResNet's BatchNorm2d, EfficientNet's BatchNormAct2d), collapse back to plain timm, and
synchronized BN with Mixture BN on 2 gloo ranks."""
from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

from atscale.layers.sync_bn import DistBatchNorm2d
from atscale.layers.context import domain, domain_split
from atscale.layers.mixture_bn import (MixtureBatchNorm2d, collapse_mixture_bn, convert_to_mixture_bn,
                                       mixture_domains, set_default_domain)

STATS = ("running_mean", "running_var", "num_batches_tracked")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _randomize(bn: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.num_batches_tracked.fill_(seed)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _mbns(model: nn.Module) -> list[MixtureBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, MixtureBatchNorm2d)]


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10, channels=[8, 16, 32, 64])


def test_routing_updates_and_trains_only_the_routed_domain() -> None:
    torch.manual_seed(0)
    mbn = MixtureBatchNorm2d(4).train()
    assert mbn.domains == ("clean", "adv") and mbn.default == "clean"
    assert set(mbn.state_dict()) == {f"bns.{d}.{k}" for d in ("clean", "adv")
                                     for k in ("weight", "bias") + STATS}
    x = torch.randn(6, 4, 5, 5) * 2 + 1
    for ctx, changed, kept in ((domain("adv"), "adv", "clean"), (domain(None), "clean", "adv")):
        mbn.zero_grad(set_to_none=True)
        before = _snapshot(mbn)
        with ctx:
            mbn(x).square().sum().backward()
        after = mbn.state_dict()
        for k in STATS:
            assert torch.equal(after[f"bns.{kept}.{k}"], before[f"bns.{kept}.{k}"])
            assert not torch.equal(after[f"bns.{changed}.{k}"], before[f"bns.{changed}.{k}"])
        assert mbn.bns[kept].weight.grad is None and mbn.bns[kept].bias.grad is None
        assert mbn.bns[changed].weight.grad.abs().sum() > 0 and mbn.bns[changed].bias.grad.abs().sum() > 0

    mbn.default = "adv"  # no context -> the (reassigned) default domain
    before = _snapshot(mbn)
    with torch.no_grad():
        mbn(x)
    assert torch.equal(mbn.bns.clean.running_mean, before["bns.clean.running_mean"])
    assert not torch.equal(mbn.bns.adv.running_mean, before["bns.adv.running_mean"])

    with pytest.raises(ValueError, match=r"'aux'.*\('clean', 'adv'\)"):
        with domain("aux"):
            mbn(x)
    with pytest.raises(ValueError, match="aux"):
        mbn.default = "aux"
    with pytest.raises(ValueError, match="'adv2'"):
        MixtureBatchNorm2d(4, default="adv2")
    for bad in (("clean", "clean"), ("a.b",), ("train",), ()):
        with pytest.raises(ValueError):
            MixtureBatchNorm2d(4, domains=bad, default=bad[0] if bad else "clean")
    three = MixtureBatchNorm2d(4, domains=("clean", "aug", "adv"))  # AdvProp's fine-grained variant (Sec 7.5.4)
    with domain("aug"):
        three(x)
    assert int(three.bns.aug.num_batches_tracked) == 1 and int(three.bns.adv.num_batches_tracked) == 0


@pytest.mark.parametrize("name", ["clean", "adv"])
@pytest.mark.parametrize("train", [True, False])
def test_routed_layer_equals_plain_batchnorm_with_that_domains_state(name: str, train: bool) -> None:
    mbn = MixtureBatchNorm2d(5, momentum=0.3, eps=1e-3)
    _randomize(mbn.bns.clean, 1)
    _randomize(mbn.bns.adv, 2)
    ref = nn.BatchNorm2d(5, momentum=0.3, eps=1e-3)
    ref.load_state_dict(mbn.bns[name].state_dict())
    mbn.train(train)
    ref.train(train)
    torch.manual_seed(3)
    x, w = torch.randn(4, 5, 3, 3) * 2 - 1, torch.randn(4, 5, 3, 3)
    other = _snapshot(mbn.bns["adv" if name == "clean" else "clean"])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with domain(name):
        y = mbn(x1)
    y_ref = ref(x2)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(mbn.bns[name].weight.grad, ref.weight.grad)
    torch.testing.assert_close(mbn.bns[name].bias.grad, ref.bias.grad)
    for k in STATS:
        torch.testing.assert_close(getattr(mbn.bns[name], k), getattr(ref, k), rtol=0, atol=0)
    for k, v in mbn.bns["adv" if name == "clean" else "clean"].state_dict().items():
        assert torch.equal(v, other[k])


def test_domain_split_routes_slices_of_one_batch() -> None:
    torch.manual_seed(0)
    xc, xa = torch.randn(3, 4, 5, 5), torch.randn(5, 4, 5, 5) * 3 + 2
    split, sep = MixtureBatchNorm2d(4), MixtureBatchNorm2d(4)
    x = torch.cat([xc, xa]).requires_grad_()
    with domain_split(("clean", 3), ("adv", 5)):
        y = split(x)
    y.square().sum().backward()
    with domain("clean"):
        yc = sep(xc)
    with domain("adv"):
        ya = sep(xa)
    (yc.square().sum() + ya.square().sum()).backward()
    torch.testing.assert_close(y, torch.cat([yc, ya]))
    for k, v in sep.state_dict().items():
        torch.testing.assert_close(split.state_dict()[k], v)
    for (k, p), q in zip(split.named_parameters(), sep.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=k)
    with pytest.raises(ValueError, match="add up to 7"):
        with domain_split(("clean", 3), ("adv", 4)):
            split(x)


def test_tiny_resnet_converts_trains_domains_separately_and_collapses_to_plain_timm() -> None:
    m0 = _tiny_resnet().train()
    with torch.no_grad():  # non-trivial running statistics to copy
        for s in range(2):
            m0(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(s)) * 2)
    m0.eval()
    n_bn = len(_bns(m0))
    m = convert_to_mixture_bn(copy.deepcopy(m0))
    assert len(_mbns(m)) == n_bn == 21 and mixture_domains(m) == ("clean", "adv") and mixture_domains(m0) == ()
    assert all(type(bn) is nn.BatchNorm2d for mbn in _mbns(m) for bn in mbn.bns.values())
    assert not torch.count_nonzero(m.layer1[0].bn2.bns.adv.weight)  # timm's zero-init last gamma stays zero
    bn_keys = {k for k in m0.state_dict() if any(k.startswith(n + ".") for n, mod in m0.named_modules()
                                                  if isinstance(mod, nn.BatchNorm2d))}
    shared = {n for n, _ in m.named_parameters() if ".bns." not in n}
    assert shared == {n for n, _ in m0.named_parameters() if n not in bn_keys}  # one conv / fc tensor each
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    m.eval()
    ref = m0(x)
    for name in ("clean", "adv"):
        with domain(name):
            torch.testing.assert_close(m(x), ref, rtol=0, atol=0)

    g = torch.Generator().manual_seed(5)
    xa, xc = torch.randn(8, 3, 32, 32, generator=g) * 2, torch.rand(8, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.train()
    conv0 = m.conv1.weight.detach().clone()
    clean0 = {k: v for k, v in _snapshot(m).items() if ".clean." in k}
    with domain("adv"):
        F.cross_entropy(m(xa), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert not torch.equal(m.conv1.weight, conv0)  # adversarial gradients reach the shared convolutions
    assert all(torch.equal(m.state_dict()[k], v) for k, v in clean0.items())  # the clean BNs are untouched
    with domain("clean"):
        F.cross_entropy(m(xc), y).backward()
    opt.step()
    moved = 0  # affine parameters behind a zero-init gamma get no gradient yet in either domain
    for mbn, bn0 in zip(_mbns(m), _bns(m0)):
        c, a = mbn.bns.clean, mbn.bns.adv
        for k in ("running_mean", "running_var"):
            assert not torch.equal(getattr(c, k), getattr(a, k))
        assert int(c.num_batches_tracked) == int(a.num_batches_tracked) == 3
        for k in ("weight", "bias"):
            if not (torch.equal(getattr(c, k), getattr(bn0, k)) and torch.equal(getattr(a, k), getattr(bn0, k))):
                moved += 1
                assert not torch.equal(getattr(c, k), getattr(a, k))
    assert moved >= 21

    m.eval()
    set_default_domain(m, "adv")
    want = m(x)
    with domain("clean"):
        assert not torch.allclose(m(x), want)
    with domain("adv"):
        torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="'aux'"):
        set_default_domain(m, "aux")
    with pytest.raises(ValueError, match="no Mixture BN"):
        set_default_domain(m0, "adv")
    with pytest.raises(ValueError, match="'aux'"):
        collapse_mixture_bn(m, "aux")
    assert len(_mbns(m)) == n_bn and all(mbn.default == "adv" for mbn in _mbns(m))

    c = collapse_mixture_bn(copy.deepcopy(m), "adv")
    assert list(c.state_dict()) == list(m0.state_dict()) and not _mbns(c)
    assert all(type(bn) is nn.BatchNorm2d for bn in _bns(c))
    torch.testing.assert_close(c(x), want, rtol=0, atol=0)
    fresh = _tiny_resnet()
    fresh.load_state_dict(c.state_dict(), strict=True)
    torch.testing.assert_close(fresh.eval()(x), want)


def test_efficientnet_batchnorm_act_keeps_its_activation_through_convert_and_collapse() -> None:
    torch.manual_seed(0)
    m0 = timm.create_model("efficientnet_b0", num_classes=10).eval()
    acts = [type(bn.act) for bn in _bns(m0)]
    assert len(acts) == 49 and all(type(bn) is BatchNormAct2d for bn in _bns(m0)) and nn.SiLU in acts
    m = convert_to_mixture_bn(copy.deepcopy(m0)).eval()
    assert len(_mbns(m)) == 49 and [type(mbn.act) for mbn in _mbns(m)] == acts
    assert all(type(bn) is nn.BatchNorm2d for mbn in _mbns(m) for bn in mbn.bns.values())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = m0(x)
    for name in ("clean", "adv"):
        with domain(name):
            torch.testing.assert_close(m(x), ref, rtol=0, atol=0)

    m.train()
    with torch.no_grad(), domain("adv"):  # the adv statistics move away from the clean ones
        m(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 + 1)
    m.eval()
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    with domain("adv"):
        want = m(x)
    assert not torch.allclose(want, ref)
    c = collapse_mixture_bn(copy.deepcopy(m), "adv")
    assert [type(bn) for bn in _bns(c)] == [BatchNormAct2d] * 49 and [type(bn.act) for bn in _bns(c)] == acts
    assert list(c.state_dict()) == list(m0.state_dict())
    torch.testing.assert_close(c(x), want)
    torch.manual_seed(0)
    fresh = timm.create_model("efficientnet_b0", num_classes=10)
    fresh.load_state_dict(c.state_dict(), strict=True)
    torch.testing.assert_close(fresh.eval()(x), want)


def test_torch_syncbatchnorm_before_or_after_conversion() -> None:
    """torch's SyncBatchNorm (what convert_sync_bn uses on CUDA): synced first -> every domain is a SyncBatchNorm with
    the group; Mixture BN first -> torch's converter swaps the per-domain BNs and EfficientNet keeps its SiLUs.
    Collapsing gives plain BatchNorm2d / BatchNormAct2d again (eval mode, one process)."""
    m0 = _tiny_resnet().eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = m0(x)
    first = convert_to_mixture_bn(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(m0)), default="adv")
    after = nn.SyncBatchNorm.convert_sync_batchnorm(convert_to_mixture_bn(copy.deepcopy(m0)))
    for m in (first, after):
        assert len(_mbns(m)) == 21
        assert all(type(bn) is nn.SyncBatchNorm for mbn in _mbns(m) for bn in mbn.bns.values())
        torch.testing.assert_close(m.eval()(x), ref, rtol=0, atol=0)
        c = collapse_mixture_bn(m, "clean")
        assert all(type(bn) is nn.BatchNorm2d for bn in _bns(c)) and list(c.state_dict()) == list(m0.state_dict())
        torch.testing.assert_close(c(x), ref, rtol=0, atol=0)

    torch.manual_seed(0)
    e0 = timm.create_model("efficientnet_b0", num_classes=10).eval()
    e = nn.SyncBatchNorm.convert_sync_batchnorm(convert_to_mixture_bn(copy.deepcopy(e0))).eval()
    assert all(type(bn) is nn.SyncBatchNorm for mbn in _mbns(e) for bn in mbn.bns.values())
    torch.testing.assert_close(e(x), e0(x), rtol=0, atol=0)
    c = collapse_mixture_bn(e, "adv")
    assert all(type(bn) is BatchNormAct2d for bn in _bns(c)) and list(c.state_dict()) == list(e0.state_dict())
    torch.testing.assert_close(c(x), e0(x), rtol=0, atol=0)


def _sync_mbn_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as tdist

    from atscale.layers.sync_bn import convert_sync_bn

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    xc, xa, w = torch.randn(8, 4, 5, 5) - 1, torch.randn(8, 4, 5, 5) * 3 + 1, torch.randn(8, 4, 5, 5)
    part = slice(rank * 4, (rank + 1) * 4)
    cpu = torch.device("cpu")
    synced = convert_sync_bn(nn.Sequential(nn.BatchNorm2d(4)), cpu)
    group = synced[0].process_group
    layers = {"sync_first": convert_to_mixture_bn(synced)[0],
              "mbn_first": convert_sync_bn(convert_to_mixture_bn(nn.Sequential(nn.BatchNorm2d(4))), cpu)[0]}
    res = {}
    for order, mbn in layers.items():
        assert all(type(bn) is DistBatchNorm2d for bn in mbn.bns.values())
        assert all(bn.process_group is not None for bn in mbn.bns.values())
        assert order != "sync_first" or all(bn.process_group is group for bn in mbn.bns.values())
        xl = xa[part].clone().requires_grad_()
        with domain("adv"):
            (mbn(xl) * w[part]).sum().backward()
        g = torch.stack([mbn.bns.adv.weight.grad, mbn.bns.adv.bias.grad])
        tdist.all_reduce(g)
        r = {"dx": xl.grad, "g": g, "clean_grad": mbn.bns.clean.weight.grad,
             "clean_after_adv": [getattr(mbn.bns.clean, k).clone() for k in STATS],
             "adv_after_adv": [getattr(mbn.bns.adv, k).clone() for k in STATS]}
        with torch.no_grad(), domain_split(("clean", 4), ("adv", 4)):  # one pass: clean slice + adv slice
            mbn(torch.cat([xc[part], xa[part]]))
        r["clean"] = [getattr(mbn.bns.clean, k) for k in STATS]
        r["adv"] = [getattr(mbn.bns.adv, k) for k in STATS]
        res[order] = r
    torch.save(res, f"{out}/r{rank}.pt")
    tdist.destroy_process_group()


def test_sync_bn_with_mixture_bn_on_two_gloo_ranks(tmp_path: Path) -> None:
    """Both orders (convert_sync_bn then convert_to_mixture_bn, and the reverse) on 2 gloo ranks: a batch routed to
    'adv' updates only the adv BN, with running statistics, input gradients and summed affine gradients equal to a plain
    BatchNorm2d on the concatenated global batch; a domain_split pass updates each domain with its own global slice."""
    import torch.multiprocessing as mp

    mp.spawn(_sync_mbn_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    xc, xa, w = torch.randn(8, 4, 5, 5) - 1, torch.randn(8, 4, 5, 5) * 3 + 1, torch.randn(8, 4, 5, 5)
    ref_adv, ref_clean, fresh = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
    xr = xa.clone().requires_grad_()
    (ref_adv(xr) * w).sum().backward()
    adv_after_adv = [getattr(ref_adv, k).clone() for k in STATS]
    with torch.no_grad():
        ref_adv(xa)
        ref_clean(xc)
    for r in range(2):
        for order, got in torch.load(tmp_path / f"r{r}.pt").items():
            torch.testing.assert_close(got["dx"], xr.grad[r * 4:(r + 1) * 4], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got["g"], torch.stack([ref_adv.weight.grad, ref_adv.bias.grad]),
                                       rtol=1e-4, atol=1e-5)
            assert got["clean_grad"] is None, order
            for k, a, b, c in zip(STATS, got["clean_after_adv"], got["adv_after_adv"], adv_after_adv):
                torch.testing.assert_close(a, getattr(fresh, k), rtol=0, atol=0, msg=f"{order} clean {k}")
                torch.testing.assert_close(b, c, msg=f"{order} adv {k}")
            for name, ref in (("clean", ref_clean), ("adv", ref_adv)):
                for k, v in zip(STATS, got[name]):
                    torch.testing.assert_close(v, getattr(ref, k), msg=f"{order} {name} {k}")
