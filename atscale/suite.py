"""Named robustness-evaluation suites: lists of attack specs run over a model, distributed, with sanity flags.

A suite is data: :class:`AttackSpec` rows (budgets in 0..255 pixel units, converted to fractions once, in
:func:`build_attack`) plus optional worst-case aggregates. The named suites follow PROTOCOLS.md:

- ``quick``: clean + PGD-10 at the run's eval budget.
- ``fd``: the Feature Denoising track (Xie thesis Sec 4.5): targeted PGD-10/100/1000/2000, eps 16, step 1 (the 10-step
  attack uses eps/10 = 1.6), random start.
- ``robustbench``: the RobustBench ImageNet track, Linf eps 4/255: clean + AutoAttack "standard" (APGD-CE, APGD-T,
  FAB-T, Square); also writes a RobustBench model-info JSON.
- ``full``: white-box PGD over steps 1..1000, with restarts, over eps/4..2 eps, AutoAttack, Square (black-box) and an
  unbounded (eps 255) PGD: the sweeps the gradient-masking checks of :mod:`atscale.sanity` compare.

Accuracy convention (AutoAttack / RobustBench): an image counts as robust only if it is classified correctly both clean
and under the attack (the clean image lies in every eps-ball), so every attacked accuracy is <= the clean accuracy.
Distributed: each rank evaluates the strided shard ``rank::world`` of the val set and counts are all-reduced, so every
image counts exactly once (as :func:`atscale.engine.evaluate`).
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from atscale import distributed as dist
from atscale import sanity
from atscale.config import ConfigError

from atscale.attacks import ATTACK_NAMES
from atscale.engine import autocast, first_images, rank_share
from atscale.layers.context import evaluation
BLACK_BOX = ("square",)
KINDS = ("clean", "white-box", "black-box", "transfer")


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

    def __post_init__(self) -> None:
        if not self.kind:
            self.kind = ("clean" if self.attack == "clean" else "transfer" if self.source else
                         "black-box" if self.attack in BLACK_BOX else "white-box")
        if self.attack != "clean" and self.attack not in ATTACK_NAMES:
            raise ConfigError(f"suite attack {self.label!r}: unknown attack {self.attack!r}; one of "
                              f"{', '.join(ATTACK_NAMES)} (or clean)")
        if self.kind not in KINDS:
            raise ConfigError(f"suite attack {self.label!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.attack != "clean":
            if not 0 < self.eps <= 255 and self.norm == "linf":
                raise ConfigError(f"suite attack {self.label!r}: eps {self.eps} is out of range; budgets are in "
                                  f"0..255 pixel units (16 means 16/255)")
            if self.steps < 1 or self.restarts < 1:
                raise ConfigError(f"suite attack {self.label!r}: steps and restarts must be >= 1")

    @property
    def step_size(self) -> float:
        """PGD step in 0..255 units."""
        k = max(1, self.steps)
        return self.eps / k if self.step <= 0 else max(self.step, self.eps / k)

    def describe(self) -> dict:
        d = {"attack": self.attack, "kind": self.kind, "norm": self.norm, "eps": float(self.eps),
             "steps": int(self.steps), "restarts": int(self.restarts), "targeted": bool(self.targeted)}
        if self.attack == "pgd":
            d.update(step=self.step_size, random_start=self.random_start)
        if self.source:
            d["source"] = self.source
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


SUITES: dict[str, Callable[[float, float, bool], Suite]] = {"quick": _quick, "fd": _fd, "robustbench": _robustbench,
                                                            "full": _full}
FIXED_BUDGET = ("fd", "robustbench")


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


def get_suite(name: str, *, eps: float | None = None, step: float | None = None, targeted: bool | None = None,
              defaults: tuple[float, float, bool] = (16.0, 1.0, True)) -> Suite:
    """A named suite (``quick`` / ``fd`` / ``robustbench`` / ``full``) or a YAML/JSON file of attack specs.

    ``eps`` / ``step`` / ``targeted`` override ``defaults`` (the checkpoint's eval budget) for quick and full; fd and
    robustbench fix their budgets, so overriding them is an error."""
    path = Path(name)
    given = {k: v for k, v in (("--eps", eps), ("--step", step), ("--targeted/--untargeted", targeted))
             if v is not None}
    if name not in SUITES and path.suffix.lower() in (".yaml", ".yml", ".json"):
        if given:
            raise ConfigError(f"suite file '{path}' sets each attack's budget; drop {', '.join(given)}")
        if not path.is_file():
            raise ConfigError(f"suite file '{path}' does not exist; pass a file of attack specs or one of "
                              f"{', '.join(SUITES)}")
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"suite file '{path}' is not valid YAML/JSON: {e}") from e
        return suite_from_dict(data, path.stem)
    if name not in SUITES:
        raise ConfigError(f"unknown suite {name!r}; one of {', '.join(SUITES)} or a .yaml/.json file of attack specs")
    if name in FIXED_BUDGET and given:
        raise ConfigError(f"suite {name!r} fixes its budget (see PROTOCOLS.md); drop {', '.join(given)} or use "
                          f"--suite quick / full")
    d_eps, d_step, d_t = defaults
    e = d_eps if eps is None else eps
    if not 0 < e <= 255:
        raise ConfigError(f"--eps {e} is out of range: budgets are in 0..255 pixel units (16 means 16/255)")
    return SUITES[name](e, d_step if step is None else step, d_t if targeted is None else targeted)


# ----------------------------------------------------------------------------------------------- attacks


def build_attack(spec: AttackSpec, amp_dtype: torch.dtype | None = None, seed: int = 0):
    """Spec (0..255 units) -> ``atscale.attacks.make_attack`` object (fractions of [0, 1]) with
    ``.perturb(model, x, y) -> AttackResult``."""
    try:
        from atscale.attacks import make_attack
    except ImportError as e:
        raise ConfigError(f"attack {spec.label!r} needs atscale.attacks.make_attack, which this installation "
                          f"lacks") from e
    eps = spec.eps / 255.0
    kw = dict(spec.kwargs)
    if spec.attack == "pgd":
        kw.setdefault("step", spec.step_size / 255.0)
        kw.setdefault("clean_start_prob", 0.0 if spec.random_start else 1.0)
    elif spec.step > 0 and spec.attack in ("mi-fgsm", "di2-fgsm", "m-di2-fgsm", "ti-fgsm"):
        kw.setdefault("step", spec.step / 255.0)
    try:
        return make_attack(spec.attack, eps=min(eps, 1.0) if spec.norm == "linf" else eps, steps=spec.steps,
                           norm=spec.norm, restarts=spec.restarts, targeted=spec.targeted, seed=seed,
                           amp_dtype=amp_dtype, **kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"suite attack {spec.label!r}: {e}") from e


# ----------------------------------------------------------------------------------------------- runner


def _shard_size(loader) -> int | None:
    inner = getattr(loader, "loader", None)
    idx = getattr(inner, "indices", None)
    return len(idx) if idx is not None else None


def _reduce_max(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_dist():
        import torch.distributed as tdist

        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t.tolist()


def run_suite(model: nn.Module, loader, suite: Suite, *, amp_dtype: torch.dtype | None = None, max_images: int = 0,
              seed: int = 0, progress: bool = True, probes: bool = True,
              surrogates: dict[str, nn.Module] | None = None, sanity_opts: sanity.SanityOptions | None = None,
              desc: str | None = None) -> dict:
    """Every spec of ``suite`` over the loader (this rank's strided shard); counts summed over ranks.

    Returns ``{"suite", "results": {label: {...}}, "probes", "flags", "n", "world_size", "seconds", "img_per_s"}``.
    Every attack restarts from the same seed, so PGD-j's iterates are a prefix of PGD-k's (monotone in k)."""
    with evaluation(), torch.no_grad():
        return _run(model, loader, suite, amp_dtype=amp_dtype, max_images=max_images, seed=seed, progress=progress,
                    probes=probes, surrogates=surrogates or {}, opts=sanity_opts or sanity.SanityOptions(),
                    desc=desc or f"suite {suite.name}")


def _run(model, loader, suite, *, amp_dtype, max_images, seed, progress, probes, surrogates, opts, desc) -> dict:
    rank, world = dist.rank(), dist.world_size()
    limit = rank_share(max_images)
    specs = suite.attacks
    attacks = {s.label: build_attack(s, amp_dtype, seed + 1) for s in specs}
    for s in specs:
        if s.source and s.source not in surrogates:
            raise ConfigError(f"transfer attack {s.label!r} needs its source model {s.source!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    fields_ = ("correct", "adv_correct", "hit_target", "clean_fooled")
    stats = {s.label: dict.fromkeys(fields_, 0) for s in specs}
    agg_correct = dict.fromkeys(suite.aggregates, 0)
    secs = dict.fromkeys([s.label for s in specs], 0.0)
    n = clean_correct = 0
    probe = {}
    total = _shard_size(loader)
    total = min(total, limit) if total is not None and limit is not None else total
    bar = tqdm(total=total, desc=desc, unit="img", disable=not (progress and rank == 0), dynamic_ncols=True,
               mininterval=1.0, leave=False)
    t0 = time.perf_counter()
    for x, y in first_images(loader, limit):
        with autocast(device, amp_dtype):
            clean_ok = model(x).argmax(1) == y
        clean_correct += int(clean_ok.sum())
        if probes and not probe:
            probe = {"gradients": sanity.probe_gradients(model, x, y, amp_dtype),
                     "stochastic": sanity.probe_stochastic(model, x)}
        robust = {}
        for s in specs:
            atk = attacks[s.label]
            t1 = time.perf_counter()
            with torch.enable_grad():
                res = atk.perturb(surrogates.get(s.source, model), x, y)
            with autocast(device, amp_dtype):
                pred = model(res.x_adv).argmax(1)
            secs[s.label] += time.perf_counter() - t1
            adv_ok = pred == y
            ok = adv_ok & clean_ok
            robust[s.label] = ok
            st = stats[s.label]
            st["correct"] += int(ok.sum())
            st["adv_correct"] += int(adv_ok.sum())
            st["clean_fooled"] += int((clean_ok & ~adv_ok).sum())
            if res.target is not None:
                st["hit_target"] += int((pred == res.target).sum())
        for agg, members in suite.aggregates.items():
            ok = clean_ok.clone()
            for m in members:
                ok &= robust[m] if m in robust else clean_ok
            agg_correct[agg] += int(ok.sum())
        n += y.shape[0]
        bar.update(y.shape[0])
        post = {"clean": f"{clean_correct / n:.3f}"}
        if specs:
            post[specs[-1].label] = f"{stats[specs[-1].label]['correct'] / n:.3f}"
        bar.set_postfix(post, refresh=False)
    bar.close()
    model.train(was_training)
    seconds = time.perf_counter() - t0

    counts = [n, clean_correct] + [stats[s.label][f] for s in specs for f in fields_] + list(agg_correct.values())
    pkeys = []
    if probes:
        probe = probe or {"gradients": {"n": 0, "zero_ce": 0, "nonfinite_ce": 0, "zero_margin": 0,
                                        "nonfinite_margin": 0},
                          "stochastic": {"n": 0, "max_rel_diff": 0.0, "pred_changed": 0}}
        pkeys = [("gradients", k) for k in probe["gradients"]] + [("stochastic", "n"), ("stochastic", "pred_changed")]
        counts += [probe[a][b] for a, b in pkeys]
    tot = [int(v) for v in dist.all_reduce_sum(torch.tensor(counts, dtype=torch.float64, device=device)).tolist()]
    n, clean_correct = tot[0], tot[1]
    i = 2
    for s in specs:
        stats[s.label] = dict(zip(fields_, tot[i: i + len(fields_)]))
        i += len(fields_)
    for agg in suite.aggregates:
        agg_correct[agg] = tot[i]
        i += 1
    for a, b in pkeys:
        probe[a][b] = tot[i]
        i += 1
    maxes = _reduce_max([seconds] + [secs[s.label] for s in specs]
                        + ([probe["stochastic"]["max_rel_diff"]] if probes else []), device)
    seconds = maxes[0]
    if probes:
        probe["stochastic"]["max_rel_diff"] = maxes[-1]

    results = {"clean": {"acc": clean_correct / max(1, n), "n": n, "attack": "clean", "kind": "clean",
                         "eps": 0.0, "steps": 0}}
    for j, s in enumerate(specs):
        st = stats[s.label]
        rate = st["hit_target"] / max(1, n) if s.targeted else st["clean_fooled"] / max(1, clean_correct)
        results[s.label] = {"acc": st["correct"] / max(1, n), "adv_acc": st["adv_correct"] / max(1, n),
                            "success_rate": rate, "n": n, **s.describe(), "seconds": maxes[1 + j]}
    for agg, members in suite.aggregates.items():
        ms = [results[m] for m in members]
        results[agg] = {"acc": agg_correct[agg] / max(1, n), "n": n, "attack": "worst-case", "kind": "aggregate",
                        "of": list(members), "eps": max(m["eps"] for m in ms), "steps": max(m["steps"] for m in ms),
                        "norm": ms[0]["norm"], "targeted": all(m.get("targeted") for m in ms),
                        "success_rate": 1 - agg_correct[agg] / max(1, clean_correct)}
    flags = sanity.check_all(results, probe if probes else None, opts)
    return {"suite": suite.to_dict(), "results": results, "probes": probe, "flags": [f.to_dict() for f in flags],
            "n": n, "world_size": world, "seconds": seconds, "img_per_s": n / max(1e-9, seconds)}


# ----------------------------------------------------------------------------------------------- outputs


def autoattack_entry(results: dict, eps: float = 4.0, norm: str = "linf") -> tuple[str, dict] | None:
    """The AutoAttack result at ``eps`` (0..255 units): a ``standard`` row, else a worst-case aggregate over the four
    AutoAttack components (APGD-CE, APGD-T, FAB-T, Square) at that eps."""
    for label, r in results.items():
        if r.get("attack") == "standard" and r.get("norm") == norm and math.isclose(r["eps"], eps) \
                and not r.get("targeted"):
            return label, r
    parts = {"apgd-ce", "apgd-t", "fab-t", "square"}
    for label, r in results.items():
        if r.get("kind") == "aggregate" and math.isclose(r["eps"], eps) and \
                parts <= {results[m]["attack"] for m in r["of"]}:
            return label, r
    return None


_ARCH_NAMES = [(r"^wide_resnet(\d+)_(\d+)", r"WideResNet-\1-\2"), (r"^resnext(\d+)_(\w+)", r"ResNeXt-\1-\2"),
               (r"^resnet(\d+)", r"ResNet-\1"), (r"^efficientnet_(b\d)", r"EfficientNet-\1"),
               (r"^vit_(\w+)_patch(\d+)", r"ViT-\1/\2")]


def pretty_arch(arch: str) -> str:
    for pat, rep in _ARCH_NAMES:
        m = re.match(pat, arch)
        if m:
            return m.expand(rep).replace("EfficientNet-b", "EfficientNet-B") + arch[m.end():]
    return arch


def robustbench_info(doc: dict, *, name: str, arch: str, dataset: str, eps: float = 4.0,
                     extra: dict | None = None) -> dict | None:
    """RobustBench ``model_info`` JSON for the Linf eps/255 track (accuracies as percent strings, two decimals)."""
    found = autoattack_entry(doc["results"], eps)
    if found is None:
        return None
    label, r = found
    info = {"link": "", "name": name, "authors": "", "additional_data": False, "number_forward_passes": 1,
            "dataset": dataset, "venue": "", "architecture": pretty_arch(arch), "eps": f"{eps:g}/255",
            "clean_acc": f"{100 * doc['results']['clean']['acc']:.2f}", "reported": "",
            "autoattack_acc": f"{100 * r['acc']:.2f}", "footnote": f"atscale suite {doc['suite']['name']!r}, "
                                                                  f"{doc['n']} images, attack row {label!r}",
            "unreliable": any(f["severity"] == "error" for f in doc.get("flags", [])), "threat_model": "Linf",
            "n_images": doc["n"]}
    info.update(extra or {})
    return info


def write_outputs(doc: dict, out_dir: str | Path, *, title: str = "", robustbench: dict | None = None) -> dict:
    """eval.json, eval.md, accuracy_vs_iterations.png, accuracy_vs_eps.png [, robustbench_model_info.json]."""
    from atscale.report import plot_accuracy_vs_eps, plot_accuracy_vs_iterations, suite_markdown

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    res = doc.get("results")
    if res:
        paths["iterations_plot"] = plot_accuracy_vs_iterations(res, out / "accuracy_vs_iterations.png", title)
        paths["eps_plot"] = plot_accuracy_vs_eps(res, out / "accuracy_vs_eps.png", title)
    if robustbench is not None:
        paths["robustbench"] = out / "robustbench_model_info.json"
        paths["robustbench"].write_text(json.dumps(robustbench, indent=2))
        doc["robustbench"] = robustbench
    paths["json"] = out / "eval.json"
    paths["json"].write_text(json.dumps(doc, indent=2))
    paths["markdown"] = out / "eval.md"
    paths["markdown"].write_text(suite_markdown(doc, title, [p for k, p in paths.items() if k.endswith("_plot")]))
    return paths


__all__ = ["AttackSpec", "Suite", "SUITES", "get_suite", "suite_from_dict", "build_attack", "run_suite",
           "robustbench_info", "write_outputs", "autoattack_entry"]
