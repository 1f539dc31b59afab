"""Plots and the Markdown report of a run, from eval.json and log.jsonl."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from atscale.config.units import budget_text
from atscale.reporting.runlog import read_log

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D


def _new_figure(figsize: tuple[float, float], ncols: int = 1) -> tuple[Figure, Any]:
    """A figure not registered with pyplot (no global state, no backend switch); ``savefig`` renders it with Agg."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=120)
    return fig, fig.subplots(1, ncols)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_measured(ax: Axes, xs: list[float], ys: list[float], **kw: Any) -> Line2D:
    """Plot what was measured: a marker at each point; a thin connecting line only for 3+ points (so a sweep reads as
    one curve), never for 1-2 points, where a line would imply a trend nobody measured."""
    style = {"linestyle": "-", "linewidth": 0.8} if len(xs) >= 3 else {"linestyle": "None"}
    return ax.plot(xs, ys, marker="o", ms=4, **style, **kw)[0]


def accuracy_vs_steps_figure(results: dict, title: str = "") -> Figure:
    """The figure of :func:`plot_accuracy_vs_steps`."""
    attacks = sorted((v["steps"], v["acc"]) for k, v in results.items() if k != "clean")
    fig, ax = _new_figure((5, 3.5))
    if attacks:
        plot_measured(ax, [s for s, _ in attacks], [100 * a for _, a in attacks], label="PGD accuracy")
    ax.axhline(100 * results["clean"]["acc"], color="gray", ls="--", label="clean accuracy")
    ax.set_xscale("log")
    ax.set_xlabel("PGD steps")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    return fig


def plot_accuracy_vs_steps(results: dict, path: Path, title: str = "") -> Path:
    """Accuracy over PGD steps (an evaluation's rows) against the clean accuracy, written to ``path``."""
    return _save(accuracy_vs_steps_figure(results, title), path)


def training_figure(log_path: Path) -> Figure | None:
    """The figure of :func:`plot_training` (None without training records): the loss as logged, and each
    validation accuracy as measured points."""
    recs = read_log(log_path)
    train = [r for r in recs if r["kind"] == "train"]
    val = [r for r in recs if r["kind"] == "val"]
    if not train:
        return None
    fig, (a1, a2) = _new_figure((9, 3.2), ncols=2)
    a1.plot([r["step"] for r in train], [r["loss"] for r in train])
    a1.set_xlabel("step")
    a1.set_ylabel("train loss")
    a1.grid(alpha=0.3)
    attack = str(val[0].get("attack", "pgd")).upper() if val else "PGD"
    for key, label in (("clean_acc", "val clean"), ("pgd_acc", f"val {attack}")):
        pts = [(r["step"], 100 * r[key]) for r in val if key in r]
        if pts:
            plot_measured(a2, [p[0] for p in pts], [p[1] for p in pts], label=label)
    a2.set_xlabel("step")
    a2.set_ylabel("accuracy (%)")
    a2.grid(alpha=0.3)
    if val:
        a2.legend()
    return fig


def plot_training(log_path: Path, path: Path) -> Path | None:
    """:func:`training_figure` written to ``path``; None (nothing written) without training records."""
    fig = training_figure(log_path)
    return None if fig is None else _save(fig, path)


def results_table(results: dict) -> str:
    """Markdown table of an evaluation's rows: robust accuracy (clean and attacked correct), the attacked-only
    accuracy beside it, and the attack success rate."""
    rows = ["| attack | steps | eps | step | targeted | robust accuracy | attacked-only accuracy | attack success |",
            "|---|---|---|---|---|---|---|---|",
            f"| clean | 0 | 0 | - | - | {100 * results['clean']['acc']:.2f}% | - | - |"]
    for name, r in sorted(((k, v) for k, v in results.items() if k != "clean"), key=lambda kv: kv[1]["steps"]):
        step = f"{r['step']:.3g}/255" if "step" in r else "-"
        adv = f"{100 * r['adv_acc']:.2f}%" if "adv_acc" in r else "-"
        eps = budget_text(r["eps"], r.get("norm", "linf"))
        rows.append(f"| {name} | {r['steps']} | {eps} | {step} | {r.get('targeted', False)} | "
                    f"{100 * r['acc']:.2f}% | {adv} | {100 * r['success_rate']:.2f}% |")
    return "\n".join(rows)


