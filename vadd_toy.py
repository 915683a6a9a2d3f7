"""VADD vs masked diffusion (MDM) on 2D toy data: the paper's Table 1 experiment, on a laptop CPU in minutes.

A point is two tokens: each coordinate discretised into --bins equal bins over [-4, 4]. With one denoising
step MDM draws the two coordinates independently from their marginals and scatters points over the whole
grid; VADD conditions its denoiser on a latent z, so even one step keeps the data's shape.

    python vadd_toy.py                                  # checkerboard, MDM and VADD, about 4 minutes on 2 cores
    python vadd_toy.py --dataset swissroll --steps 1,5  # another dataset, other step counts

Read top to bottom: configuration, data, networks, objective, samplers, evaluation, training, main.
The method: docs/method.md; what all scripts share (schedule, reverse step, bounds, run utilities): common.py.
"""
import os
import time

import numpy as np
import torch
import torch.nn as nn

import common

# ----------------------------------------------------------------------------------------------------------
# Configuration

def parse_config(argv=None):
    p = common.parser(__doc__)
    a, whole = p.add_argument, common.whole
    a("--dataset", choices=("checkerboard", "swissroll", "circles"), default="checkerboard",
      help="2D distribution (default %(default)s)")
    a("--bins", type=whole(2), default=64, help="bins per coordinate over [-4, 4], the vocabulary V (default 64)")
    a("--steps", type=common.counts, default="1,2,5,10,100", help="denoising step counts to evaluate, e.g. 1,5")
    a("--num-samples", type=whole(), default=50_000, help="points drawn per sampler and step count")
    a("--num-eval", type=whole(), default=20_000, help="held-out data points for the likelihoods")
    a("--iw-samples", type=whole(), default=100, help="draws of z for the importance-weighted DELBO")
    a("--ref-points", type=whole(), default=10_000_000, help="data points in the reference histogram")
    a("--width", type=whole(2), default=128, help="hidden width of the denoiser's MLP (default 128)")
    a("--rec-width", type=whole(2), default=64, help="hidden width of the recognition MLP (default 64)")
    a("--depth", type=whole(0), default=2, help="residual blocks of the denoiser")
    a("--latent-dim", type=whole(), default=2, help="size of z (VADD)")
    common.add_training_flags(p, dict(max_iters=6000, batch_size=512, lr=2e-3, warmup_iters=100, ema=0.999,
                                      schedule="linear", log_interval=500, ckpt_interval=2000), evaluation=False)
    cfg = p.parse_args(argv)
    cfg.out_dir = cfg.out_dir or os.path.join("out", "toy", cfg.dataset)
    return common.finish_config(cfg, p)


# ----------------------------------------------------------------------------------------------------------
# Data: continuous 2D points drawn on the fly, then each coordinate binned into a token

def draw_points(dataset, n, rng):
    """n points of one of the paper's 2D distributions (from the FFJORD toy set), as an (n, 2) float array."""
    u = rng.uniform(size=n)
    if dataset == "checkerboard":  # 8 squares of side 2, uniform over half of [-4, 4]^2: ln 2048 nats at 64 bins
        x1 = rng.uniform(-2, 2, n)
        x2 = rng.uniform(0, 1, n) - 2 * rng.integers(0, 2, n) + np.floor(x1) % 2
        return np.stack([x1, x2], 1) * 2
    if dataset == "swissroll":
        t = 1.5 * np.pi * (1 + 2 * u)
        return (np.stack([t * np.cos(t), t * np.sin(t)], 1) + rng.normal(size=(n, 2))) / 5
    radius = np.where(rng.integers(0, 2, n) == 0, 1.0, 0.5)  # circles: two rings, radii 3 and 1.5
    ring = radius[:, None] * np.stack([np.cos(2 * np.pi * u), np.sin(2 * np.pi * u)], 1)
    return (ring + 0.08 * rng.normal(size=(n, 2))) * 3


def draw_tokens(dataset, n, bins, rng):
    """Bin each coordinate over [-4, 4] (points outside go to the edge bins): int64 array (n, 2) in [0, bins)."""
    return np.clip(np.floor((draw_points(dataset, n, rng) + 4) / 8 * bins), 0, bins - 1).astype(np.int64)


def histogram(tokens, bins):
    return np.bincount(tokens[:, 0] * bins + tokens[:, 1], minlength=bins * bins).reshape(bins, bins)


