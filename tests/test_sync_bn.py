"""Synchronized BN (``atscale.layers.sync_bn``) on a real 2-rank gloo group: a timm EfficientNet twin (``BatchNormAct2d``
with SiLU, plus a plain ``nn.BatchNorm2d`` in front) whose two ranks each see half of a batch behaves exactly like the
unconverted model on the whole batch (outputs, input and parameter gradients, running statistics), alone and combined
with Mixture BN in either order; the CUDA converter keeps activations; BN kinds it cannot synchronize are refused.

One spawn of 2 processes runs every distributed scenario (module-scoped fixture); the tests compare its results with
single-process references computed here. A hang fails after ``_TIMEOUT_S`` instead of blocking the suite."""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.layers.norm_act import SyncBatchNormAct
from torch import nn

from atscale.errors import ModelError
from atscale.layers.mixture_bn import MixtureBatchNorm2d, convert_to_mixture_bn
from atscale.layers.sync_bn import DistBatchNorm2d, DistBatchNormAct2d, convert_sync_bn

WORLD, N = 2, 8  # 2 ranks, 4 images each
LOCAL = N // WORLD
DOMAINS = ("clean", "adv")
SCENARIOS = ("sync", "mbn_then_sync", "sync_then_mbn", "sync_identity_act", "unsynced")
_TIMEOUT_S = 120.0


def _model() -> nn.Module:
    """The EfficientNet tiny twin (timm ``BatchNormAct2d``: SiLU after most BNs, Identity after the projections) with a
    plain ``nn.BatchNorm2d`` on the input, so both of the CPU converter's layer kinds are exercised."""
    return nn.Sequential(nn.BatchNorm2d(3), timm.create_model("test_efficientnet", num_classes=10))


def _initial() -> dict:
    """Initial weights with non-trivial BN state (affine parameters, running statistics, batch counter), so a
    converter that forgot to copy any of it would be caught; a fixed batch and labels."""
    torch.manual_seed(0)
    model = _model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, 32, 32, generator=gen) * 1.5 + 0.3
    y = torch.randint(0, 10, (N,), generator=gen)
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "x": x, "y": y}


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over this process's images / the global batch: summed over ranks it is the global-batch mean loss."""
    return F.cross_entropy(out, y, reduction="sum") / N


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One train-mode forward + backward; outputs, input and parameter gradients, and the state after the step."""
    model.train()
    x = x.clone().requires_grad_()
    out = model(x)
    _loss(out, y).backward()
    return {"out": out.detach(), "dx": x.grad.detach(),
            "grads": {k: None if p.grad is None else p.grad.detach().clone() for k, p in model.named_parameters()},
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _build(scenario: str, state: dict) -> nn.Module:
    model = _model()
    model.load_state_dict(state)
    cpu = torch.device("cpu")
    if scenario in ("sync", "sync_identity_act"):
        model = convert_sync_bn(model, cpu)
    elif scenario == "mbn_then_sync":
        model = convert_sync_bn(convert_to_mixture_bn(model, DOMAINS, default="clean"), cpu)
    elif scenario == "sync_then_mbn":
        model = convert_to_mixture_bn(convert_sync_bn(model, cpu), DOMAINS, default="clean")
    if scenario == "sync_identity_act":  # mutation: the activation dropped during conversion
        for m in model.modules():
            if isinstance(m, DistBatchNormAct2d):
                m.act = nn.Identity()
    return model


def _layers(model: nn.Module) -> dict:
    """name -> (BN class, activation class or None, has a process group) for every BN-like layer."""
    info = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, MixtureBatchNorm2d)):
            act = getattr(m, "act", None)
            info[name] = (type(m).__name__, None if act is None else type(act).__name__,
                          getattr(m, "process_group", None) is not None)
    return info


def _worker(rank: int, port: int, tmp: str) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                             timeout=timedelta(seconds=60))
    try:
        data = torch.load(f"{tmp}/in.pt")
        sl = slice(rank * LOCAL, (rank + 1) * LOCAL)
        results = {}
        for scenario in SCENARIOS:
            model = _build(scenario, data["state"])
            layers = _layers(model)
            res = _step(model, data["x"][sl], data["y"][sl])
            for g in res["grads"].values():  # local grads are partial sums of the global-batch gradient
                if g is not None:
                    tdist.all_reduce(g)
            res["layers"] = layers
            results[scenario] = res
        torch.save(results, f"{tmp}/r{rank}.pt")
    finally:
        tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("sync_bn")
    data = _initial()
    torch.save(data, tmp / "in.pt")
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    deadline = time.monotonic() + _TIMEOUT_S
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
            pytest.fail(f"the {WORLD} gloo ranks did not finish within {_TIMEOUT_S:.0f} s (hang in a collective?)")
    ranks = [torch.load(tmp / f"r{r}.pt") for r in range(WORLD)]
    return {"data": data, "ranks": ranks}


@pytest.fixture(scope="module")
def reference(dist_results: dict) -> dict:
    """The unconverted model, one process, on the whole batch."""
    data = dist_results["data"]
    model = _model()
    model.load_state_dict(data["state"])
    return _step(model, data["x"], data["y"])


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    a, b = a.double(), b.double()
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(1.0, b.abs().max().item()), msg=what)


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))


def _mixture_key(key: str, domain: str = "clean") -> str:
    """A Mixture BN key of ``domain`` -> the plain model's key (``stem.bns.clean.weight`` -> ``stem.weight``)."""
    return key.replace(f".bns.{domain}.", ".")


