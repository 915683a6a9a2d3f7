"""VADD vs masked diffusion (MDM) on 2D toy data: the paper's Table 1 experiment, on a laptop CPU in minutes.

A point is two tokens: each coordinate discretised into --bins equal bins over [-4, 4]. With one denoising
step MDM draws the two coordinates independently from their marginals and scatters points over the whole
grid; VADD conditions its denoiser on a latent z, so even one step keeps the data's shape.

    python vadd_toy.py                                  # checkerboard, MDM and VADD, about 3 minutes on 2 cores
    python vadd_toy.py --dataset swissroll --steps 1,5  # another dataset, other step counts

Read top to bottom: configuration, data, networks, objective, samplers, evaluation, training, main.
The method and its pitfalls: REFERENCE.md; shared pieces (schedule, reverse step, bounds): common.py.
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn

import common

# ----------------------------------------------------------------------------------------------------------
# Configuration

DATASETS = ("checkerboard", "swissroll", "circles", "8gaussians", "moons", "pinwheel", "2spirals")
SAMPLERS = {"mdm": "MDM", "vadd": "VADD vanilla (fresh z each step)", "vadd_cs": "VADD-CS (one z per point)"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="checkerboard", choices=DATASETS, help="2D distribution (default %(default)s)")
    a("--method", default="both", choices=("mdm", "vadd", "both"),
      help="train MDM, VADD, or both one after the other with the same seed, data and budget (default both)")
    a("--bins", type=int, default=64, help="bins per coordinate over [-4, 4], the vocabulary V (default 64)")
    a("--steps", default="1,2,5,10,100", help="denoising step counts to evaluate, comma separated")
    a("--num-samples", type=int, default=50_000, help="points drawn per sampler and step count")
    a("--num-eval", type=int, default=20_000, help="held-out data points for the likelihoods")
    a("--iw-samples", type=int, default=100, help="draws of z for the importance-weighted DELBO")
    a("--ref-points", type=int, default=10_000_000, help="data points in the reference histogram (cached)")
    # budget and optimisation
    a("--max-iters", type=int, default=6000, help="training iterations per method")
    a("--batch-size", type=int, default=512, help="points per training iteration")
    a("--lr", type=float, default=2e-3, help="peak learning rate of AdamW")
    a("--warmup-iters", type=int, default=100, help="linear learning-rate warm-up, then cosine decay to lr/10")
    a("--grad-clip", type=float, default=1.0, help="gradient-norm clipping")
    a("--ema", type=float, default=0.999, help="EMA decay of the weights used for evaluation (0 = off)")
    # model
    a("--width", type=int, default=128, help="hidden width of both MLPs")
    a("--depth", type=int, default=2, help="residual blocks of the denoiser")
    a("--latent-dim", type=int, default=2, help="size of z (VADD)")
    a("--kl-warmup", type=int, default=None, help="iterations over which lambda rises to 1 (default max-iters/2)")
    a("--kl-start", type=float, default=0.0, help="lambda at iteration 0")
    a("--schedule", default="linear", choices=common.SCHEDULES, help="masking schedule alpha(t)")
    a("--objective", default="delbo", choices=("delbo", "steps"),
      help="delbo: the paper's continuous-time DELBO (MDM: NELBO); steps: the valid bound of the K-step "
           "consistency sampler (MDM: of the K-step sampler), REFERENCE.md section 3b (default delbo)")
    a("--train-steps", default="1,2,4,8", help="budgets K for --objective steps, one drawn per example")
    # run
    a("--seed", type=int, default=0, help="seeds training, data and sampling (same for both methods)")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    a("--dtype", default=None, choices=("float32", "bfloat16"), help="autocast dtype (default bf16 on CUDA)")
    a("--compile", default=None, action=argparse.BooleanOptionalAction, help="torch.compile (default on CUDA)")
    a("--out-dir", default=None, help="output folder (default out/toy/<dataset>)")
    a("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "vadd"),
      help="where reference histograms are cached")
    a("--resume", action="store_true", help="continue from ckpt_<method>.pt in --out-dir")
    a("--log-interval", type=int, default=500, help="iterations between progress lines")
    a("--ckpt-interval", type=int, default=2000, help="iterations between checkpoints (and one at the end)")
    return p


def parse_config(argv=None):
    """Parse and check every flag before anything is written; a bad value stops with one sentence."""
    p = build_parser()
    cfg = p.parse_args(argv)
    for flag in ("steps", "train_steps"):
        try:
            counts = [int(s) for s in str(getattr(cfg, flag)).split(",") if s.strip()]
        except ValueError:
            p.error(f"--{flag.replace('_', '-')} {getattr(cfg, flag)!r}: give whole numbers separated by commas, e.g. 1,2,5")
        if not counts or min(counts) < 1:
            p.error(f"--{flag.replace('_', '-')} {counts}: every step count must be a positive whole number")
        setattr(cfg, flag, counts)
    for name, low in [("bins", 2), ("num_samples", 1), ("num_eval", 1), ("iw_samples", 1), ("ref_points", 1),
                      ("max_iters", 0), ("batch_size", 1), ("width", 2), ("depth", 0), ("latent_dim", 1),
                      ("log_interval", 1), ("ckpt_interval", 1)]:
        if getattr(cfg, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or not 0 <= cfg.ema < 1 or not 0 <= cfg.kl_start <= 1:
        p.error("--lr must be positive, --ema in [0, 1) and --kl-start in [0, 1]")
    try:
        cfg.device = str(common.pick_device(cfg.device))
    except (ValueError, RuntimeError) as e:
        p.error(str(e))
    cuda = cfg.device.startswith("cuda")
    cfg.dtype = cfg.dtype or ("bfloat16" if cuda else "float32")
    cfg.compile = cuda if cfg.compile is None else cfg.compile
    cfg.kl_warmup = cfg.max_iters // 2 if cfg.kl_warmup is None else cfg.kl_warmup
    cfg.out_dir = cfg.out_dir or os.path.join("out", "toy", cfg.dataset)
    for folder in (cfg.out_dir, cfg.cache_dir):
        blocker = next((q for q in _ancestors(folder) if os.path.exists(q) and not os.path.isdir(q)), None)
        if blocker:
            p.error(f"cannot create folder {folder!r}: {blocker!r} is a file, not a folder; choose another path")
    return cfg


def _ancestors(path):
    path = os.path.abspath(path)
    while True:
        yield path
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


# ----------------------------------------------------------------------------------------------------------
# Data: continuous 2D points drawn on the fly, then each coordinate binned into a token

def draw_points(dataset, n, rng):
    """n points of a 2D distribution (the FFJORD toy set, the usual benchmark), as an (n, 2) float array."""
    u = rng.uniform(size=n)
    if dataset == "checkerboard":  # 8 squares of side 2: uniform over half of [-4, 4]^2, entropy ln 2048 at 64 bins
        x1 = rng.uniform(-2, 2, n)
        x2 = rng.uniform(0, 1, n) - 2 * rng.integers(0, 2, n) + np.floor(x1) % 2
        return np.stack([x1, x2], 1) * 2
    if dataset == "swissroll":
        t = 1.5 * np.pi * (1 + 2 * u)
        return (np.stack([t * np.cos(t), t * np.sin(t)], 1) + rng.normal(size=(n, 2))) / 5
    if dataset == "circles":  # two rings, radii 3 and 1.5
        radius = np.where(rng.integers(0, 2, n) == 0, 1.0, 0.5)
        angle = 2 * np.pi * u
        return (radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1) + 0.08 * rng.normal(size=(n, 2))) * 3
    if dataset == "8gaussians":
        angle = 2 * np.pi * rng.integers(0, 8, n) / 8
        centres = 4 * np.stack([np.cos(angle), np.sin(angle)], 1)
        return (centres + 0.5 * rng.normal(size=(n, 2))) / math.sqrt(2)
    if dataset == "moons":
        angle = np.pi * u
        upper = rng.integers(0, 2, n)[:, None] == 0
        xy = np.where(upper, np.stack([np.cos(angle), np.sin(angle)], 1),
                      np.stack([1 - np.cos(angle), 0.5 - np.sin(angle)], 1))
        return (xy + 0.1 * rng.normal(size=(n, 2))) * 2 + np.array([-1.0, -0.2])
    if dataset == "pinwheel":  # 5 arms
        features = rng.normal(size=(n, 2)) * np.array([0.3, 0.1]) + np.array([1.0, 0.0])
        angle = 2 * np.pi * rng.integers(0, 5, n) / 5 + 0.25 * np.exp(features[:, 0])
        c, s = np.cos(angle), np.sin(angle)
        return 2 * np.stack([features[:, 0] * c - features[:, 1] * s, features[:, 0] * s + features[:, 1] * c], 1)
    if dataset == "2spirals":
        r = np.sqrt(u) * 3 * np.pi
        arm = np.stack([-np.cos(r) * r, np.sin(r) * r], 1) + 0.5 * rng.uniform(size=(n, 2))
        sign = np.where(rng.integers(0, 2, n) == 0, 1.0, -1.0)[:, None]
        return sign * arm / 3 + 0.1 * rng.normal(size=(n, 2))
    raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")


def to_tokens(points, bins):
    """Bin each coordinate over [-4, 4] (points outside go to the edge bins): int64 array (n, 2) in [0, bins)."""
    return np.clip(np.floor((points + 4) / 8 * bins), 0, bins - 1).astype(np.int64)


def draw_tokens(dataset, n, bins, rng):
    return to_tokens(draw_points(dataset, n, rng), bins)


def histogram(tokens, bins):
    return np.bincount(tokens[:, 0] * bins + tokens[:, 1], minlength=bins * bins).reshape(bins, bins)


def reference_distribution(cfg):
    """The dataset's distribution on the grid: the histogram of --ref-points points drawn with a fixed seed,
    cached, so every run and every sampler is measured against the same reference."""
    path = os.path.join(cfg.cache_dir, f"toy_ref_{cfg.dataset}_bins{cfg.bins}_n{cfg.ref_points}.npy")
    if os.path.exists(path):
        counts = np.load(path)
    else:
        rng, counts, left = np.random.default_rng(20250522), np.zeros((cfg.bins, cfg.bins), np.int64), cfg.ref_points
        while left:
            n = min(left, 1_000_000)
            counts += histogram(draw_tokens(cfg.dataset, n, cfg.bins, rng), cfg.bins)
            left -= n
        os.makedirs(cfg.cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.npy"
        np.save(tmp, counts)
        os.replace(tmp, path)
    return counts / counts.sum()


# ----------------------------------------------------------------------------------------------------------
# Networks

class ResidualBlock(nn.Module):
    """h + MLP(LayerNorm(h)), the normalised input scaled and shifted by the conditioning vector c when there
    is one (adaLN, as in the paper's DiT and UNet), zero-initialised so a fresh block ignores c."""

    def __init__(self, width, cond_width=0):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
        self.modulation = nn.Linear(cond_width, 2 * width) if cond_width else None
        if self.modulation is not None:
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)

    def forward(self, h, c=None):
        x = self.norm(h)
        if self.modulation is not None:
            scale, shift = self.modulation(c).chunk(2, -1)
            x = x * (1 + scale) + shift
        return h + self.mlp(x)


