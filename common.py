"""What every VADD script shares. First the method's mathematics (docs/method.md explains it): schedule,
forward masking, time sampling, KL annealing, the reverse step, the likelihood estimators, the `steps` loss.
Conventions: tokens are int64 tensors (B, ...) in [0, V) and the mask id [M] is V; t is one time per example;
denoise(xt, t, z) returns logits xt.shape + (V,) over the real tokens only (z None for MDM); recognize(x0,
masked) returns the float32 (mean, logvar) of r(z | x0, x_t), each (B, d); likelihoods are nats per example.
Then the run utilities, which teach nothing about VADD: device, precision, seeding, EMA, flags, the learning
rate, DDP, mean and standard error over processes, checkpoints, the training figures with their progress line,
metrics.json, and the two plots every script draws (training curves, figures against the number of steps).
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
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
    Without it the posterior collapses to the prior (docs/method.md)."""
    if warmup <= 0:
        return 1.0
    return min(1.0, start + (1 - start) * step / warmup)


# ----------------------------------------------------------------------------------------------------------
# Latent: reparameterised draw, the prior p(z), and KL(r || p)

def sample_latent(mean, logvar):
    return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)


def gaussian_kl(mean, logvar):
    """KL(N(mean, diag exp(logvar)) || N(0, I)) per example, in float32."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(-1)


def gaussian_log_prob(z, mean, logvar):
    return -0.5 * (((z - mean) ** 2) / logvar.exp() + logvar + math.log(2 * math.pi)).sum(-1)


class Prior(torch.nn.Module):
    """p(z) over `dim` dimensions: 'gaussian', N(0, I) as in the paper, or 'mixture' of `components` diagonal
    Gaussians whose means, log-variances and weights are learned with the model (docs/method.md)."""

    def __init__(self, dim, kind="gaussian", components=10):
        super().__init__()
        self.dim, self.mixture = dim, kind == "mixture"
        if self.mixture:  # components spread like draws of N(0, I), equal weights at first
            self.means = torch.nn.Parameter(torch.randn(components, dim))
            self.logvars = torch.nn.Parameter(torch.zeros(components, dim))
            self.logits = torch.nn.Parameter(torch.zeros(components))

    def log_prob(self, z):
        """log p(z) in float32 for z of shape (..., dim)."""
        z = z.float()
        if not self.mixture:
            return gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
        log_weights = torch.log_softmax(self.logits.float(), -1)
        return torch.logsumexp(gaussian_log_prob(z.unsqueeze(-2), self.means, self.logvars) + log_weights, -1)

    @torch.no_grad()
    def sample(self, num, device):
        if not self.mixture:
            return torch.randn(num, self.dim, device=device)
        k = torch.multinomial(torch.softmax(self.logits.float(), -1), num, replacement=True)
        return self.means[k] + torch.exp(0.5 * self.logvars[k]) * torch.randn(num, self.dim, device=device)


def draw_latent(mean, logvar, prior=None):
    """z ~ r = N(mean, diag exp(logvar)), reparameterised, and KL(r || p) per example (latent_kl)."""
    z = sample_latent(mean, logvar)
    return z, latent_kl(mean, logvar, z, prior)


def latent_kl(mean, logvar, z, prior=None):
    """KL(r || p) per example, r = N(mean, diag exp(logvar)), z ~ r already drawn: in closed form for N(0, I)
    (prior None or Gaussian); for a mixture the single-draw estimate log r(z) - log p(z), unbiased, so every
    bound that adds it stays valid in expectation (docs/method.md)."""
    if prior is None or not prior.mixture:
        return gaussian_kl(mean, logvar)
    return gaussian_log_prob(z.float(), mean.float(), logvar.float()) - prior.log_prob(z)


# ----------------------------------------------------------------------------------------------------------
# Reverse step: what every sampler does, drawn in float64 (docs/method.md, "Pitfalls")

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


# ----------------------------------------------------------------------------------------------------------
# Likelihood estimators (docs/method.md, "Which numbers are bounds"), each a function of a denoiser callable

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


def step_bound_term(x0, denoise, schedule, mask_id, T, i, z=None, recognize=None, prior=None):
    """Step i of the valid T-step bound (t = i/T -> s = (i-1)/T; i a (B,) tensor, T an int or (B,) tensor):
    (alpha_s - alpha_t)/(1 - alpha_t) * sum_masked -log mu(x0 | x_t, z), x_t ~ q(x_t | x0). With `recognize`
    (vanilla sampler) z ~ r(z | x0, x_t) is drawn here and the step adds KL(r || p) times the chance that it
    reveals anything, 1 - (1 - p)^n: a step that reveals nothing does not depend on z. Otherwise z is the
    caller's (None for MDM, the example's one z for VADD-CS). prior: p(z), None for N(0, I)."""
    t, s = i.double() / T, (i.double() - 1) / T
    alpha_t, alpha_s = schedule.alpha_grid(t), schedule.alpha_grid(s)
    xt = forward_mask(x0, alpha_t.float(), mask_id)
    masked = xt == mask_id
    kl_term = 0.0
    if recognize is not None:
        z, kl = draw_latent(*recognize(x0, masked), prior)
        n = masked.reshape(x0.shape[0], -1).sum(1).double()
        reveals_any = 1 - ((1 - alpha_s) / (1 - alpha_t)) ** n  # 0 ** 0 = 1: nothing masked, nothing revealed
        kl_term = reveals_any.float() * kl
    nll = masked_nll(denoise(xt, t.float(), z), x0, masked)
    return unmask_probability(alpha_t, alpha_s).float() * nll + kl_term


def steps_loss(x0, denoise, schedule, mask_id, train_steps, recognize=None, kl_weight=1.0, prior=None):
    """The `steps` objective (docs/method.md), per example: the valid bound of the K-step consistency sampler
    as a loss. z ~ r(z | x0, everything masked) once (reparameterised), K drawn from `train_steps`, a step i
    uniform in 1..K: K * step_bound_term + kl_weight * KL(r || p), the KL once and not weighted by w(t). Its
    expectation is the K-step bound. recognize None: MDM's K-step bound. Returns (loss, kl) like a DELBO."""
    B = x0.shape[0]
    z, kl = None, torch.zeros(B, device=x0.device)
    if recognize is not None:
        z, kl = draw_latent(*recognize(x0, torch.ones_like(x0, dtype=torch.bool)), prior)
    K = torch.tensor(train_steps, device=x0.device)[torch.randint(len(train_steps), (B,), device=x0.device)]
    i = (torch.rand(B, device=x0.device) * K).long().clamp_max(K - 1) + 1
    return K * step_bound_term(x0, denoise, schedule, mask_id, K, i, z) + kl_weight * kl, kl


