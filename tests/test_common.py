"""The mathematics of common.py (docs/method.md): schedules, forward masking, time sampling, KL
annealing, the reverse step, and the estimators' normalisation."""
import itertools
import json
import math
import types

import numpy as np
import pytest
import torch

import common
from helpers import (TableModel, fix_draws, kl_by_hand, log_normal, mixture_log_prob_by_hand, nll_by_hand,
                     random_mixture, reverse_step_probs)


def schedule_names():
    return list(common.SCHEDULES)


@pytest.mark.parametrize("name", schedule_names())
def test_schedule_endpoints_and_weight(name):
    s = common.Schedule(name, eps=1e-3)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a0, a1 = s.alpha(t).tolist()
    assert a0 == pytest.approx(1.0, abs=1e-12)
    assert a1 == pytest.approx(1e-3 if name == "loglinear" else 0.0, abs=1e-12)
    assert s.alpha_grid(t).tolist() == pytest.approx([1.0, 0.0], abs=1e-12)  # samplers start from all-[M]
    # w(t) = -alpha'(t) / (1 - alpha(t)), alpha' by autograd
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    (d_alpha,) = torch.autograd.grad(s.alpha(t).sum(), t)
    expected = -d_alpha / (1 - s.alpha(t))
    assert torch.allclose(s.weight(t.detach()), expected.detach(), rtol=1e-9)
    if name != "cosine":
        assert torch.allclose(s.weight(t.detach()), 1 / t.detach())


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown schedule"):
        common.Schedule("quadratic")


def test_masking_rate_is_one_minus_alpha_for_any_shape():
    torch.manual_seed(0)
    x0 = torch.randint(0, 7, (6, 40, 50, 3))
    alpha = torch.tensor([0.0, 0.1, 0.35, 0.5, 0.9, 1.0])
    xt = common.forward_mask(x0, alpha, mask_id=7)
    assert xt.shape == x0.shape
    kept = xt != 7
    assert torch.equal(xt[kept], x0[kept])  # what is kept is the clean token
    rate = (~kept).flatten(1).float().mean(1)
    n = kept[0].numel()
    se = torch.sqrt(alpha * (1 - alpha) / n).clamp_min(1e-9)
    assert torch.all((rate - (1 - alpha)).abs() <= 5 * se), (rate, 1 - alpha)


def test_time_sampler_is_stratified_inside_eps_one():
    torch.manual_seed(1)
    eps, B = 1e-3, 1000
    for _ in range(5):
        t = common.sample_times(B, eps)
        assert t.min() >= eps and t.max() <= 1
        u = (t - eps) / (1 - eps)
        strata = torch.sort((u * B).floor().long()).values
        assert torch.equal(strata, torch.arange(B)), "each of the B strata holds exactly one time"


def test_kl_annealing():
    assert common.kl_weight(0, 100) == 0.0
    assert common.kl_weight(50, 100) == pytest.approx(0.5)
    assert common.kl_weight(100, 100) == 1.0
    assert common.kl_weight(10_000, 100) == 1.0
    assert common.kl_weight(50, 100, start=0.2) == pytest.approx(0.6)
    assert common.kl_weight(0, 0) == 1.0 and common.kl_weight(7, 0, start=0.3) == 1.0


@pytest.mark.parametrize("name", schedule_names())
def test_weighted_masking_integrates_to_one_per_position(name):
    """E_t[w(t) 1{masked}] = 1 per position. With t on [eps, 1] the exact value is
    (alpha(eps) - alpha(1)) / (1 - eps), within 2e-3 of 1 for eps = 1e-3."""
    torch.manual_seed(2)
    s, eps, B, L = common.Schedule(name), 1e-3, 1 << 15, 256
    t = common.sample_times(B, eps).double()
    xt = common.forward_mask(torch.zeros(B, L, dtype=torch.long), s.alpha(t), mask_id=1)
    per_example = s.weight(t) * (xt == 1).double().mean(1)
    estimate, se = per_example.mean().item(), per_example.std().item() / math.sqrt(B)
    ends = s.alpha(torch.tensor([eps, 1.0], dtype=torch.float64))
    exact = ((ends[0] - ends[1]) / (1 - eps)).item()
    assert abs(exact - 1) < 2e-3
    assert abs(estimate - exact) < 4 * se, (estimate, exact, se)


