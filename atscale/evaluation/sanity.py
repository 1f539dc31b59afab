"""Signs of gradient masking, as flags over evaluation results and over two cheap model probes.

Athalye, Carlini & Wagner (2018) and Carlini et al. (2019, "On Evaluating Adversarial Robustness") list the symptoms
checked here; PROTOCOLS.md "Evaluation conventions" asks for the first three:
- robust accuracy not falling with more iterations (or restarts) or with a larger eps, or rising;
- a black-box / transfer attack stronger than the white-box attacks at the same (or a larger) budget;
- an unbounded attack (eps = 255/255) not reaching ~0% accuracy;
- input gradients that are zero or non-finite on real images (shattered gradients, non-differentiable front ends);
- a model whose logits differ across two identical calls (randomized defences need EOT, not plain PGD).

Results are the per-attack dicts the suite runner writes (``acc``, ``n``, ``attack``, ``kind``, ``norm``, ``eps`` in
0..255 units, ``steps``, ``restarts``, ``targeted``). Each check returns :class:`Flag` objects; :func:`warn` sends them
to ``logging`` and ``warnings`` so they are seen even when nobody opens eval.json.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("atscale.sanity")

UNBOUNDED_EPS = 255.0
GRADIENT_KINDS = ("white-box",)
BLACK_BOX_KINDS = ("black-box", "transfer")


class GradientMaskingWarning(UserWarning):
    """Raised (as a warning) for every sanity flag of severity warning or error."""


@dataclass
class Flag:
    name: str
    severity: str  # "error": the evaluation cannot be trusted as is; "warning": look before trusting it
    message: str  # one line, with the figures
    figures: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SanityOptions:
    tol: float = 0.002  # accuracy rises smaller than max(tol, 1/n) are noise
    unbounded_max_acc: float = 0.01  # an eps = 255 attack must bring accuracy to at most this
    zero_grad_max_frac: float = 0.01  # share of probe images allowed an all-zero input gradient
    stochastic_rtol: float = 1e-3  # max |logits_1 - logits_2| / max |logits| allowed across two identical calls


def _pct(a: float) -> str:
    return f"{100 * a:.2f}%"


def _attacks(results: dict, kinds: Iterable[str]) -> list[tuple[str, dict]]:
    kinds = tuple(kinds)
    return [(k, r) for k, r in results.items() if r.get("kind") in kinds]


def _tol(opts: SanityOptions, n: int) -> float:
    return max(opts.tol, 1.0 / max(1, n))


def _sweep_flags(results: dict, axis: str, opts: SanityOptions) -> list[Flag]:
    """Along ``axis`` (steps, restarts or eps), with every other setting equal, accuracy must not rise and should fall
    between the weakest and the strongest setting (unless there is nothing left to fool)."""
    others = {"steps": ("eps", "restarts"), "restarts": ("eps", "steps"), "eps": ("steps", "restarts")}[axis]
    groups: dict[tuple, list[tuple[str, dict]]] = {}
    for label, r in _attacks(results, GRADIENT_KINDS):
        if r.get("eps", 0) >= UNBOUNDED_EPS:
            continue
        key = (r.get("attack"), r.get("norm"), bool(r.get("targeted")), r.get("source", "")) + \
            tuple(r.get(o) for o in others)
        groups.setdefault(key, []).append((label, r))
    flags = []
    what = {"steps": "iterations", "restarts": "restarts", "eps": "eps"}[axis]
    for key, members in groups.items():
        members = sorted(members, key=lambda m: m[1][axis])
        if len({m[1][axis] for m in members}) < 2:
            continue
        n = min(m[1]["n"] for m in members)
        tol = _tol(opts, n)
        for (la, a), (lb, b) in zip(members, members[1:]):
            if b[axis] > a[axis] and b["acc"] > a["acc"] + tol:
                flags.append(Flag(f"accuracy_rises_with_{axis}", "error",
                                  f"{lb} ({axis} {b[axis]:g}) leaves {_pct(b['acc'])} accuracy, more than {la} "
                                  f"({axis} {a[axis]:g}) at {_pct(a['acc'])}: a stronger attack must not do worse "
                                  f"(non-monotone attack: gradient masking, randomness, or a bug)",
                                  {"weaker": la, "stronger": lb, "acc_weaker": a["acc"], "acc_stronger": b["acc"]}))
        (lw, w), (ls, s) = members[0], members[-1]
        if s["acc"] >= w["acc"] and w["acc"] > 0 and s[axis] >= 2 * w[axis]:
            flags.append(Flag(f"accuracy_flat_in_{axis}", "warning",
                              f"accuracy does not fall from {lw} ({what} {w[axis]:g}: {_pct(w['acc'])}) to {ls} "
                              f"({what} {s[axis]:g}: {_pct(s['acc'])}); a {s[axis] / w[axis]:g}x stronger attack "
                              f"fooled no further image (gradient masking, or a converged attack on a small set)",
                              {"weaker": lw, "stronger": ls, "acc_weaker": w["acc"], "acc_stronger": s["acc"]}))
    return flags


def check_unbounded(results: dict, opts: SanityOptions = SanityOptions()) -> list[Flag]:
    """An attack with eps = 255/255 can turn any image into any other; a working gradient attack reaches ~0%."""
    flags = []
    for label, r in results.items():
        if r.get("kind") in GRADIENT_KINDS + BLACK_BOX_KINDS and r.get("eps", 0) >= UNBOUNDED_EPS \
                and r["acc"] > opts.unbounded_max_acc:
            flags.append(Flag("unbounded_attack_not_zero", "error",
                              f"{label} with an unbounded budget (eps {r['eps']:g}/255) leaves {_pct(r['acc'])} "
                              f"accuracy, above {_pct(opts.unbounded_max_acc)}: the attack cannot follow the "
                              f"model's gradients (gradient masking) or is broken",
                              {"attack": label, "acc": r["acc"], "max_acc": opts.unbounded_max_acc}))
    return flags


def _beaten_white_box(results: dict, kinds: tuple[str, ...], opts: SanityOptions,
                      same_eps: bool) -> Iterator[tuple[str, dict, str, dict]]:
    """(label, row, white-box label, white-box row) for each row of ``kinds`` clearly more successful than the
    strongest plain white-box row of its norm and targeting (at the same eps, or an equal or larger bounded one)."""
    white = _attacks(results, GRADIENT_KINDS)
    for label, r in _attacks(results, kinds):
        peers = [(lw, w) for lw, w in white if w.get("norm") == r.get("norm")
                 and bool(w.get("targeted")) == bool(r.get("targeted"))
                 and (w["eps"] == r["eps"] if same_eps else r["eps"] <= w["eps"] < UNBOUNDED_EPS)]
        if peers:
            lw, w = min(peers, key=lambda p: p[1]["acc"])
            if r["acc"] < w["acc"] - _tol(opts, min(r["n"], w["n"])):
                yield label, r, lw, w


def check_black_box(results: dict, opts: SanityOptions = SanityOptions()) -> list[Flag]:
    """A black-box or transfer attack beating every white-box attack with the same norm, targeting and an equal or
    larger eps means the white-box gradients are misleading."""
    return [Flag("black_box_stronger_than_white_box", "warning",
                 f"{r['kind']} attack {label} (eps {r['eps']:g}/255) leaves {_pct(r['acc'])} accuracy, below the "
                 f"strongest white-box attack {lw} (eps {w['eps']:g}/255) at {_pct(w['acc'])}: the model's gradients "
                 "mislead the white-box attacks",
                 {"black_box": label, "white_box": lw, "acc_black_box": r["acc"], "acc_white_box": w["acc"]})
            for label, r, lw, w in _beaten_white_box(results, BLACK_BOX_KINDS, opts, same_eps=False)]


def check_adaptive(results: dict, opts: SanityOptions = SanityOptions()) -> list[Flag]:
    """An adaptive row (BPDA through a pre-processor, EOT over randomness; Athalye et al. 2018) beating every plain
    white-box row of its norm, targeting and budget means the plain gradients are obfuscated: only the adaptive
    number may be reported for this defense (the worst case does that)."""
    return [Flag("adaptive_stronger_than_white_box", "warning",
                 f"adaptive attack {label} (through {r.get('through')}) leaves {_pct(r['acc'])} accuracy, below the "
                 f"strongest plain white-box attack {lw} at {_pct(w['acc'])}: the defense's own gradients are "
                 "obfuscated (Athalye et al. 2018); report the adaptive or worst-case number",
                 {"adaptive": label, "white_box": lw, "acc_adaptive": r["acc"], "acc_white_box": w["acc"]})
            for label, r, lw, w in _beaten_white_box(results, ("adaptive",), opts, same_eps=True)]


def check_results(results: dict, opts: SanityOptions = SanityOptions()) -> list[Flag]:
    flags = []
    for axis in ("steps", "restarts", "eps"):
        flags += _sweep_flags(results, axis, opts)
    return flags + check_unbounded(results, opts) + check_black_box(results, opts) + check_adaptive(results, opts)


def _margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y (Carlini-Wagner): never saturates, unlike cross-entropy."""
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
    return (other - logits.gather(1, y.view(-1, 1)).squeeze(1)).sum()