def reference_distribution(cfg):
    """The dataset's distribution on the grid: the histogram of --ref-points points from a fixed seed, so every
    run and every sampler is measured against the same reference."""
    rng, counts = np.random.default_rng(20250522), np.zeros((cfg.bins, cfg.bins), np.int64)
    for first in range(0, cfg.ref_points, 1_000_000):
        n = min(1_000_000, cfg.ref_points - first)
        counts += histogram(draw_tokens(cfg.dataset, n, cfg.bins, rng), cfg.bins)
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
        for p in self.modulation.parameters() if cond_width else ():
            nn.init.zeros_(p)

    def forward(self, h, c=None):
        x = self.norm(h)
        if self.modulation is not None:
            scale, shift = self.modulation(c).chunk(2, -1)
            x = x * (1 + scale) + shift
        return h + self.mlp(x)


class Denoiser(nn.Module):
    """mu_theta(x0 | x_t, z): an MLP over the two embedded tokens ([M] = id V has its own embedding), with V logits
    per coordinate, so [M] is never predicted. For VADD an MLP of z is added to the first hidden layer and
    modulates every block. No time input: the optimal masked-diffusion denoiser depends on x_t alone (MDLM)."""

    def __init__(self, bins, width, depth, latent_dim=0):
        super().__init__()
        self.bins = bins
        self.embed = nn.Embedding(2 * (bins + 1), width // 2)  # one table per coordinate, tokens 0..V
        self.latent = nn.Sequential(nn.Linear(latent_dim, width), nn.SiLU(),
                                    nn.Linear(width, width)) if latent_dim else None
        self.blocks = nn.ModuleList([ResidualBlock(width, width if latent_dim else 0) for _ in range(depth)])
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * bins))

    def forward(self, xt, z=None):
        h = self.embed(xt + torch.tensor([0, self.bins + 1], device=xt.device)).flatten(1)
        c = None if self.latent is None else self.latent(z)  # VADD: added to the input, and each block's adaLN
        h = h if c is None else h + c
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
        self.net = nn.Sequential(nn.Linear(width + 2, width), nn.SiLU(), ResidualBlock(width),
                                 ResidualBlock(width), nn.LayerNorm(width), nn.Linear(width, 2 * latent_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x0, masked):
        h = self.embed(x0 + torch.tensor([0, self.bins], device=x0.device)).flatten(1)
        return self.net(torch.cat([h, masked.float()], 1)).float().chunk(2, -1)  # (mean, logvar) in float32


class Model(nn.Module):
    """The denoiser and, for VADD, the recognition model: one module, so one optimizer, EMA and checkpoint.
    denoise() is the only way anything calls the denoiser; forward() is the training loss."""

    def __init__(self, cfg, method):
        super().__init__()
        self.method, self.objective, self.train_steps = method, cfg.objective, cfg.train_steps
        self.latent_dim, self.mask_id = cfg.latent_dim if method == "vadd" else 0, cfg.bins
        self.schedule = common.Schedule(cfg.schedule)
        self.denoiser = Denoiser(cfg.bins, cfg.width, cfg.depth, self.latent_dim)
        self.recognition = Recognition(cfg.bins, cfg.rec_width, self.latent_dim) if self.latent_dim else None
        self.prior = common.Prior(self.latent_dim, cfg.prior, cfg.prior_components) if method == "vadd" else None

    def denoise(self, xt, t, z):
        return self.denoiser(xt, z)  # no time input (see Denoiser)

    def forward(self, x0, kl_weight):
        if self.objective == "steps":  # the valid bound of the K-step consistency sampler (docs/method.md)
            return common.steps_loss(x0, self.denoise, self.schedule, self.mask_id, self.train_steps,
                                     self.recognition, kl_weight, self.prior)
        return delbo(self, x0, kl_weight)


# ----------------------------------------------------------------------------------------------------------
# Objective: the paper's DELBO (docs/method.md; MDM's NELBO is the same without z)

def delbo(model, x0, kl_weight):
    """Per point: w(t) * (sum_masked -log mu(x0 | x_t, z) + kl_weight * KL(r(z | x0, x_t) || p(z))),
    with t drawn low-discrepancy, x_t ~ q(x_t | x0), z ~ r reparameterised. Returns (loss, kl) per point;
    the KL, unweighted by w(t), is logged to watch for posterior collapse."""
    t = common.sample_times(x0.shape[0], model.schedule.eps, x0.device)
    xt = common.forward_mask(x0, model.schedule.alpha(t), model.mask_id)
    masked = xt == model.mask_id
    z, kl = None, torch.zeros(x0.shape[0], device=x0.device)
    if model.recognition is not None:
        z, kl = common.draw_latent(*model.recognition(x0, masked), model.prior)
    nll = common.masked_nll(model.denoise(xt, t, z), x0, masked)
    return model.schedule.weight(t) * (nll + kl_weight * kl), kl


# ----------------------------------------------------------------------------------------------------------
# Samplers: start from all-[M], T reverse steps on the grid t_i = i/T (common.reverse_step, float64 draws).
# A sampler is the z it gives the denoiser at each step, from the z of the step before (None at the start).

def no_latent(z, num, model):
    return None


def fresh_latent(z, num, model):
    return model.prior.sample(num, next(model.parameters()).device)


def one_latent(z, num, model):
    return fresh_latent(z, num, model) if z is None else z


SAMPLERS = {  # name: (label, the method whose model it samples, its z at each step)
    "mdm": ("MDM", "mdm", no_latent),
    "vadd": ("VADD vanilla (fresh z each step)", "vadd", fresh_latent),
    "vadd_cs": ("VADD-CS (one z per point)", "vadd", one_latent),
}


@torch.no_grad()
def sample(model, num, T, sampler, cfg):
    """num points from `sampler` in T steps: (tokens, network evaluations per point). The denoiser runs only on
    points that still hold a [M] and whose x_t or z changed: without a time input its output would be the same."""
    device, latent = next(model.parameters()).device, SAMPLERS[sampler][2]
    xt = torch.full((num, 2), model.mask_id, dtype=torch.long, device=device)
    logits = torch.empty(num, 2, cfg.bins, device=device)
    z, stale, evaluations = None, torch.ones(num, dtype=torch.bool, device=device), 0
    for i in range(T, 0, -1):
        new_z = latent(z, num, model)
        stale |= new_z is not z
        z, t = new_z, torch.full((num,), i / T, device=device)
        rows = (stale & (xt == model.mask_id).any(1)).nonzero().squeeze(1)
        for part in rows.split(common.rows_per_call(2, cfg.bins)) if len(rows) else ():
            logits[part] = model.denoise(xt[part], t[part], None if z is None else z[part]).float()
        evaluations += len(rows)
        alpha_t, alpha_s = model.schedule.alpha_grid(torch.tensor([i / T, (i - 1) / T], dtype=torch.float64))
        xs = common.reverse_step(xt, logits, alpha_t, alpha_s, model.mask_id)
        stale, xt = (xs != xt).any(1), xs
    return xt.cpu().numpy(), evaluations / num


# ----------------------------------------------------------------------------------------------------------
# Evaluation: histogram divergences of samples, likelihoods of held-out points

def sample_metrics(tokens, reference):
    """JS (nats), KL(reference || samples) and validity of the samples' histogram. KL adds half a count to every
    cell (the Krichevsky-Trofimov estimator), so a cell the samples miss costs a finite amount."""
    counts = histogram(tokens, reference.shape[0]).astype(np.float64)
    q, p = counts / len(tokens), reference
    m = (p + q) / 2

    def kl(a, b):
        return float(np.sum(a[a > 0] * np.log(a[a > 0] / b[a > 0])))

    q_smooth = (counts + 0.5) / (len(tokens) + 0.5 * counts.size)
    return {"js": 0.5 * kl(p, m) + 0.5 * kl(q, m), "kl": kl(p, q_smooth), "validity": float(q[p > 0].sum())}


@torch.no_grad()
def likelihoods(model, x0, cfg):
    """Held-out (mean, standard error) in nats per point: MDM's NELBO, or VADD's DELBO and IW-DELBO (not bounds),
    and under (sampler, T) each sampler's valid T-step bound (all T steps summed: two tokens make it cheap)."""
    parts, vadd = x0.split(common.rows_per_call(2, cfg.bins)), model.recognition is not None
    figures = {"delbo" if vadd else "mdm_nelbo": common.mean_se([delbo(model, x, 1.0)[0] for x in parts])}
    if vadd:
        figures["iw_delbo"] = common.mean_se(common.iw_delbo(x0, model.denoise, model.recognition, model.schedule,
                                                             model.mask_id, cfg.iw_samples, prior=model.prior))
    for sampler in [s for s, (_, method, _) in SAMPLERS.items() if method == model.method]:
        for T in cfg.steps:
            bounds = [common.step_bound(x, model.denoise, model.schedule, model.mask_id, T, model.recognition,
                                        sampler, exact=True, prior=model.prior) for x in parts]
            figures[sampler, T] = common.mean_se(bounds)
    return figures


def evaluate(model, method, cfg, heldout, reference):
    """Likelihoods, then every sampler of `method` at every T, each printed when done: (likelihood entry, rows)."""
    common.seed_everything(cfg.seed + 3)
    figures = likelihoods(model, torch.from_numpy(heldout).to(cfg.device), cfg)
    for key, (mean, se) in figures.items():
        if isinstance(key, str):
            print(f"[{method}] {key} {mean:.4f} +- {se:.4f} nats per point")
    rows = []
    for sampler, T in [key for key in figures if isinstance(key, tuple)]:
        t0 = time.time()
        tokens, nfe = sample(model, cfg.num_samples, T, sampler, cfg)
        np.save(os.path.join(cfg.out_dir, f"samples_{sampler}_T{T}.npy"), tokens)
        (bound, bound_se), seconds = figures[sampler, T], time.time() - t0
        print(f"[{sampler}] T={T}: {cfg.num_samples} samples in {seconds:.1f}s, valid bound {bound:.4f} +- "
              f"{bound_se:.4f}")
        rows.append({"sampler": sampler, "steps": T, "bound": bound, "bound_se": bound_se,
                     "sample_seconds": seconds, "nfe": nfe, **sample_metrics(tokens, reference)})
    return common.likelihood_entry(figures, cfg.iw_samples), rows


# ----------------------------------------------------------------------------------------------------------
# Training

HISTORY_EVERY = 50  # iterations averaged into one point of the training curves


def train(cfg, method, ckpt=None):
    """Train one method (from `ckpt` if given): (the model with its EMA weights, its history, its summary)."""
    device = torch.device(cfg.device)
    common.seed_everything(cfg.seed)  # both methods start from the same weights and see the same data
    rng = np.random.default_rng(cfg.seed)
    model = Model(cfg, method).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = common.EMA(model, cfg.ema)
    path, start, history = os.path.join(cfg.out_dir, f"ckpt_{method}.pt"), 0, {"train": [], "val": []}
    if ckpt is not None:
        start, history = common.resume(ckpt, model, opt, ema, rng, device, 0, 1, cfg.seed + 1)
    step = torch.compile(model) if cfg.compile else model
    print(f"[{method}] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, iterations {start} to "
          f"{cfg.max_iters} of batch {cfg.batch_size}")
    meter = common.Meter(method, start, cfg.max_iters, cfg.batch_size, "points/s")
    for it in range(start, cfg.max_iters):
        for group in opt.param_groups:
            group["lr"] = common.lr_at(it, cfg)
        x0 = torch.from_numpy(draw_tokens(cfg.dataset, cfg.batch_size, cfg.bins, rng)).to(device)
        lam = common.kl_weight(it, cfg.kl_warmup, cfg.kl_start) if method == "vadd" else 0.0
        with common.autocast(device, cfg.dtype):
            loss, kl = step(x0, torch.tensor(lam))  # lambda as a tensor: one compiled graph for every value
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model)
        meter.add(loss, kl.mean())
        it += 1  # iterations done
        save = it % cfg.ckpt_interval == 0 or it == cfg.max_iters
        if it % HISTORY_EVERY == 0 or save:  # a NaN stops the run here, before the checkpoint below
            history["train"].append((it, *meter.mean("curve", it)[:2], lam))
        if it % cfg.log_interval == 0 or it == cfg.max_iters:
            loss, kl = meter.mean("line", it)[:2]
            print(meter.line(it, loss=loss, kl=kl, **{"lambda": lam}))
        if save:
            common.save_atomic(common.training_state(model, opt, ema, it, weight_settings(cfg, method), history,
                                                     rng, device), path)
    ema.copy_to(model)
    return model.eval(), history, meter.summary(device)