def reverse_case():
    torch.manual_seed(3)
    V, mask = 5, 5
    xt = torch.tensor([[0, mask, 3, mask], [mask, mask, mask, 1]])
    logits = torch.randn(2, 4, V)
    return xt, logits, mask


def test_reverse_step_probabilities_are_float64_and_sum_to_one():
    xt, logits, mask = reverse_case()
    probs = reverse_step_probs(xt, logits, torch.tensor([0.3, 0.3]), torch.tensor([0.6, 0.6]), mask)
    assert probs.dtype == torch.float64 and probs.shape == (2, 4, 6)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, dtype=torch.float64), atol=1e-12)
    stay = (1 - 0.6) / (1 - 0.3)
    assert probs[0, 1, mask].item() == pytest.approx(stay)  # a masked position stays [M] w.p. (1-a_s)/(1-a_t)
    assert probs[0, 0, 0].item() == 1.0 and probs[0, 2, 3].item() == 1.0  # unmasked positions are copied


def test_reverse_step_copies_unmasked_and_matches_its_distribution():
    xt, logits, mask = reverse_case()
    a_t, a_s = torch.tensor([0.2, 0.4]), torch.tensor([0.7, 0.5])
    torch.manual_seed(4)
    n = 40_000
    xs = common.reverse_step(xt.repeat(n, 1), logits.repeat(n, 1, 1), a_t.repeat(n), a_s.repeat(n), mask)
    xs = xs.view(n, 2, 4)
    unmasked = xt != mask
    assert torch.all(xs[:, unmasked] == xt[unmasked])
    freq = torch.nn.functional.one_hot(xs, 6).double().mean(0)
    probs = reverse_step_probs(xt, logits, a_t, a_s, mask)
    se = torch.sqrt(probs * (1 - probs) / n)
    assert torch.all((freq - probs).abs() <= 5 * se + 1e-12), (freq - probs).abs().max()


def test_reverse_step_to_time_zero_leaves_no_mask():
    torch.manual_seed(5)
    V = 11
    xt = torch.randint(0, V + 1, (64, 3, 8))
    xs = common.reverse_step(xt, torch.randn(64, 3, 8, V), torch.tensor(0.3), torch.tensor(1.0), V)
    assert not (xs == V).any() and xs.max() < V


def test_categorical_draw_is_float64_exact_on_extreme_logits():
    """A token of probability 1e-12 must essentially never appear and one of 0 (logit -inf) never."""
    torch.manual_seed(6)
    logits = torch.tensor([[0.0, math.log(1e-12), -math.inf]]).repeat(200_000, 1)
    draws = common.sample_categorical(logits, max_elements=3 * 1000)  # many chunks
    assert draws.shape == (200_000,) and (draws == 0).all()


