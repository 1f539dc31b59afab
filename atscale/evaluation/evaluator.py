"""The one evaluator: every robust accuracy atscale reports (training's quick checks and final evaluation, ``atscale
eval``, the suites, the fidelity benchmark) comes from :func:`run_suite`.

Accuracy rule (AutoAttack / RobustBench): an image counts as robust only if it is classified correctly both clean and
under the attack (the clean image lies in every eps-ball), so an attacked accuracy never exceeds the clean one; the
attacked-only accuracy (``adv_acc``) is reported beside it. Every attack of a suite restarts from the same seed, so all
see the same random starts and targets. Distributed: each rank evaluates the strided shard ``rank::world`` of the val
set and the counts are all-reduced, so every image counts exactly once; ``max_images`` keeps the first images of the
whole set.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from atscale import distributed as dist
from atscale.errors import ConfigError
from atscale.evaluation import sanity
from atscale.evaluation.adaptive_views import adaptive_view
from atscale.evaluation.suites import AttackSpec, Suite, build_attack
from atscale.layers.context import evaluation
from atscale.runtime import autocast

_FIELDS = ("correct", "adv_correct", "hit_target", "clean_fooled")
_EMPTY_PROBE = {"gradients": {"n": 0, "zero_ce": 0, "nonfinite_ce": 0, "zero_margin": 0, "nonfinite_margin": 0},
                "stochastic": {"n": 0, "max_rel_diff": 0.0, "pred_changed": 0}}


def rank_share(max_images: int) -> int | None:
    """This rank's part of the first ``max_images`` images of the val set sharded ``rank::world`` (None: all)."""
    return len(range(dist.rank(), max_images, dist.world_size())) if max_images else None


def first_images(batches: Iterable, limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches, the last one cut, until ``limit`` images have come out (None: all of them)."""
    seen = 0
    for x, y in batches:
        if limit is not None:
            if seen >= limit:
                return
            x, y = x[: limit - seen], y[: limit - seen]
        seen += y.shape[0]
        yield x, y


@dataclass
class Tally:
    """Counts over this rank's images, summed over ranks by :meth:`reduce`."""

    specs: list[AttackSpec]
    aggregates: dict[str, list[str]]
    n: int = 0
    clean_correct: int = 0
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    agg_correct: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stats = {s.label: dict.fromkeys(_FIELDS, 0) for s in self.specs}
        self.agg_correct = dict.fromkeys(self.aggregates, 0)
        self.seconds = dict.fromkeys([s.label for s in self.specs], 0.0)

    def add_attack(self, label: str, clean_ok: torch.Tensor, pred: torch.Tensor, y: torch.Tensor,
                   target: torch.Tensor | None) -> torch.Tensor:
        """Count one batch of one attack; returns its robust mask (clean-correct and attacked-correct)."""
        adv_ok = pred == y
        ok = adv_ok & clean_ok
        st = self.stats[label]
        st["correct"] += int(ok.sum())
        st["adv_correct"] += int(adv_ok.sum())
        st["clean_fooled"] += int((clean_ok & ~adv_ok).sum())
        if target is not None:
            st["hit_target"] += int((pred == target).sum())
        return ok

    def add_aggregates(self, clean_ok: torch.Tensor, robust: dict[str, torch.Tensor]) -> None:
        for agg, members in self.aggregates.items():
            ok = clean_ok.clone()
            for m in members:
                ok &= robust.get(m, clean_ok)
            self.agg_correct[agg] += int(ok.sum())

    def reduce(self, probe: dict | None, device: torch.device) -> None:
        """Sum the counts (and the probes') over ranks; times and the stochastic probe's difference take the max."""
        labels = [s.label for s in self.specs]
        pkeys = [("gradients", k) for k in probe["gradients"]] + [("stochastic", "n"), ("stochastic", "pred_changed")] \
            if probe else []
        counts = [self.n, self.clean_correct] + [self.stats[lb][f] for lb in labels for f in _FIELDS] \
            + list(self.agg_correct.values()) + [probe[a][b] for a, b in pkeys]
        tot = iter(int(v) for v in dist.all_reduce_sum(torch.tensor(counts, dtype=torch.float64,
                                                                     device=device)).tolist())
        self.n, self.clean_correct = next(tot), next(tot)
        for lb in labels:
            self.stats[lb] = {f: next(tot) for f in _FIELDS}
        self.agg_correct = {agg: next(tot) for agg in self.agg_correct}
        for a, b in pkeys:
            probe[a][b] = next(tot)
        maxes = _reduce_max([self.seconds[lb] for lb in labels]
                            + ([probe["stochastic"]["max_rel_diff"]] if probe else []), device)
        self.seconds = dict(zip(labels, maxes))
        if probe:
            probe["stochastic"]["max_rel_diff"] = maxes[-1]


def _reduce_max(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values or [0.0], dtype=torch.float64, device=device)
    if dist.is_dist():
        import torch.distributed as tdist

        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t.tolist()


def _shard_size(loader) -> int | None:
    idx = getattr(getattr(loader, "loader", None), "indices", None)
    return len(idx) if idx is not None else None


class _Progress:
    """The evaluator's bar: images done (of this rank's shard), the attack running with its index ("final eval pgd10
    (3/5)") and the running clean accuracy. Every attack is shown as it starts on the first batch; after that the
    line is redrawn at most once per ``mininterval`` seconds."""

    def __init__(self, total: int | None, desc: str, labels: list[str], *, enabled: bool, mininterval: float = 1.0):
        self.desc, self.labels, self.mininterval = desc, labels, mininterval
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True,
                        mininterval=mininterval, leave=False)
        self.first_batch, self.last = True, 0.0

    def clean(self, correct: int, seen: int) -> None:
        self.bar.set_postfix({"clean": f"{correct / max(1, seen):.3f}"}, refresh=False)

    def attack(self, i: int) -> None:
        self.bar.set_description_str(f"{self.desc} {self.labels[i]} ({i + 1}/{len(self.labels)})", refresh=False)
        now = time.monotonic()
        if self.first_batch or now - self.last >= self.mininterval:
            self.bar.refresh()
            self.last = now

    def done(self, images: int) -> None:
        self.first_batch = False
        self.bar.update(images)

    def close(self) -> None:
        self.bar.close()