def weight_settings(cfg, method):
    """The flags that shape the trained weights: a checkpoint trained with others is refused."""
    prior = f"mixture of {cfg.prior_components}" if method == "vadd" and cfg.prior == "mixture" else None
    rec = cfg.rec_width if method == "vadd" and cfg.rec_width != cfg.width else None  # None: as --width
    keys = ("dataset", "bins", "width", "depth", "latent_dim", "schedule", "objective", "train_steps")
    return {"method": method, "prior": prior, "rec_width": rec, **{k: getattr(cfg, k) for k in keys}}


# ----------------------------------------------------------------------------------------------------------
# Main, its table and its figures

def main(argv=None):
    cfg = parse_config(argv)
    methods = ["mdm", "vadd"] if cfg.method == "both" else [cfg.method]
    checkpoints = {m: common.check_checkpoint(cfg, m, weight_settings(cfg, m), True) for m in methods}
    common.make_out_dir(cfg)
    run_start = time.time()
    reference = reference_distribution(cfg)
    data_tokens = draw_tokens(cfg.dataset, cfg.num_samples, cfg.bins, np.random.default_rng(cfg.seed + 1))
    np.save(os.path.join(cfg.out_dir, "data.npy"), data_tokens)
    heldout = draw_tokens(cfg.dataset, cfg.num_eval, cfg.bins, np.random.default_rng(cfg.seed + 2))
    data = {"entropy": float(-np.sum(reference[reference > 0] * np.log(reference[reference > 0]))),
            "noise_floor_js": sample_metrics(data_tokens, reference)["js"]}
    metrics, histories = {"unit": "nats per point", "data": data, "config": {}, "likelihood": {}, "training": {},
                          "by_steps": []}, {}
    for method in methods:
        model, histories[method], metrics["training"][method] = train(cfg, method, checkpoints[method])
        metrics["config"][method] = dict(vars(cfg))
        metrics["likelihood"][method], rows = evaluate(model, method, cfg, heldout, reference)
        metrics["by_steps"] += rows
    metrics["seconds"] = time.time() - run_start
    metrics = common.save_metrics(cfg.out_dir, metrics, methods, SAMPLERS)
    plot_samples(os.path.join(cfg.out_dir, "samples.png"), cfg, data_tokens, metrics)
    floor = [(metrics["data"]["noise_floor_js"], "noise floor (data vs reference)", "--")]
    common.plot_by_steps(os.path.join(cfg.out_dir, "js.png"), metrics["by_steps"], SAMPLERS,
                         [("js", "JS to reference (nats)")], floor, cfg.dataset)
    common.plot_training(os.path.join(cfg.out_dir, "training.png"), histories,
                         "training loss (objective at lambda), nats per point", "VADD: KL(r || p), nats")
    print_table(cfg, metrics)
    return metrics