@torch.no_grad()
def step_bound(x0, denoise, schedule, mask_id, T, recognize=None, sampler="mdm", exact=False, prior=None):
    """A valid upper bound on -log p_T(x0) of the T-step sampler (grid t_i = i/T), per example: 'mdm', 'vadd'
    (a fresh z at every step) or 'vadd_cs' (one z ~ r(z | x0, everything masked) for all steps, its KL paid
    once); >= the sampler's true NLL whatever the networks are. exact=True sums all T steps (T calls);
    exact=False is the unbiased estimate T * (the term of one step drawn per example), one call."""
    B, z, total = x0.shape[0], None, torch.zeros(x0.shape[0], device=x0.device)
    if sampler == "vadd_cs":
        z, kl = draw_latent(*recognize(x0, torch.ones_like(x0, dtype=torch.bool)), prior)
        total += kl
    per_step_recognize = recognize if sampler == "vadd" else None
    if exact:
        for step in range(1, T + 1):
            i = torch.full((B,), step, device=x0.device)
            total += step_bound_term(x0, denoise, schedule, mask_id, T, i, z, per_step_recognize, prior)
    else:
        i = (stratified_uniform(B, x0.device) * T).long().clamp_max(T - 1) + 1  # one step per example
        total += T * step_bound_term(x0, denoise, schedule, mask_id, T, i, z, per_step_recognize, prior)
    return total