def probe_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    amp_dtype: torch.dtype | None = None) -> dict:
    """Per image, whether the input gradient of the cross-entropy and of the margin loss is all zero or non-finite.

    Runs in :func:`atscale.attacks.attack_mode` (what the attacker sees: eval-mode BN, frozen parameters)."""
    from atscale.attacks.base import attack_mode

    out = {"n": int(y.shape[0])}
    with attack_mode(model), torch.enable_grad():
        for name, loss_fn in (("ce", lambda z, t: F.cross_entropy(z, t, reduction="sum")), ("margin", _margin_loss)):
            xg = x.detach().clone().requires_grad_(True)
            with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(xg).float()
            (g,) = torch.autograd.grad(loss_fn(logits, y), xg, allow_unused=True)
            g = torch.zeros_like(xg) if g is None else g.detach()
            flat = g.flatten(1)
            finite = torch.isfinite(flat).all(1)
            out[f"zero_{name}"] = int(((flat == 0).all(1) & finite).sum())
            out[f"nonfinite_{name}"] = int((~finite).sum())
    return out


@torch.no_grad()
def probe_stochastic(model: nn.Module, x: torch.Tensor) -> dict:
    """Two identical eval-mode calls on the same batch: largest relative logit difference and prediction changes.

    In float32 after a warm-up call, so low-precision rounding or a first-call kernel choice (cuDNN benchmark) does
    not look like randomness."""
    was = model.training
    model.eval()
    model(x)
    a, b = model(x).float(), model(x).float()
    model.train(was)
    scale = a.abs().amax().clamp_min(1e-12)
    return {"n": int(x.shape[0]), "max_rel_diff": float(((a - b).abs().amax() / scale).item()),
            "pred_changed": int((a.argmax(1) != b.argmax(1)).sum())}


