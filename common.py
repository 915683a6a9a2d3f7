"""What every VADD script shares: the masking schedule, forward masking, time sampling, KL annealing, the
reverse-step math of the samplers, the likelihood estimators built on them, and a few run utilities.

Conventions used by all scripts and by the functions below:
- tokens are int64 tensors of shape (B, ...) with values in [0, V); the mask id [M] is V;
- a time t in [0, 1] is one value per example, shape (B,); alpha(t) is the chance a token is still unmasked;
- a denoiser is called as denoise(xt, t, z) and returns logits of shape xt.shape + (V,) over the V real
  tokens only, so [M] can never be predicted; z is None for MDM;
- a recognition model is called as recognize(x0, masked), `masked` a bool tensor of x0's shape, and returns
  (mean, logvar) of the diagonal Gaussian r(z | x0, x_t), each of shape (B, d).
Every likelihood below is in nats per example (sequence, image or 2D point), returned per example.
The method and the reasons for each detail: REFERENCE.md sections 1-3 and 6.
"""
import contextlib
import math
import os
import random

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# Masking schedule, forward process, time sampling, KL annealing

SCHEDULES = ("linear", "loglinear", "cosine")


class Schedule:
    """alpha(t), the chance that a token is still unmasked at time t: alpha(0) = 1 and alpha(1) = 0,
    except log-linear (MDLM), whose alpha(1) = eps keeps its weight finite."""

    def __init__(self, name="loglinear", eps=1e-3):
        if name not in SCHEDULES:
            raise ValueError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
        self.name, self.eps = name, eps

    def alpha(self, t):
        if self.name == "linear":
            return 1 - t
        if self.name == "loglinear":
            return 1 - (1 - self.eps) * t
        return 1 - torch.cos(math.pi / 2 * (1 - t))  # cosine, as in MD4

    def weight(self, t):
        """w(t) = -alpha'(t) / (1 - alpha(t)), the continuous-time NELBO weight of a masked position."""
        if self.name in ("linear", "loglinear"):
            return 1 / t
        return math.pi / 2 * torch.tan(math.pi / 2 * (1 - t))

    def alpha_grid(self, t):
        """alpha on a sampler's step grid: exactly 0 at t = 1, so samplers and T-step bounds start from
        all-[M] even under log-linear (whose alpha(1) = eps)."""
        return torch.where(t >= 1, torch.zeros_like(t), self.alpha(t))


def forward_mask(x0, alpha_t, mask_id):
    """Draw x_t ~ q(x_t | x0): each token is kept with probability alpha_t (one value per example), else [M]."""
    keep = alpha_t.view(-1, *[1] * (x0.dim() - 1))
    return torch.where(torch.rand(x0.shape, device=x0.device) < keep, x0, mask_id)


def stratified_uniform(batch_size, device="cpu"):
    """u_i = (u0 + i / B) mod 1 with one u0 ~ U(0, 1): each u_i is uniform and the batch has one value in each
    of the B strata, which lowers the variance of a batch mean at no cost (low-discrepancy sampling)."""
    return (torch.rand((), device=device) + torch.arange(batch_size, device=device) / batch_size) % 1


def sample_times(batch_size, eps=1e-3, device="cpu"):
    """Training and evaluation times t = eps + (1 - eps) u, u stratified over the batch."""
    return eps + (1 - eps) * stratified_uniform(batch_size, device)


def kl_weight(step, warmup, start=0.0):
    """KL annealing lambda: rises linearly from `start` to 1 over `warmup` steps (0 steps: always 1).
    Without it the posterior collapses to the prior (REFERENCE.md section 2)."""
    if warmup <= 0:
        return 1.0
    return min(1.0, start + (1 - start) * step / warmup)


# ----------------------------------------------------------------------------------------------------------
# Latent: reparameterised draw and closed-form KL to the prior N(0, I)

def sample_latent(mean, logvar):
    return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)