@torch.no_grad()
def iw_delbo(x0, denoise, recognize, schedule, mask_id, num_samples, eps=1e-3, budget=None, prior=None):
    """Importance-weighted DELBO with K draws of z ~ r(z | x0, x_t), per example (one t and x_t each):
    w(t) * -(logsumexp_k l_k - log K), l_k = sum_masked log mu(x0 | x_t, z_k) + log p(z_k) - log r(z_k). Like the
    DELBO a comparison figure, not a bound. The K x B (draw, example) pairs go through the denoiser in calls
    of at most `budget` logits; all noise is drawn first, so the figures do not depend on the budget."""
    B = x0.shape[0]
    t = sample_times(B, eps, x0.device)
    xt = forward_mask(x0, schedule.alpha(t), mask_id)
    masked = xt == mask_id
    mean, logvar = (a.float() for a in recognize(x0, masked))
    z = mean + torch.exp(0.5 * logvar) * torch.randn(num_samples, *mean.shape, device=x0.device)  # (K, B, d)
    log_w = (Prior(z.shape[-1]) if prior is None else prior).log_prob(z) - gaussian_log_prob(z, mean, logvar)
    z, log_w = z.flatten(0, 1), log_w.flatten()  # pair j is draw j // B of example j % B
    pairs = torch.arange(num_samples * B, device=x0.device)
    for j in pairs.split(rows_per_call(x0[0].numel(), mask_id, budget)):
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


# ==========================================================================================================
# Run utilities: nothing below is about VADD; every training run needs it

def pick_device(name="auto"):
    """The device of --device ('auto': CUDA when there is one)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda":  # float32 matmuls on TF32 tensor cores: about 8x faster, with a 10-bit mantissa
        torch.set_float32_matmul_precision("high")
    return device


def autocast(device, dtype):
    """bf16 autocast for the networks (softmax, losses and KL are taken in float32 by the code above); float16
    is not offered: its range (up to 65504) is too narrow for logits and their gradients without loss scaling."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EMA:
    """Exponential moving average of the weights, used for evaluation and sampling. The decay at update k,
    min(decay, (1 + k)/(10 + k)), lets short runs move off the initialisation; decay 0 tracks the weights."""

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


# ----------------------------------------------------------------------------------------------------------
# Flags: argparse types that refuse a bad value with one sentence, and the flags every script shares

def parser(doc):
    """A parser whose errors take two lines: the usage line, then the sentence that matters."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   usage="%(prog)s [options]; --help lists them")


def whole(low=1, high=math.inf):
    """argparse type: a whole number from low to high."""
    def parse(text):
        if not text.strip().lstrip("-").isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {low} to {high}")
        return int(text)
    return parse


def number(low, high=math.inf):
    """argparse type: a finite number from low to high; NaN and infinity are refused."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (low <= value <= high and math.isfinite(value)):  # NaN fails every comparison
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number from {low} to {high}")
        return value
    return parse


