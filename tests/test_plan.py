"""``atscale plan`` (atscale.planning): counted FLOPs per training image against direct FlopCounterMode counts of the same
real timm model, PGD-k linear in k, smaller phases cheaper, objectives' update passes, the JSON the CLI prints and
its one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from atscale import planning as P
from atscale.cli import main
from atscale.config import load_config
from atscale.planning import flops, gpus
from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, **extra: object):
    return load_config(None, tiny_overrides(tmp_path / "no_data", tmp_path / "runs", "plan", **extra))


def _direct(fn) -> float:
    """Unmodified FlopCounterMode around ``fn``."""
    with FlopCounterMode(display=False) as c:
        fn()
    return float(c.get_total_flops())


def test_attack_step_and_forward_match_a_direct_flopcounter_count(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    cost = P.count_phase(cfg, P.phases_of(cfg)[0])
    model = flops.phase_model(cfg, P.phases_of(cfg)[0], torch.device("cpu")).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    y = torch.tensor([0, 1, 2])

    def attack_step() -> None:  # one PGD step: forward + input-gradient backward, parameters frozen
        F.cross_entropy(model(x), y).backward()

    with torch.no_grad():
        forward = _direct(lambda: model(x)) / 3
    assert cost.forward == pytest.approx(forward, rel=1e-9)
    assert cost.attack_step == pytest.approx(_direct(attack_step) / 3, rel=1e-9)
    assert cost.attack_fixed == 0  # untargeted PGD from a random start: no pass outside its steps
    assert cost.counted_on == "fake"


def test_fake_tensor_count_equals_real_arithmetic_count(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"objective.name": "trades", "attack.iters": 3})
    spec = P.phases_of(cfg)[0]
    fake, real = P.count_phase(cfg, spec), P.count_phase(cfg, spec, fake=False)
    assert (fake.counted_on, real.counted_on) == ("fake", "cpu")
    for field in ("forward", "attack_step", "attack_fixed", "update"):
        assert getattr(fake, field) == pytest.approx(getattr(real, field), rel=1e-9), field
    assert real.attack_fixed == pytest.approx(real.forward, rel=1e-9)  # TRADES: one clean forward for p(x)
    madry = P.count_phase(cfg := replace(cfg, objective=replace(cfg.objective, name="madry")), P.phases_of(cfg)[0])
    assert real.update == pytest.approx(2 * madry.update, rel=1e-9)  # one pass over clean + adversarial


def test_pgd_k_is_linear_in_k_and_matches_a_real_pgd_k(tmp_path: Path) -> None:
    """The plan extrapolates from PGD-1 and PGD-2; a real targeted least-likely PGD-6 (one clean forward for the
    targets, then 6 steps) counted directly must equal fixed + 6 x step."""
    cfg = _cfg(tmp_path, **{"attack.targeted": True, "attack.target_mode": "least_likely"})
    spec = P.phases_of(cfg)[0]
    cost = P.count_phase(cfg, spec)
    assert cost.attack_fixed == pytest.approx(cost.forward, rel=1e-9)
    model = flops.phase_model(cfg, spec, torch.device("cpu"))
    objective, _ = flops.phase_objective(cfg)
    x, y = flops.synthetic_batch(cfg, 2, 32, torch.device("cpu"), 10)
    real6 = P.count_flops(lambda: objective.make_adv(model, flops.phase_attack(cfg, spec, 6), x, y)) / 2
    assert real6 == pytest.approx(cost.attack_fixed + 6 * cost.attack_step, rel=1e-9)
    assert cost.attack_step == pytest.approx(2 * cost.forward, rel=1e-9)  # forward + input-gradient backward


def test_grouped_conv_weight_gradient_costs_one_forward() -> None:
    """A depthwise / grouped convolution's full backward (input and weight gradients) is two forwards; torch's stock
    formula counts the weight gradient ``groups`` times over."""
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, groups=8)
    x = torch.rand(2, 32, 8, 8, requires_grad=True)
    with torch.no_grad():
        forward = P.count_flops(lambda: conv(x))
    out = conv(x)
    assert P.count_flops(lambda: out.sum().backward()) == 2 * forward
    out = conv(x)
    assert _direct(lambda: out.sum().backward()) == (1 + 8) * forward  # the stock count this corrects


def test_update_pass_follows_the_objective(tmp_path: Path) -> None:
    """Mixed / TRADES run the update on the clean + adversarial concatenation: twice Madry's; free replays it m x."""
    costs = {}
    for name in ("madry", "mixed", "free"):
        cfg = _cfg(tmp_path, **{"objective.name": name, "objective.free_replays": 3})
        costs[name] = P.count_phase(cfg, P.phases_of(cfg)[0])
    madry = costs["madry"]
    # forward F + weight gradients (F) + input gradients of every layer but the stem (< F)
    assert 2 * madry.forward < madry.update < 3 * madry.forward
    assert costs["mixed"].update == pytest.approx(2 * madry.update, rel=1e-9)
    free = costs["free"]
    assert free.attack == 0 and free.replays == 3
    assert free.per_image == pytest.approx(3 * free.update, rel=1e-9) and free.update > madry.update  # + input grad


