"""APE-G and ARN (issue 14): losses against a direct computation, the alternating updates touching only their own
networks, L_adv reaching the decoder only (ARN Eq. 7-8), and a real ARN run resuming exactly with its discriminators."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from atscale.checkpoint import load_checkpoint
from atscale.config import load_config
from atscale.defenses import build_model
from atscale.train import main
from atscale.training.gan_objectives import APEGObjective, ARNObjective, gaussian_kl_to_standard

from conftest import tiny_overrides

TWO_ATTACKS = [{"attack": "pgd", "eps": 8, "steps": 2, "step": 4}, {"attack": "pgd", "norm": "l2", "eps": 128,
                                                                      "steps": 2, "step": 64}]


def _model(name: str):
    kwargs = {"ape_g": "{widths: [8, 16]}", "arn": "{widths: [8, 16], code: 8}"}[name]
    cfg = load_config(None, [f"defense.preprocessor={name}", f"defense.kwargs={kwargs}", "defense.train=preprocessor",
                             "model.init_from=t.pt", "model.arch=resnet18", "model.kwargs={channels: [8, 16, 32, 64]}",
                             "model.channels_last=false", "model.mean=[0.5, 0.5, 0.5]", "model.std=[0.5, 0.5, 0.5]"])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.defense, 10).eval()


def _batch(n: int = 4):
    g = torch.Generator().manual_seed(2)
    return torch.rand(n, 3, 32, 32, generator=g), torch.rand(n, 3, 32, 32, generator=g), torch.arange(n)


def _params(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def _changed(before: dict, m) -> set[str]:
    return {k for k, v in m.named_parameters() if not torch.equal(before[k], v)}


def test_ape_g_loss_and_its_discriminator_step() -> None:
    model = _model("ape_g").train()
    obj = APEGObjective(disc_lr=1e-2)
    obj.bind(model)
    x, x_adv, y = _batch()
    out = obj(model, x, x_adv, y)
    restored = model.preprocessor(x_adv)
    d = obj.disc["d"]
    direct = 0.7 * ((restored - x) ** 2).mean() + 0.3 * -F.logsigmoid(d(restored)).mean()
    assert torch.allclose(out.loss, direct, rtol=1e-5)
    out.loss.backward()
    assert all(p.grad is None for p in d.parameters())  # the discriminator is frozen during G's backward
    gen, disc = _params(model), _params(d)
    obj.after_backward()
    assert not _changed(gen, model) and _changed(disc, d) == set(disc)


def test_arn_loss_is_eq_1_to_8_and_l_adv_reaches_the_decoder_only() -> None:
    model = _model("arn").train()
    obj = ARNObjective(TWO_ATTACKS, lam1=0.1, lam2=0.01, theta=10.0)  # a large theta: L_adv's share is large
    obj.bind(model)
    x, _, y = _batch()
    x_adv = torch.cat([_batch()[1], torch.rand(4, 3, 32, 32)])  # K = 2 seen attacks
    out = obj(model, x, x_adv, y)

    enc, dec = model.preprocessor.encoder, model.preprocessor.decoder
    z = enc(x_adv)
    restored = dec(z)
    target = torch.cat([x, x])
    l_mse = ((restored - target) ** 2).sum((1, 2, 3)).mean()  # Eq. 4
    l_att = -(F.log_softmax(obj.disc["attack"](z), 1) / 2).sum(1).mean()  # Eq. 2: towards [1/K, 1/K]

    def kl(c):  # Eq. 3: KL of the batch's per-channel Gaussian to N(0, 1), by hand
        flat = c.permute(1, 0, 2, 3).reshape(c.shape[1], -1)
        mu, var = flat.mean(1), flat.var(1, unbiased=False)
        return (0.5 * (var + mu ** 2 - 1 - torch.log(var))).mean()

    l_nor = (kl(z[:4]) + kl(z[4:])) / 2
    l_adv = -F.logsigmoid(obj.disc["image"](restored)).mean()  # Eq. 6
    assert torch.allclose(gaussian_kl_to_standard(z[:4]), kl(z[:4]), rtol=1e-5)
    assert torch.allclose(out.loss, l_mse + 0.1 * l_att + 0.01 * l_nor + 10.0 * l_adv, rtol=1e-5)
    assert out.logits.shape[0] == 4  # accuracy on the first seen attack's batch

    params = list(enc.parameters()) + list(dec.parameters())
    n_enc = len(list(enc.parameters()))
    grads = torch.autograd.grad(out.loss, params)
    l_e = l_mse + 0.1 * l_att + 0.01 * l_nor
    no_adv = torch.autograd.grad(l_e, params, retain_graph=True)
    with_adv = torch.autograd.grad(l_e + 10.0 * l_adv, params)
    for a, b, c in zip(grads[:n_enc], no_adv[:n_enc], with_adv[:n_enc]):  # Eq. 7: E follows L_E, without L_adv
        err, share = (a - b).abs().max(), (c - b).abs().max()
        assert err <= 1e-5 * b.abs().max() and share > 100 * err, (err, share)
    for a, c in zip(grads[n_enc:], with_adv[n_enc:]):  # Eq. 8: G follows L_mse + theta L_adv
        assert (a - c).abs().max() <= 1e-5 * c.abs().max()


def test_arn_alternating_updates_change_only_their_own_networks() -> None:
    model = _model("arn").train()
    obj = ARNObjective(TWO_ATTACKS, 0.1, 0.01, 0.1, disc_lr=1e-2)
    obj.bind(model)
    x, _, y = _batch()
    x_adv = obj.make_adv(model, None, x, y)
    assert x_adv.shape[0] == 8 and (x_adv[:4] - x).abs().max() <= 8 / 255 + 1e-6
    opt = torch.optim.SGD(model.preprocessor.parameters(), lr=0.1)
    d_before, p_before = _params(obj.disc.nets), _params(model)
    obj(model, x, x_adv, y).loss.backward()
    opt.step()
    assert not _changed(d_before, obj.disc.nets)  # E, G's step leaves D_A, D_I alone
    assert {k.split(".")[0] for k in _changed(p_before, model)} == {"preprocessor"}  # the target stays fixed
    p_mid = _params(model)
    obj.after_backward()
    assert not _changed(p_mid, model)  # D_A, D_I's step leaves E, G alone
    assert {k.split(".")[0] for k in _changed(d_before, obj.disc.nets)} == {"attack", "image"}


def test_arn_run_resumes_exactly_with_its_discriminators(digits_root: Path, tmp_path: Path,
                                                         trained_digits_model) -> None:
    over = {"defense.preprocessor": "arn", "defense.kwargs": {"widths": [8, 16], "code": 8},
            "defense.train": "preprocessor", "objective.name": "arn", "objective.arn_attacks": TWO_ATTACKS,
            "attack.name": "none", "optim.name": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 0.0,
            "model.init_from": str(trained_digits_model[1].run_dir / "checkpoints" / "last.pt")}
    main(load_config(None, tiny_overrides(digits_root, tmp_path, "full", **over, **{"run.max_steps": 4})))
    main(load_config(None, tiny_overrides(digits_root, tmp_path, "split", **over, **{"run.max_steps": 2})))
    main(load_config(None, tiny_overrides(digits_root, tmp_path, "split", **over, **{"run.max_steps": 4,
                                                                                     "run.resume": "auto"})))
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    da, db = a["objective"]["disc"]["nets"], b["objective"]["disc"]["nets"]
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)


def test_arn_seen_attacks_take_the_papers_types_in_their_own_units() -> None:
    """defense_PP (PGD_N + PGD_T), defense_DP (DDN_N) and the STA ablation (Zhou et al. 2021 Sec 4.2)."""
    from atscale.attacks import DDN, PGD, STA

    obj = ARNObjective([{"attack": "pgd", "eps": 8, "steps": 3, "step": 2, "targeted": True},
                        {"attack": "ddn", "eps": 127.5, "steps": 3}, {"attack": "sta", "eps": 1.0, "steps": 3}],
                       0.1, 0.01, 0.1)
    pgd, ddn, sta = obj.attacks
    assert isinstance(pgd, PGD) and pgd.targeted and pgd.eps == pytest.approx(8 / 255)
    assert isinstance(ddn, DDN) and ddn.eps == pytest.approx(0.5)
    assert isinstance(sta, STA) and sta.eps == 1.0  # flow pixels, not /255
