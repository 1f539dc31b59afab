"""`atscale --help`, every command's --help and bad arguments answer without importing torch or timm (the command
parses its arguments first, then imports its heavy entry); `python -m atscale.train` / `-m atscale.evaluate` still
work."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = ("import json, sys\nfrom atscale.cli import main\nrc = main(json.loads(sys.argv[1]))\n"
         "print('@@probe ' + json.dumps({'rc': rc, 'heavy': sorted(m for m in ('torch', 'timm') if m in sys.modules)}))")
HELP = [["--help"], ["train", "--help"], ["eval", "--help"], ["export", "--help"], ["data", "--help"],
        ["data", "imagefolder", "--help"], ["data", "digits", "--help"], ["plan", "--help"]]
BAD = [(["train", "--bogus"], "atscale train: error: ", "unknown option"),
       (["train", "--config"], "atscale train: error: ", "--config"),
       (["train", "--twin", "cifar"], "atscale train: error: ", "invalid choice"),
       (["eval", "run/last.pt", "--bogus"], "atscale eval: error: ", "--bogus"),
       (["eval", "run/last.pt", "--eps", "big"], "atscale eval: error: ", "--eps"),
       (["eval", "--attacks", "autoattack", "run/last.pt"], "atscale eval: error: ", "unknown attack"),
       (["eval"], "atscale eval: error: ", "no checkpoint given"),
       (["export", "--checkpoint", "x.pt"], "atscale export: error: ", "--out"),
       (["data", "digits", "--bogus", "--out", "x"], "atscale data: error: ", "--bogus"),
       (["--bogus"], "atscale: error: ", "required: cmd"),
       (["bogus"], "atscale: error: ", "invalid choice"),
       ([], "atscale: error: ", "required")]


def _probe(args: list[str]) -> tuple[dict, str, str]:
    res = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("@@probe ")]
    assert res.returncode == 0 and len(lines) == 1, res.stderr[-3000:]
    out = res.stdout.replace(lines[0], "")
    return json.loads(lines[0][len("@@probe "):]), out, res.stderr


@pytest.mark.parametrize("args", HELP, ids=[" ".join(a) for a in HELP])
def test_help_needs_no_torch(args: list[str]) -> None:
    got, out, err = _probe(args)
    assert got == {"rc": 0, "heavy": []}, (got, err)
    prog = " ".join(["atscale", *[a for a in args if a != "--help"]])
    assert out.startswith(f"usage: {prog}"), out[:300]


@pytest.mark.parametrize("args, prefix, fragment", BAD, ids=[" ".join(a) or "(none)" for a, _, _ in BAD])
def test_bad_arguments_are_one_line_exit_2_without_torch(args: list[str], prefix: str, fragment: str) -> None:
    got, out, err = _probe(args)
    assert got == {"rc": 2, "heavy": []}, (got, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix) and fragment in lines[0], lines
    assert "usage:" not in out + err


def test_console_entry_imports_no_torch_for_help() -> None:
    """The real entry (`python -m atscale`, what the console script runs): -X importtime lists every import."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "atscale", "train", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("usage: atscale train"), res.stderr[-2000:]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in res.stderr.splitlines() if ln.startswith("import time:")}
    assert imported and not {m for m in imported if m.split(".")[0] in ("torch", "timm")}


def test_module_entry_points_still_parse() -> None:
    """`python -m atscale.train` and `python -m atscale.evaluate` (torchrun's entries) keep their command lines."""
    for module, prog in (("atscale.train", "atscale train"), ("atscale.evaluate", "atscale eval")):
        res = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0 and res.stdout.startswith(f"usage: {prog}"), res.stderr[-2000:]


def test_import_atscale_is_light_and_models_register() -> None:
    code = ("import sys, atscale, atscale.cli, atscale.config, atscale.cli_args, atscale.training.preempt\n"
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'heavy import'\n"
            "import timm, atscale.models\n"
            "timm.create_model('resnet50_silu', channels=[8, 16, 32, 64], num_classes=3)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_eval_help_names_every_suite() -> None:
    """The help is written before torch loads, so it cannot read the suite registry: this keeps the two in step."""
    from atscale.evaluation.suites import SUITE_NAMES

    sub = subprocess.run([sys.executable, "-m", "atscale", "eval", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    text = " ".join(sub.stdout.split())
    assert all(f" {name} " in text or f" {name}," in text for name in SUITE_NAMES), (SUITE_NAMES, text)