def print_table(cfg, metrics):
    data = metrics["data"]
    print(f"\n{cfg.dataset}, {cfg.bins} bins: data entropy {data['entropy']:.3f} nats per point; JS noise floor "
          f"({cfg.num_samples} data points vs reference) {data['noise_floor_js']:.4f}")
    labels = {"mdm_nelbo": "MDM NELBO (bound, continuous time)", "delbo": "VADD DELBO (not a bound)",
              "iw_delbo": "VADD IW-DELBO (not a bound)"}
    for lik in metrics["likelihood"].values():
        for key in [k for k in labels if k in lik]:
            print(f"  {labels[key]:45s} {lik[key]:7.3f} +- {lik[key + '_se']:.3f}")
    print(f"\n{'sampler':8s} {'T':>4s} {'JS':>7s} {'KL':>7s} {'valid':>6s} {'bound (valid)':>16s} {'NFE':>6s} "
          f"{'sec':>6s}")
    for r in metrics["by_steps"]:
        print(f"{r['sampler']:8s} {r['steps']:4d} {r['js']:7.4f} {r['kl']:7.3f} {r['validity']:6.3f} "
              f"{r['bound']:8.3f} +- {r['bound_se']:.3f} {r['nfe']:6.2f} {r['sample_seconds']:6.2f}")
    print(f"\nwrote {cfg.out_dir}/ (metrics.json, samples_*.npy, samples.png, js.png, training.png) "
          f"in {metrics['seconds']:.0f}s")