def run_suite(model: nn.Module, loader, suite: Suite, *, amp_dtype: torch.dtype | None = None, max_images: int = 0,
              seed: int = 0, progress: bool = True, probes: bool = True,
              surrogates: dict[str, nn.Module] | None = None, sanity_opts: sanity.SanityOptions | None = None,
              desc: str | None = None) -> dict:
    """Every row of ``suite`` over the loader (this rank's strided shard); counts summed over ranks.

    Returns ``{"suite", "results": {label: {"acc", "adv_acc", "success_rate", "n", ...}}, "probes", "flags", "n",
    "world_size", "seconds", "img_per_s"}``. ``probes``: the gradient-masking probes and checks of
    :mod:`atscale.evaluation.sanity` (off for training's quick checks)."""
    surrogates = surrogates or {}
    for s in suite.attacks:
        if s.source and s.source not in surrogates:
            raise ConfigError(f"transfer attack {s.label!r} needs its source model {s.source!r}",
                              "pass the source checkpoint's model in surrogates")
    was_training = model.training
    model.eval()
    try:
        with evaluation(), torch.no_grad():
            return _run(model, loader, suite, amp_dtype=amp_dtype, max_images=max_images, seed=seed,
                        progress=progress, probes=probes, surrogates=surrogates,
                        opts=sanity_opts or sanity.SanityOptions(), desc=desc or f"suite {suite.name}")
    finally:
        model.train(was_training)


def _run(model, loader, suite, *, amp_dtype, max_images, seed, progress, probes, surrogates, opts, desc) -> dict:
    specs = suite.attacks
    attacks = {s.label: build_attack(s, amp_dtype, seed + 1) for s in specs}
    views = {s.label: adaptive_view(model, s.through) for s in specs}
    device = next(model.parameters()).device
    tally = Tally(specs, suite.aggregates)
    probe: dict = {}
    limit, total = rank_share(max_images), _shard_size(loader)
    total = min(total, limit) if total is not None and limit is not None else total
    bar = _Progress(total, desc, [s.label for s in specs], enabled=progress and dist.rank() == 0)
    t0 = time.perf_counter()
    for x, y in first_images(loader, limit):
        with autocast(device, amp_dtype):
            clean_ok = model(x).argmax(1) == y
        tally.clean_correct += int(clean_ok.sum())
        bar.clean(tally.clean_correct, tally.n + y.shape[0])
        if probes and not probe:
            probe = {"gradients": sanity.probe_gradients(model, x, y, amp_dtype),
                     "stochastic": sanity.probe_stochastic(model, x)}
        robust = {}
        for i, s in enumerate(specs):
            bar.attack(i)
            t1 = time.perf_counter()
            with torch.enable_grad():
                res = attacks[s.label].perturb(surrogates[s.source] if s.source else views[s.label], x, y)
            with autocast(device, amp_dtype):
                pred = model(res.x_adv).argmax(1)
            tally.seconds[s.label] += time.perf_counter() - t1
            robust[s.label] = tally.add_attack(s.label, clean_ok, pred, y, res.target)
        tally.add_aggregates(clean_ok, robust)
        tally.n += y.shape[0]
        bar.done(y.shape[0])
    bar.close()
    seconds = _reduce_max([time.perf_counter() - t0], device)[0]
    if probes:
        probe = probe or {k: dict(v) for k, v in _EMPTY_PROBE.items()}
    tally.reduce(probe if probes else None, device)
    results = _results(tally, suite)
    flags = sanity.check_all(results, probe if probes else None, opts)
    return {"suite": suite.to_dict(), "results": results, "probes": probe, "flags": [f.to_dict() for f in flags],
            "n": tally.n, "world_size": dist.world_size(), "seconds": seconds,
            "img_per_s": tally.n / max(1e-9, seconds)}


def _results(t: Tally, suite: Suite) -> dict[str, dict]:
    n, clean = max(1, t.n), t.clean_correct
    results = {"clean": {"acc": clean / n, "n": t.n, "attack": "clean", "kind": "clean", "eps": 0.0, "steps": 0}}
    for s in t.specs:
        st = t.stats[s.label]
        rate = st["hit_target"] / n if s.targeted else st["clean_fooled"] / max(1, clean)
        results[s.label] = {"acc": st["correct"] / n, "adv_acc": st["adv_correct"] / n, "success_rate": rate,
                            "n": t.n, **s.describe(), "seconds": t.seconds[s.label]}
    for agg, members in suite.aggregates.items():
        ms = [results[m] for m in members]
        results[agg] = {"acc": t.agg_correct[agg] / n, "n": t.n, "attack": "worst-case", "kind": "aggregate",
                        "of": list(members), "eps": max(m["eps"] for m in ms), "steps": max(m["steps"] for m in ms),
                        "norm": ms[0]["norm"], "targeted": all(m.get("targeted") for m in ms),
                        "success_rate": 1 - t.agg_correct[agg] / max(1, clean)}
    return results


__all__ = ["run_suite", "rank_share", "first_images", "Tally"]