def counts(text):
    """argparse type: positive whole numbers separated by commas, e.g. 1,2,5."""
    values = [s.strip() for s in text.split(",") if s.strip()]
    if not values or not all(v.isdigit() and int(v) > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive whole numbers separated by commas, e.g. 1,2,5")
    return [int(v) for v in values]


def choose_preset(args, cpu_run):
    """--preset left unset: 'gpu' where CUDA is (or --device asks for it), else 'cpu', said on the first line."""
    if args.preset is None:
        cuda = torch.cuda.is_available() if args.device == "auto" else args.device.startswith("cuda")
        args.preset = "gpu" if cuda else "cpu"
        if not cuda and int(os.environ.get("RANK", 0)) == 0:
            print(f"no CUDA device: --preset cpu, {cpu_run}; --preset gpu runs the GPU-sized setting")
    return args.preset


def add_training_flags(p, defaults, preset_keys=(), evaluation=True):
    """The flags of training and running that every script has, with this script's `defaults`; a flag in
    `preset_keys` takes its default from --preset. evaluation=False (toy) leaves out gradient accumulation,
    validation and --eval-only / --sample-only."""
    defaults = {"method": "both", "grad_accum": 1, "grad_clip": 1.0, "kl_start": 0.0, "schedule": "loglinear",
                "objective": "delbo", "train_steps": "1,2,4,8", "prior": "gaussian", "prior_components": 10,
                "seed": 0, "device": "auto", **defaults}

    def a(flag, help, to=p, **kw):
        key = flag[2:].replace("-", "_")
        shown = "from --preset" if key in preset_keys else "%(default)s"
        shown = "" if key not in preset_keys and defaults.get(key) is None else f" (default {shown})"
        to.add_argument(flag, default=defaults.get(key), help=help + shown, **kw)

    a("--method", choices=("mdm", "vadd", "both"),
      help="train MDM, VADD, or both one after the other with the same seed, data and budget")
    a("--max-iters", type=whole(0), help="training iterations per method")
    a("--batch-size", type=whole(), help="examples per iteration, over all processes and micro-batches")
    if evaluation:
        a("--grad-accum", type=whole(), help="micro-batches per iteration on each process")
    a("--lr", type=number(0), help="peak learning rate of AdamW")
    a("--warmup-iters", type=whole(0), help="linear learning-rate warm-up, then cosine decay to lr/10")
    a("--grad-clip", type=number(0), help="gradient-norm clipping")
    a("--ema", type=number(0, 1), help="EMA decay of the evaluated and sampled weights (0: none)")
    a("--kl-warmup", type=whole(0), help="iterations over which lambda rises to 1 (default half of --max-iters)")
    a("--kl-start", type=number(0, 1), help="lambda at iteration 0")
    a("--schedule", choices=SCHEDULES, help="masking schedule alpha(t)")
    a("--objective", choices=("delbo", "steps"),
      help="delbo: the paper's continuous-time DELBO (MDM: NELBO); steps: the valid bound of the K-step "
           "consistency sampler (MDM: of the K-step sampler), docs/method.md")
    a("--train-steps", type=counts, help="budgets K of --objective steps, drawn one per example")
    a("--prior", choices=("gaussian", "mixture"), help="VADD's p(z): N(0, I) as in the paper, or a mixture of "
      "--prior-components diagonal Gaussians learned with the model")
    a("--prior-components", type=whole(), help="components of --prior mixture")
    a("--seed", type=whole(0, 2**32 - 1), help="seeds training, data and sampling (the same for both methods)")
    a("--device", help="auto, cpu, cuda, cuda:N (torchrun: each process takes its local GPU)")
    a("--dtype", choices=("float32", "bfloat16"), help="autocast dtype (default float32 on CPU, bfloat16 on CUDA)")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default off on CPU, on on CUDA)")
    a("--out-dir", help="output folder (default named after the script and the data)")
    modes = p.add_mutually_exclusive_group()  # each asks for a different run
    a("--resume", to=modes, action="store_true", help="continue from ckpt_<method>.pt in --out-dir")
    if evaluation:
        a("--eval-only", to=modes, action="store_true", help="no training: evaluate and sample the checkpoints")
        a("--sample-only", to=modes, action="store_true", help="no training and no likelihoods: sample only")
    a("--log-interval", type=whole(), help="iterations between progress lines")
    if evaluation:
        a("--eval-interval", type=whole(), help="iterations between validation figures (EMA weights, and the end)")
    a("--ckpt-interval", type=whole(), help="iterations between checkpoints (and one at the end)")


