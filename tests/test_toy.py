"""vadd_toy.py end to end on tiny configs, and common.py's T-step bounds against exact likelihoods: with two
positions every unmasking path of a T-step sampler can be enumerated."""
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch

import common
import vadd_toy as toy
from helpers import random_mixture


def tiny_args(tmp_path, *extra):
    return ["--max-iters", "30", "--batch-size", "64", "--width", "32", "--rec-width", "32", "--depth", "1",
            "--bins", "16", "--num-samples", "400", "--num-eval", "200", "--iw-samples", "4",
            "--ref-points", "50000", "--steps", "1,2", "--log-interval", "10", "--ckpt-interval", "10",
            "--out-dir", str(tmp_path / "out"), *extra]


def trained(tmp_path, method, iters=300, bins=8):
    """A briefly trained model on checkerboard with a small vocabulary, through the script's own train()."""
    cfg = toy.parse_config(tiny_args(tmp_path, "--bins", str(bins), "--width", "64", "--max-iters", str(iters),
                                     "--batch-size", "256", "--log-interval", "1000", "--ckpt-interval", "1000"))
    os.makedirs(cfg.out_dir, exist_ok=True)
    model, _, _ = toy.train(cfg, method)
    return model


# ----------------------------------------------------------------------------------------------------------
# Exact likelihoods of the T-step samplers on two positions

def exact_nll(model, x0, T, schedule, z=None, fresh_z=False):
    """-log p_T(x0) of the T-step sampler, summed over every unmasking path: states are the sets of revealed
    positions (bit j = position j), revealed tokens must equal x0's. z: (Z, d) prior draws, averaged at the
    end (one z for all steps, VADD-CS) or at every step (fresh_z, the vanilla sampler); None for MDM."""
    bins, B = model.denoiser.bins, len(x0)
    Z = 1 if z is None else len(z)
    x0_rep = x0.repeat_interleave(Z, 0)
    z_rep = None if z is None else z.repeat(B, 1)
    prob = {0: torch.ones(B, Z, dtype=torch.float64)}
    for i in range(T, 0, -1):
        alpha_t, alpha_s = schedule.alpha_grid(torch.tensor([i / T, (i - 1) / T], dtype=torch.float64))
        p = common.unmask_probability(alpha_t, alpha_s)
        new = {}
        for state, pr in prob.items():
            masked = [j for j in (0, 1) if not state >> j & 1]
            xt = x0_rep.clone()
            xt[:, masked] = bins
            with torch.no_grad():
                mu = torch.softmax(model.denoiser(xt, z_rep).double(), -1)
            mu = mu.gather(-1, x0_rep.unsqueeze(-1)).squeeze(-1).view(B, Z, 2)
            for k in range(len(masked) + 1):
                for revealed in itertools.combinations(masked, k):
                    f = torch.ones(B, Z, dtype=torch.float64)
                    for j in masked:
                        f = f * (p * mu[:, :, j] if j in revealed else 1 - p)
                    if fresh_z:
                        f = f.mean(1, keepdim=True)
                    target = state | sum(1 << j for j in revealed)
                    new[target] = new.get(target, 0) + pr * f
        prob = new
    p_x0 = prob[3].mean(1)
    return -torch.log(p_x0), prob[3]


def bound_stats(x0, n, **kw):
    """Mean and standard error of common.step_bound per point, over n repeats of each point. The batch holds
    the points in turn (not each point's repeats in a row), so that every point meets every stratum of the
    step and time draws, which are stratified over the batch."""
    b = common.step_bound(x0.repeat(n, 1), **kw).view(n, len(x0)).double()
    return b.mean(0), b.std(0) / math.sqrt(n)


POINTS = torch.tensor([[1, 2], [2, 1], [6, 5], [0, 0], [7, 6], [3, 3]])