def test_gaussian_kl_closed_form_against_monte_carlo():
    torch.manual_seed(7)
    mean, logvar = torch.tensor([[0.5, -1.0, 0.2]]), torch.tensor([[-0.5, 0.3, 0.0]])
    assert common.gaussian_kl(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0.0
    z = common.sample_latent(mean.expand(200_000, 3), logvar.expand(200_000, 3))
    zeros = torch.zeros_like(z)
    mc = (common.gaussian_log_prob(z, mean, logvar) - common.gaussian_log_prob(z, zeros, zeros)).mean()
    assert mc.item() == pytest.approx(common.gaussian_kl(mean, logvar).item(), abs=0.01)


def test_mixture_prior_log_density_is_the_weighted_sum_of_its_gaussians_by_hand():
    prior, z = random_mixture(3, 4), torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(prior.log_prob(z).double(), mixture_log_prob_by_hand(prior, z), atol=1e-5)
    gaussian = common.Prior(3)
    assert list(gaussian.parameters()) == []  # N(0, I): nothing learned, nothing in the checkpoint
    assert torch.allclose(gaussian.log_prob(z), log_normal(z, torch.zeros(3), torch.zeros(3)))


def test_mixture_prior_draws_follow_its_components():
    """Draws land on the components in proportion to their weights, each with its mean and variance."""
    torch.manual_seed(2)
    prior = common.Prior(2, "mixture", 2)
    with torch.no_grad():
        prior.means.copy_(torch.tensor([[-10.0, 0.0], [10.0, 5.0]]))
        prior.logvars.copy_(torch.tensor([[0.0, 0.0], [math.log(4.0), math.log(0.25)]]))
        prior.logits.copy_(torch.tensor([0.0, math.log(3.0)]))  # weights 1/4, 3/4
    z = prior.sample(40_000, "cpu")
    right = z[:, 0] > 0
    assert right.float().mean().item() == pytest.approx(0.75, abs=0.01)
    assert z[right].mean(0).tolist() == pytest.approx([10.0, 5.0], abs=0.05)
    assert z[right].var(0).tolist() == pytest.approx([4.0, 0.25], rel=0.05)
    assert z[~right].mean(0).tolist() == pytest.approx([-10.0, 0.0], abs=0.05)


def test_single_draw_kl_to_a_standard_one_component_mixture_has_the_closed_form_mean():
    """log r(z) - log p(z) at z ~ r is unbiased for KL(r || p): with one N(0, I) component its mean over many
    draws is the closed form, per example."""
    torch.manual_seed(3)
    prior = common.Prior(3, "mixture", 1)
    with torch.no_grad():
        prior.means.zero_()
    mean = torch.tensor([[0.5, -1.0, 0.2], [0.0, 2.0, -0.3]])
    logvar = torch.tensor([[-0.5, 0.3, 0.0], [1.0, -1.0, 0.2]])
    n = 100_000
    means, logvars = mean.repeat(n, 1), logvar.repeat(n, 1)
    estimate = common.latent_kl(means, logvars, common.sample_latent(means, logvars), prior).view(n, 2).double()
    se = estimate.std(0) / math.sqrt(n)
    assert torch.all((estimate.mean(0) - common.gaussian_kl(mean, logvar)).abs() < 4 * se)
    assert torch.equal(common.latent_kl(mean, logvar, None, common.Prior(3)), common.gaussian_kl(mean, logvar))


def test_masked_nll_counts_only_masked_positions():
    x0 = torch.tensor([[0, 1, 2]])
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]] * 3]))
    masked = torch.tensor([[True, False, True]])
    assert common.masked_nll(logits, x0, masked).item() == pytest.approx(math.log(2) + math.log(4))


def test_iw_delbo_normalises_by_k():
    """With r = p and a denoiser that ignores z every importance weight is the same, so any K gives the K = 1
    value for the same (t, x_t): checks the -log K."""
    V = 4
    torch.manual_seed(9)
    logits = torch.randn(1, 3, V)
    denoise = lambda xt, t, z: logits.expand(xt.shape[0], 3, V)  # noqa: E731
    recognize = lambda x0, masked: (torch.zeros(x0.shape[0], 2), torch.zeros(x0.shape[0], 2))  # noqa: E731
    x0 = torch.randint(0, V, (64, 3))
    s = common.Schedule("linear")
    out = []
    for k, budget in [(1, None), (7, 3 * 64 * 3 * V), (16, 1)]:
        torch.manual_seed(8)
        out.append(common.iw_delbo(x0, denoise, recognize, s, V, k, budget=budget))
    for other in out[1:]:  # equal up to float32 rounding of logsumexp and log K
        assert torch.allclose(out[0], other, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out[0]).all()


def test_masked_nll_is_the_same_compiled_and_eager():
    """Eagerly the cross-entropy is taken at the masked positions only; compiled, everywhere and then masked."""
    torch.manual_seed(10)
    logits, x0 = torch.randn(5, 7, 6), torch.randint(0, 6, (5, 7))
    masked = torch.rand(5, 7) < 0.5
    masked[0] = False  # an example with nothing masked
    compiled = torch.compile(common.masked_nll, backend="eager")
    assert torch.allclose(common.masked_nll(logits, x0, masked).double(), nll_by_hand(logits, x0, masked))
    assert torch.allclose(compiled(logits, x0, masked), common.masked_nll(logits, x0, masked))


