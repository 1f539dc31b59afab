"""FLOPs per training image of one phase, counted, not assumed, for ``atscale plan`` (:mod:`atscale.planning`).

``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add; convolutions, matmuls and attention;
elementwise ops, BN and softmax uncounted; grouped convolutions' weight gradients counted correctly,
:func:`conv_backward_flop`) over the real parts of one training step, built from the config and run on fake tensors
(``FakeTensorMode``: every op and shape, no arithmetic; real CPU arithmetic where an op has no fake kernel), for each
``data.phases`` phase (image size, attack iterations, token drop):

- forward F: one eval-mode forward of the atscale model (``atscale.defenses.build_model``: the defended model when a pre-processor is set);
- attack: the objective's ``make_adv`` (the training attack of ``attack.*``) with 1 and with 2 iterations; their
  difference is one attack step (about 2F: forward plus input-gradient backward with frozen parameters,
  ``atscale.attacks.base``), and the rest is the attack's fixed part, so k iterations cost fixed + k x step;
- update: ``atscale.training.loop.train_step`` (attack, objective, backward; the optimizer's elementwise update is
  not counted) minus its attack: about 3F per image through the loss, on the clean + adversarial concatenation for
  mixed / mbn / advprop / alp / trades / mart (6F), three domains for advprop_fg (9F), 1 + r for ratio;
- per image = replays x (attack + update) (free training replays each minibatch ``objective.free_replays`` times).

Feature Denoising (Xie thesis Sec 4.5): PGD-30 adversarial training multiplies a step's cost by about (2k + 3) / 3 = 21.
The builders here (:func:`phase_model`, :func:`phase_attack`, :func:`phase_objective`, :func:`synthetic_batch`) are
the ones ``--measure`` (:mod:`atscale.planning.measure`) times.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from fractions import Fraction
from typing import Any, Callable, Iterator

from atscale.config import Config
from atscale.planning.phases import PhaseCost, PhaseSpec, num_classes

COUNTER = ("torch.utils.flop_counter.FlopCounterMode, 2 FLOPs per multiply-add; conv / matmul / attention "
           "only; forward = eval-mode forward, attack = objective.make_adv, update = train_step minus attack")


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed: bool,
                       _output_padding, _groups, output_mask, out_shape, **_: Any) -> int:
    """FLOPs of ``aten.convolution_backward``: torch's count of the input gradient, and the weight gradient counted
    as the forward convolution (the same multiply-adds). torch's own formula ignores ``groups`` in the weight
    gradient, counting a depthwise convolution's (EfficientNet, ConvNeXt) ``groups`` times over."""
    from torch.utils.flop_counter import conv_flop_count

    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, list(out_shape[0]), not transposed)
    if output_mask[1]:
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


def _counter():
    """``FlopCounterMode`` with :func:`conv_backward_flop` and without its per-module tracker: the tracker's backward
    hooks refuse ``torch.autograd.grad`` on leaf inputs ("A leaf node was passed to _will_engine_execute_node"),
    which every attack calls; the global count (all this module reads) is the same."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    class _Global:
        parents = {"Global"}

        def __enter__(self):
            return self

        def __exit__(self, *exc: Any) -> bool:
            return False

    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop})
    counter.mod_tracker = _Global()
    return counter


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn()`` (forward and backward ops alike), counted by ``FlopCounterMode``."""
    with _counter() as c:
        fn()
    return float(c.get_total_flops())


def probe_batch(cfg: Config) -> int:
    """Images per counted step: 2 (BN in train mode needs two), or enough for ``objective.clean_ratio`` to keep its
    exact share of clean images (CleanRatio keeps round(r n))."""
    if cfg.objective.name != "ratio":
        return 2
    return max(2, Fraction(cfg.objective.clean_ratio).limit_denominator(10).denominator)


def phase_model(cfg: Config, spec: PhaseSpec, device):
    """The run's model in train mode, with the phase's token drop (timm ``patch_drop_rate``) when it has one."""
    from atscale.defenses import build_model

    model_cfg = cfg.model
    if spec.token_drop > 0 or "patch_drop_rate" in model_cfg.kwargs:
        model_cfg = replace(model_cfg, kwargs={**model_cfg.kwargs, "patch_drop_rate": spec.token_drop})
    return build_model(model_cfg, cfg.defense, num_classes(cfg)).to(device).train()