def test_mdm_bound_is_exact_at_one_step_and_above_the_exact_nll_beyond(tmp_path):
    torch.manual_seed(0)
    model, schedule = trained(tmp_path, "mdm"), common.Schedule("linear")
    kw = dict(denoise=model.denoise, schedule=schedule, mask_id=8, sampler="mdm")
    exact1, _ = exact_nll(model, POINTS, 1, schedule)
    bound1 = common.step_bound(POINTS, T=1, exact=True, **kw)
    assert torch.allclose(bound1.double(), exact1, atol=1e-4)
    for T in (2, 3, 5):
        exact, _ = exact_nll(model, POINTS, T, schedule)
        mean, se = bound_stats(POINTS, 4000, T=T, exact=True, **kw)
        assert torch.all(mean >= exact - 4 * se), (T, mean, exact, se)
        one_step, se1 = bound_stats(POINTS, 4000, T=T, exact=False, **kw)  # unbiased for the summed bound
        assert torch.all((one_step - mean).abs() <= 4 * torch.sqrt(se ** 2 + se1 ** 2)), (T, one_step, mean)


def test_vadd_bounds_are_above_the_exact_nll(tmp_path):
    """Trained with N(0, I), then with a mixture prior put in its place: a bound holds whatever the networks
    and the prior are, and with a mixture each KL in it is the single-draw estimate."""
    torch.manual_seed(1)
    model, schedule = trained(tmp_path, "vadd", iters=400), common.Schedule("linear")
    for prior in (model.prior, random_mixture(model.latent_dim, 3)):
        z = prior.sample(20_000, "cpu")
        kw = dict(denoise=model.denoise, schedule=schedule, mask_id=8, recognize=model.recognition, prior=prior)
        for sampler, T in [("vadd_cs", 1), ("vadd_cs", 3), ("vadd", 1), ("vadd", 3)]:
            nll, per_z = exact_nll(model, POINTS, T, schedule, z, fresh_z=sampler == "vadd")
            nll_se = per_z.std(1) / (per_z.mean(1) * math.sqrt(per_z.shape[1]))  # delta method, prior draws
            mean, se = bound_stats(POINTS, 4000, T=T, sampler=sampler, exact=True, **kw)
            assert torch.all(mean >= nll - 4 * (se + nll_se)), (prior.mixture, sampler, T, mean, nll)
    # one step: vanilla and consistency are the same sampler, and their bounds the same VAE bound
    cs, se_cs = bound_stats(POINTS, 4000, T=1, sampler="vadd_cs", exact=True, **kw)
    va, se_va = bound_stats(POINTS, 4000, T=1, sampler="vadd", exact=True, **kw)
    assert torch.all((cs - va).abs() <= 4 * torch.sqrt(se_cs ** 2 + se_va ** 2))


def test_uniform_denoiser_gives_nelbo_two_log_v(tmp_path):
    torch.manual_seed(2)
    cfg = toy.parse_config(tiny_args(tmp_path))
    model = toy.Model(cfg, "mdm")
    torch.nn.init.zeros_(model.denoiser.out[-1].weight)
    torch.nn.init.zeros_(model.denoiser.out[-1].bias)
    x0 = torch.randint(0, cfg.bins, (1 << 16, 2))
    loss, _ = toy.delbo(model, x0, 0.0)
    se = loss.std().item() / math.sqrt(len(loss))
    assert abs(loss.mean().item() - 2 * math.log(cfg.bins)) < 4 * se