# ----------------------------------------------------------------------------------------------------------
# Each estimator against its formula computed by hand, on a model whose r is not the prior

def bound_by_enumeration(model, x0, T, sampler, schedule):
    """The expectation of common.step_bound (exact=True) for one x0, summed over every mask pattern of every
    step: sum_i E_m[p_i * nll(m) + (vanilla) (1 - (1 - p_i)^|m|) KL(r(x0, m))], plus (VADD-CS) the KL of
    r(x0, everything masked) once. The table denoiser ignores z, so no expectation over z is needed."""
    L, total = model.L, 0.0
    if sampler == "vadd_cs":
        total += kl_by_hand(*model.recognize(x0[None], torch.ones(1, L, dtype=torch.bool))).item()
    for i in range(1, T + 1):
        alpha_t, alpha_s = schedule.alpha_grid(torch.tensor([i / T, (i - 1) / T], dtype=torch.float64)).tolist()
        p = (alpha_s - alpha_t) / (1 - alpha_t)
        for pattern in itertools.product([False, True], repeat=L):
            masked = torch.tensor([pattern])
            n = sum(pattern)
            prob = (1 - alpha_t) ** n * alpha_t ** (L - n)
            xt = torch.where(masked, model.V, x0[None])
            term = p * nll_by_hand(model.denoise(xt, None, None), x0[None], masked).item()
            if sampler == "vadd":
                term += (1 - (1 - p) ** n) * kl_by_hand(*model.recognize(x0[None], masked)).item()
            total += prob * term
    return total


@pytest.mark.parametrize("sampler", ["mdm", "vadd", "vadd_cs"])
def test_each_t_step_bound_is_its_expectation_by_enumeration(sampler):
    """Equality, not only bound >= NLL: a KL paid at every step of the vanilla sampler (instead of with the
    chance that the step reveals something), a KL paid twice by VADD-CS or a missing unmasking factor fails."""
    torch.manual_seed(11)
    model, schedule, n = TableModel(), common.Schedule("linear"), 20_000
    points = torch.tensor([[0, 1, 2], [2, 2, 0], [1, 0, 1]])
    kw = dict(denoise=model.denoise, schedule=schedule, mask_id=model.V, sampler=sampler,
              recognize=None if sampler == "mdm" else model.recognize)
    for T in (1, 3):
        exact = torch.tensor([bound_by_enumeration(model, x0, T, sampler, schedule) for x0 in points])
        for summed in (True, False):  # all T steps, and the unbiased one-random-step estimate
            b = common.step_bound(points.repeat(n, 1), T=T, exact=summed, **kw).view(n, len(points)).double()
            mean, se = b.mean(0), b.std(0) / math.sqrt(n)
            assert torch.all((mean - exact).abs() <= 4.5 * se + 1e-6), (T, summed, mean, exact, se)


@pytest.mark.parametrize("mixture", [False, True])
def test_iw_delbo_is_its_formula_by_hand(monkeypatch, mixture):
    """w(t) * -(logsumexp_k [log mu(x0 | x_t, z_k) + log p(z_k) - log r(z_k)] - log K) with z_k = mean + std
    eps_k, eps of shape (K, B, d) drawn first, p = N(0, I) or a mixture: a missing w(t), a flipped
    log p - log r or the Gaussian's log p under a mixture prior fails."""
    model, schedule, K = TableModel(z_weight=1.0), common.Schedule("linear"), 5
    prior = random_mixture(model.d, 3) if mixture else None
    x0 = torch.tensor([[0, 1, 2], [2, 2, 0], [1, 0, 1], [1, 1, 1]])
    t = torch.tensor([0.3, 0.55, 0.8, 0.95])
    mask = fix_draws(monkeypatch, t)
    torch.manual_seed(12)
    got = common.iw_delbo(x0, model.denoise, model.recognize, schedule, model.V, K, prior=prior)
    torch.manual_seed(12)
    eps = torch.randn(K, len(x0), model.d)
    xt = mask(x0, schedule.alpha(t), model.V)
    masked = xt == model.V
    mean, logvar = model.recognize(x0, masked)
    z = mean + torch.exp(0.5 * logvar) * eps
    zeros = torch.zeros_like(mean)
    log_p = [mixture_log_prob_by_hand(prior, z[k]) if mixture else log_normal(z[k], zeros, zeros)
             for k in range(K)]
    log_w = torch.stack([-nll_by_hand(model.denoise(xt, t, z[k]), x0, masked) + log_p[k]
                         - log_normal(z[k], mean, logvar) for k in range(K)]).double()
    expected = (1 / t.double()) * -(torch.logsumexp(log_w, 0) - math.log(K))
    assert torch.allclose(got.double(), expected, rtol=1e-5), (got, expected)