def gaussian_kl(mean, logvar):
    """KL(N(mean, diag exp(logvar)) || N(0, I)) per example, in float32 (REFERENCE.md section 6)."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(-1)


def gaussian_log_prob(z, mean, logvar):
    return -0.5 * (((z - mean) ** 2) / logvar.exp() + logvar + math.log(2 * math.pi)).sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Reverse step: what every sampler does, drawn in float64 (REFERENCE.md sections 1 and 6)

def unmask_probability(alpha_t, alpha_s):
    """Chance that a position masked at t is revealed on the step t -> s < t."""
    return (alpha_s - alpha_t) / (1 - alpha_t)


def sample_categorical(logits, max_elements=2**25):
    """One exact draw per row from softmax(logits), in float64 (Gumbel-max); float32 Gumbel noise lowers the
    entropy of samples (Zheng et al. 2024). Rows go in chunks so a float64 copy of a 50k vocabulary stays small."""
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    rows = max(1, max_elements // logits.shape[-1])
    for i in range(0, logits.shape[0], rows):
        log_p = torch.log_softmax(logits[i:i + rows].double(), -1)
        u = torch.rand(log_p.shape, dtype=torch.float64, device=logits.device)
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
        out[i:i + rows] = (log_p + gumbel).argmax(-1)
    return out


def reverse_step(xt, logits, alpha_t, alpha_s, mask_id):
    """Draw x_s from x_t: each masked position is revealed with probability (alpha_s - alpha_t)/(1 - alpha_t)
    and then takes a token from the denoiser's softmax(logits); unmasked positions are copied. alpha_t and
    alpha_s are tensors of shape (B,) or scalars. Which positions reveal is drawn first (a float64 Bernoulli
    each), so the float64 categorical is computed only where it is needed."""
    p = unmask_probability(torch.as_tensor(alpha_t, dtype=torch.float64, device=xt.device),
                           torch.as_tensor(alpha_s, dtype=torch.float64, device=xt.device))
    p = p.reshape(-1, *[1] * (xt.dim() - 1)) if p.dim() else p
    reveal = (xt == mask_id) & (torch.rand(xt.shape, dtype=torch.float64, device=xt.device) < p)
    where = reveal.nonzero(as_tuple=True)
    xs = xt.clone()
    xs[where] = sample_categorical(logits[where])
    return xs


def reverse_step_probs(xt, logits, alpha_t, alpha_s, mask_id):
    """The distribution reverse_step draws from, written out: per position, float64 probabilities over the
    V tokens and [M] (last column). Materialises B x ... x (V + 1) float64 values: for teaching and tests."""
    B, V = xt.shape[0], logits.shape[-1]
    p = unmask_probability(torch.as_tensor(alpha_t, dtype=torch.float64),
                           torch.as_tensor(alpha_s, dtype=torch.float64))
    p = p.reshape(-1, *[1] * xt.dim()) if p.dim() else p
    masked_row = torch.cat([p * torch.softmax(logits.double(), -1),
                            (1 - p) * torch.ones(*xt.shape, 1, dtype=torch.float64)], -1)
    copied_row = F.one_hot(xt.clamp_max(V), V + 1).double()
    return torch.where((xt == mask_id).unsqueeze(-1), masked_row, copied_row)


# ----------------------------------------------------------------------------------------------------------
# Likelihood estimators (REFERENCE.md section 3), each a function of a denoiser callable

def masked_nll(logits, x0, masked):
    """sum over masked positions of -log mu(x0 | x_t), per example; softmax and loss in float32. Run eagerly
    (evaluation) the float32 cross-entropy is taken at the masked positions only, so a batch of GPT-2 logits
    is never copied whole to float32; under torch.compile it is taken everywhere and fused (the masked rows
    have a data-dependent count, which would break the compiled graph)."""
    V = logits.shape[-1]
    if torch.compiler.is_compiling():
        nll = F.cross_entropy(logits.reshape(-1, V).float(), x0.reshape(-1), reduction="none")
        return torch.where(masked.reshape(-1), nll, 0.0).view(x0.shape[0], -1).sum(1)
    rows = masked.reshape(-1).nonzero().squeeze(1)
    nll = F.cross_entropy(logits.reshape(-1, V)[rows].float(), x0.reshape(-1)[rows], reduction="none")
    example = rows // masked[0].numel()
    return torch.zeros(x0.shape[0], device=nll.device, dtype=nll.dtype).index_add_(0, example, nll)


def step_bound_term(x0, denoise, schedule, mask_id, T, i, z=None, recognize=None):
    """Step i (t = i/T -> s = (i-1)/T; i a (B,) tensor, T an int or a (B,) tensor) of the valid T-step bound:
    (alpha_s - alpha_t)/(1 - alpha_t) * sum_masked -log mu(x0 | x_t, z) with x_t ~ q(x_t | x0).
    With `recognize` (the vanilla sampler, a fresh z at every step) z ~ r(z | x0, x_t) is drawn here and the
    step adds KL(r || p) times the chance that it reveals anything, 1 - ((1 - alpha_s)/(1 - alpha_t))^n: a step
    that reveals nothing does not depend on z and so pays no KL. Otherwise z is the caller's (None for MDM,
    the example's one z for VADD-CS). Per example; steps_loss trains on it."""
    t, s = i.double() / T, (i.double() - 1) / T
    alpha_t, alpha_s = schedule.alpha_grid(t), schedule.alpha_grid(s)
    xt = forward_mask(x0, alpha_t.float(), mask_id)
    masked = xt == mask_id
    kl_term = 0.0
    if recognize is not None:
        mean, logvar = recognize(x0, masked)
        z = sample_latent(mean, logvar)
        n = masked.reshape(x0.shape[0], -1).sum(1).double()
        reveals_any = 1 - ((1 - alpha_s) / (1 - alpha_t)) ** n  # 0 ** 0 = 1: nothing masked, nothing revealed
        kl_term = reveals_any.float() * gaussian_kl(mean, logvar)
    nll = masked_nll(denoise(xt, t.float(), z), x0, masked)
    return unmask_probability(alpha_t, alpha_s).float() * nll + kl_term