def _check_equivalent(dist_results: dict, reference: dict, scenario: str, mixture: bool) -> None:
    initial = dist_results["data"]["state"]
    for rank, res in enumerate(dist_results["ranks"]):
        res = res[scenario]
        sl = slice(rank * LOCAL, (rank + 1) * LOCAL)
        _close(res["out"], reference["out"][sl], f"{scenario}: rank {rank} outputs")
        _close(res["dx"], reference["dx"][sl], f"{scenario}: rank {rank} input gradients")
        seen = set()
        for key, value in res["state"].items():
            if mixture and ".bns.adv." in key:  # the unused domain: untouched
                ref_key = _mixture_key(key, "adv")
                torch.testing.assert_close(value, initial[ref_key], rtol=0, atol=0, msg=f"{scenario}: {key}")
                continue
            ref_key = _mixture_key(key) if mixture else key
            seen.add(ref_key)
            if key.endswith("num_batches_tracked"):
                assert value.item() == reference["state"][ref_key].item() == 4, f"{scenario}: {key}"
            else:
                _close(value, reference["state"][ref_key], f"{scenario}: rank {rank} {key}")
        assert seen == set(reference["state"]), f"{scenario}: state keys differ"
        seen = set()
        for name, g in res["grads"].items():
            if mixture and ".bns.adv." in name:
                assert g is None, f"{scenario}: the unused domain's {name} got a gradient"
                continue
            ref_name = _mixture_key(name) if mixture else name
            seen.add(ref_name)
            ref = reference["grads"][ref_name]
            assert g is not None and ref is not None, f"{scenario}: no gradient for {name}"
            _close(g, ref, f"{scenario}: rank {rank} all-reduced gradient of {name}")
        assert seen == set(reference["grads"]), f"{scenario}: parameter names differ"


def test_efficientnet_sync_bn_on_two_ranks_equals_one_process_on_the_global_batch(dist_results: dict,
                                                                                   reference: dict) -> None:
    """Outputs per rank = the matching slice of the single-process output; running mean/var and batch counters of every
    BN = the single-process ones; input gradients and summed parameter gradients (loss = local sum / 8 per rank) =
    those of the single-process global-batch mean loss."""
    _check_equivalent(dist_results, reference, "sync", mixture=False)
    # the reference really depends on the whole batch: plain BN on each half differs (the check above is sensitive)
    for rank, res in enumerate(dist_results["ranks"]):
        sl = slice(rank * LOCAL, (rank + 1) * LOCAL)
        assert _differs(res["unsynced"]["out"], reference["out"][sl]), "unsynchronized BN should not match"
        assert _differs(res["unsynced"]["state"]["1.bn1.running_mean"], reference["state"]["1.bn1.running_mean"])