class Denoiser(nn.Module):
    """mu_theta(x0 | x_t, z): an MLP over the two embedded tokens ([M] = id V has its own embedding in each
    coordinate), returning V logits per coordinate, so [M] is never predicted. For VADD an MLP of z is added
    to the first hidden layer and modulates every block. No time input: the optimal masked-diffusion
    denoiser depends on x_t alone (MDLM)."""

    def __init__(self, bins, width, depth, latent_dim=0):
        super().__init__()
        self.bins = bins
        self.embed = nn.Embedding(2 * (bins + 1), width // 2)  # one table per coordinate, tokens 0..V
        self.latent = nn.Sequential(nn.Linear(latent_dim, width), nn.SiLU(), nn.Linear(width, width)) if latent_dim else None
        self.blocks = nn.ModuleList([ResidualBlock(width, width if latent_dim else 0) for _ in range(depth)])
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * bins))

    def forward(self, xt, z=None):
        h = self.embed(xt + torch.tensor([0, self.bins + 1], device=xt.device)).flatten(1)
        c = None
        if self.latent is not None:
            c = self.latent(z)
            h = h + c
        for block in self.blocks:
            h = block(h, c)
        return self.out(h).view(-1, 2, self.bins)


class Recognition(nn.Module):
    """r_phi(z | x0, x_t) = N(mean, diag exp(logvar)) from the clean tokens and the two mask bits: (x0, mask)
    carries what (x0, x_t) does. Zero-initialised output: r starts at the prior and the KL at 0."""

    def __init__(self, bins, width, latent_dim):
        super().__init__()
        self.bins = bins
        self.embed = nn.Embedding(2 * bins, width // 2)
        self.net = nn.Sequential(nn.Linear(width + 2, width), nn.SiLU(), ResidualBlock(width), ResidualBlock(width),
                                 nn.LayerNorm(width), nn.Linear(width, 2 * latent_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x0, masked):
        h = self.embed(x0 + torch.tensor([0, self.bins], device=x0.device)).flatten(1)
        mean, logvar = self.net(torch.cat([h, masked.float()], 1)).float().chunk(2, -1)  # z's noise in float32
        return mean, logvar


class Model(nn.Module):
    """The denoiser and, for VADD, the recognition model: one module, so one optimizer, EMA and checkpoint."""

    def __init__(self, cfg, method):
        super().__init__()
        latent_dim = cfg.latent_dim if method == "vadd" else 0
        self.latent_dim = latent_dim
        self.denoiser = Denoiser(cfg.bins, cfg.width, cfg.depth, latent_dim)
        self.recognition = Recognition(cfg.bins, cfg.width, latent_dim) if latent_dim else None

    def denoise(self, xt, t, z):  # the signature common.py's estimators call
        return self.denoiser(xt, z)


# ----------------------------------------------------------------------------------------------------------
# Objective: the paper's DELBO (REFERENCE.md section 2; MDM's NELBO is the same without z). --objective steps
# trains the valid bound of the K-step sampler instead (section 3b), common.steps_loss

def delbo(model, x0, schedule, kl_weight):
    """Per point: w(t) * (sum_masked -log mu(x0 | x_t, z) + kl_weight * KL(r(z | x0, x_t) || N(0, I))),
    with t drawn low-discrepancy, x_t ~ q(x_t | x0), z ~ r reparameterised. Returns (loss, kl) per point;
    the KL, unweighted by w(t), is logged to watch for posterior collapse."""
    bins = model.denoiser.bins
    t = common.sample_times(x0.shape[0], device=x0.device)
    xt = common.forward_mask(x0, schedule.alpha(t), bins)
    masked = xt == bins
    z, kl = None, torch.zeros(x0.shape[0], device=x0.device)
    if model.recognition is not None:
        mean, logvar = model.recognition(x0, masked)
        z, kl = common.sample_latent(mean, logvar), common.gaussian_kl(mean, logvar)
    nll = common.masked_nll(model.denoiser(xt, z), x0, masked)
    return schedule.weight(t) * (nll + kl_weight * kl), kl


# ----------------------------------------------------------------------------------------------------------
# Samplers: start from all-[M], T reverse steps on the grid t_i = i/T (common.reverse_step)

@torch.no_grad()
def sample(model, num, T, sampler, schedule):
    """sampler 'mdm': no z; 'vadd' (vanilla): a fresh z ~ N(0, I) at every step; 'vadd_cs' (consistency):
    one z per point for all steps. The denoiser runs only on points that still hold a [M] and whose input
    changed since its last call (MDM and VADD-CS; valid as the denoiser has no time input) or, for the
    vanilla sampler, got a new z. Returns (tokens, network evaluations per point)."""
    device = next(model.parameters()).device
    bins = model.denoiser.bins
    xt = torch.full((num, 2), bins, dtype=torch.long, device=device)
    logits = torch.empty(num, 2, bins, device=device)
    z = torch.randn(num, model.latent_dim, device=device) if sampler == "vadd_cs" else None
    stale, evaluations = torch.ones(num, dtype=torch.bool, device=device), 0
    for i in range(T, 0, -1):
        if sampler == "vadd":
            z, stale = torch.randn(num, model.latent_dim, device=device), torch.ones_like(stale)
        rows = (stale & (xt == bins).any(1)).nonzero().squeeze(1)
        for part in rows.split(common.rows_per_call(2, bins)) if len(rows) else ():
            logits[part] = model.denoiser(xt[part], None if z is None else z[part]).float()
        evaluations += len(rows)
        alpha_t, alpha_s = schedule.alpha_grid(torch.tensor([i / T, (i - 1) / T], dtype=torch.float64))
        xs = common.reverse_step(xt, logits, alpha_t, alpha_s, bins)
        stale, xt = (xs != xt).any(1), xs
    return xt.cpu().numpy(), evaluations / num


# ----------------------------------------------------------------------------------------------------------
# Evaluation: histogram divergences of samples, likelihoods of held-out points

def sample_metrics(tokens, reference):
    """JS (nats) and KL(reference || model) between the samples' histogram and the reference, and validity.
    KL smooths the model histogram with half a count per cell (the Krichevsky-Trofimov estimator), so a
    cell the samples miss costs a finite amount."""
    bins, n = reference.shape[0], len(tokens)
    counts = histogram(tokens, bins).astype(np.float64)
    q, p = counts / n, reference
    m = (p + q) / 2
    kl = lambda a, b: float(np.sum(a[a > 0] * np.log(a[a > 0] / b[a > 0])))  # noqa: E731
    q_smooth = (counts + 0.5) / (n + 0.5 * counts.size)
    return {"js": 0.5 * kl(p, m) + 0.5 * kl(q, m), "kl": kl(p, q_smooth), "validity": float(q[p > 0].sum())}


def mean_se(x):
    x = x.double()
    return float(x.mean()), float(x.std() / math.sqrt(len(x))) if len(x) > 1 else 0.0


@torch.no_grad()
def likelihoods(model, x0, cfg, schedule):
    """Held-out figures in nats per point, each with its standard error: the continuous-time NELBO (MDM) or
    DELBO and its importance-weighted version (VADD; comparison figures, not bounds), and the valid T-step
    bound of each sampler at every step count (exact sum over the T steps: two tokens make it cheap)."""
    bins, out, parts = cfg.bins, {}, x0.split(common.rows_per_call(2, cfg.bins))
    key = "delbo" if model.recognition is not None else "mdm_nelbo"
    out[key] = mean_se(torch.cat([delbo(model, x, schedule, 1.0)[0] for x in parts]))
    if model.recognition is not None:
        out["iw_delbo"] = mean_se(common.iw_delbo(x0, model.denoise, model.recognition, schedule, bins,
                                                  cfg.iw_samples))
        out["iw_samples"] = cfg.iw_samples
    bounds = {}
    for sampler in (["vadd", "vadd_cs"] if model.recognition is not None else ["mdm"]):
        for T in cfg.steps:
            bounds[(sampler, T)] = mean_se(torch.cat([
                common.step_bound(x, model.denoise, schedule, bins, T, model.recognition, sampler, exact=True)
                for x in parts]))
    return out, bounds


# ----------------------------------------------------------------------------------------------------------
# Plots

def pyplot():
    """matplotlib without a display, imported only when plotting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_samples(path, cfg, data_tokens, samples):
    plt = pyplot()
    rows = ["data"] + [s for s in SAMPLERS if any(k[0] == s for k in samples)]
    fig, axes = plt.subplots(len(rows), len(cfg.steps), figsize=(2 * len(cfg.steps), 2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, T in enumerate(cfg.steps):
            ax = axes[r, c]
            tokens = data_tokens if row == "data" else samples.get((row, T))
            if tokens is not None:
                ax.imshow(histogram(tokens, cfg.bins).T, origin="lower", cmap="magma", interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"T = {T}")
            if c == 0:
                ax.set_ylabel("data" if row == "data" else SAMPLERS[row].split(" (")[0])
    fig.suptitle(f"{cfg.dataset}: samples after T denoising steps ({cfg.num_samples} points each)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_js(path, cfg, rows, floor):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for sampler, label in SAMPLERS.items():
        pts = sorted((r["steps"], r["js"]) for r in rows if r["sampler"] == sampler)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(floor, color="gray", ls="--", label="noise floor (data vs reference)")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("denoising steps T"), ax.set_ylabel("JS to reference (nats)"), ax.set_title(cfg.dataset)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(path, histories):
    """Loss of each method; KL and lambda of VADD (a KL falling to 0 is posterior collapse)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for method, h in histories.items():
        h = np.asarray(h).reshape(-1, 4)
        axes[0].plot(h[:, 0], h[:, 1], label=method)
        if method == "vadd":
            axes[1].plot(h[:, 0], h[:, 2], label=method)
            axes[2].plot(h[:, 0], h[:, 3], label=method)
    titles = ["training loss (objective at lambda), nats per point", "VADD: KL(r || p), nats", "VADD: lambda"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9), ax.set_xlabel("iteration")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Training

def train(cfg, method, schedule, ckpt=None):
    """Train one method, from a checkpoint if given; returns the model with its EMA weights loaded and the
    loss history."""
    device = torch.device(cfg.device)
    common.seed_everything(cfg.seed)  # both methods see the same initialisation seed and data stream
    rng = np.random.default_rng(cfg.seed)
    model = Model(cfg, method).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = common.EMA(model, cfg.ema)
    ckpt_path = os.path.join(cfg.out_dir, f"ckpt_{method}.pt")
    start, history = 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        ema.load_state_dict(ckpt["ema"])
        rng.bit_generator.state = ckpt["rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and ckpt["cuda_rng"] is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        start, history = ckpt["iter"], [tuple(h) for h in ckpt["history"]]
        print(f"[{method}] resumed from {ckpt_path} at iteration {start}")
    def objective(model, x0, schedule, kl_weight):
        if cfg.objective == "delbo":
            return delbo(model, x0, schedule, kl_weight)
        # the valid bound of the K-step consistency sampler (REFERENCE.md section 3b)
        return common.steps_loss(x0, model.denoise, schedule, cfg.bins, cfg.train_steps, model.recognition, kl_weight)

    step_fn = torch.compile(objective) if cfg.compile else objective
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{method}] {n_params / 1e6:.2f}M parameters, {cfg.max_iters} iterations of batch {cfg.batch_size}")
    t0, curve, log = time.time(), np.zeros(3), np.zeros(3)  # (loss, KL, count) since the last point / log line
    for it in range(start, cfg.max_iters):
        lr = cfg.lr * min(1.0, (it + 1) / max(1, cfg.warmup_iters))
        lr *= 0.55 + 0.45 * math.cos(math.pi * it / cfg.max_iters)  # cosine decay to lr / 10
        for group in opt.param_groups:
            group["lr"] = lr
        x0 = torch.from_numpy(draw_tokens(cfg.dataset, cfg.batch_size, cfg.bins, rng)).to(device)
        lam = common.kl_weight(it, cfg.kl_warmup, cfg.kl_start) if method == "vadd" else 0.0
        with common.autocast(device, cfg.dtype):
            loss, kl = step_fn(model, x0, schedule, torch.tensor(lam))  # a tensor: compiled once for every lambda
        loss = loss.mean()
        if not torch.isfinite(loss):
            raise SystemExit(f"[{method}] the loss became {loss.item()} at iteration {it}: lower --lr "
                             f"(now {cfg.lr}); checkpoints already written are kept")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model)
        curve += (loss.item(), kl.mean().item(), 1)  # one batch is noisy (w(t) = 1/t): report means
        log += (loss.item(), kl.mean().item(), 1)
        if (it + 1) % HISTORY_EVERY == 0 or it == cfg.max_iters - 1:
            history.append((it + 1, float(curve[0] / curve[2]), float(curve[1] / curve[2]), lam))
            curve[:] = 0
        if (it + 1) % cfg.log_interval == 0 or it == cfg.max_iters - 1:
            speed = (it + 1 - start) / (time.time() - t0)
            print(f"[{method}] iter {it + 1:6d}/{cfg.max_iters} | loss {log[0] / log[2]:7.3f} | kl {log[1] / log[2]:6.3f} "
                  f"| lambda {lam:4.2f} | {speed:6.1f} it/s | eta {(cfg.max_iters - it - 1) / speed:5.0f}s", flush=True)
            log[:] = 0
        if (it + 1) % cfg.ckpt_interval == 0 or it == cfg.max_iters - 1:
            common.save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                "iter": it + 1, "config": checkpoint_config(cfg, method), "history": history,
                                "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                               ckpt_path)
    ema.copy_to(model)
    return model.eval(), history


HISTORY_EVERY = 50  # iterations averaged into one point of the training curves

CHECKPOINT_KEYS = ("dataset", "bins", "width", "depth", "latent_dim", "schedule", "objective", "train_steps")


def checkpoint_config(cfg, method):
    return {"method": method, **{k: getattr(cfg, k) for k in CHECKPOINT_KEYS}}


def read_checkpoint(cfg, method):
    """The checkpoint --resume continues from (None without --resume or file); one trained with other
    flags stops the run before anything is written."""
    path = os.path.join(cfg.out_dir, f"ckpt_{method}.pt")
    if not (cfg.resume and os.path.exists(path)):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"cannot read {path} ({e.__class__.__name__}): delete it or choose another --out-dir")
    if ckpt.get("config") != checkpoint_config(cfg, method):
        raise SystemExit(f"{path} was trained with {ckpt.get('config')}, not {checkpoint_config(cfg, method)}: "
                         f"pass the same flags, or another --out-dir to start afresh")
    return ckpt