def test_smaller_phase_costs_less_and_totals_add_up(tmp_path: Path) -> None:
    phases = [{"until_epoch": 1, "image_size": 16, "attack_iters": 1}, {"until_epoch": 3, "image_size": 32}]
    cfg = _cfg(tmp_path, **{"data.phases": phases, "schedule.epochs": 3})
    p = P.plan(cfg, gpus=1, kinds=["a100"], mfu=0.5, images=1000)
    small, full = p["phases"]
    assert (small["image_size"], small["attack_iters"], full["image_size"], full["attack_iters"]) == (16, 1, 32, 2)
    assert small["forward_gflops"] < full["forward_gflops"] and small["gflops_per_image"] < full["gflops_per_image"]
    assert small["images_per_epoch"] == full["images_per_epoch"] == 1000 // 64 * 64
    assert p["total_flops"] == pytest.approx(sum((r["epochs"][1] - r["epochs"][0]) * r["images_per_epoch"] *
                                                 r["gflops_per_image"] * 1e9 for r in p["phases"]), rel=1e-9)
    a100 = p["gpu_kinds"][0]
    assert a100["images_per_s_per_gpu"][0] > a100["images_per_s_per_gpu"][1]
    assert a100["gpu_hours"] * 3600 * 0.5 * 312e12 == pytest.approx(p["total_flops"], rel=1e-9)