def check_probes(probes: dict, opts: SanityOptions = SanityOptions()) -> list[Flag]:
    """Flags from :func:`probe_gradients` / :func:`probe_stochastic` figures (summed over ranks by the runner)."""
    flags = []
    g = probes.get("gradients")
    if g and g["n"]:
        n = g["n"]
        nonfinite = max(g["nonfinite_ce"], g["nonfinite_margin"])
        if nonfinite:
            flags.append(Flag("nonfinite_gradients", "error",
                              f"input gradients are NaN/inf for {nonfinite} of {n} probe images: gradient attacks "
                              f"cannot work on this model (numerical masking)", {"n": n, "nonfinite": nonfinite}))
        if g["zero_margin"] / n > opts.zero_grad_max_frac:
            flags.append(Flag("zero_gradients", "error",
                              f"the input gradient is exactly zero for {g['zero_margin']} of {n} probe images even "
                              f"for the margin loss: a non-differentiable or shattered-gradient component (e.g. "
                              f"quantization) hides the model from gradient attacks; use BPDA / transfer attacks",
                              {"n": n, "zero": g["zero_margin"], "zero_ce": g["zero_ce"]}))
        elif g["zero_ce"] / n > opts.zero_grad_max_frac:
            flags.append(Flag("vanishing_ce_gradients", "warning",
                              f"the cross-entropy input gradient underflows to zero for {g['zero_ce']} of {n} probe "
                              f"images (saturated softmax) while the margin loss still has gradients: CE-based PGD "
                              f"stalls there; use margin/DLR losses (APGD-T, FAB-T, AutoAttack)",
                              {"n": n, "zero_ce": g["zero_ce"]}))
    s = probes.get("stochastic")
    if s and s["n"] and s["max_rel_diff"] > opts.stochastic_rtol:
        flags.append(Flag("stochastic_model", "warning",
                          f"two identical eval-mode calls give logits differing by up to "
                          f"{100 * s['max_rel_diff']:.3g}% of their scale ({s['pred_changed']} of {s['n']} "
                          f"predictions changed): a randomized model needs EOT attacks, plain PGD overestimates "
                          f"robustness", {"n": s["n"], "max_rel_diff": s["max_rel_diff"],
                                          "pred_changed": s["pred_changed"]}))
    return flags


def check_all(results: dict, probes: dict | None = None, opts: SanityOptions = SanityOptions()) -> list[Flag]:
    return check_results(results, opts) + check_probes(probes or {}, opts)


def warn(flags: list[Flag], where: str = "") -> None:
    for f in flags:
        text = f"[{f.severity}] {f.name}: {f.message}" + (f" ({where})" if where else "")
        log.warning(text)
        warnings.warn(text, GradientMaskingWarning, stacklevel=2)