# ----------------------------------------------------------------------------------------------------------
# Main

def main(argv=None):
    cfg = parse_config(argv)
    methods = ["mdm", "vadd"] if cfg.method == "both" else [cfg.method]
    checkpoints = {method: read_checkpoint(cfg, method) for method in methods}
    os.makedirs(cfg.out_dir, exist_ok=True)
    run_start = time.time()
    schedule = common.Schedule(cfg.schedule)
    reference = reference_distribution(cfg)
    data_entropy = float(-np.sum(reference[reference > 0] * np.log(reference[reference > 0])))
    data_tokens = draw_tokens(cfg.dataset, cfg.num_samples, cfg.bins, np.random.default_rng(cfg.seed + 1))
    np.save(os.path.join(cfg.out_dir, "data.npy"), data_tokens)
    floor = sample_metrics(data_tokens, reference)["js"]
    heldout = torch.from_numpy(draw_tokens(cfg.dataset, cfg.num_eval, cfg.bins, np.random.default_rng(cfg.seed + 2)))

    likelihood, rows, samples, histories = {"data_entropy": data_entropy}, [], {}, {}
    for method in methods:
        model, histories[method] = train(cfg, method, schedule, checkpoints[method])
        common.seed_everything(cfg.seed + 3)
        lik, bounds = likelihoods(model, heldout.to(cfg.device), cfg, schedule)
        likelihood.update({k: v[0] if isinstance(v, tuple) else v for k, v in lik.items()})
        likelihood.update({f"{k}_se": v[1] for k, v in lik.items() if isinstance(v, tuple)})
        for sampler in (["mdm"] if method == "mdm" else ["vadd", "vadd_cs"]):
            for T in cfg.steps:
                t0 = time.time()
                tokens, nfe = sample(model, cfg.num_samples, T, sampler, schedule)
                seconds = time.time() - t0
                np.save(os.path.join(cfg.out_dir, f"samples_{sampler}_T{T}.npy"), tokens)
                samples[(sampler, T)] = tokens
                bound, bound_se = bounds[(sampler, T)]
                rows.append({"sampler": sampler, "steps": T, "bound": bound, "bound_se": bound_se,
                             "sample_seconds": seconds, "nfe": nfe, **sample_metrics(tokens, reference)})

    metrics = {"config": dict(vars(cfg)), "unit": "nats per point", "likelihood": likelihood,
               "noise_floor_js": floor, "by_steps": rows, "seconds": time.time() - run_start}
    metrics = merge_earlier_run(cfg, metrics, samples)
    with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    rows = metrics["by_steps"]
    plot_samples(os.path.join(cfg.out_dir, "samples.png"), cfg, data_tokens, samples)
    plot_js(os.path.join(cfg.out_dir, "js.png"), cfg, rows, floor)
    plot_training(os.path.join(cfg.out_dir, "training.png"), histories)
    print_table(cfg, metrics)
    return metrics