def finish_config(cfg, parser):
    """What every script derives after parsing: the device, bf16 and torch.compile on CUDA only (unless
    given), and lambda's warm-up over half the run (unless given)."""
    try:
        cfg.device = str(pick_device(cfg.device))
    except (ValueError, RuntimeError) as e:
        parser.error(str(e))
    cuda = cfg.device.startswith("cuda")
    cfg.dtype = cfg.dtype or ("bfloat16" if cuda else "float32")
    cfg.compile = cuda if cfg.compile is None else cfg.compile
    cfg.kl_warmup = cfg.max_iters // 2 if cfg.kl_warmup is None else cfg.kl_warmup
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes
    accum = getattr(cfg, "grad_accum", None)  # the toy has no --grad-accum
    if cfg.batch_size % (world * (accum or 1)):
        parser.error(f"--batch-size {cfg.batch_size} must split evenly over {world} process(es)"
                     + (f" x --grad-accum {accum} micro-batches" if accum else ""))
    for key in ("num_eval", "val_images"):  # a process without examples would fail or skip a collective
        if 0 < getattr(cfg, key, world) < world:
            parser.error(f"--{key.replace('_', '-')} {getattr(cfg, key)} is fewer than the {world} processes: "
                         f"give each process at least one")
    return cfg


def lr_at(it, cfg):
    """Linear warm-up over --warmup-iters, then cosine decay to lr / 10 at --max-iters."""
    lr = cfg.lr * min(1.0, (it + 1) / max(1, cfg.warmup_iters))
    return lr * (0.55 + 0.45 * math.cos(math.pi * it / max(1, cfg.max_iters)))


# ----------------------------------------------------------------------------------------------------------
# Processes (torchrun's DDP) and statistics over all of them

@contextlib.contextmanager
def distributed(cfg):
    """(rank, world size) for the body of a run. torchrun sets RANK and WORLD_SIZE: NCCL with one GPU per
    process, gloo on CPUs. A body that ends well waits for every rank before the group is destroyed; one that
    fails destroys it at once and re-raises, so the failing rank exits with its message and torchrun stops the
    others (a barrier there would wait for ranks that never come)."""
    rank_world = setup_ddp(cfg)
    try:
        yield rank_world
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def setup_ddp(cfg):
    if "RANK" not in os.environ:
        return 0, 1
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(cfg.device)
    # rank 0 samples and writes alone while the others wait at the next collective: allow it an hour
    backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=1))
    return dist.get_rank(), dist.get_world_size()


def sum_over_ranks(sums):
    """A tensor of sums added over every rank, as floats: every rank sees the same (and stops on the same NaN)."""
    sums = sums.clone()
    if dist.is_initialized():
        dist.all_reduce(sums)
    return sums.tolist()


def mean_se(values, device="cpu"):
    """Mean and standard error of per-example values (a tensor or a list of them), over every rank."""
    x = (torch.cat(values) if isinstance(values, (list, tuple)) else values).double().flatten()
    n, total, squares = sum_over_ranks(torch.stack([torch.tensor(float(len(x)), dtype=torch.float64),
                                                    x.sum().cpu(), (x * x).sum().cpu()]).to(device))
    mean = total / n
    var = max(0.0, (squares / n - mean ** 2) * n / (n - 1)) if n > 1 else 0.0
    return mean, math.sqrt(var) / math.sqrt(n)


def print0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: written atomically with every random state; refused when the weights' settings differ

def make_out_dir(cfg):
    """--out-dir must be a folder this run can write to, found out before any training."""
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        probe = os.path.join(cfg.out_dir, f".probe{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--out-dir {cfg.out_dir} is not a folder this run can write to ({e.strerror}): "
                         f"choose another") from None


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def training_state(model, opt, ema, it, settings, history, rng, device):
    """Everything --resume needs, with the (CPU, CUDA) generator states of every rank: call it on every rank
    (a collective under DDP) and save it on rank 0."""
    state = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    states = [state] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(states, state)
    return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "iter": it,
            "config": settings, "history": history, "rng": rng.bit_generator.state, "torch_rng": states}