def test_iw_delbo_does_not_depend_on_the_logit_budget():
    """The (draw, example) pairs go through the denoiser in calls of at most `budget` logits; one row per call
    gives the same figures as all of them at once."""
    model, schedule = TableModel(z_weight=1.0), common.Schedule("loglinear")
    x0 = torch.randint(0, model.V, (6, model.L), generator=torch.Generator().manual_seed(13))
    out = []
    for budget in (None, 1, 2 * model.L * model.V):
        torch.manual_seed(14)
        out.append(common.iw_delbo(x0, model.denoise, model.recognize, schedule, model.V, 7, budget=budget))
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[0], out[2])


# ----------------------------------------------------------------------------------------------------------
# Run utilities

def test_ema_resumes_onto_the_device_and_dtype_of_its_model():
    """A checkpoint is read onto the CPU; the EMA must keep living beside the model (here on the meta device,
    standing in for CUDA), or its first update after --resume mixes devices."""
    model = torch.nn.Linear(3, 2, device="meta")
    ema = common.EMA(model, 0.9)
    saved = {"decay": 0.5, "steps": 7, "params": {k: torch.ones(v.shape) for k, v in ema.params.items()}}
    ema.load_state_dict(saved)
    assert ema.steps == 7 and ema.decay == 0.5
    assert all(v.device.type == "meta" and v.dtype == torch.float32 for v in ema.params.values())
    ema.update(model)  # the same devices: no error
    cpu_model = torch.nn.Linear(3, 2)
    cpu_ema = common.EMA(cpu_model, 0.9)
    cpu_ema.load_state_dict(saved)
    assert all(torch.equal(v, torch.ones(v.shape)) for v in cpu_ema.params.values())