RUN_ONLY_KEYS = ("method", "resume", "device", "dtype", "compile", "out_dir", "cache_dir", "log_interval", "ckpt_interval")


def merge_earlier_run(cfg, metrics, samples):
    """Keep the other method's results when one method is trained into a folder that holds them (same flags
    otherwise), so `--method mdm` then `--method vadd` end with one metrics.json and one figure for both."""
    path = os.path.join(cfg.out_dir, "metrics.json")
    if not os.path.exists(path):
        return metrics
    with open(path) as f:
        old = json.load(f)
    same_run = lambda c: {k: v for k, v in c.items() if k not in RUN_ONLY_KEYS}  # noqa: E731
    if same_run(old.get("config", {})) != same_run(metrics["config"]):
        return metrics
    fresh = {r["sampler"] for r in metrics["by_steps"]}
    kept = [r for r in old["by_steps"] if r["sampler"] not in fresh]
    for r in kept:
        saved = os.path.join(cfg.out_dir, f"samples_{r['sampler']}_T{r['steps']}.npy")
        if os.path.exists(saved):
            samples[(r["sampler"], r["steps"])] = np.load(saved)
    metrics["by_steps"] = kept + metrics["by_steps"]
    metrics["likelihood"] = {**old["likelihood"], **metrics["likelihood"]}
    if kept:
        metrics["config"]["method"] = "both"
    return metrics


