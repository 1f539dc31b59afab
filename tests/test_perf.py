"""Speed and memory switches (``perf`` section): each keeps the training step's numerics.

Activation checkpointing must give the same gradients, BN statistics and adversarial examples as the plain step, also
for Mixture BN's concatenated clean + adversarial batch whose domain split is gone by the time backward recomputes;
fused SGD the same update as foreach SGD; ``torch.compile`` the same PGD step within float tolerance; DDP gets the
bucket-view setting; a real run with every switch on trains and checkpoints with unchanged parameter names.
"""
from __future__ import annotations

import copy
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from atscale.attacks import build_attack
from atscale.config import AttackCfg, ConfigError, ObjectiveCfg, OptimCfg, load_config
from atscale.checkpoint import load_checkpoint
from atscale.layers.checkpointing import disable_activation_checkpointing, enable_activation_checkpointing
from atscale.layers.denoise import DenoiseBlock, insert_denoise
from atscale.models.factory import create_model
from atscale.training.objectives import build_objective
from atscale.training.optim import build_optimizer, use_fused
from atscale.runtime import compile_model
from atscale.train import main
from atscale.distributed.updater import DDPUpdater
from conftest import TINY_MODEL, tiny_overrides


def _tiny(bn_domains=(), denoise: bool = False, layers=None) -> torch.nn.Module:
    kwargs = dict(TINY_MODEL["kwargs"], **({"layers": layers} if layers else {}))
    model = create_model("resnet18", 10, TINY_MODEL["mean"], TINY_MODEL["std"], kwargs, True, bn_domains)
    if denoise:
        insert_denoise(model.net, "gaussian")
    return model.train()


def _step(model, objective_name: str, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """One PGD-2 training step's adversarial batch and loss, backward done (grads left on the parameters)."""
    attack = build_attack(AttackCfg(eps=32, step=16, iters=2, targeted=False, clean_start_prob=0.0), seed=3)
    objective = build_objective(ObjectiveCfg(name=objective_name, label_smoothing=0.0))
    x_adv = objective.make_adv(model, attack, x, y)
    out = objective(model, x, x_adv, y)
    out.loss.backward()
    return x_adv, out.loss.detach()


@pytest.mark.parametrize("attack", [True, False])
@pytest.mark.parametrize("objective_name,bn_domains", [("madry", ()), ("mbn", ("clean", "adv"))])
def test_activation_checkpointing_keeps_the_step_exact(digits_val_batch, objective_name, bn_domains, attack) -> None:
    """Same adversarial batch, loss, gradients and BN statistics; a block runs once more per checkpointed backward:
    PGD-2 + update = 3 forwards, +1 for the update's backward, +2 more when the attack's passes are checkpointed."""
    x, y = digits_val_batch[0][:16], digits_val_batch[1][:16]
    torch.manual_seed(0)
    plain = _tiny(bn_domains, denoise=True)
    ckpt = copy.deepcopy(plain)
    n = enable_activation_checkpointing(ckpt, attack=attack)
    assert n == 8 + 4  # 8 basic blocks + 4 denoise blocks (stage ends)
    calls = []
    ckpt.net.layer2[0].conv1.register_forward_hook(lambda *_: calls.append(1))
    last = ckpt.net.layer4[-1]
    assert isinstance(last, DenoiseBlock) and type(last).__name__ == "CheckpointedDenoiseBlock"
    results = [_step(m, objective_name, x, y) for m in (plain, ckpt)]
    assert len(calls) == (6 if attack else 4)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-6)
    grads = {k: p.grad for k, p in plain.named_parameters()}
    for k, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=1e-5, atol=1e-6, msg=k)
    sa, sb = plain.state_dict(), ckpt.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # running statistics updated once per forward, not again by the recomputation
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=k)
    ema = copy.deepcopy(ckpt)
    assert type(ema.net.layer1[0]).__name__ == "CheckpointedBasicBlock"
    assert disable_activation_checkpointing(ckpt) == n and type(ckpt.net.layer1[0]).__name__ == "BasicBlock"


def test_activation_checkpointing_refuses_models_without_known_blocks() -> None:
    with pytest.raises(ValueError, match="no residual blocks"):
        enable_activation_checkpointing(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()))