def test_consistency_sampler_keeps_z_and_vanilla_draws_a_new_one(tmp_path):
    """The spy sees the z of every point the denoiser is run on. VADD-CS: every z is one of the first call's
    (which covers all points); vanilla: every call brings z never seen before."""
    torch.manual_seed(3)
    cfg = toy.parse_config(tiny_args(tmp_path))
    model = toy.Model(cfg, "vadd").eval()
    seen, forward = [], model.denoiser.forward
    model.denoiser.forward = lambda xt, z=None: (seen.append(z.clone()), forward(xt, z))[1]
    for sampler in ("vadd_cs", "vadd"):
        seen.clear()
        tokens, nfe = toy.sample(model, 300, 6, sampler, cfg)
        assert tokens.shape == (300, 2) and tokens.min() >= 0 and tokens.max() < cfg.bins
        assert len(seen) > 1 and len(seen[0]) == 300 and nfe == sum(len(z) for z in seen) / 300
        for i, z in enumerate(seen[1:], 1):
            earlier = (z[:, None, :] == torch.cat(seen[:i])[None]).all(-1).any(1)  # each row seen before?
            assert torch.all(earlier) if sampler == "vadd_cs" else not torch.any(earlier)


def test_sampler_with_as_many_steps_as_positions_reveals_one_per_step():
    """T = L reveals about one position per step, and no [M] is left at the end."""
    torch.manual_seed(4)
    L, V, n, T = 16, 5, 4000, 16
    schedule = common.Schedule("linear")
    xt, revealed = torch.full((n, L), V), []
    for i in range(T, 0, -1):
        alpha = schedule.alpha_grid(torch.tensor([i / T, (i - 1) / T], dtype=torch.float64))
        xs = common.reverse_step(xt, torch.randn(n, L, V), alpha[0], alpha[1], V)
        revealed.append(((xt == V) & (xs != V)).sum(1).double().mean().item())
        xt = xs
    assert not (xt == V).any()
    assert np.allclose(revealed, 1.0, atol=0.1), revealed


# ----------------------------------------------------------------------------------------------------------
# End to end through main()

def test_main_writes_every_output(tmp_path, capsys):
    metrics = toy.main(tiny_args(tmp_path))
    out = tmp_path / "out"
    names = ["data.npy", "metrics.json", "samples.png", "js.png", "training.png", "ckpt_mdm.pt", "ckpt_vadd.pt"]
    names += [f"samples_{s}_T{T}.npy" for s in ("mdm", "vadd", "vadd_cs") for T in (1, 2)]
    for name in names:
        assert (out / name).stat().st_size > 0, name
    for s in ("mdm", "vadd", "vadd_cs"):
        a = np.load(out / f"samples_{s}_T2.npy")
        assert a.shape == (400, 2) and a.dtype.kind == "i" and a.min() >= 0 and a.max() < 16
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["unit"] == "nats per point" and saved["config"]["vadd"]["bins"] == 16
    assert set(saved["likelihood"]["mdm"]) == {"mdm_nelbo", "mdm_nelbo_se"}
    assert set(saved["likelihood"]["vadd"]) == {"delbo", "delbo_se", "iw_delbo", "iw_delbo_se", "iw_samples"}
    assert 0 < saved["data"]["entropy"] < 2 * math.log(16) and saved["training"]["vadd"]["iters"] == 30
    assert len(saved["by_steps"]) == 6
    for row in saved["by_steps"]:
        for key in ("sampler", "steps", "bound", "sample_seconds", "nfe", "js", "kl", "validity"):
            assert key in row, key
        assert 0 <= row["js"] <= math.log(2) and 0 <= row["validity"] <= 1
        assert row["bound"] > 0 and row["nfe"] >= 1
    assert metrics["by_steps"] == saved["by_steps"]
    table = capsys.readouterr().out.split("checkerboard, 16 bins: data entropy")[1]  # print_table's, at the end
    assert all(f"\n{r['sampler']:8s} {r['steps']:4d} {r['js']:7.4f} " in table for r in saved["by_steps"])