def print_table(cfg, metrics):
    lik = metrics["likelihood"]
    print(f"\n{cfg.dataset}, {cfg.bins} bins: data entropy {lik['data_entropy']:.3f} nats per point; "
          f"JS noise floor ({cfg.num_samples} data points vs reference) {metrics['noise_floor_js']:.4f}")
    for key, label in [("mdm_nelbo", "MDM NELBO (bound, continuous time)"),
                       ("delbo", "VADD DELBO (not a bound)"),
                       ("iw_delbo", f"VADD IW-DELBO, K = {lik.get('iw_samples')} (not a bound)")]:
        if key in lik:
            print(f"  {label:45s} {lik[key]:7.3f} +- {lik[key + '_se']:.3f}")
    print(f"\n{'sampler':8s} {'T':>4s} {'JS':>7s} {'KL':>7s} {'valid':>6s} {'bound (valid)':>16s} {'NFE':>6s} {'sec':>6s}")
    for r in metrics["by_steps"]:
        print(f"{r['sampler']:8s} {r['steps']:4d} {r['js']:7.4f} {r['kl']:7.3f} {r['validity']:6.3f} "
              f"{r['bound']:8.3f} +- {r['bound_se']:.3f} {r['nfe']:6.2f} {r['sample_seconds']:6.2f}")
    print(f"\nwrote {cfg.out_dir}/ (metrics.json, samples_*.npy, samples.png, js.png, training.png) "
          f"in {metrics['seconds']:.0f}s")


if __name__ == "__main__":
    main()
