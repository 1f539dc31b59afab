"""Plots and the Markdown report of a run, from eval.json and log.jsonl."""
from __future__ import annotations

from pathlib import Path

from atscale.runlog import read_log


def plot_accuracy_vs_steps(results: dict, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = sorted((v["steps"], v["acc"]) for k, v in results.items() if k != "clean")
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    if attacks:
        ax.plot([s for s, _ in attacks], [100 * a for _, a in attacks], "o-", label="PGD accuracy")
    ax.axhline(100 * results["clean"]["acc"], color="gray", ls="--", label="clean accuracy")
    ax.set_xscale("log")
    ax.set_xlabel("PGD steps")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_training(log_path: Path, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_log(log_path)
    train = [r for r in recs if r["kind"] == "train"]
    val = [r for r in recs if r["kind"] == "val"]
    if not train:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=120)
    a1.plot([r["step"] for r in train], [r["loss"] for r in train])
    a1.set_xlabel("step")
    a1.set_ylabel("train loss")
    a1.grid(alpha=0.3)
    attack = str(val[0].get("attack", "pgd")).upper() if val else "PGD"
    for key, label in (("clean_acc", "val clean"), ("pgd_acc", f"val {attack}")):
        pts = [(r["step"], 100 * r[key]) for r in val if key in r]
        if pts:
            a2.plot(*zip(*pts), "o-", label=label)
    a2.set_xlabel("step")
    a2.set_ylabel("accuracy (%)")
    a2.grid(alpha=0.3)
    if val:
        a2.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def results_table(results: dict) -> str:
    rows = ["| attack | steps | eps | step | targeted | accuracy | attack success |", "|---|---|---|---|---|---|---|",
            f"| clean | 0 | 0 | - | - | {100 * results['clean']['acc']:.2f}% | - |"]
    for name, r in sorted(((k, v) for k, v in results.items() if k != "clean"), key=lambda kv: kv[1]["steps"]):
        rows.append(f"| {name} | {r['steps']} | {r['eps']:.3g}/255 | {r['step']:.3g}/255 | {r['targeted']} | "
                    f"{100 * r['acc']:.2f}% | {100 * r['success_rate']:.2f}% |")
    return "\n".join(rows)


def write_report(run_dir: Path, cfg, results: dict, meta: dict, train_summary: dict, plots: list[Path],
                 export_dir: Path | None) -> Path:
    n = results["clean"]["n"]
    lines = [f"# atscale run `{cfg.run.name}`", "",
             f"Model `{cfg.model.arch}` trained on `{meta.get('source')}` ({meta.get('n_train')} train / "
             f"{meta.get('n_val')} val images, {meta.get('num_classes')} classes) for {cfg.schedule.epochs} epochs with "
             f"objective `{cfg.objective.name}` and attack `{cfg.attack.name}` (eps {cfg.attack.eps:g}/255, step "
             f"{cfg.attack.step:g}/255, {cfg.attack.iters} iterations, targeted={cfg.attack.targeted}).", "",
             f"## Evaluation on {n} val images", "", results_table(results), "",
             "Attack success: targeted = share of images classified as the attacker's target; untargeted = share of "
             "clean-correct images that the attack made wrong.", "", "## Training", "",
             f"- optimizer steps: {train_summary.get('steps')}, wall time {train_summary.get('seconds', 0):.0f} s, "
             f"{train_summary.get('img_per_s', 0):.1f} training images/s (attack included)",
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
