"""Evaluation suites as data: :class:`AttackSpec` rows (budgets in 0..255 pixel units, converted by
:mod:`atscale.config.units` when the attack is built) plus optional worst-case aggregates. The one evaluator that runs
them is :mod:`atscale.evaluation.evaluator`. Suites (PROTOCOLS.md):

- ``run``: the run's own evaluation, from its ``eval`` config: clean + PGD-k for each k in ``eval.steps`` at
  ``eval.eps`` (what ``atscale train`` reports at the end); its quick check is clean + PGD-``eval.quick_steps``.
- ``quick``: clean + PGD-10 at the run's eval budget.
- ``fd``: the Feature Denoising track (Xie thesis Sec 4.5): targeted PGD-10/100/1000/2000, eps 16, step 1 (the 10-step
  attack uses eps/10 = 1.6), random start.
- ``robustbench``: the RobustBench ImageNet track, Linf eps 4/255: clean + AutoAttack "standard" (APGD-CE, APGD-T,
  FAB-T, Square); also writes a RobustBench model-info JSON.
- ``defense``: pre-processing defenses (issue 14): PGD-40 through the full model, with BPDA and with EOT
  (:mod:`atscale.evaluation.adaptive_views`), targeted PGD-40, APGD-DLR, TI-BIM, Square and AutoAttack, worst case.
- ``unseen``: the ARN paper's attack types, each in its own threat model: L-inf PGD (untargeted, targeted), L2 DDN /
  CW-L2 / PGD, STA (flow budget in pixels), FWA (Wasserstein budget); worst cases within a threat model only.
- ``full``: white-box PGD over steps 1..1000, with restarts, over eps/4..2 eps, AutoAttack, Square (black-box) and an
  unbounded (eps 255) PGD: the sweeps the gradient-masking checks of :mod:`atscale.evaluation.sanity` compare.

Every PGD-k row steps by :func:`atscale.config.units.pgd_step` = max(step, eps / k), so it can reach the boundary of its
budget; a row whose iterations cannot reach it (an FGSM-family attack with steps x step < eps) is refused.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from atscale.attacks import ATTACK_NAMES, NORMS, OWN_NORM, default_transfer_iters, make_attack
from atscale.config import EvalCfg
from atscale.config.units import OWN_UNITS, STEP_RULE, budget_fraction, pgd_step, to_fraction
from atscale.errors import ConfigError
from atscale.evaluation.adaptive_views import check_through

BLACK_BOX = ("square",)
_FGSM_FAMILY = ("i-fgsm", "mi-fgsm", "di2-fgsm", "m-di2-fgsm", "ti-fgsm")
KINDS = ("clean", "white-box", "black-box", "transfer", "adaptive")


@dataclass
class AttackSpec:
    """One row of a suite. ``eps`` / ``step`` in 0..255 pixel units (L2: the L2 norm of the perturbation x 255).

    ``step`` 0 = eps / steps for PGD (as ``atscale eval --step 0``), the attack's own default otherwise; a positive PGD
    step is raised to eps / steps when smaller, so k steps can reach the boundary (Feature Denoising: "the 10-step
    attack uses eps/10 = 1.6"). ``steps`` is the iteration count (Square: queries). ``source``: a checkpoint whose
    model crafts the examples (a transfer attack)."""

    label: str
    attack: str = "pgd"  # "clean" or a name of atscale.attacks.make_attack
    eps: float = 0.0
    steps: int = 0
    step: float = 0.0
    norm: str = "linf"
    restarts: int = 1
    targeted: bool = False
    random_start: bool = True
    kind: str = ""  # "" = derived: clean | white-box | black-box (Square) | transfer (source set)
    source: str = ""
    kwargs: dict = field(default_factory=dict)  # passed to make_attack
    through: str = ""  # what the attack differentiates: "" | bpda | eot<N> | bpda+eot<N> (evaluation.adaptive_views)

    def __post_init__(self) -> None:
        own = OWN_NORM.get(self.attack)
        if own and self.norm == "linf":
            self.norm = own  # the row left the default: the attack's own threat model
        if (own and self.norm != own) or self.norm not in NORMS or (not own and self.norm in OWN_UNITS):
            raise ConfigError(f"suite attack {self.label!r}: norm {self.norm!r} does not fit attack {self.attack!r}",
                              f"use norm {own or 'linf'!r}" + ("" if own else " (or 'l2' where the attack has it)"))
        if not self.kind:
            self.kind = ("clean" if self.attack == "clean" else "transfer" if self.source else
                         "black-box" if self.attack in BLACK_BOX else "adaptive" if self.through else "white-box")
        check_through(self.through, self.label)
        if self.attack != "clean" and self.attack not in ATTACK_NAMES:
            raise ConfigError(f"suite attack {self.label!r}: unknown attack {self.attack!r}; one of "
                              f"{', '.join(ATTACK_NAMES)} (or clean)")
        if self.kind not in KINDS:
            raise ConfigError(f"suite attack {self.label!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.attack != "clean":
            if not 0 < self.eps <= 255 and self.norm == "linf":
                raise ConfigError(f"suite attack {self.label!r}: eps {self.eps} is out of range; budgets are in "
                                  f"0..255 pixel units (16 means 16/255)")
            if self.steps < 0 or (self.steps < 1 and self.attack not in _FGSM_FAMILY) or self.restarts < 1:
                raise ConfigError(f"suite attack {self.label!r}: steps and restarts must be >= 1")
            if self.step < 0:
                raise ConfigError(f"suite attack {self.label!r}: step {self.step} is negative; give a step in 0..255 "
                                  "pixel units (0 = the attack's default)")
            self._check_reach()

    @property
    def step_size(self) -> float:
        """PGD step in 0..255 units: the one step rule, max(step, eps / k)."""
        return pgd_step(self.eps, self.steps, self.step)

    def _check_reach(self) -> None:
        """Refuse rows whose attack cannot reach the boundary of its own budget."""
        if self.attack == "pgd" and "step" in self.kwargs:
            raise ConfigError(f"suite attack {self.label!r}: give the PGD step as the row's 'step' (stepped by "
                              f"{STEP_RULE}), not in kwargs")
        if self.attack not in _FGSM_FAMILY:
            return
        iters = self.steps or default_transfer_iters(to_fraction(self.eps))
        step = self.step or 1.0  # the family's default step is 1/255
        if step * iters < self.eps:
            raise ConfigError(f"suite attack {self.label!r}: {iters} steps of {step:g}/255 cannot reach eps "
                              f"{self.eps:g}/255, so its accuracy would overstate robustness",
                              f"use steps >= {math.ceil(self.eps / step)} or a larger step")

    def describe(self) -> dict:
        d = {"attack": self.attack, "kind": self.kind, "norm": self.norm, "eps": float(self.eps),
             "steps": int(self.steps), "restarts": int(self.restarts), "targeted": bool(self.targeted)}
        if self.attack == "pgd":
            d.update(step=self.step_size, step_rule=STEP_RULE, random_start=self.random_start)
        if self.source:
            d["source"] = self.source
        if self.through:
            d["through"] = self.through
        return d


@dataclass
class Suite:
    name: str
    specs: list[AttackSpec]
    description: str = ""
    aggregates: dict[str, list[str]] = field(default_factory=dict)  # label -> spec labels; robust only to all
    robustbench: bool = False  # write the RobustBench model-info JSON (Linf eps 4/255 track)

    def __post_init__(self) -> None:
        labels = [s.label for s in self.specs]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ConfigError(f"suite {self.name!r}: attack labels must be unique; repeated: {dup}")
        if "clean" in labels and next(s for s in self.specs if s.label == "clean").attack != "clean":
            raise ConfigError(f"suite {self.name!r}: the label 'clean' is reserved for clean accuracy")
        for agg, members in self.aggregates.items():
            missing = [m for m in members if m not in labels]
            if agg in labels or missing or not members:
                raise ConfigError(f"suite {self.name!r}: aggregate {agg!r} must name existing attacks (unknown: "
                                  f"{missing}) and not reuse an attack's label")
            norms = sorted({s.norm for s in self.specs if s.label in members})
            if len(norms) > 1:
                raise ConfigError(f"suite {self.name!r}: aggregate {agg!r} mixes threat models {norms}; a worst case "
                                  "is an accuracy at one budget", "aggregate the rows of one norm at a time")

    @property
    def attacks(self) -> list[AttackSpec]:
        return [s for s in self.specs if s.attack != "clean"]

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "robustbench": self.robustbench,
                "attacks": [asdict(s) for s in self.specs], "aggregates": self.aggregates}


def _pgd(label: str, eps: float, steps: int, step: float = 0.0, **kw: Any) -> AttackSpec:
    return AttackSpec(label, "pgd", eps=eps, steps=steps, step=step, **kw)


def _quick(eps: float, step: float, targeted: bool) -> Suite:
    return Suite("quick", [AttackSpec("clean", "clean"), _pgd("pgd10", eps, 10, step, targeted=targeted)],
                 f"clean + PGD-10, eps {eps:g}/255, {'targeted' if targeted else 'untargeted'}")


def _fd(eps: float, step: float, targeted: bool) -> Suite:
    specs = [AttackSpec("clean", "clean")] + [_pgd(f"pgd{k}", 16.0, k, 1.0, targeted=True) for k in (10, 100, 1000,
                                                                                                      2000)]
    return Suite("fd", specs, "Feature Denoising track (Xie thesis Sec 4.5): targeted PGD-10/100/1000/2000, eps 16, "
                              "step 1 (PGD-10: eps/10 = 1.6), random start")


def _robustbench(eps: float, step: float, targeted: bool) -> Suite:
    return Suite("robustbench", [AttackSpec("clean", "clean"), AttackSpec("autoattack", "standard", eps=4.0,
                                                                          steps=100)],
                 "RobustBench ImageNet Linf eps 4/255: clean + AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square)",
                 robustbench=True)


def _full(eps: float, step: float, targeted: bool) -> Suite:
    t = "t" if targeted else ""
    specs = [AttackSpec("clean", "clean")]
    specs += [_pgd(f"pgd{k}{t}", eps, k, step, targeted=targeted) for k in (1, 10, 100, 1000)]
    specs.append(_pgd(f"pgd100{t}x5", eps, 100, step, targeted=targeted, restarts=5))
    specs += [_pgd(f"pgd100{t}-eps{e:g}", e, 100, step * e / eps, targeted=targeted)
              for e in (eps / 4, eps / 2, min(2 * eps, 254.0))]
    if targeted:
        specs.append(_pgd("pgd100", eps, 100, step))
    specs += [AttackSpec("autoattack", "standard", eps=eps, steps=100),
              AttackSpec("square", "square", eps=eps, steps=1000),
              _pgd("pgd100-unbounded", 255.0, 100, random_start=False)]
    at_eps = [s.label for s in specs if s.attack != "clean" and s.eps == eps]
    return Suite("full", specs, f"white-box PGD sweeps (steps 1..1000, 5 restarts, eps {eps / 4:g}..{2 * eps:g}), "
                                f"AutoAttack, Square and unbounded PGD around eps {eps:g}/255",
                 aggregates={"worst-case": at_eps})


def _defense(eps: float, step: float, targeted: bool) -> Suite:
    """Pre-processing defenses (JATP Sec 4 Table 1 and Fig. 4a; Xiao & Zheng Sec 4; Athalye et al. 2018): white-box
    attacks through the whole pipeline, the same with P's gradient replaced by the identity (BPDA) and with EOT over
    the model's randomness, TI-BIM, Square (gradient-free) and AutoAttack; robust = robust to every row."""
    specs = [AttackSpec("clean", "clean"), _pgd("pgd40", eps, 40, step),
             _pgd("pgd40-bpda", eps, 40, step, through="bpda"), _pgd("pgd40-eot8", eps, 40, step, through="eot8"),
             _pgd("pgd40-targeted", eps, 40, step, targeted=True),
             AttackSpec("apgd-dlr", "apgd-dlr", eps=eps, steps=40), AttackSpec("ti-bim", "ti-fgsm", eps=eps, steps=10,
                                                                              step=max(step, eps / 10)),
             AttackSpec("square", "square", eps=eps, steps=1000), AttackSpec("autoattack", "standard", eps=eps,
                                                                              steps=100)]
    return Suite("defense", specs, f"pre-processing defenses at eps {eps:g}/255: PGD-40 through the full model, with "
                                   "BPDA (identity backward through P) and with EOT over 8 draws, targeted PGD-40, "
                                   "APGD-DLR, TI-BIM, Square and AutoAttack; worst case over all",
                 aggregates={"worst-case": [s.label for s in specs if s.attack != "clean"]})


# the unseen attacks' budgets (Zhou et al. 2021 use them unbounded or at unstated budgets): L2 0.5 (x 255), the
# usual CIFAR-10 L2 radius; a flow of at most 1 pixel per component; a transport cost of 0.1 (Wong et al. 2019's
# CIFAR-10 scale)
UNSEEN_L2, UNSEEN_FLOW, UNSEEN_W1 = 127.5, 1.0, 0.1


def _unseen(eps: float, step: float, targeted: bool) -> Suite:
    """The ARN paper's attack types (Zhou et al. 2021, Sec 4.1, Tables 1-2), each in its own threat model, for a
    pre-processor trained on PGD: L-inf PGD-40 untargeted and targeted at eps; L2 DDN, CW-L2 and PGD-40 (the white-box
    reference of that ball); STA untargeted and targeted within a flow budget; FWA within a Wasserstein budget. Worst
    cases only within a threat model (an accuracy is stated at one budget)."""
    l2 = dict(eps=UNSEEN_L2, norm="l2")
    specs = [AttackSpec("clean", "clean"), _pgd("pgd40", eps, 40, step),
             _pgd("pgd40-targeted", eps, 40, step, targeted=True),
             AttackSpec("ddn", "ddn", steps=100, **l2), AttackSpec("cw-l2", "cw-l2", steps=100, **l2),
             _pgd("pgd40-l2", UNSEEN_L2, 40, 2.5 * UNSEEN_L2 / 40, norm="l2"),
             AttackSpec("sta", "sta", eps=UNSEEN_FLOW, steps=100),
             AttackSpec("sta-targeted", "sta", eps=UNSEEN_FLOW, steps=100, targeted=True),
             AttackSpec("fwa", "fwa", eps=UNSEEN_W1, steps=50)]
    return Suite("unseen", specs, f"the ARN paper's unseen attack types, each in its threat model: L-inf PGD-40 "
                                  f"(untargeted, targeted) at {eps:g}/255; L2 DDN, CW-L2, PGD-40 at "
                                  f"{UNSEEN_L2 / 255:g}; "
                                  f"STA (untargeted, targeted) with flow <= {UNSEEN_FLOW:g} px; FWA at W1 <= "
                                  f"{UNSEEN_W1:g}",
                 aggregates={"worst-linf": ["pgd40", "pgd40-targeted"], "worst-l2": ["ddn", "cw-l2", "pgd40-l2"],
                             "worst-flow": ["sta", "sta-targeted"]})


SUITES: dict[str, Callable[[float, float, bool], Suite]] = {"quick": _quick, "fd": _fd, "robustbench": _robustbench,
                                                            "full": _full, "defense": _defense, "unseen": _unseen}
FIXED_BUDGET = ("fd", "robustbench")
SUITE_NAMES = ("run",) + tuple(SUITES)


def suite_from_dict(d: dict, name: str = "custom") -> Suite:
    """``{"name": ..., "attacks": [{"label": ..., "attack": "pgd", "eps": 8, "steps": 10, ...}], "aggregates": {}}``;
    a bare list of attack dicts also works. A clean row is added when missing."""
    if isinstance(d, list):
        d = {"attacks": d}
    if not isinstance(d, dict) or not isinstance(d.get("attacks"), list):
        raise ConfigError(f"suite {name!r}: expected a mapping with an 'attacks' list (or a list of attacks)")
    known = {f.name for f in fields(AttackSpec)}
    specs = []
    for i, a in enumerate(d["attacks"]):
        if not isinstance(a, dict) or set(a) - known:
            raise ConfigError(f"suite {name!r}: attack #{i} must be a mapping with keys from {sorted(known)}"
                              + (f"; unknown: {sorted(set(a) - known)}" if isinstance(a, dict) else ""))
        a = dict(a)
        a.setdefault("label", a.get("attack", "pgd") + str(a.get("steps", "")))
        specs.append(AttackSpec(**a))
    if not any(s.attack == "clean" for s in specs):
        specs.insert(0, AttackSpec("clean", "clean"))
    return Suite(d.get("name", name), specs, d.get("description", ""), dict(d.get("aggregates", {})),
                 bool(d.get("robustbench", False)))


def run_suite_of(ev: EvalCfg) -> Suite:
    """The run's own evaluation (``eval.suite: ""``): clean + PGD-k for each k in ``eval.steps`` at ``eval.eps``."""
    kind = "targeted" if ev.targeted else "untargeted"
    specs = [AttackSpec("clean", "clean")] + [_pgd(f"pgd{k}", ev.eps, k, ev.step, targeted=ev.targeted,
                                                   random_start=ev.random_start) for k in sorted(set(ev.steps))]
    return Suite("run", specs, f"clean + PGD-k for k in {sorted(set(ev.steps))}, eps {ev.eps:g}/255, {kind}, step "
                               f"{STEP_RULE} with step {ev.step:g}/255")


def quick_check_suite(ev: EvalCfg) -> Suite:
    """The quick check during training: clean + PGD-``eval.quick_steps`` at the run's eval budget (the same row as the
    run suite's PGD-k of that k, so their numbers agree on the same images)."""
    return Suite("quick-check", [AttackSpec("clean", "clean"),
                                 _pgd(f"pgd{ev.quick_steps}", ev.eps, ev.quick_steps, ev.step, targeted=ev.targeted,
                                      random_start=ev.random_start)])


def _suite_file(path: Path) -> Suite:
    if not path.is_file():
        raise ConfigError(f"suite file '{path}' does not exist", f"pass a file of attack rows or one of "
                                                                 f"{', '.join(SUITE_NAMES)}")
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"suite file '{path}' is not valid YAML/JSON ({' '.join(str(e).split())})",
                          "fix the file's syntax") from None
    return suite_from_dict(data, path.stem)


