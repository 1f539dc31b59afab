"""What a run writes for people: plots draw measured points (a line only through 3+), the evaluator's bar names each
attack, files and folders follow the user's umask, and an export replaces ``export/`` atomically, cleaning up after
killed exports."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import atscale.fsio as fsio
import atscale.models.export as export_mod
from atscale.evaluation.evaluator import run_suite
from atscale.evaluation.suites import AttackSpec, Suite
from atscale.fsio import atomic_write_bytes, exchange, replace_dir
from atscale.models.export import export_timm, remove_stale_temp_dirs
from atscale.models.normalize import NormalizedModel
from atscale.reporting.report import (accuracy_vs_steps_figure, plot_accuracy_vs_eps, plot_accuracy_vs_iterations,
                                      plot_accuracy_vs_steps, plot_training, suite_figure, training_figure)

MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def _row(acc: float, steps: int, eps: float = 4.0) -> dict:
    return {"acc": acc, "attack": "pgd", "kind": "white-box", "norm": "linf", "eps": eps, "steps": steps,
            "restarts": 1, "targeted": False}


def _curves(fig) -> dict[str, object]:
    """The figure's measured curves by label (the dashed clean-accuracy reference left out)."""
    return {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() != "clean accuracy"}


def _measured_only(line) -> bool:
    return line.get_linestyle() == "None" and line.get_marker() == "o"


def _sweep(line) -> bool:
    return line.get_linestyle() == "-" and line.get_marker() == "o" and line.get_linewidth() <= 1.0


# ----------------------------------------------------------------------------------------------------- plots


