"""Which pass the network is running: the attacker's input-gradient passes or the optimizer's passes, and which BN domain.

Layers whose behaviour depends on the pass read it from here, so no model code needs extra arguments:
- the Table 5.1 ablation of Smooth Adversarial Training (Xie thesis Sec 5.3) switches an activation's backward pass for
  the attacker only, the optimizer only, or both (``in_attack()``), and keeps the model's own (ReLU) gradient for
  evaluation attacks (``in_evaluation()``: ``atscale.engine.evaluate`` and the evaluation suite enter it);
- Mixture BN / auxiliary BN (Sec 6.4.2, Chapter 7) picks a BN domain per forward pass (``bn_domain()``).
Attacks enter ``attack_pass()`` (``atscale.attacks.base.attack_mode`` does) and the objective's attack domain;
objectives enter ``domain(name)`` or ``domain_split(...)`` for a concatenated clean + adversarial batch.

One process-level switch is not a pass state but a run setting: ``set_stochastic_attack(on)``
(``attack.stochastic_layers``, set once when a run is built) lets dropout, drop path and patch dropout draw as in
training inside the training attack's passes; ``attack_mode`` reads ``stochastic_attack()``. Evaluation attacks (inside ``evaluation()``) never do.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, ContextManager, Iterator

_ATTACK: ContextVar[bool] = ContextVar("atscale_attack_pass", default=False)
_DOMAIN: ContextVar[str | None] = ContextVar("atscale_bn_domain", default=None)
_EVAL: ContextVar[bool] = ContextVar("atscale_evaluation", default=False)
_SPLIT: ContextVar[tuple[tuple[str, int], ...] | None] = ContextVar("atscale_bn_split", default=None)


@contextlib.contextmanager
def attack_pass() -> Iterator[None]:
    """Mark the forward and backward passes run inside as the attacker's (input gradients only)."""
    token = _ATTACK.set(True)
    try:
        yield
    finally:
        _ATTACK.reset(token)


def in_attack() -> bool:
    return _ATTACK.get()


@contextlib.contextmanager
def evaluation() -> Iterator[None]:
    """Mark everything inside (clean passes and evaluation attacks) as evaluation of a trained model."""
    token = _EVAL.set(True)
    try:
        yield
    finally:
        _EVAL.reset(token)


def in_evaluation() -> bool:
    return _EVAL.get()


@contextlib.contextmanager
def domain(name: str | None) -> Iterator[None]:
    """Route every domain-aware BN layer to domain ``name`` (None = the layer's own default) inside the block."""
    token = _DOMAIN.set(name)
    try:
        yield
    finally:
        _DOMAIN.reset(token)


def bn_domain() -> str | None:
    return _DOMAIN.get()


@contextlib.contextmanager
def domain_split(*parts: tuple[str, int]) -> Iterator[None]:
    """One forward pass over concatenated batches: the first n1 images go through domain d1's BN, the next n2 through
    d2's, ... (``domain_split(("clean", n), ("adv", n))``). One pass keeps DDP to one forward per backward."""
    token = _SPLIT.set(tuple((str(d), int(n)) for d, n in parts))
    try:
        yield
    finally:
        _SPLIT.reset(token)


def bn_split() -> tuple[tuple[str, int], ...] | None:
    return _SPLIT.get()


_STOCHASTIC_ATTACK = [False]


def set_stochastic_attack(on: bool) -> None:
    """Process-wide: whether the training attack's passes run dropout / drop path / patch dropout as in training
    (``attack.stochastic_layers``; Singh et al. 2023 and timm-style recipes train ViTs and ConvNeXts with drop path).
    Off (the default) gives the attacker the deterministic network, as BN's running statistics do."""
    _STOCHASTIC_ATTACK[0] = bool(on)


def stochastic_attack() -> bool:
    """The switch of :func:`set_stochastic_attack` (always False inside ``evaluation()``)."""
    return _STOCHASTIC_ATTACK[0] and not _EVAL.get()


_ALL = (_ATTACK, _DOMAIN, _EVAL, _SPLIT)


def snapshot() -> Callable[[], ContextManager[None]]:
    """The pass state now, as a factory of context managers that re-enter it later: activation checkpointing
    recomputes a block's forward inside the backward pass, where the attack pass, BN domain or split that the
    original forward saw may no longer be set (``atscale.layers.checkpointing``)."""
    values = [(var, var.get()) for var in _ALL]

    @contextlib.contextmanager
    def restore() -> Iterator[None]:
        tokens = [(var, var.set(v)) for var, v in values]
        try:
            yield
        finally:
            for var, token in reversed(tokens):
                var.reset(token)

    return restore