def write_report(run_dir: Path, cfg, doc: dict, meta: dict, train_summary: dict, plots: list[Path],
                 export_dir: Path | None) -> Path:
    """``report.md`` of a finished run from its final evaluation document (:func:`atscale.evaluation.evaluator.
    run_suite`'s) and training summary."""
    results = doc["results"]
    n = results["clean"]["n"]
    lines = [f"# atscale run `{cfg.run.name}`", "",
             f"Model `{cfg.model.arch}` trained on `{meta.get('source')}` ({meta.get('n_train')} train / "
             f"{meta.get('n_val')} val images, {meta.get('num_classes')} classes) for {cfg.schedule.epochs} epochs with "
             f"objective `{cfg.objective.name}` and attack `{cfg.attack.name}` (eps {cfg.attack.eps:g}/255, step "
             f"{cfg.attack.step:g}/255, {cfg.attack.iters} iterations, targeted={cfg.attack.targeted}).", "",
             f"## Evaluation on {n} val images", "", results_table(results), "",
             "Robust accuracy counts an image when it is classified correctly both clean and attacked (the AutoAttack / "
             "RobustBench rule); the attacked-only accuracy ignores the clean prediction. PGD-k steps by max(step, "
             "eps/k), so every row can reach the boundary of its budget. Attack success: targeted = share of images "
             "classified as the attacker's target; untargeted = share of clean-correct images that the attack made "
             "wrong.", ""] + [f"- sanity flag ({f['severity']}): {f['message']}" for f in doc.get("flags", [])] + [
             "", "## Training", "",
             f"- optimizer steps: {train_summary.get('steps')}, training time {train_summary.get('seconds', 0):.0f} s "
             f"in {train_summary.get('processes', 1)} process(es) (the whole run across resumes; work re-done after a "
             f"kill counts once), {train_summary.get('img_per_s', 0):.1f} training images/s (attack included)",
             f"- final train loss {train_summary.get('loss', float('nan')):.4f}, train (adversarial) accuracy "
             f"{100 * train_summary.get('acc', float('nan')):.2f}%", ""]
    for p in plots:
        lines += [f"![{p.stem}]({p.name})", ""]
    if export_dir is not None:
        lines += ["## Export", "", f"`{export_dir}` loads in plain timm: "
                  f"`timm.create_model('local-dir:{export_dir}', pretrained=True)` (normalize inputs with the mean/std "
                  "in its config.json).", ""]
    path = Path(run_dir) / "report.md"
    path.write_text("\n".join(lines))
    return path


# ------------------------------------------------------------------ evaluation suites (atscale.suite / atscale.shift)


def _curve_label(r: dict, fixed: tuple[str, ...]) -> str:
    parts = [str(r.get("attack", "")).upper()]
    if "steps" in fixed and r.get("steps"):
        parts.append(f"{r['steps']} it")
    if "eps" in fixed:
        parts.append(f"eps {r['eps']:g}")
    if r.get("restarts", 1) > 1:
        parts.append(f"x{r['restarts']}")
    parts.append("targeted" if r.get("targeted") else "untargeted")
    if r.get("kind") not in ("white-box", None):
        parts.append(r["kind"])
    return ", ".join(parts)