def steps_loss(x0, denoise, schedule, mask_id, train_steps, recognize=None, kl_weight=1.0):
    """The `steps` training objective (REFERENCE.md section 3b), per example: the valid bound of the K-step
    consistency sampler as a loss. z ~ r(z | x0, everything masked) is drawn once (reparameterised), a budget K
    from `train_steps` and a step i uniform in 1..K; the loss is K * step_bound_term + kl_weight * KL(r || p),
    the KL once and not weighted by w(t). Its expectation is the summed K-step bound, so training on it lowers
    exactly what the K-step sampler is judged by. recognize None: MDM's K-step bound, no z.
    Returns (loss, kl) per example, like each script's DELBO."""
    B = x0.shape[0]
    z, kl = None, torch.zeros(B, device=x0.device)
    if recognize is not None:
        mean, logvar = recognize(x0, torch.ones_like(x0, dtype=torch.bool))
        z, kl = sample_latent(mean, logvar), gaussian_kl(mean, logvar)
    K = torch.tensor(train_steps, device=x0.device)[torch.randint(len(train_steps), (B,), device=x0.device)]
    i = (torch.rand(B, device=x0.device) * K).long().clamp_max(K - 1) + 1
    return K * step_bound_term(x0, denoise, schedule, mask_id, K, i, z) + kl_weight * kl, kl


@torch.no_grad()
def step_bound(x0, denoise, schedule, mask_id, T, recognize=None, sampler="mdm", exact=False):
    """A valid upper bound on -log p_T(x0) of the T-step sampler `sampler` (grid t_i = i/T), per example:
    'mdm' (z None), 'vadd' (vanilla: fresh z ~ N(0, I) at every step) or 'vadd_cs' (consistency: one z for
    all steps, drawn here from r(z | x0, everything masked), paying KL(r || p) once). It is >= the sampler's
    true negative log-likelihood whatever the networks are. exact=True sums all T steps (T network calls);
    exact=False returns the unbiased estimate T * (term of one step drawn per example), one call."""
    if sampler not in ("mdm", "vadd", "vadd_cs"):
        raise ValueError(f"unknown sampler {sampler!r}")
    if sampler != "mdm" and recognize is None:
        raise ValueError(f"the {sampler} bound needs the recognition model")
    B, z, total = x0.shape[0], None, torch.zeros(x0.shape[0], device=x0.device)
    if sampler == "vadd_cs":
        mean, logvar = recognize(x0, torch.ones_like(x0, dtype=torch.bool))
        z = sample_latent(mean, logvar)
        total += gaussian_kl(mean, logvar)
    per_step_recognize = recognize if sampler == "vadd" else None
    if exact:
        for step in range(1, T + 1):
            i = torch.full((B,), step, device=x0.device)
            total += step_bound_term(x0, denoise, schedule, mask_id, T, i, z, per_step_recognize)
    else:
        i = (stratified_uniform(B, x0.device) * T).long().clamp_max(T - 1) + 1  # one step per example
        total += T * step_bound_term(x0, denoise, schedule, mask_id, T, i, z, per_step_recognize)
    return total