def get_suite(name: str, ev: EvalCfg, given: Iterable[str] = ()) -> Suite:
    """The suite ``name`` (``run`` or "" for the run's own, ``quick``, ``fd``, ``robustbench``, ``full``) or a
    YAML/JSON file of attack rows; ``ev`` is the evaluation config (its eps / step / targeted parametrize run, quick
    and full). ``given``: the eval keys the user set on the command line; fd, robustbench and suite files fix their
    own budgets, so setting eval.eps / eval.step / eval.targeted with them is an error."""
    budget = sorted({f"eval.{k}" for k in ("eps", "step", "targeted")} & set(given))
    path = Path(name)
    fixed = name in FIXED_BUDGET or (name not in SUITE_NAMES and path.suffix.lower() in (".yaml", ".yml", ".json"))
    if fixed and budget:
        raise ConfigError(f"suite {name!r} fixes its budget for each attack (PROTOCOLS.md), so {', '.join(budget)} "
                          "would be ignored", "drop them, or use suite run / quick / full")
    if name in ("", "run"):
        return run_suite_of(ev)
    if name in SUITES:
        if not 0 < ev.eps <= 255:
            raise ConfigError(f"eval.eps = {ev.eps} is out of range for suite {name!r}",
                              "give a budget in (0, 255] pixel units (16 means 16/255)")
        return SUITES[name](ev.eps, ev.step, ev.targeted)
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        return _suite_file(path)
    raise ConfigError(f"unknown suite {name!r}", f"use one of {', '.join(SUITE_NAMES)} or a .yaml/.json file of "
                                                 "attack rows")