def _suite_curves(results: dict, axis: str) -> list[tuple[str, list[tuple[float, float]]]]:
    """Curves of accuracy along ``axis`` (steps or eps) for rows equal in everything else; unbounded rows left out."""
    fixed = ("eps",) if axis == "steps" else ("steps",)
    groups: dict[tuple, list[dict]] = {}
    for r in results.values():
        if r.get("kind") in ("clean", "aggregate", None) or r.get("eps", 0) >= 255:
            continue
        key = (r.get("attack"), r.get("norm"), bool(r.get("targeted")), r.get("restarts", 1), r.get("kind"),
               r.get("source", "")) + tuple(r.get(f) for f in fixed)
        groups.setdefault(key, []).append(r)
    curves = []
    for members in groups.values():
        pts = sorted({(float(m[axis]), 100 * m["acc"]) for m in members})
        if axis == "eps":
            pts = [(0.0, 100 * results["clean"]["acc"])] + pts
        curves.append((_curve_label(members[0], fixed), pts))
    return sorted(curves)


def suite_figure(results: dict, axis: str, title: str = "") -> Figure:
    """The figure of the suite plots: robust accuracy over ``axis`` ("steps" or "eps"), one curve per attack
    setting, each drawn as measured (:func:`plot_measured`)."""
    curves = _suite_curves(results, axis)
    fig, ax = _new_figure((5.5, 3.8))
    for label, pts in curves:
        plot_measured(ax, [p[0] for p in pts], [p[1] for p in pts], label=label)
    if "clean" in results:
        ax.axhline(100 * results["clean"]["acc"], color="gray", ls="--", label="clean accuracy")
    if axis == "steps":
        ticks = sorted({p[0] for _, pts in curves for p in pts})
        ax.set_xscale("log")
        if ticks:
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
            ax.set_xlim(ticks[0] / 1.5, ticks[-1] * 1.5)
        ax.set_xlabel("attack iterations")
    else:
        ax.set_xlabel("eps (0..255 pixel units)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return fig


def _plot_suite(results: dict, axis: str, path: Path, title: str) -> Path:
    """:func:`suite_figure` written to ``path``."""
    return _save(suite_figure(results, axis, title), path)


def plot_accuracy_vs_iterations(results: dict, path: Path, title: str = "") -> Path:
    """Suite results (label -> row with acc, attack, eps, steps, ...): one curve per attack setting over iterations."""
    return _plot_suite(results, "steps", Path(path), title)


def plot_accuracy_vs_eps(results: dict, path: Path, title: str = "") -> Path:
    """Suite results: one curve per attack setting over eps, starting at clean accuracy at eps 0."""
    return _plot_suite(results, "eps", Path(path), title)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def suite_table(results: dict) -> str:
    rows = ["| attack | method | kind | norm | eps | iterations | step | restarts | targeted | accuracy | "
            "attack success | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        if r.get("kind") == "clean":
            rows.append(f"| clean | - | clean | - | 0 | 0 | - | - | - | {_pct(r['acc'])} | - | - |")
            continue
        step = f"{r['step']:.3g}/255" if r.get("step") is not None else "-"
        method = r["attack"] if r.get("kind") != "aggregate" else "worst of " + ", ".join(r["of"])
        secs = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        rows.append(f"| {label} | {method} | {r['kind']} | {r.get('norm', '-')} | "
                    f"{budget_text(r['eps'], r.get('norm', 'linf'))} | "
                    f"{r.get('steps', '-')} | {step} | {r.get('restarts', '-')} | {r.get('targeted', '-')} | "
                    f"{_pct(r['acc'])} | {_pct(r.get('success_rate'))} | {secs} |")
    return "\n".join(rows)


def shift_markdown(shift: list[dict]) -> list[str]:
    lines = ["## Distribution shift", "", "| test set | layout | images | classes | accuracy | error | mCE |",
             "|---|---|---|---|---|---|---|"]
    for s in shift:
        mce = f"{100 * s['mce']:.2f}%" if s.get("mce") is not None else "-"
        lines.append(f"| `{s['root']}` | {s['layout']} | {s['n']} | {s['n_classes']} | {_pct(s['acc'])} | "
                     f"{_pct(s['error'])} | {mce} |")
    for s in shift:
        if s["layout"] != "imagenet-c":
            continue
        sev = sorted({k for e in s["errors"].values() for k in e}, key=int)
        lines += ["", f"### ImageNet-C errors: `{s['root']}`", "",
                  "| corruption | " + " | ".join(f"s{k}" for k in sev) + " | mean error | CE | rel. CE |",
                  "|---|" + "---|" * (len(sev) + 3)]
        for c, e in s["errors"].items():
            ce, rce = (s.get("ce") or {}).get(c), (s.get("relative_ce") or {}).get(c)
            lines.append(f"| {c} | " + " | ".join(_pct(e.get(k)) for k in sev) +
                         f" | {_pct(s['corruption_error'][c])} | {_pct(ce)} | {_pct(rce)} |")
        if s.get("mce") is not None:
            lines += ["", f"mCE {100 * s['mce']:.2f}% against baseline `{s.get('baseline')}`"
                      + (f", relative mCE {100 * s['relative_mce']:.2f}%" if s.get("relative_mce") is not None
                         else "") + ". CE_c = sum_s E_s,c / sum_s E^base_s,c; mCE = mean over corruptions."]
        for note in s.get("notes", []):
            lines += ["", f"Note: {note}"]
    return lines + [""]


def suite_markdown(doc: dict, title: str = "", plots: list[Path] = ()) -> str:
    """The Markdown report of an evaluation (suite results, sanity flags, probes, shift sets, plots)."""
    lines = [f"# Robustness evaluation{': ' + title if title else ''}", ""]
    info = doc.get("checkpoint_info", {})
    if info:
        lines += [f"- checkpoint: `{info.get('checkpoint')}`", f"- model: `{info.get('arch')}`"
                  + (f", BN domain `{info['bn_domain']}`" if info.get("bn_domain") else ""),
                  f"- data: `{info.get('data')}`", ""]
    if doc.get("results"):
        s = doc["suite"]
        lines += [f"## Suite `{s['name']}`", "", s.get("description", ""), "",
                  f"{doc['n']} images, {doc['world_size']} process(es), {doc['seconds']:.1f} s "
                  f"({doc['img_per_s']:.1f} images/s through all attacks).", "", suite_table(doc["results"]), "",
                  "Accuracy counts an image as robust only if it is classified correctly both clean and under the "
                  "attack (AutoAttack / RobustBench convention). Attack success: targeted = share of images "
                  "classified as the target; untargeted = share of clean-correct images the attack fooled.", ""]
    flags = doc.get("flags")
    if flags is not None:
        lines += ["## Sanity checks (gradient masking)", ""]
        if flags:
            lines += [f"- **{f['severity']}** `{f['name']}`: {f['message']}" for f in flags]
        else:
            lines.append("No flags: accuracy falls with iterations and eps, no black-box attack beats the white-box "
                         "ones, unbounded attacks reach ~0%, input gradients are non-zero and finite, and the model "
                         "is deterministic (for the checks this suite's attacks allow).")
        p = doc.get("probes") or {}
        if p.get("gradients"):
            g, st = p["gradients"], p["stochastic"]
            lines += ["", f"Probes on the first batch of each rank: {g['n']} images; all-zero input gradient "
                          f"(CE / margin loss): {g['zero_ce']} / {g['zero_margin']}; non-finite: "
                          f"{max(g['nonfinite_ce'], g['nonfinite_margin'])}; two identical calls differ by up to "
                          f"{st['max_rel_diff']:.3g} (relative), {st['pred_changed']} predictions changed."]
        lines.append("")
    if doc.get("robustbench"):
        rb = doc["robustbench"]
        lines += ["## RobustBench model info", "", f"`robustbench_model_info.json`: clean {rb['clean_acc']}%, "
                  f"AutoAttack {rb['autoattack_acc']}% at Linf eps {rb['eps']} ({rb['dataset']}).", ""]
    if doc.get("shift"):
        lines += shift_markdown(doc["shift"])
    for p in plots:
        lines += [f"![{Path(p).stem}]({Path(p).name})", ""]
    return "\n".join(lines)