def resume(path, model, opt, ema, rng, device, rank, world, seed):
    """Load the training_state at `path`; each rank's generators continue exactly (on another number of
    processes they are reseeded from the iteration, so no draw of an earlier iteration repeats). Returns
    (iteration, history); the checkpoint is dropped on return."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    ema.load_state_dict(ckpt["ema"])
    rng.bit_generator.state = ckpt["rng"]
    if len(ckpt["torch_rng"]) == world:
        torch.set_rng_state(ckpt["torch_rng"][rank][0])
        if device.type == "cuda" and ckpt["torch_rng"][rank][1] is not None:
            torch.cuda.set_rng_state(ckpt["torch_rng"][rank][1], device)
    else:
        torch.manual_seed(seed + rank + world * ckpt["iter"])
    return ckpt["iter"], ckpt["history"]


def load_weights(path, model):
    """Put a checkpoint's EMA weights into `model` (for --eval-only, --sample-only); returns its history."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["ema"]["params"])
    return ckpt["history"]


def check_checkpoint(cfg, method, settings, train):
    """The path of `method`'s checkpoint in --out-dir to continue from (--resume) or to evaluate (train False),
    else None; checked on every rank before any training, and read in full only when its method starts. A run
    of a method this run trains is continued only with --resume, never replaced (nothing is deleted); one
    missing where needed, unreadable, or trained with other `settings` stops with one sentence."""
    path = os.path.join(cfg.out_dir, f"ckpt_{method}.pt")
    if not os.path.exists(path):
        if not train:
            raise SystemExit(f"{path} does not exist: train first (without --eval-only or --sample-only), or "
                             f"point --out-dir at the run's folder")
        if cfg.resume:
            print0(f"--resume: {cfg.out_dir} holds no ckpt_{method}.pt, so {method} starts from scratch")
        return None
    if train and not cfg.resume:
        raise SystemExit(f"{cfg.out_dir} already holds a {method} run ({path}): pass --resume to continue it, or "
                         f"remove the folder or choose another --out-dir to start afresh")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("config") or {}
    except Exception as e:
        raise SystemExit(f"cannot read {path} ({e.__class__.__name__}): delete it or choose another --out-dir")
    differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {v!r})" for k, v in settings.items()
              if saved.get(k) != v]
    if differ:
        raise SystemExit(f"{path} was trained with {', '.join(differ)}: pass the same flags, or another --out-dir")
    return path


# ----------------------------------------------------------------------------------------------------------
# Reporting: the training figures, metrics.json, the two plots every script draws

class Meter:
    """A training loop's figures (loss, KL, ...): summed on the device at every iteration and read back only
    when a progress line or a curve point is due (a read waits for the GPU). A figure that is not finite stops
    the run when it is read, before the next checkpoint. The rate leaves out the first iteration (compilation)."""

    def __init__(self, method, start, total, items_per_iter, unit):
        self.method, self.start, self.total, self.items, self.unit = method, start, total, items_per_iter, unit
        self.sums, self.t0, self.t1 = {}, time.time(), None

    def add(self, *figures):
        x = torch.stack([f.detach().float() for f in figures] + [torch.ones_like(figures[0]).float()])
        self.sums = {key: self.sums.get(key, 0) + x for key in ("line", "curve")}
        self.t1 = self.t1 or time.time()

    def mean(self, key, it):
        """The mean of each figure over every rank since the last read of `key` ('line' or 'curve')."""
        *sums, n = sum_over_ranks(self.sums.pop(key))
        bad = [s / n for s in sums if not math.isfinite(s)]
        if bad:
            raise SystemExit(f"[{self.method}] the loss (or its KL or gradient) became {bad[0]} by iteration "
                             f"{it}: lower --lr; checkpoints already written are kept")
        return [s / n for s in sums]

    def rate(self, it):
        """Items per second after iteration `it` (NaN until two iterations have run)."""
        return self.items * (it - self.start - 1) / (time.time() - self.t1) if it > self.start + 1 else math.nan

    def line(self, it, **figures):
        shown = " | ".join(f"{k} {v:.4g}" for k, v in figures.items())
        rate = self.rate(it)
        return (f"[{self.method}] iter {it:7d}/{self.total} | {shown} | {rate:9.1f} {self.unit} | eta "
                f"{(self.total - it) * self.items / rate:5.0f}s")

    def summary(self, device):
        """This run's training: iterations, seconds, items per second, and the peak GPU memory."""
        out = {"iters": self.total - self.start, "seconds": time.time() - self.t0,
               self.unit.replace("/s", "_per_s"): self.rate(self.total)}
        if device.type == "cuda":
            out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out