def test_cuda_device_turns_on_tf32_for_float32_matmuls(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert common.pick_device("cuda").type == "cuda"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_checkpoints_save_and_restore_the_cuda_generator(monkeypatch, tmp_path):
    """--resume continues exactly on CUDA only if the CUDA generator travels with the checkpoint: faked here
    (a device whose type is 'cuda' and a stand-in generator state), since the tests run on a CPU."""
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([7, 7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(state.tolist()))
    model = torch.nn.Linear(2, 2)
    opt, ema, rng = torch.optim.AdamW(model.parameters()), common.EMA(model, 0.9), np.random.default_rng(0)
    fake_cuda = types.SimpleNamespace(type="cuda")
    state = common.training_state(model, opt, ema, 3, {}, [], rng, fake_cuda)
    assert state["torch_rng"][0][1].tolist() == [7, 7]
    common.save_atomic(state, tmp_path / "ckpt.pt")
    common.resume(tmp_path / "ckpt.pt", model, opt, ema, rng, fake_cuda, 0, 1, seed=0)
    assert restored == [[7, 7]]


def test_resume_on_another_number_of_processes_does_not_repeat_the_first_draws(tmp_path):
    """Saved by one process at iteration 3, resumed as rank 0 and rank 1 of two: each rank's times, masks and z
    come from a new stream, neither the saved one nor one that a rank used from iteration 0."""
    model = torch.nn.Linear(2, 2)
    opt, ema, rng = torch.optim.AdamW(model.parameters()), common.EMA(model, 0.9), np.random.default_rng(0)
    common.save_atomic(common.training_state(model, opt, ema, 3, {}, [], rng, torch.device("cpu")),
                       tmp_path / "ckpt.pt")
    draws = []
    for rank in (0, 1):
        assert common.resume(tmp_path / "ckpt.pt", model, opt, ema, rng, torch.device("cpu"), rank, 2, 1)[0] == 3
        draws.append(torch.rand(4))
    for rank in (0, 1):  # the streams of a run started on two processes (train(): seed + rank, seed = 1)
        torch.manual_seed(1 + rank)
        draws.append(torch.rand(4))
    assert len({tuple(d.tolist()) for d in draws}) == 4


def test_ema_is_the_decayed_average_of_the_weights_by_hand():
    """After updates k = 1, 2, ... with weights w_k: e_k = d_k e_(k-1) + (1 - d_k) w_k, d_k = min(decay,
    (1 + k)/(10 + k)); integer buffers are copied, not averaged."""
    model = torch.nn.BatchNorm1d(2)  # float weights and an integer buffer (num_batches_tracked)
    ema, expected = common.EMA(model, 0.25), model.weight.detach().clone().double()
    for k, value in enumerate([2.0, -1.0, 4.0, 0.5], 1):
        with torch.no_grad():
            model.weight.fill_(value)
        model.num_batches_tracked.fill_(10 * k)
        ema.update(model)
        d = min(0.25, (1 + k) / (10 + k))  # the schedule at k = 1, the cap from k = 3
        expected = d * expected + (1 - d) * value
    assert torch.allclose(ema.params["weight"].double(), expected, rtol=1e-6)
    assert ema.params["num_batches_tracked"].item() == 40
    target = torch.nn.BatchNorm1d(2)
    ema.copy_to(target)
    assert torch.allclose(target.weight.double(), expected, rtol=1e-6)


def test_mean_and_standard_error_by_hand():
    x = torch.tensor([1.0, 4.0, 2.5, -3.0, 7.25])
    mean, se = common.mean_se([x[:2], x[2:]])
    assert mean == pytest.approx(float(np.mean(x.numpy())))
    assert se == pytest.approx(float(np.std(x.numpy(), ddof=1) / math.sqrt(5)))
    assert common.mean_se(torch.tensor([3.0])) == (3.0, 0.0)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    cfg = types.SimpleNamespace(lr=2.0, warmup_iters=4, max_iters=100)
    assert [common.lr_at(it, cfg) for it in range(3)] == pytest.approx(
        [2.0 * (it + 1) / 4 * (0.55 + 0.45 * math.cos(math.pi * it / 100)) for it in range(3)])
    assert common.lr_at(50, cfg) == pytest.approx(2.0 * 0.55)
    assert common.lr_at(100, cfg) == pytest.approx(0.2)


def test_reverse_step_draws_in_float64_with_the_gumbel_max_of_its_distribution(monkeypatch):
    """Every uniform draw of a reverse step is float64 (float32 noise truncates the Gumbel tails, which lowers
    the samples' entropy), and the token drawn is argmax(log softmax(logits) - log(-log u)) of those draws."""
    real, draws = torch.rand, []

    def recording_rand(*shape, dtype=None, **kwargs):
        u = real(*shape, dtype=dtype, **kwargs)
        draws.append(u)
        return u

    monkeypatch.setattr(torch, "rand", recording_rand)
    torch.manual_seed(0)
    xt = torch.full((3, 5), 7)
    logits = torch.randn(3, 5, 7).to(torch.bfloat16)
    xs = common.reverse_step(xt, logits, torch.tensor(0.0), torch.tensor(1.0), 7)  # reveals every position
    assert [u.dtype for u in draws] == [torch.float64, torch.float64]
    gumbel = -torch.log(-torch.log(draws[1]))
    expected = (torch.log_softmax(logits.reshape(-1, 7).double(), -1) + gumbel).argmax(-1)
    assert torch.equal(xs.flatten(), expected)


def metrics_of(method, sampler, figure, steps=(1, 2)):
    return {"unit": "nats", "config": {method: {"seed": figure}}, "likelihood": {method: {"nelbo": figure}},
            "training": {method: {"iters": figure}},
            "by_steps": [{"sampler": sampler, "steps": T, "bound": figure} for T in steps]}


SAMPLERS = {"mdm": ("MDM", "mdm"), "vadd": ("VADD", "vadd"), "vadd_cs": ("VADD-CS", "vadd")}


def test_metrics_replace_the_entries_of_the_methods_a_run_ran_and_keep_the_others(tmp_path, capsys):
    common.save_metrics(tmp_path, metrics_of("mdm", "mdm", 1.0), ["mdm"], SAMPLERS)
    common.save_metrics(tmp_path, metrics_of("vadd", "vadd_cs", 2.0), ["vadd"], SAMPLERS)
    # a later run of vadd (e.g. --eval-only at T = 3) replaces every vadd entry and row whole
    new = common.save_metrics(tmp_path, metrics_of("vadd", "vadd", 3.0, (3,)), ["vadd"], SAMPLERS)
    assert new["likelihood"] == {"mdm": {"nelbo": 1.0}, "vadd": {"nelbo": 3.0}}
    assert new["config"]["mdm"] == {"seed": 1.0} and new["training"]["vadd"] == {"iters": 3.0}
    assert [(r["sampler"], r["steps"], r["bound"]) for r in new["by_steps"]] == [
        ("mdm", 1, 1.0), ("mdm", 2, 1.0), ("vadd", 3, 3.0)]
    assert json.loads((tmp_path / "metrics.json").read_text()) == new
    # an unreadable metrics.json is set aside with one line, not a traceback after the run
    (tmp_path / "metrics.json").write_text('{"config": ')
    new = common.save_metrics(tmp_path, metrics_of("mdm", "mdm", 5.0), ["mdm"], SAMPLERS)
    assert set(new["config"]) == {"mdm"} and "kept as" in capsys.readouterr().out
    assert (tmp_path / "metrics.json.unreadable").read_text() == '{"config": '


def test_meter_averages_since_each_read_and_stops_on_a_figure_that_is_not_finite(capsys):
    meter = common.Meter("vadd", 0, 6, 10, "x/s")
    for it, loss in enumerate([1.0, 3.0, 2.0], 1):
        meter.add(torch.tensor(loss), torch.tensor(0.5 * it))
        if it == 2:
            assert meter.mean("curve", it) == [2.0, 0.75]
    assert meter.mean("line", 3) == [2.0, 1.0] and meter.mean("curve", 3) == [2.0, 1.5]
    assert meter.line(3, loss=2.0).startswith("[vadd] iter       3/6 | loss 2 | ")
    meter.add(torch.tensor(math.nan), torch.tensor(0.0))
    with pytest.raises(SystemExit, match=r"\[vadd\] the loss \(or its KL or gradient\) became nan by iteration 4"):
        meter.mean("curve", 4)


def test_a_checkpoint_is_continued_only_with_resume_and_must_match_the_weights_settings(tmp_path, capsys):
    cfg = types.SimpleNamespace(out_dir=str(tmp_path), resume=False)
    assert common.check_checkpoint(cfg, "vadd", {"width": 8}, train=True) is None
    with pytest.raises(SystemExit, match="ckpt_vadd.pt does not exist: train first"):
        common.check_checkpoint(cfg, "vadd", {"width": 8}, train=False)
    path = str(tmp_path / "ckpt_vadd.pt")
    common.save_atomic({"config": {"width": 8}, "iter": 3}, path)
    with pytest.raises(SystemExit, match="already holds a vadd run .*: pass --resume to continue it"):
        common.check_checkpoint(cfg, "vadd", {"width": 8}, train=True)
    assert common.check_checkpoint(cfg, "vadd", {"width": 8}, train=False) == path
    cfg.resume = True
    assert common.check_checkpoint(cfg, "vadd", {"width": 8}, train=True) == path
    with pytest.raises(SystemExit, match=r"was trained with --width 8 \(now 16\): pass the same flags"):
        common.check_checkpoint(cfg, "vadd", {"width": 16}, train=True)
    assert common.check_checkpoint(cfg, "mdm", {}, train=True) is None
    assert "holds no ckpt_mdm.pt, so mdm starts from scratch" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_vadd.pt"]  # nothing deleted