def test_conversion_keeps_activations_and_leaves_no_plain_bn(dist_results: dict, reference: dict) -> None:
    before = _layers(_model())
    assert sum(act == "SiLU" for _, act, _ in before.values()) >= 5  # the twin really has BN + SiLU layers
    for rank, res in enumerate(dist_results["ranks"]):
        after = res["sync"]["layers"]
        assert after.keys() == before.keys()
        for name, (cls, act, has_group) in after.items():
            old_cls, old_act, _ = before[name]
            assert cls == {"BatchNormAct2d": "DistBatchNormAct2d", "BatchNorm2d": "DistBatchNorm2d"}[old_cls], name
            assert act == old_act, f"rank {rank}: {name} activation {old_act} became {act}"
            assert has_group, f"rank {rank}: {name} has no process group of its own"
        # mutation: the same sync BN with its activations dropped does not match the reference
        sl = slice(rank * LOCAL, (rank + 1) * LOCAL)
        assert _differs(res["sync_identity_act"]["out"], reference["out"][sl]), "dropping the activation went unseen"
    # the converter itself, in one process (group None): classes and activation modules kept, nothing plain left
    model = _model()
    acts = {name: m.act for name, m in model.named_modules() if isinstance(m, BatchNormAct2d)}
    convert_sync_bn(model, torch.device("cpu"))
    for name, m in model.named_modules():
        assert type(m) not in (BatchNormAct2d, nn.BatchNorm2d), f"{name} left unsynchronized"
        if name in acts:
            assert isinstance(m, DistBatchNormAct2d) and m.act is acts[name], name
    assert isinstance(model[0], DistBatchNorm2d) and not isinstance(model[0], DistBatchNormAct2d)


@pytest.mark.parametrize("scenario", ["mbn_then_sync", "sync_then_mbn"])
def test_mixture_bn_with_sync_bn_in_either_order(dist_results: dict, reference: dict, scenario: str) -> None:
    """Mixture BN + sync BN (either order), default domain: outputs, gradients and the clean domain's running statistics
    equal the plain single-process model on the whole batch; the adv domain is untouched and gets no gradient."""
    _check_equivalent(dist_results, reference, scenario, mixture=True)
    for rank, res in enumerate(dist_results["ranks"]):
        layers = res[scenario]["layers"]
        mbns = {n for n, (cls, _, _) in layers.items() if cls == "MixtureBatchNorm2d"}
        assert len(mbns) == 14  # the input BN and the 13 BatchNormAct2d
        for name in mbns:
            for d in DOMAINS:
                cls, _, has_group = layers[f"{name}.bns.{d}"]
                assert cls == "DistBatchNorm2d" and has_group, f"{scenario}: {name}.bns.{d} is {cls}"
        # the shared activation of a former BatchNormAct2d is kept on the Mixture BN layer
        assert layers["1.bn1"][1] == "SiLU" and layers["0"][1] == "Identity"


def test_cuda_path_swaps_modules_and_keeps_activations() -> None:
    """``device=cuda`` uses timm's converter (module swap only, runs without a GPU): BatchNormAct2d -> SyncBatchNormAct
    with the same activation and drop modules, nn.BatchNorm2d -> nn.SyncBatchNorm. No forward is run."""
    torch.manual_seed(0)
    model = _model()
    acts = {name: (m.act, m.drop) for name, m in model.named_modules() if isinstance(m, BatchNormAct2d)}
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(acts) == 13
    out = convert_sync_bn(model, torch.device("cuda"))
    mods = dict(out.named_modules())
    for name, (act, drop) in acts.items():
        m = mods[name]
        assert type(m) is SyncBatchNormAct, f"{name} is {type(m).__name__}"
        assert m.act is act and m.drop is drop, name
        torch.testing.assert_close(m.weight, weights[name])
    assert type(mods["0"]) is nn.SyncBatchNorm
    torch.testing.assert_close(mods["0"].weight, weights["0"])
    assert sum(isinstance(m.act, nn.SiLU) for m in mods.values() if isinstance(m, SyncBatchNormAct)) >= 5
    for name, m in mods.items():
        assert not (isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)), name


@pytest.mark.parametrize("bn", [lambda: nn.BatchNorm1d(4), lambda: nn.BatchNorm3d(4),
                                lambda: type("MyBN2d", (nn.BatchNorm2d,), {})(4)], ids=["bn1d", "bn3d", "bn2d_subclass"])
def test_unsupported_bn_kind_is_refused_on_cpu_even_on_one_rank(bn) -> None:
    import torch.distributed as tdist

    assert not (tdist.is_available() and tdist.is_initialized())  # a 1-rank world: still refused
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(bn(), nn.ReLU()))
    with pytest.raises(ModelError, match=r"dist\.sync_bn"):
        convert_sync_bn(model, torch.device("cpu"))