@torch.no_grad()
def iw_delbo(x0, denoise, recognize, schedule, mask_id, num_samples, eps=1e-3, budget=None):
    """Importance-weighted DELBO with K = num_samples draws of z ~ r(z | x0, x_t), per example (one t and x_t
    per example): w(t) * -(logsumexp_k l_k - log K), l_k = log mu(x0 | x_t, z_k) summed over masked positions
    + log p(z_k) - log r(z_k | x0, x_t). K = 1 is the DELBO with the one-sample KL. Like the DELBO it is a
    comparison figure, not a bound on -log p(x0) (REFERENCE.md section 3). The K x B (draw, example) pairs go
    through the denoiser in calls of at most `budget` logits (LOGITS_BUDGET by default); the noise of every
    z is drawn up front, so the result does not depend on the budget."""
    B = x0.shape[0]
    t = sample_times(B, eps, x0.device)
    xt = forward_mask(x0, schedule.alpha(t), mask_id)
    masked = xt == mask_id
    mean, logvar = (a.float() for a in recognize(x0, masked))
    z = mean + torch.exp(0.5 * logvar) * torch.randn(num_samples, *mean.shape, device=x0.device)  # (K, B, d)
    log_w = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)) - gaussian_log_prob(z, mean, logvar)
    z, log_w = z.flatten(0, 1), log_w.flatten()  # pair j is draw j // B of example j % B
    for j in torch.arange(num_samples * B, device=x0.device).split(rows_per_call(x0[0].numel(), mask_id, budget)):
        b = j % B
        log_w[j] -= masked_nll(denoise(xt[b], t[b], z[j]), x0[b], masked[b])
    log_w = log_w.view(num_samples, B).double()  # float64: K in the thousands, weights up to 1/eps
    return (schedule.weight(t.double()) * -(torch.logsumexp(log_w, 0) - math.log(num_samples))).float()


# Evaluation and sampling call the networks on at most this many logits (tokens x vocabulary) at a time:
# 0.5 GB in bf16, 1 GB as float32. Windows of 1024 GPT-2 tokens go 5 per call; a 32 x 32 binary image, 131072.
LOGITS_BUDGET = 2 ** 28


def rows_per_call(tokens_per_row, vocab_size, budget=None):
    """How many examples of `tokens_per_row` tokens over `vocab_size` values fit one call's logit budget."""
    return max(1, (budget or LOGITS_BUDGET) // (tokens_per_row * vocab_size))


# ----------------------------------------------------------------------------------------------------------
# Run utilities: device, precision, seeding, EMA, atomic checkpoints

def pick_device(name="auto"):
    """The device of --device ('auto': CUDA when there is one)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda":  # float32 matmuls (--dtype float32) on TF32 tensor cores: ~8x faster, 10-bit mantissa
        torch.set_float32_matmul_precision("high")
    return device


def autocast(device, dtype):
    """bf16 autocast for the networks (softmax, losses and KL are taken in float32 by the code above);
    float16 is refused: it overflows the large negative logits used for [M] (REFERENCE.md section 6)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype != "bfloat16":
        raise ValueError(f"--dtype {dtype}: choose float32 or bfloat16")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EMA:
    """Exponential moving average of the weights, used for evaluation and sampling. The decay
    min(decay, (1 + k)/(10 + k)) lets short runs move off the initialisation; decay 0 tracks the weights."""

    def __init__(self, model, decay):
        self.decay, self.steps = decay, 0
        self.params = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.params[k].lerp_(v.float(), 1 - d)
            else:
                self.params[k].copy_(v)

    def state_dict(self):
        return {"decay": self.decay, "steps": self.steps, "params": self.params}

    def load_state_dict(self, state):
        """Copied into the tensors that live beside the model: a checkpoint read onto the CPU resumes on CUDA."""
        self.decay, self.steps = state["decay"], state["steps"]
        for k, v in state["params"].items():
            self.params[k].copy_(v)

    def copy_to(self, model):
        model.load_state_dict(self.params)


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)