def test_fused_sgd_matches_foreach_sgd() -> None:
    torch.manual_seed(0)
    models = [_tiny(), None]
    models[1] = copy.deepcopy(models[0])
    cfg = OptimCfg(weight_decay=5e-4)
    opts = [build_optimizer(m, cfg, 256, fused=f) for m, f in zip(models, (False, True))]
    assert opts[1].defaults["fused"] is True and not opts[0].defaults["fused"]
    x = torch.rand(8, 3, 32, 32)
    for _ in range(3):
        for m, o in zip(models, opts):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    ref = dict(models[0].named_parameters())
    for k, p in models[1].named_parameters():
        torch.testing.assert_close(p, ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert use_fused("auto", "sgd", torch.device("cuda")) and not use_fused("auto", "sgd", torch.device("cpu"))
    assert not use_fused("auto", "rmsprop_tf", torch.device("cuda"))
    assert not use_fused("off", "sgd", torch.device("cuda"))
    assert not use_fused("auto", "sgd", torch.device("cuda"), "deepspeed")
    with pytest.raises(ValueError, match="needs optim.name = sgd"):
        use_fused("on", "rmsprop_tf", torch.device("cpu"))


def test_compiled_model_gives_the_same_pgd_step(digits_val_batch) -> None:
    """torch.compile (inductor's CPU backend here) of the model in place: same adversarial batch, loss and gradients
    within float tolerance, same parameter names; the attack (eval BN, frozen parameters) and the update both run it."""
    x, y = digits_val_batch[0][:8], digits_val_batch[1][:8]
    torch.manual_seed(0)
    eager = _tiny(layers=[1, 1, 1, 1])
    compiled = compile_model(copy.deepcopy(eager), "default")
    assert compiled._compiled_call_impl is not None
    (xa, la), (xb, lb) = (_step(m, "madry", x, y) for m in (eager, compiled))
    assert (xa - xb).abs().max().item() <= 16 / 255 + 1e-6  # sign() may flip a pixel's step on a 1e-7 tie
    assert (xa != xb).float().mean().item() < 0.01
    torch.testing.assert_close(lb, la, rtol=1e-3, atol=1e-3)
    grads = {k: p.grad for k, p in eager.named_parameters()}
    for k, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=2e-2, atol=2e-3, msg=k)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    with pytest.raises(ValueError, match="perf.compile"):
        compile_model(eager, "fastest")


def test_ddp_gets_the_bucket_settings(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        for view, cap in ((True, 25.0), (False, 1.0)):
            model = _tiny()
            up = DDPUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"), 1, None,
                            gradient_as_bucket_view=view, bucket_cap_mb=cap)
            assert isinstance(up.module, torch.nn.parallel.DistributedDataParallel)
            assert up.module.gradient_as_bucket_view is view and up.module.bucket_bytes_cap == int(cap * 1024 * 1024)
            up.backward(up.module(torch.rand(2, 3, 32, 32)).square().mean(), last=True)  # all-reduce + step
            assert all(p.grad is None for p in model.parameters())
    finally:
        tdist.destroy_process_group()


def test_run_with_checkpointing_and_fused_sgd_trains_and_resumes(digits_root: Path, tmp_path: Path) -> None:
    over = {"perf.activation_checkpointing": "all", "perf.fused_optimizer": "on", "run.max_steps": 3,
            "model.bn_domains": ["clean", "adv"], "objective.name": "mbn"}
    res = main(load_config(None, tiny_overrides(digits_root, tmp_path, "perf", **over)))
    assert res["stopped"] and res["step"] == 3
    state = load_checkpoint(tmp_path / "perf" / "checkpoints" / "last.pt")
    assert "net.layer1.0.bn1.bns.clean.running_mean" in state["model"]
    start = json.loads((tmp_path / "perf" / "log.jsonl").read_text().splitlines()[0])
    assert start["fused_optimizer"] is True and start["perf"]["activation_checkpointing"] == "all"
    res = main(load_config(None, tiny_overrides(digits_root, tmp_path, "perf", **{
        **over, "run.max_steps": 5, "run.resume": "auto", "perf.fused_optimizer": "off"})))
    assert res["step"] == 5
    starts = [json.loads(line) for line in (tmp_path / "perf" / "log.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "start"]
    assert len(starts) == 2 and starts[1]["fused_optimizer"] is False  # the run's setting, not the checkpoint's
    with pytest.raises(ConfigError, match="perf.compile"):
        load_config(None, tiny_overrides(digits_root, tmp_path, "bad", **{"perf.compile": "fastest"}))
    with pytest.raises(ConfigError, match="not supported"):
        load_config(None, tiny_overrides(digits_root, tmp_path, "bad", **{"perf.compile": "default",
                                                                         "perf.activation_checkpointing": "all"}))