def plot_samples(path, cfg, data_tokens, metrics):
    """2D histograms: the data, then each sampler in metrics.json (from samples_*.npy, at its method's bins)."""
    plt = common.pyplot()
    samplers = [s for s in SAMPLERS if any(r["sampler"] == s for r in metrics["by_steps"])]
    size = (max(6, 2 * len(cfg.steps)), 2 + 2 * len(samplers))  # wide enough for the title
    fig, axes = plt.subplots(1 + len(samplers), len(cfg.steps), figsize=size, squeeze=False)
    for r, row in enumerate(["data"] + samplers):
        bins = cfg.bins if row == "data" else metrics["config"][SAMPLERS[row][1]]["bins"]
        for c, T in enumerate(cfg.steps):
            ax, saved = axes[r, c], os.path.join(cfg.out_dir, f"samples_{row}_T{T}.npy")
            tokens = data_tokens if row == "data" else np.load(saved) if os.path.exists(saved) else None
            if tokens is not None:
                ax.imshow(histogram(tokens, bins).T, origin="lower", cmap="magma", interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"T = {T}")
            if c == 0:
                ax.set_ylabel("data" if row == "data" else SAMPLERS[row][0].split(" (")[0])
    fig.suptitle(f"{cfg.dataset}: samples after T denoising steps ({cfg.num_samples} points each)")
    common.savefig(fig, path)


if __name__ == "__main__":
    main()