def likelihood_entry(figures, iw_samples):
    """A method's entry under "likelihood" in metrics.json: each named figure with its standard error (the
    (sampler, T) bounds go to the by_steps rows), and the number of draws of the IW-DELBO."""
    entry = {"iw_samples": iw_samples} if "iw_delbo" in figures else {}
    for key, (mean, se) in figures.items():
        if isinstance(key, str):
            entry[key], entry[key + "_se"] = mean, se
    return entry


def save_metrics(out_dir, metrics, methods, samplers):
    """Write metrics.json: the entries of the `methods` this run trained or evaluated replace theirs whole,
    those of other methods already in the file are kept. `samplers` is the script's SAMPLERS (sampler ->
    (label, method, ...)), which orders the by_steps rows. Returns what it wrote."""
    path, old = os.path.join(out_dir, "metrics.json"), {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = dict(json.load(f))
        except (ValueError, TypeError) as e:  # the run's figures matter more than an unreadable old file
            os.replace(path, f"{path}.unreadable")
            print0(f"{path} could not be read ({e.__class__.__name__}): kept as {path}.unreadable, written anew")
    new = {**old, **metrics}
    for part in ("config", "likelihood", "training"):
        new[part] = {**{m: v for m, v in old.get(part, {}).items() if m not in methods}, **metrics[part]}
    rows = [r for r in old.get("by_steps", []) if samplers[r["sampler"]][1] not in methods] + metrics["by_steps"]
    new["by_steps"] = sorted(rows, key=lambda r: (list(samplers).index(r["sampler"]), r["steps"]))
    with open(f"{path}.tmp{os.getpid()}", "w") as f:
        json.dump(new, f, indent=1)
    os.replace(f"{path}.tmp{os.getpid()}", path)
    return new


def pyplot():
    """matplotlib without a display, imported only when plotting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def savefig(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def plot_training(path, histories, loss_title, kl_title):
    """Each method's training loss with its validation figures (EMA weights, where there are any), and VADD's
    KL (a KL falling to 0 is posterior collapse). `histories` maps methods to {"train": [(iteration, loss, KL,
    lambda)], "val": [(iteration, loss)]}."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for method, history in histories.items():
        h = np.asarray(history["train"], dtype=float).reshape(-1, 4)
        line, = axes[0].plot(h[:, 0], h[:, 1], label=f"{method} training")
        if history["val"]:
            axes[0].plot(*zip(*history["val"]), marker="o", ls="--", color=line.get_color(),
                         label=f"{method} validation (EMA)")
        if method == "vadd":
            axes[1].plot(h[:, 0], h[:, 2], color=line.get_color())
    for ax, title in zip(axes, [loss_title, kl_title]):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
    if axes[0].lines:
        axes[0].legend(fontsize=7)
    savefig(fig, path)


def plot_by_steps(path, rows, samplers, panels, lines=(), title=""):
    """One panel per (key, axis label) in `panels`: each sampler's figure in the by_steps `rows` against the
    number of denoising steps T (logarithmic), with error bars where the rows hold key_se, and on the first
    panel the horizontal reference `lines` (value, label, line style). `samplers` is the script's SAMPLERS."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for sampler, (name, *_) in samplers.items():
            pts = sorted((r["steps"], r[key], r.get(key + "_se", 0.0)) for r in rows
                         if r["sampler"] == sampler and key in r)
            if pts:
                ax.errorbar(*zip(*pts), marker="o", capsize=2, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("denoising steps T")
        ax.set_ylabel(label)
    for value, label, style in lines:
        axes[0, 0].axhline(value, color="gray", ls=style, label=label)
    axes[0, 0].set_title(title, fontsize=9)
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    savefig(fig, path)