def test_cli_prints_json_with_the_fields(digits_root: Path, capsys) -> None:
    rc = main(["plan", "--config", str(REPO / "configs/demo.yaml"), "--gpus", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    meta = json.loads((digits_root / "meta.json").read_text())
    assert out["dataset_images"] == meta["n_train"]  # the digits split, computed without building it
    for key in ("preset", "model", "phases", "gpu_kinds", "total_flops", "mfu", "mfu_source", "scaling", "counter"):
        assert key in out, key
    assert out["gpus"] == 8 and out["preset"] == "demo" and out["published"] is None and out["measured"] is None
    assert [k["kind"] for k in out["gpu_kinds"]] == list(P.GPU_KINDS)
    phase = out["phases"][0]
    assert phase["image_size"] == 32 and phase["attack_iters"] == 5 and phase["counted_on"] == "fake"
    assert phase["images_per_epoch"] == meta["n_train"] // 8 // 64 * 64 * 8  # drop_last per rank
    for k in out["gpu_kinds"]:
        assert k["wall_hours"] == pytest.approx(k["gpu_hours"] / 8)
        rate = out["mfu"] * k["peak_tflops"] * 1e12
        assert k["images_per_s_per_gpu"][0] == pytest.approx(rate / (phase["gflops_per_image"] * 1e9))


def test_cli_dataset_size_from_meta_json_and_text_table(digits_root: Path, capsys) -> None:
    rc = main(["plan", "--config", str(REPO / "configs/demo.yaml"), "--gpu-kind", "h100,v100", "--gpus", "2",
               f"data.root={digits_root}"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "meta.json" in text and "H100 SXM" in text and "V100 SXM2" in text and "A100 SXM" not in text
    assert "wall on 2 GPUs" in text and "MFU 0.35" in text


@pytest.mark.parametrize("args, fragment", [
    (["--gpus", "0"], "--gpus 0 is not a GPU count"),
    (["--gpu-kind", "tpu-v4"], "--gpu-kind tpu-v4 is unknown; use one of v100, a100"),
    (["--mfu", "1.5"], "--mfu 1.5 is not a utilization"),
])
def test_bad_arguments_are_one_line_exit_2_without_torch(args: list[str], fragment: str) -> None:
    probe = ("import json, sys\nfrom atscale.cli import main\nrc = main(json.loads(sys.argv[1]))\n"
             "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))")
    res = subprocess.run([sys.executable, "-c", probe, json.dumps(["plan", "--config", "configs/demo.yaml", *args])],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"rc": 2, "torch": False}, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("atscale plan: error: ") and fragment in lines[0], lines


def test_too_many_gpus_for_the_dataset_is_a_config_error(tmp_path: Path, capsys) -> None:
    rc = main(["plan", "--config", str(REPO / "configs/demo.yaml"), "--gpus", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "give no full batch of 64" in err[0] and "fewer GPUs" in err[0]


def test_measure_times_real_steps(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"run.device": "cpu"})
    p = P.plan(cfg, gpus=1, kinds=["a100"], images=640, measure=True, measure_steps=1)
    m = p["measured"][0]
    assert m["batch"] == 2 and m["images_per_s"] > 0 and m["device"].startswith("cpu")
    assert m["achieved_tflops"] == pytest.approx(m["images_per_s"] * p["phases"][0]["gflops_per_image"] / 1e3)
    assert "mfu" not in m  # no GPU kind for a CPU
    assert "measured phase 0 on cpu" in P.format_plan(p)


def test_measured_mfu_reads_gpu_results_only(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gpus, "RESULTS_DIR", tmp_path)
    row = {"model": "resnet50", "ours": {"mfu": 0.4}}
    (tmp_path / "cpu_mfu.json").write_text(json.dumps({"benchmark": "mfu", "device": {"type": "cpu"}, "rows": [row]}))
    assert P.measured_mfu("resnet50") is None
    gpu = {"benchmark": "mfu", "device": {"type": "cuda"},
           "rows": [row, {"model": "resnet50", "ours": {"mfu": 0.3}}, {"model": "resnet152", "ours": {"mfu": 0.5}}]}
    (tmp_path / "h100_mfu.json").write_text(json.dumps(gpu))
    assert P.measured_mfu("resnet50")[0] == pytest.approx(0.35)
    assert P.measured_mfu("vit_base_patch16_224")[0] == pytest.approx(0.4)
    assert "h100_mfu.json" in P.measured_mfu("resnet50")[1]


def test_device_names_map_to_gpu_kinds() -> None:
    assert gpus.kind_of_device("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpus.kind_of_device("NVIDIA A10") == "a10"
    assert gpus.kind_of_device("NVIDIA A10G") is None
    assert gpus.kind_of_device("NVIDIA H100 80GB HBM3") == "h100"
    assert gpus.kind_of_device("NVIDIA H100 PCIe") == "h100-pcie"
    assert gpus.kind_of_device("NVIDIA H200") == "h200"


def test_published_iat_run_implies_a_possible_utilization() -> None:
    """ResNet-152 PGD-30 (r152_iat): the counted FLOPs over the published 52 h on 128 V100s must need less than the
    V100's fp32 peak (implied MFU < 1) and more than a trivial share of it."""
    cfg = load_config(REPO / "configs/imagenet/r152_iat.yaml")
    p = P.plan(cfg, gpus=128, kinds=["v100"], mfu=0.35)
    phase, pub = p["phases"][0], p["published"]
    assert phase["forward_equivalents"] == pytest.approx(2 * 30 + 3, abs=0.5)
    assert pub["gpu_hours"] == 128 * 52 and 0.1 < pub["implied_mfu"] < 1