def phase_attack(cfg: Config, spec: PhaseSpec, iters: int, amp_dtype=None, seed: int = 0):
    """The run's training attack (``attack.*``) with ``iters`` iterations and the phase's eps and step."""
    from atscale.attacks import build_attack

    return build_attack(replace(cfg.attack, iters=iters, eps=spec.attack_eps, step=spec.attack_step), amp_dtype,
                        seed=seed)


def phase_objective(cfg: Config, seed: int = 0, counting: bool = False):
    """The objective and the loop's batch augmentation (AutoAugment; advprop_fg applies its own). ``counting``: an
    identity in AutoAugment's place (its per-image draws read values, which fake tensors cannot, and it has no
    counted FLOPs)."""
    from atscale.data.augment import AutoAugmentBatch
    from atscale.training.objectives import build_objective

    augment = AutoAugmentBatch(cfg.data.autoaugment, seed) if cfg.data.autoaugment != "none" else None
    if counting and augment is not None:
        augment = _identity
    keep = augment if cfg.objective.name != "advprop_fg" else None
    return build_objective(cfg.objective, augment, cfg.defense), keep


def _identity(x):
    return x


def synthetic_batch(cfg: Config, n: int, size: int, device, classes: int):
    """``n`` seeded uniform [0, 1] images of ``size`` px (channels_last when the model is) and random labels."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g).to(device)
    if cfg.model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, classes, (n,), generator=g).to(device)


@contextlib.contextmanager
def stochastic_attack(on: bool) -> Iterator[None]:
    """``attack.stochastic_layers`` as the run sets it: dropout-like layers (PatchDropout's token drop included) draw
    in the attack's passes too, which changes the attack's FLOPs."""
    from atscale.layers import context

    before = context.stochastic_attack()
    context.set_stochastic_attack(on)
    try:
        yield
    finally:
        context.set_stochastic_attack(before)


def count_phase(cfg: Config, spec: PhaseSpec, fake: bool = True) -> PhaseCost:
    """Count one phase's FLOPs per image on CPU (see the module docstring): forward, the attack at 1 and 2
    iterations, and one real ``train_step``. ``fake``: run them on fake tensors (``FakeTensorMode``: shapes and ops
    without arithmetic, seconds for any model), falling back to real CPU arithmetic for an op that has no fake
    kernel or whose output shape depends on data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with stochastic_attack(cfg.attack.stochastic_layers):
        if fake:
            try:
                with FakeTensorMode(allow_non_fake_inputs=True):
                    return replace(_count_phase(cfg, spec), counted_on="fake")
            except (RuntimeError, NotImplementedError):
                pass
        return _count_phase(cfg, spec)


def _count_phase(cfg: Config, spec: PhaseSpec) -> PhaseCost:
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from atscale.distributed.updater import DDPUpdater
    from atscale.training.loop import train_step

    cpu, n = torch.device("cpu"), probe_batch(cfg)
    with unset_fake_temporarily():  # real parameters; the inputs make the ops fake
        model, (objective, _) = phase_model(cfg, spec, cpu), phase_objective(cfg, counting=True)
        attack1, attack2 = phase_attack(cfg, spec, 1), phase_attack(cfg, spec, 2)
        updater = DDPUpdater(model, torch.optim.SGD(model.parameters(), lr=0.0), cpu, accum=1, amp_dtype=None)
    x, y = synthetic_batch(cfg, n, spec.image_size, cpu, num_classes(cfg))
    model.eval()
    with torch.no_grad():
        forward = count_flops(lambda: model(x))
    model.train()
    run_attack = objective.needs_attack and cfg.objective.name != "free"
    a1 = count_flops(lambda: objective.make_adv(model, attack1, x, y)) if run_attack else 0.0
    a2 = count_flops(lambda: objective.make_adv(model, attack2, x, y)) if run_attack else 0.0
    step = count_flops(lambda: train_step(updater, attack1, objective, x, y, amp_dtype=None))
    return PhaseCost(spec, forward / n, (a2 - a1) / n, (2 * a1 - a2) / n, (step - a1) / n, objective.replays)