# ----------------------------------------------------------------------------------------------- attacks


def build_attack(spec: AttackSpec, amp_dtype: torch.dtype | None = None, seed: int = 0):
    """Spec (0..255 units) -> ``atscale.attacks.make_attack`` object (fractions of [0, 1]) with
    ``.perturb(model, x, y) -> AttackResult``."""
    eps = budget_fraction(spec.eps, spec.norm)
    kw = dict(spec.kwargs)
    if spec.attack == "pgd":
        kw["step"] = to_fraction(spec.step_size)
        kw.setdefault("clean_start_prob", 0.0 if spec.random_start else 1.0)
    elif spec.step > 0 and spec.attack in _FGSM_FAMILY:
        kw.setdefault("step", to_fraction(spec.step))
    try:
        return make_attack(spec.attack, eps=min(eps, 1.0) if spec.norm == "linf" else eps, steps=spec.steps,
                           norm=spec.norm, restarts=spec.restarts, targeted=spec.targeted, seed=seed,
                           amp_dtype=amp_dtype, **kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"suite attack {spec.label!r}: {e}", "fix the row's attack settings") from None


__all__ = ["AttackSpec", "Suite", "SUITES", "SUITE_NAMES", "get_suite", "run_suite_of", "quick_check_suite",
           "suite_from_dict", "build_attack"]
