"""Read the outputs of named submodules during a forward pass (forward hooks, removed on exit). Objectives that need
internal feature maps (JATP's feature-similarity terms, HGD's representation-guided loss) use it, so the training
forward stays one pass through the (DDP-wrapped) model."""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = ["tap", "check_module_names"]


def check_module_names(model: nn.Module, names: Sequence[str], key: str) -> None:
    """Raise a ValueError naming ``key`` and close module names when a name is not a submodule of ``model``."""
    known = [n for n, _ in model.named_modules()]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.4)
            raise ValueError(f"{key} = {name!r} is not a module of the model; close names: {close or known[-5:]}")


@contextmanager
def tap(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """``with tap(model, ["net.layer3"]) as out: model(x)`` -> ``out["net.layer3"]`` is that module's last output."""
    check_module_names(model, names, "module")
    mods = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    handles = [mods[n].register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, o)) for n in names]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
