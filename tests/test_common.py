"""The mathematics of common.py (REFERENCE.md section 6): schedules, forward masking, time sampling, KL
annealing, the reverse step, and the estimators' normalisation."""
import math

import pytest
import torch

import common


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
    """E_t[w(t) 1{masked}] = 1 per position (REFERENCE.md section 6). With t on [eps, 1] the exact value is
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
    probs = common.reverse_step_probs(xt, logits, torch.tensor([0.3, 0.3]), torch.tensor([0.6, 0.6]), mask)
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
    probs = common.reverse_step_probs(xt, logits, a_t, a_s, mask)
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