def test_quick_suite_plots_show_points_not_lines(tmp_path: Path) -> None:
    """The quick suite (clean + one PGD row): accuracy vs eps has 2 points (clean at 0, the attack), accuracy vs
    iterations 1 point; both are markers only."""
    res = {"clean": {"acc": 0.8, "kind": "clean", "eps": 0.0, "steps": 0}, "pgd10": _row(0.3, 10)}
    for axis, n in (("eps", 2), ("steps", 1)):
        (line,) = _curves(suite_figure(res, axis)).values()
        assert len(line.get_xdata()) == n and _measured_only(line), (axis, line.get_linestyle())
    for fn, name in ((plot_accuracy_vs_eps, "eps.png"), (plot_accuracy_vs_iterations, "it.png")):
        assert fn(res, tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suite_sweep_of_three_points_is_one_thin_line() -> None:
    res = {"clean": {"acc": 0.8, "kind": "clean", "eps": 0.0, "steps": 0},
           **{f"pgd{k}": _row(0.5 - k / 1000, k) for k in (1, 10, 100)},
           "pgd10-eps8": _row(0.2, 10, eps=8.0)}
    by_steps = _curves(suite_figure(res, "steps"))
    assert sorted(len(ln.get_xdata()) for ln in by_steps.values()) == [1, 3]
    assert all(_sweep(ln) if len(ln.get_xdata()) >= 3 else _measured_only(ln) for ln in by_steps.values())
    by_eps = _curves(suite_figure(res, "eps"))
    assert sorted(len(ln.get_xdata()) for ln in by_eps.values()) == [2, 2, 3]  # 1, 100 steps: 2; 10 steps: 3
    assert all(_sweep(ln) if len(ln.get_xdata()) >= 3 else _measured_only(ln) for ln in by_eps.values())


@pytest.mark.parametrize("steps,joined", [((10,), False), ((10, 100), False), ((1, 10, 100), True)])
def test_accuracy_vs_steps_joins_only_three_or_more(tmp_path: Path, steps: tuple[int, ...], joined: bool) -> None:
    res = {"clean": {"acc": 0.9}, **{f"pgd{k}": {"steps": k, "acc": 0.4} for k in steps}}
    (line,) = _curves(accuracy_vs_steps_figure(res)).values()
    assert _sweep(line) if joined else _measured_only(line)
    assert plot_accuracy_vs_steps(res, tmp_path / "a.png").is_file()


def test_training_plot_val_points_are_markers(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    recs = [{"kind": "train", "step": s, "loss": 2.0 / s} for s in range(1, 30)]
    recs += [{"kind": "val", "step": s, "clean_acc": 0.5, "pgd_acc": 0.2, "attack": "pgd"} for s in (10, 20)]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    curves = _curves(training_figure(log))
    assert _measured_only(curves["val clean"]) and _measured_only(curves["val PGD"])
    assert plot_training(log, tmp_path / "t.png").is_file()


# --------------------------------------------------------------------------------------------- eval progress


def test_eval_bar_names_each_attack_with_its_index_and_clean_accuracy(capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    batches = [(torch.rand(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(2)]
    specs = [AttackSpec("clean", "clean"), AttackSpec("pgd1", "pgd", eps=4, steps=1),
             AttackSpec("pgd2", "pgd", eps=4, steps=2), AttackSpec("pgd3-eps8", "pgd", eps=8, steps=3)]
    doc = run_suite(model, batches, Suite("tiny", specs), progress=True, probes=False, desc="final eval")
    err = capsys.readouterr().err
    assert doc["n"] == 8
    for i, label in enumerate(("pgd1", "pgd2", "pgd3-eps8"), 1):
        assert f"final eval {label} ({i}/3)" in err, err
    assert "clean=" in err and "img" in err
    run_suite(model, batches, Suite("tiny", specs), progress=False, probes=False)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------------- umask


def _tiny_model() -> NormalizedModel:
    torch.manual_seed(0)
    return NormalizedModel(timm.create_model("test_resnet", num_classes=3), MEAN, STD).eval()


def _export(folder: Path, n: int) -> Path:
    return export_timm(_tiny_model(), folder, mean=MEAN, std=STD, input_size=32, extra={"n": n})


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_follow_umask(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        assert fsio.current_umask() == mask
        atomic_write_bytes(tmp_path / "run" / "config.yaml", b"a: 1\n")
        out = _export(tmp_path / "run" / "export", 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "run" / "config.yaml").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"config.json", "model.safetensors", "atscale.json"} <= {p.name for p in files}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~mask}


def test_umask_without_proc_is_read_once_and_restored(tmp_path: Path) -> None:
    """The fallback (no /proc): os.umask(0) then restore, cached; the process keeps its umask."""
    code = ("import os, atscale.fsio as f\nos.umask(0o027)\nf._proc_umask = lambda: None\n"
            "assert f.current_umask() == 0o027 and os.umask(0o027) == 0o027\n"
            "f.atomic_write_bytes('x', b'1')\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.stdout.strip() == "ok", proc.stderr
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o640


# ---------------------------------------------------------------------------------------------- export swap


def _exchange_works(where: Path) -> bool:
    a, b = where / "probe-a", where / "probe-b"
    a.mkdir(), b.mkdir()
    works = exchange(a, b)
    a.rmdir(), b.rmdir()
    return works


def test_exchange_swaps_two_folders(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "f").write_text("A"), (b / "f").write_text("B")
    if not exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A"
    with pytest.raises(FileNotFoundError):
        exchange(a, tmp_path / "missing")


def test_replace_dir_without_exchange_still_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsio, "exchange", lambda a, b: False)
    src, dst = tmp_path / ".dst.tmp", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    (src / "f").write_text("new"), (dst / "f").write_text("old")
    replace_dir(src, dst)
    assert (dst / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_second_export_replaces_first_and_export_never_missing(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run" / "export"
    _export(out, 1)
    seen: list[bool] = []
    real_rmtree, real_rename = shutil.rmtree, os.rename

    def watch(fn):
        def wrapped(*a, **k):
            r = fn(*a, **k)
            seen.append((out / "atscale.json").is_file())
            return r
        return wrapped

    atomic = _exchange_works(tmp_path)
    monkeypatch.setattr(shutil, "rmtree", watch(real_rmtree))
    monkeypatch.setattr(os, "rename", watch(real_rename))
    _export(out, 2)
    if atomic:
        assert seen and all(seen), seen
    assert json.loads((out / "atscale.json").read_text()) == {"n": 2}
    assert sorted(p.name for p in out.parent.iterdir()) == ["export"]


def test_failed_export_keeps_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _export(tmp_path / "export", 1)

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_mod, "save_for_hf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        _export(out, 2)
    assert json.loads((out / "atscale.json").read_text()) == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_exports_are_removed(tmp_path: Path) -> None:
    host = export_mod._host()
    day_ago = time.time() - export_mod.FOREIGN_STALE_S - 60
    names = {f".export.{_dead_pid()}@{host}.abc12345": False, f".export.{os.getpid()}@{host}.abc12345": True,
             f".export.{os.getppid()}@{host}.abc12345-old": True, ".export.1@other-host.abc12345": True,
             ".export.2@other-host.old12345": False, ".export.legacy12": False, ".export-notes": True}
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    for name in (".export.2@other-host.old12345", ".export.legacy12"):
        os.utime(tmp_path / name, (day_ago, day_ago))
    (tmp_path / ".export.json.abc123.tmp").write_text("a file, never touched")
    removed = remove_stale_temp_dirs(tmp_path / "export")
    assert sorted(p.name for p in removed) == sorted(n for n, kept in names.items() if not kept)
    left = {n for n, kept in names.items() if kept} | {".export.json.abc123.tmp"}
    assert {p.name for p in tmp_path.iterdir()} == left
    stale = tmp_path / f".export.{_dead_pid()}@{host}.zzz99999"
    stale.mkdir()
    _export(tmp_path / "export", 1)
    assert not stale.exists() and (tmp_path / "export" / "config.json").is_file()
