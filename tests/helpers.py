"""What several test files share: deterministic stand-ins for the random draws of common.py, so that an
objective can be compared with its formula computed by hand, and a tiny model whose every mask pattern can be
enumerated."""
import math

import torch
import torch.nn.functional as F

import common


def fix_draws(monkeypatch, t):
    """Make common's draws deterministic: every batch gets the times t (cycled over the batch), x_t masks the
    positions where a fixed uniform u (the same for the same shape) is at least alpha_t, and a reparameterised
    z is mean + 0.7 std. Returns the patched forward_mask, for the hand computations."""
    def times(batch_size, eps=1e-3, device="cpu"):
        return t.repeat(batch_size // len(t) + 1)[:batch_size].to(device)

    def mask(x0, alpha_t, mask_id):
        u = torch.rand(x0.shape, generator=torch.Generator().manual_seed(0)).to(x0.device)
        return torch.where(u < alpha_t.view(-1, *[1] * (x0.dim() - 1)), x0, mask_id)

    monkeypatch.setattr(common, "sample_times", times)
    monkeypatch.setattr(common, "forward_mask", mask)
    monkeypatch.setattr(common, "sample_latent", lambda mean, logvar: mean + 0.7 * torch.exp(0.5 * logvar))
    return mask


def nll_by_hand(logits, x0, masked):
    """sum over masked positions of -log softmax(logits)[x0], per example, written out."""
    log_p = torch.log_softmax(logits.double(), -1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    return -(log_p * masked).flatten(1).sum(1)


def kl_by_hand(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) = 1/2 sum(mean^2 + var - 1 - log var), per example."""
    mean, logvar = mean.double(), logvar.double()
    return 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(-1)


def log_normal(z, mean, logvar):
    return -0.5 * ((z - mean) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi)).sum(-1)


def perturb(module, std=0.1, seed=0):
    """Add noise to every parameter: zero-initialised layers (output heads, modulations) start to matter, so
    the recognition reads its inputs and the denoiser its z."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g).to(p.dtype))
    return module


class TableModel:
    """L positions over V tokens. The denoiser is a fixed table of logits per x_t (one row per pattern of
    tokens and [M]) plus z times a fixed matrix (z_weight 0: it ignores z); the recognition is a fixed linear
    map of (one-hot x0, mask): r differs from the prior and depends on the mask."""

    def __init__(self, L=3, V=3, d=2, z_weight=0.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.L, self.V, self.d = L, V, d
        self.table = 1.5 * torch.randn((V + 1) ** L, L, V, generator=g)
        self.z_map = z_weight * torch.randn(d, L * V, generator=g)
        self.rec = 0.6 * torch.randn(L * V + L + 1, 2 * d, generator=g)

    def denoise(self, xt, t, z):
        logits = self.table[(xt * (self.V + 1) ** torch.arange(self.L)).sum(1)]
        return logits if z is None else logits + (z @ self.z_map).view(-1, self.L, self.V)

    def recognize(self, x0, masked):
        features = torch.cat([F.one_hot(x0, self.V).flatten(1).float(), masked.float(),
                              torch.ones(len(x0), 1)], 1)
        mean, logvar = (features @ self.rec).chunk(2, -1)
        return mean, logvar


def reverse_step_probs(xt, logits, alpha_t, alpha_s, mask_id):
    """The distribution common.reverse_step draws from, written out: per position, float64 probabilities over
    the V tokens and [M] (last column): a masked position is revealed with probability (alpha_s - alpha_t) /
    (1 - alpha_t) and then takes a token from softmax(logits); any other position is copied."""
    V = logits.shape[-1]
    p = common.unmask_probability(torch.as_tensor(alpha_t, dtype=torch.float64),
                                  torch.as_tensor(alpha_s, dtype=torch.float64))
    p = p.reshape(-1, *[1] * xt.dim()) if p.dim() else p
    masked_row = torch.cat([p * torch.softmax(logits.double(), -1),
                            (1 - p) * torch.ones(*xt.shape, 1, dtype=torch.float64)], -1)
    copied_row = F.one_hot(xt.clamp_max(V), V + 1).double()
    return torch.where((xt == mask_id).unsqueeze(-1), masked_row, copied_row)


def mixture_log_prob_by_hand(prior, z):
    """log sum_k w_k prod_j N(z_j; m_kj, exp(v_kj)) with w = softmax(logits), written out in float64."""
    weights = torch.softmax(prior.logits.detach().double(), -1)
    means, logvars = prior.means.detach().double(), prior.logvars.detach().double()
    out = []
    for row in z.double():
        density = sum(weights[k] * torch.prod(torch.exp(-0.5 * (row - means[k]) ** 2 / logvars[k].exp())
                                              / torch.sqrt(2 * math.pi * logvars[k].exp()))
                      for k in range(len(weights)))
        out.append(torch.log(density))
    return torch.stack(out)


def random_mixture(dim, components, seed=0):
    """A mixture prior whose means, log-variances and weights are all different (not its initialisation)."""
    prior = common.Prior(dim, "mixture", components)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        prior.means.copy_(torch.randn(components, dim, generator=g))
        prior.logvars.copy_(0.5 * torch.randn(components, dim, generator=g))
        prior.logits.copy_(torch.randn(components, generator=g))
    return prior