@pytest.mark.parametrize("prior", ["gaussian", "mixture"])
def test_resume_matches_a_run_straight_through(tmp_path, monkeypatch, prior):
    """A learned prior travels with the model: its parameters and their optimizer state are saved, restored."""
    args = lambda d: tiny_args(d, "--method", "vadd", "--max-iters", "40", "--ckpt-interval", "20",  # noqa: E731
                               "--prior", prior)
    toy.main(args(tmp_path / "straight"))
    update, calls = common.EMA.update, []

    def interrupted_update(self, model):
        calls.append(1)
        if len(calls) == 25:
            raise KeyboardInterrupt  # the run dies after the checkpoint at iteration 20
        update(self, model)

    monkeypatch.setattr(common.EMA, "update", interrupted_update)
    with pytest.raises(KeyboardInterrupt):
        toy.main(args(tmp_path / "resumed"))
    monkeypatch.setattr(common.EMA, "update", update)
    assert torch.load(tmp_path / "resumed" / "out" / "ckpt_vadd.pt", weights_only=True)["iter"] == 20
    toy.main(args(tmp_path / "resumed") + ["--resume"])
    a = torch.load(tmp_path / "straight" / "out" / "ckpt_vadd.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "out" / "ckpt_vadd.pt", weights_only=True)
    assert b["iter"] == 40 and ("prior.means" in a["model"]) == (prior == "mixture")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear message, nothing written

@pytest.mark.parametrize("extra, message", [
    (["--dataset", "spiral"], "invalid choice: 'spiral'"),
    (["--bins", "1"], "argument --bins: '1' is not a whole number from 2 to inf"),
    (["--steps", "0"], "positive whole numbers separated by commas"),
    (["--steps", "1,-2"], "positive whole numbers separated by commas"),
    (["--steps", "1,x"], "positive whole numbers separated by commas"),
    (["--num-samples", "0"], "argument --num-samples: '0' is not a whole number from 1 to inf"),
    (["--train-steps", "2,0"], "positive whole numbers separated by commas"),
    (["--ema", "1.5"], "argument --ema: '1.5' is not a finite number from 0 to 1"),
    (["--resume", "--eval-only"], "unrecognized arguments: --eval-only"),  # the toy always trains
    (["--objective", "elbo"], "invalid choice: 'elbo'"),
])
def test_bad_flags_stop_before_writing(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        toy.main(tiny_args(tmp_path, *extra))
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_out_dir_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit, match="is not a folder this run can write to"):
        toy.main(tiny_args(tmp_path, "--out-dir", str(tmp_path / "file" / "out")))
    assert (tmp_path / "file").read_text() == "not a folder"


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    toy.main(tiny_args(tmp_path, "--method", "mdm"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(SystemExit, match="was trained with .* pass the same flags"):
        toy.main(tiny_args(tmp_path, "--method", "mdm", "--width", "48", "--resume"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_one_method_after_the_other_keeps_both_in_metrics(tmp_path):
    """metrics.json keeps one entry per method: a run replaces the entries of the methods it trains, whole.
    A method retrained at other --bins after its checkpoint was removed is drawn at its own bins."""
    toy.main(tiny_args(tmp_path, "--method", "mdm"))
    toy.main(tiny_args(tmp_path, "--method", "vadd"))
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert sorted({r["sampler"] for r in saved["by_steps"]}) == ["mdm", "vadd", "vadd_cs"]
    assert "mdm_nelbo" in saved["likelihood"]["mdm"] and "delbo" in saved["likelihood"]["vadd"]
    before = [r for r in saved["by_steps"] if r["sampler"] == "mdm"]
    (tmp_path / "out" / "ckpt_vadd.pt").unlink()
    toy.main(tiny_args(tmp_path, "--method", "vadd", "--bins", "12", "--steps", "1"))
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [r for r in saved["by_steps"] if r["sampler"] == "mdm"] == before  # MDM's model did not change
    assert [(r["sampler"], r["steps"]) for r in saved["by_steps"] if r["sampler"] != "mdm"] == [("vadd", 1),
                                                                                               ("vadd_cs", 1)]
    assert saved["config"]["mdm"]["bins"] == 16 and saved["config"]["vadd"]["bins"] == 12


# ----------------------------------------------------------------------------------------------------------
# --objective steps (docs/method.md)

def test_steps_loss_is_an_unbiased_estimate_of_the_summed_bound(tmp_path):
    """The mean of the `steps` loss over many draws equals the summed K-step bound: for MDM, and for VADD
    with z ~ r(z | x0, everything masked) and the KL once, i.e. the VADD-CS bound; a set of budgets gives the
    average of their bounds."""
    torch.manual_seed(5)
    schedule, n = common.Schedule("linear"), 4000
    for method in ("mdm", "vadd"):
        model = trained(tmp_path / method, method, iters=200)
        sampler = "mdm" if method == "mdm" else "vadd_cs"
        kw = dict(denoise=model.denoise, schedule=schedule, mask_id=8, recognize=model.recognition,
                  sampler=sampler)
        for budgets in ([3], [1, 2, 4]):
            with torch.no_grad():
                loss = common.steps_loss(POINTS.repeat(n, 1), model.denoise, schedule, 8, budgets,
                                         model.recognition)[0]
            loss = loss.view(n, len(POINTS)).double()
            mean, se = loss.mean(0), loss.std(0) / math.sqrt(n)
            bounds = [bound_stats(POINTS, n, T=K, exact=True, **kw) for K in budgets]
            summed = sum(b[0] for b in bounds) / len(budgets)
            summed_se = torch.sqrt(sum(b[1] ** 2 for b in bounds)) / len(budgets)
            assert torch.all((mean - summed).abs() <= 4 * torch.sqrt(se ** 2 + summed_se ** 2)), (method, budgets)


def test_steps_loss_with_one_step_is_the_vae_bound(tmp_path):
    torch.manual_seed(6)
    schedule = common.Schedule("linear")
    mdm = trained(tmp_path / "mdm", "mdm", iters=50)
    with torch.no_grad():  # MDM, K = 1: everything masked, deterministic, the T = 1 bound exactly
        loss = common.steps_loss(POINTS, mdm.denoise, schedule, 8, [1])[0]
    exact, _ = exact_nll(mdm, POINTS, 1, schedule)
    assert torch.allclose(loss.double(), exact, atol=1e-4)
    vadd = trained(tmp_path / "vadd", "vadd", iters=200)
    masks = []
    forward = vadd.recognition.forward
    vadd.recognition.forward = lambda x0, masked: (masks.append(masked.clone()), forward(x0, masked))[1]
    with torch.no_grad():
        loss = common.steps_loss(POINTS.repeat(4000, 1), vadd.denoise, schedule, 8, [1], vadd.recognition)[0]
        loss = loss.view(4000, -1).double()
    assert len(masks) == 1 and masks[0].all(), "the recognition model sees x0 with everything masked"
    vadd.recognition.forward = forward
    vae, vae_se = bound_stats(POINTS, 4000, denoise=vadd.denoise, schedule=schedule, mask_id=8,
                              recognize=vadd.recognition, sampler="vadd_cs", T=1, exact=True)
    se = loss.std(0) / math.sqrt(4000)
    assert torch.all((loss.mean(0) - vae).abs() <= 4 * torch.sqrt(se ** 2 + vae_se ** 2))


def test_main_with_the_steps_objective(tmp_path):
    metrics = toy.main(tiny_args(tmp_path, "--objective", "steps", "--train-steps", "1,3"))
    assert metrics["config"]["vadd"]["objective"] == "steps" and metrics["config"]["vadd"]["train_steps"] == [1, 3]
    assert {r["sampler"] for r in metrics["by_steps"]} == {"mdm", "vadd", "vadd_cs"}
    assert all(math.isfinite(r["bound"]) for r in metrics["by_steps"])
    with pytest.raises(SystemExit, match="was trained with"):  # a checkpoint of the other objective is refused
        toy.main(tiny_args(tmp_path, "--objective", "delbo", "--resume"))
