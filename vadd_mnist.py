"""VADD vs masked diffusion (MDM) on binarized MNIST: the paper's pixel-level binary-image experiment.

An image is 32 x 32 binary pixels (MNIST thresholded at 0.5 and padded by 2 zero pixels per side), so 1024
tokens over V = 2; the mask [M] is token 2. With few denoising steps MDM reveals many pixels at once, each
drawn independently, and the digits dissolve into noise; VADD conditions its UNet denoiser on a latent z
that a recognition network infers from the clean image during training, so one z carries the digit's shape.

    python vadd_mnist.py                              # full MNIST (downloaded, md5 checked), both methods, a GPU
    python vadd_mnist.py --preset cpu --data mnist5k  # a small model on a CPU, IDX files from a folder
    torchrun --nproc_per_node 8 vadd_mnist.py         # DDP: each process takes its slice of every batch

Read top to bottom: configuration, data, networks, objective, samplers, evaluation, training, main, plots.
The method: docs/method.md; what all scripts share (schedule, reverse step, bounds, run utilities): common.py.
"""
import contextlib
import copy
import gzip
import hashlib
import math
import os
import shutil
import struct
import time
import urllib.request
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common

# ----------------------------------------------------------------------------------------------------------
# Configuration

SIZE, V, MASK = 32, 2, 2  # padded image side, pixel values {0, 1}, the mask token
D = SIZE * SIZE  # tokens per image

# The flags each --preset sets. The paper gives the task (threshold 0.5, 32 x 32, test bpd) but not the UNet or
# the budget: gpu is our choice, sized like the small DDPM/MD4 UNets, with a recognition of half the channels
# (VADD's training FLOPs 1.11 times MDM's, 1.44 at full width); cpu runs both methods in about half an hour on 2
# cores, its recognition as small as measurement allowed (docs/mnist.md).
PRESETS = {
    "gpu": dict(channels=64, rec_channels=32, channel_mult="1,2,2", num_res_blocks=2, attn_res="8", patch=1,
                dropout=0.1, latent_dim=32, max_iters=100_000, batch_size=128, lr=2e-4, warmup_iters=1000,
                ema=0.9999, val_images=5000, eval_batch=500, eval_repeats=1, eval_interval=5000, num_samples=1000,
                sample_batch=500, iw_samples=100, log_interval=500, ckpt_interval=5000),
    "cpu": dict(channels=32, rec_channels=8, channel_mult="1,2", num_res_blocks=1, attn_res="8", patch=2,
                dropout=0.0, latent_dim=16, max_iters=4000, batch_size=64, lr=1e-3, warmup_iters=100, ema=0.995,
                val_images=250, eval_batch=250, eval_repeats=4, eval_interval=1000, num_samples=64,
                sample_batch=64, iw_samples=8, log_interval=250, ckpt_interval=1000),
}


def bpd(nats):
    """Nats per image -> bits per dimension, the unit of every figure of this script."""
    return nats / (D * math.log(2))


def build_parser():
    p = common.parser(__doc__)
    a, whole, preset = p.add_argument, common.whole, " (default from --preset)"
    a("--preset", choices=tuple(PRESETS), help="defaults of the flags that say so, the table PRESETS above "
      "(default gpu where CUDA is, else cpu)")
    a("--data", help="folder with the MNIST IDX files (gzipped or not); no network, no md5")
    a("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "vadd", "mnist"),
      help="where full MNIST is downloaded to when --data is not given (default %(default)s)")
    a("--val-images", type=whole(), help="training images carved out for validation" + preset)
    a("--num-eval", type=whole(0), default=0, help="test images for the likelihoods (default 0: all)")
    a("--steps", type=common.counts, default="1,5,10,20,50,100",
      help="denoising step counts to sample and bound (default %(default)s)")
    a("--num-samples", type=whole(), help="images drawn per sampler and step count" + preset)
    a("--sample-batch", type=whole(), help="images per sampling batch" + preset)
    a("--iw-samples", type=whole(), help="draws of z for the importance-weighted DELBO" + preset)
    a("--eval-batch", type=whole(), help="test images per likelihood batch" + preset)
    a("--eval-repeats", type=whole(), help="passes over the test set for the one-random-step estimates" + preset)
    # model
    a("--channels", type=whole(8), help="channels of the UNets' first level (a multiple of 8)" + preset)
    a("--rec-channels", type=whole(8), help="the same for the recognition network" + preset)
    a("--channel-mult", type=common.counts, help="channel multiplier per UNet level; each halves the resolution"
      + preset)
    a("--num-res-blocks", type=whole(), help="residual blocks per UNet level" + preset)
    a("--attn-res", type=lambda text: common.counts(text) if text.strip() else [],
      help="resolutions with self-attention after each block ('' for none)" + preset)
    a("--patch", type=int, choices=(1, 2, 4), help="pixels per side folded into one UNet input cell" + preset)
    a("--dropout", type=common.number(0, 1), help="dropout inside the residual blocks" + preset)
    a("--time-cond", action="store_true",
      help="condition the denoiser on t too (off: the optimal masked denoiser needs only x_t, MDLM, and the "
      "samplers reuse its output while an image does not change)")
    a("--latent-dim", type=whole(), help="size of z (VADD)" + preset)
    common.add_training_flags(p, {"out_dir": os.path.join("out", "mnist")}, PRESETS["gpu"])
    return p


def parse_config(argv=None):
    """Parse and check every flag before anything is written; a bad value stops with one sentence."""
    p = build_parser()
    preset = common.choose_preset(p.parse_args(argv), "a small UNet on 2 x 2 patches, 4000 iterations of 64 "
                                  "images (about half an hour on 2 cores)")
    p.set_defaults(**PRESETS[preset], preset=preset)  # the preset changes defaults; flags given still win
    cfg = p.parse_args(argv)
    for flag, channels in (("--channels", cfg.channels), ("--rec-channels", cfg.rec_channels)):
        if channels % 8:
            p.error(f"{flag} {channels}: must be a multiple of 8 (group normalisation uses 8 groups)")
    if SIZE // cfg.patch % 2 ** (len(cfg.channel_mult) - 1):
        p.error(f"--channel-mult {cfg.channel_mult} with --patch {cfg.patch}: too many levels to halve "
                f"{SIZE // cfg.patch} pixels")
    levels = [SIZE // cfg.patch // 2 ** i for i in range(len(cfg.channel_mult))]
    if not set(cfg.attn_res) <= set(levels):
        p.error(f"--attn-res {cfg.attn_res}: the UNet's resolutions are {levels}; pick some of them or ''")
    return common.finish_config(cfg, p)


# ----------------------------------------------------------------------------------------------------------
# Data: the four MNIST IDX files, binarised at 0.5 and padded to 32 x 32

MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"]
MNIST_MD5 = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}


def download_mnist(cache_dir):
    """Fetch the four gzipped IDX files into cache_dir, each from the first mirror that serves it with its md5.
    A file that fails the check, cached or just downloaded, is deleted and reported, never used."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--cache-dir {cache_dir} cannot be made a folder ({e.strerror}): choose another")
    for name, md5 in MNIST_MD5.items():
        path, errors = os.path.join(cache_dir, name), []
        for url in [None] + [mirror + name for mirror in MIRRORS]:  # None: the copy already in the cache
            try:
                if url:
                    print(f"downloading {url}")
                    with urllib.request.urlopen(url, timeout=60) as r, open(path, "wb") as f:
                        shutil.copyfileobj(r, f)
                with open(path, "rb") as f:
                    got = hashlib.md5(f.read()).hexdigest()
            except OSError as e:  # URLError, HTTP errors, timeouts, a full disk; no cached copy is no error
                if url:
                    errors.append(f"{url}: {e}")
                continue
            if got == md5:
                break
            os.remove(path)
            print(f"{url or path} has md5 {got}, not {md5} (corrupt or cut short): deleted")
            errors.append(f"{url or path}: md5 mismatch")
        else:
            raise SystemExit(f"could not download {name} intact ({'; '.join(errors)}): put the MNIST files into "
                             f"{cache_dir} by hand, or pass --data with a folder that holds them")


def read_images(folder, part):
    """The uint8 (N, 28, 28) images of MNIST's IDX file `part` ('train' or 't10k', gzipped or not) in folder."""
    name = os.path.join(folder, f"{part}-images-idx3-ubyte")
    path = name if os.path.exists(name) else name + ".gz"
    try:
        with open(path, "rb") as f:
            data = f.read()
        data = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (FileNotFoundError, NotADirectoryError):
        raise SystemExit(f"{folder} has no {part}-images-idx3-ubyte (nor .gz): put the MNIST IDX files there")
    except (OSError, EOFError, zlib.error):  # a bad or truncated gzip stream
        data = b""
    n, rows, cols = struct.unpack(">3I", data[4:16]) if len(data) >= 16 else (0, 0, 0)
    if data[:4] != b"\x00\x00\x08\x03" or (rows, cols) != (28, 28) or len(data) != 16 + n * 28 * 28:
        raise SystemExit(f"{path} is not an intact IDX file of 28 x 28 images of bytes (corrupt, cut short or "
                         f"another file): fetch it again")
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, 28, 28)


def binarize(images):
    """uint8 (N, 28, 28) -> int64 (N, 32, 32) in {0, 1}: threshold 0.5 and 2 zero pixels per side (the paper)."""
    x = torch.from_numpy((np.asarray(images) > 127).astype(np.int64))
    return F.pad(x, (2, 2, 2, 2))


def load_mnist(cfg):
    """(train, val, test) int64 (N, 32, 32) from --data or the cache; validation is a carve-out of the training
    images, the same for every seed. The labels are not read: the model is unconditional."""
    train, test = (binarize(read_images(cfg.data or cfg.cache_dir, part)) for part in ("train", "t10k"))
    if cfg.val_images >= len(train):
        raise SystemExit(f"--val-images {cfg.val_images} leaves no training images of the {len(train)}: lower it")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234))
    test = test[:cfg.num_eval] if cfg.num_eval else test
    return train[order[cfg.val_images:]], train[order[:cfg.val_images]], test


# ----------------------------------------------------------------------------------------------------------
# Networks: UNets whose residual blocks are modulated by a conditioning vector (time and z)

EMBED = 16  # channels per pixel of the input embedding: three symbols (0, 1, [M]) need few


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a skip; c scales and shifts the second normalisation (adaptive group norm,
    the images' adaLN). The modulation and the last conv start at zero: each block starts as the identity."""

    def __init__(self, c_in, c_out, cond_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.modulation = nn.Linear(cond_dim, 2 * c_out) if cond_dim else None
        for layer in (self.conv2, self.modulation):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, h, c=None):
        x = self.norm2(self.conv1(F.silu(self.norm1(h))))
        if self.modulation is not None:
            scale, shift = self.modulation(c)[:, :, None, None].chunk(2, 1)
            x = x * (1 + scale) + shift
        return self.skip(h) + self.conv2(self.dropout(F.silu(x)))


class Attention(nn.Module):
    """Self-attention over the cells of a low-resolution feature map (4 heads), zero-initialised output."""

    def __init__(self, channels, heads=4):
        super().__init__()
        self.heads, self.norm = heads, nn.GroupNorm(8, channels)
        self.qkv, self.proj = nn.Conv2d(channels, 3 * channels, 1), nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h, c=None):
        B, C, H, W = h.shape
        qkv = self.qkv(self.norm(h)).view(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2)
        q, k, v = qkv.contiguous().unbind(1)  # (B, heads, cells, channels), channels contiguous: the fused kernels
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W)
        return h + self.proj(out)


class UNet(nn.Module):
    """Embedded pixels (B, 32, 32, EMBED) folded into patch x patch cells, then residual blocks at halving
    resolutions (average pooling down, nearest up), one skip per level and a middle block with attention, all
    modulated by c. decoder=False keeps the contracting half (with its own `channels`): the recognition network."""

    def __init__(self, cfg, cond_dim, decoder=True, channels=None):
        super().__init__()
        base = channels or cfg.channels
        chans, res, self.patch = [base * m for m in cfg.channel_mult], SIZE // cfg.patch, cfg.patch

        def level(c_in, c_out, res):
            layers = []
            for j in range(cfg.num_res_blocks):
                layers.append(ResBlock(c_in if j == 0 else c_out, c_out, cond_dim, cfg.dropout))
                if res in cfg.attn_res:
                    layers.append(Attention(c_out))
            return nn.ModuleList(layers)

        self.stem = nn.Conv2d(EMBED * cfg.patch ** 2, base, 3, padding=1)
        # a learned embedding of position: convolutions alone know where they are only from the zero padding,
        # so neither a z that modulates channels could place strokes nor a pooled recognition locate them
        self.position = nn.Parameter(0.1 * torch.randn(1, base, res, res))
        self.down, c = nn.ModuleList(), base
        for i, ch in enumerate(chans):
            self.down.append(level(c, ch, res // 2 ** i))
            c = ch
        self.mid = nn.ModuleList([ResBlock(c, c, cond_dim, cfg.dropout), Attention(c),
                                  ResBlock(c, c, cond_dim, cfg.dropout)])
        self.up = nn.ModuleList()
        if decoder:
            for i, ch in reversed(list(enumerate(chans))):
                self.up.append(level(c + ch, ch, res // 2 ** i))
                c = ch
        self.out_channels = c

    def forward(self, x, c=None):
        h, skips = self.stem(F.pixel_unshuffle(x.permute(0, 3, 1, 2), self.patch)) + self.position, []
        for i, layers in enumerate(self.down):
            if i:
                h = F.avg_pool2d(h, 2)
            for layer in layers:
                h = layer(h, c)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, c)
        for i, layers in enumerate(self.up):
            if i:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = torch.cat([h, skips.pop()], 1)
            for layer in layers:
                h = layer(h, c)
        return h


def timestep_embedding(t, dim):
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], 1)


class Denoiser(nn.Module):
    """mu_theta(x0 | x_t, z, t): the embedded pixels (0, 1 and [M] each have a vector) through a UNet whose
    conditioning vector c = MLP(z) (+ MLP of a sinusoidal time embedding with --time-cond) modulates every
    residual block; two logits per pixel, so [M] is never predicted. MDM without time has no c at all."""

    def __init__(self, cfg, latent_dim):
        super().__init__()
        cond_dim = 4 * cfg.channels
        self.embed = nn.Embedding(V + 1, EMBED)

        def mlp(d):
            return nn.Sequential(nn.Linear(d, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

        self.latent = mlp(latent_dim) if latent_dim else None
        self.time = mlp(cfg.channels) if cfg.time_cond else None
        self.unet = UNet(cfg, cond_dim if latent_dim or cfg.time_cond else 0)
        self.head = nn.Sequential(nn.GroupNorm(8, self.unet.out_channels), nn.SiLU(),
                                  nn.Conv2d(self.unet.out_channels, V * cfg.patch ** 2, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)  # uniform predictions at the start: NELBO = 1024 ln 2 (MDLM)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, xt, t=None, z=None):
        c = None if self.latent is None else self.latent(z)
        if self.time is not None:
            c = (0 if c is None else c) + self.time(timestep_embedding(t, self.time[0].in_features))
        h = self.head(self.unet(self.embed(xt), c))
        return F.pixel_shuffle(h, self.unet.patch).permute(0, 2, 3, 1)  # (B, 32, 32, V)


class Recognition(nn.Module):
    """r_phi(z | x0, x_t) = N(mean, diag exp(logvar)): a contracting UNet over the four embedded (x0, mask) pairs
    (which carry what (x0, x_t) does), mean-pooled. The output weights start random, not zero: with r at the
    prior and the denoiser's modulation at zero no gradient opens the path through z (docs/mnist.md)."""

    def __init__(self, cfg, latent_dim):
        super().__init__()
        self.embed = nn.Embedding(2 * V, EMBED)
        self.unet = UNet(cfg, 0, decoder=False, channels=cfg.rec_channels)
        self.norm = nn.GroupNorm(8, self.unet.out_channels)
        self.out = nn.Linear(self.unet.out_channels, 2 * latent_dim)
        nn.init.zeros_(self.out.bias)

    def forward(self, x0, masked):
        h = self.unet(self.embed(x0 + V * masked.long()))
        return self.out(F.silu(self.norm(h)).mean((2, 3))).float().chunk(2, -1)  # (mean, logvar), float32


class Model(nn.Module):
    """The denoiser and, for VADD, the recognition network: one module, so one optimizer, EMA and checkpoint.
    forward() is the training loss, so DDP and torch.compile wrap the whole objective."""

    def __init__(self, cfg, method):
        super().__init__()
        self.method, self.objective, self.train_steps = method, cfg.objective, cfg.train_steps
        self.latent_dim = cfg.latent_dim if method == "vadd" else 0
        self.mask_id, self.time_cond = MASK, cfg.time_cond
        self.schedule = common.Schedule(cfg.schedule)
        self.denoiser = Denoiser(cfg, self.latent_dim)
        self.recognition = Recognition(cfg, self.latent_dim) if self.latent_dim else None
        self.prior = common.Prior(self.latent_dim, cfg.prior, cfg.prior_components) if method == "vadd" else None

    def denoise(self, xt, t, z):
        return self.denoiser(xt, t, z)

    def forward(self, x0, kl_weight):
        if self.objective == "steps":  # the valid bound of the K-step consistency sampler (docs/method.md)
            return common.steps_loss(x0, self.denoise, self.schedule, self.mask_id, self.train_steps,
                                     self.recognition, kl_weight, self.prior)
        return delbo(self, x0, kl_weight)


# ----------------------------------------------------------------------------------------------------------
# Objective: the paper's DELBO (docs/method.md; MDM's NELBO is the same without z)

def delbo(model, x0, kl_weight):
    """Per image: w(t) * (sum_masked -log mu(x0 | x_t, z) + kl_weight * KL(r(z | x0, x_t) || p(z))), with t
    drawn low-discrepancy, x_t ~ q(x_t | x0) and z ~ r reparameterised. Returns (loss, kl) per image in nats;
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
    "vadd_cs": ("VADD-CS (one z per image)", "vadd", one_latent),
}


@torch.no_grad()
def sample(model, num, T, sampler, cfg):
    """num images from `sampler` in T steps, --sample-batch at a time. The denoiser runs only on images that
    still hold a [M] and whose input (x_t or z) changed since its last call: without a time input its output
    would be the same. Returns (uint8 images (num, 32, 32), network evaluations per image)."""
    device, latent, out, evaluations = next(model.parameters()).device, SAMPLERS[sampler][2], [], 0
    for start in range(0, num, cfg.sample_batch):
        n = min(cfg.sample_batch, num - start)
        xt = torch.full((n, SIZE, SIZE), model.mask_id, dtype=torch.long, device=device)
        logits = torch.empty(n, SIZE, SIZE, V, device=device)
        z, stale = None, torch.ones(n, dtype=torch.bool, device=device)
        for i in range(T, 0, -1):
            new_z = latent(z, n, model)
            stale |= new_z is not z or model.time_cond
            z, t = new_z, torch.full((n,), i / T, device=device)
            rows = (stale & (xt == model.mask_id).flatten(1).any(1)).nonzero().squeeze(1)
            for part in rows.split(common.rows_per_call(D, V)) if len(rows) else ():
                with common.autocast(device, cfg.dtype):
                    logits[part] = model.denoise(xt[part], t[part], None if z is None else z[part]).float()
            evaluations += len(rows)
            alpha_t, alpha_s = model.schedule.alpha_grid(torch.tensor([i / T, (i - 1) / T], dtype=torch.float64))
            xs = common.reverse_step(xt, logits, alpha_t, alpha_s, model.mask_id)
            stale, xt = (xs != xt).flatten(1).any(1), xs
        out.append(xt.to(torch.uint8).cpu())
    return torch.cat(out).numpy(), evaluations / num


# ----------------------------------------------------------------------------------------------------------
# Evaluation: likelihoods of the test images (bits per dimension), nearness of samples to training digits

@torch.no_grad()
def likelihoods(model, x0, cfg):
    """Test figures in bpd, each (mean, standard error over every rank's share x0): the continuous-time NELBO
    (MDM, a bound) or the DELBO and IW-DELBO (VADD, not bounds), and under (sampler, T) each sampler's valid
    T-step bound from one random step per image (unbiased), over --eval-repeats passes (docs/method.md)."""
    device, per, vadd = torch.device(cfg.device), {}, model.recognition is not None
    chunk = min(cfg.eval_batch, common.rows_per_call(D, V))
    samplers = [s for s, (_, method, _) in SAMPLERS.items() if method == model.method]
    for _ in range(cfg.eval_repeats):
        for x in x0.split(chunk):
            x, figures = x.to(device), {}
            with common.autocast(device, cfg.dtype):
                figures["delbo" if vadd else "mdm_nelbo"] = delbo(model, x, 1.0)[0]
                if vadd:  # K draws of z per image: K x chunk images, in calls of at most `chunk`
                    figures["iw_delbo"] = common.iw_delbo(x, model.denoise, model.recognition, model.schedule,
                                                          model.mask_id, cfg.iw_samples, budget=chunk * D * V,
                                                          prior=model.prior)
                for sampler in samplers:
                    for T in cfg.steps:
                        figures[sampler, T] = common.step_bound(x, model.denoise, model.schedule, model.mask_id, T,
                                                                model.recognition, sampler, prior=model.prior)
            for key, nats in figures.items():
                per.setdefault(key, []).append(bpd(nats.float().cpu()))
    # the passes' estimates of one image are averaged first: the standard error is over distinct images
    per = {key: torch.cat(v).view(cfg.eval_repeats, -1).mean(0) for key, v in per.items()}
    return {key: common.mean_se(v, device) for key, v in per.items()}


@torch.no_grad()
def validate(model, x0, cfg):
    """NELBO (MDM) or DELBO at lambda = 1 (VADD) of the validation images, each rank its share x0, in bpd."""
    device, losses = torch.device(cfg.device), []
    for x in x0.split(min(cfg.eval_batch, common.rows_per_call(D, V))):
        with common.autocast(device, cfg.dtype):
            losses.append(delbo(model, x.to(device), 1.0)[0].float())
    return bpd(common.mean_se(losses, device)[0])


def nearest_hamming(images, reference, chunk=1000):
    """Mean over images of the Hamming distance (pixels) to the nearest reference image: near the data's
    own figure (test vs train) for digit-like samples, far above it for pixel noise with the right density."""
    ref = torch.as_tensor(reference).flatten(1).float()
    dists = [(x.sum(1, keepdim=True) + ref.sum(1) - 2 * x @ ref.T).min(1).values  # |x| + |ref| - 2 x.ref
             for x in torch.as_tensor(images).flatten(1).float().split(chunk)]
    return float(torch.cat(dists).mean())


def evaluate(model, method, cfg, test_x, train_x, rank, world):
    """The method's likelihood entry for metrics.json (none with --sample-only) and its by_steps rows: each of
    its samplers at every --steps count, drawn by rank 0 alone and saved as samples_<sampler>_T<T>.npy."""
    common.seed_everything(cfg.seed + 1 + rank)  # each rank its own draws for its share of the test set
    figures = {} if cfg.sample_only else likelihoods(model, test_x[rank::world], cfg)
    for key, (mean, se) in figures.items():
        if isinstance(key, str):
            common.print0(f"[{method}] {key} {mean:.4f} +- {se:.4f} bpd")
    rows = []
    for sampler in [s for s, (_, m, _) in SAMPLERS.items() if m == method and rank == 0]:  # rank 0 alone
        for T in cfg.steps:
            t0 = time.time()
            images, nfe = sample(model, cfg.num_samples, T, sampler, cfg)
            row = {"sampler": sampler, "steps": T, "sample_seconds": time.time() - t0, "nfe": nfe,
                   "nn_hamming": nearest_hamming(images, train_x)}
            if (sampler, T) in figures:
                row["bound"], row["bound_se"] = figures[sampler, T]
            bound = f", valid bound {row['bound']:.4f} +- {row['bound_se']:.4f}" if "bound" in row else ""
            print(f"[{sampler}] T={T}: {len(images)} samples in {row['sample_seconds']:.1f}s{bound}", flush=True)
            rows.append(row)
            np.save(os.path.join(cfg.out_dir, f"samples_{sampler}_T{T}.npy"), images)
    return common.likelihood_entry(figures, cfg.iw_samples), rows


# ----------------------------------------------------------------------------------------------------------
# Training (DDP through torchrun: each rank takes its slice of the global batch, rank 0 writes)

HISTORY_EVERY = 20  # iterations averaged into one point of the training curve


def train(cfg, method, data, ckpt, rank, world):
    """Train one method on data = (train, validation images), from a checkpoint if given; returns the model
    with its EMA weights loaded, the history (training curve in bpd, validation points) and a summary."""
    device, (train_x, val_x) = torch.device(cfg.device), data
    common.seed_everything(cfg.seed)  # both methods, and every rank, start from the same weights
    model = Model(cfg, method).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = common.EMA(model, cfg.ema)
    rng = np.random.default_rng(cfg.seed)  # one data stream: each rank takes its slice of every global batch
    if world > 1:
        torch.manual_seed(cfg.seed + 1 + rank)  # its own times, masks and z on each rank
    path, start, history = os.path.join(cfg.out_dir, f"ckpt_{method}.pt"), 0, {"train": [], "val": []}
    if ckpt is not None:
        start, history = common.resume(ckpt, model, opt, ema, rng, device, rank, world, cfg.seed + 1)
    ddp = DDP(model, device_ids=None if device.index is None else [device.index]) if world > 1 else model
    step = torch.compile(ddp) if cfg.compile else ddp
    evaluator = copy.deepcopy(model).eval()
    sizes = ", ".join(f"{k} {sum(p.numel() for p in part.parameters()) / 1e6:.2f}M"
                      for k, part in model.named_children())
    common.print0(f"[{method}] parameters: {sizes}; iterations {start} to {cfg.max_iters} of {cfg.batch_size} "
                  f"images on {world} process(es) x {cfg.grad_accum} micro-batch(es)")
    meter = common.Meter(method, start, cfg.max_iters, cfg.batch_size, "images/s")
    for it in range(start, cfg.max_iters):
        for group in opt.param_groups:
            group["lr"] = common.lr_at(it, cfg)
        lam = common.kl_weight(it, cfg.kl_warmup, cfg.kl_start) if method == "vadd" else 0.0
        kl_weight = torch.tensor(lam)  # lambda as a 0-d tensor: one compiled graph for every value
        batch = torch.from_numpy(rng.integers(0, len(train_x), cfg.batch_size))[rank::world]
        figures = torch.zeros(2, device=device)  # (loss, KL), the mean over the micro-batches
        for m, idx in enumerate(batch.reshape(cfg.grad_accum, -1)):
            x0 = train_x[idx].to(device, non_blocking=True)
            with ddp.no_sync() if world > 1 and m < cfg.grad_accum - 1 else contextlib.nullcontext():
                with common.autocast(device, cfg.dtype):
                    loss, kl = step(x0, kl_weight)
                (loss.mean() / cfg.grad_accum).backward()
            figures += torch.stack([loss.detach().mean(), kl.detach().mean()]) / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        meter.add(*figures)
        it += 1  # iterations done
        save = it % cfg.ckpt_interval == 0 or it == cfg.max_iters
        if it % HISTORY_EVERY == 0 or save:  # a NaN stops the run here, before the checkpoint below
            loss, kl = meter.mean("curve", it)
            history["train"].append((it, bpd(loss), kl, lam))
        if it % cfg.log_interval == 0 or it == cfg.max_iters:
            loss, kl = meter.mean("line", it)
            common.print0(meter.line(it, loss=bpd(loss), kl=kl, **{"lambda": lam}))
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:  # the EMA weights at lambda 1
            ema.copy_to(evaluator)
            history["val"].append((it, validate(evaluator, val_x[rank::world], cfg)))
            common.print0(f"[{method}] iter {it:7d} | validation {'DELBO' if method == 'vadd' else 'NELBO'} "
                          f"{history['val'][-1][1]:.4f} bpd (EMA weights, lambda 1)")
        if save:
            state = common.training_state(model, opt, ema, it, weight_settings(cfg, method), history, rng, device)
            if rank == 0:
                common.save_atomic(state, path)
    ema.copy_to(model)
    return model.eval(), history, meter.summary(device)


def weight_settings(cfg, method):
    """The flags that shape the trained weights: a checkpoint trained with others is refused."""
    prior = f"mixture of {cfg.prior_components}" if method == "vadd" and cfg.prior == "mixture" else None
    rec = cfg.rec_channels if method == "vadd" and cfg.rec_channels != cfg.channels else None  # None: the same
    keys = ("channels", "channel_mult", "num_res_blocks", "attn_res", "patch", "time_cond", "schedule",
            "objective", "train_steps") + (("latent_dim",) if method == "vadd" else ())
    return {"method": method, "prior": prior, "rec_channels": rec, **{k: getattr(cfg, k) for k in keys}}


# ----------------------------------------------------------------------------------------------------------
# Main

def main(argv=None):
    cfg = parse_config(argv)
    if cfg.data is None and int(os.environ.get("RANK", 0)) == 0:
        download_mnist(cfg.cache_dir)  # before the process group: the others wait for rank 0 to join it
    with common.distributed(cfg) as (rank, world):
        train_x, val_x, test_x = load_mnist(cfg)
        common.print0(f"MNIST: {len(train_x)} training, {len(val_x)} validation, {len(test_x)} test images")
        methods = ["mdm", "vadd"] if cfg.method == "both" else [cfg.method]
        training = not (cfg.eval_only or cfg.sample_only)
        checkpoints = {m: common.check_checkpoint(cfg, m, weight_settings(cfg, m), training) for m in methods}
        if rank == 0:
            common.make_out_dir(cfg)
        run_start, histories = time.time(), {}
        metrics = {"unit": "bits per dimension (nats per image / (1024 ln 2))", "config": {}, "likelihood": {},
                   "training": {}, "by_steps": []}
        for method in methods:
            if training:
                model, histories[method], metrics["training"][method] = train(
                    cfg, method, (train_x, val_x), checkpoints[method], rank, world)
            else:  # the EMA weights of the checkpoint
                model = Model(cfg, method).to(cfg.device)
                histories[method] = common.load_weights(checkpoints[method], model)
            metrics["config"][method] = dict(vars(cfg))
            metrics["likelihood"][method], rows = evaluate(model.eval(), method, cfg, test_x, train_x, rank, world)
            metrics["by_steps"] += rows
        if rank:
            return None
        metrics["test_nn_hamming"] = nearest_hamming(spread(test_x, min(cfg.num_samples, len(test_x))), train_x)
        metrics["seconds"] = time.time() - run_start
        metrics = common.save_metrics(cfg.out_dir, metrics, methods, SAMPLERS)
        plot_overview(os.path.join(cfg.out_dir, "overview.png"), cfg, spread(test_x, 16).numpy(), metrics)
        lines = [(metrics["likelihood"][m][key], label, style) for m, key, label, style in [
            ("mdm", "mdm_nelbo", "MDM NELBO (continuous time, a bound)", ":"),
            ("vadd", "delbo", "VADD DELBO (not a bound)", "--")] if key in metrics["likelihood"].get(m, {})]
        common.plot_by_steps(os.path.join(cfg.out_dir, "bounds.png"), metrics["by_steps"], SAMPLERS,
                             [("bound", "valid T-step bound, test bits per dim")], lines)
        common.plot_training(os.path.join(cfg.out_dir, "training.png"), histories, "loss (MDM NELBO; VADD DELBO "
                             "at lambda), bits per dim", "VADD: KL(r || p), nats per image")
        print_table(cfg, metrics)
        return metrics


def spread(images, n):
    """n images evenly spaced through the set (the files may be sorted by label)."""
    return images[np.linspace(0, len(images) - 1, n).astype(int)]


def print_table(cfg, metrics):
    print("\nbinarized MNIST 32 x 32, test set, bits per dimension (paper, full MNIST: MDLM 0.075, VADD 0.063)")
    lik = {key: value for entry in metrics["likelihood"].values() for key, value in entry.items()}
    for key, label in [("mdm_nelbo", "MDM NELBO (bound, continuous time)"), ("delbo", "VADD DELBO (not a bound)"),
                       ("iw_delbo", f"VADD IW-DELBO, K = {lik.get('iw_samples')} (not a bound)")]:
        if key in lik:
            print(f"  {label:45s} {lik[key]:.4f} +- {lik[key + '_se']:.4f}")
    print(f"\n{'sampler':8s} {'T':>4s} {'valid T-step bound':>20s} {'NN Hamming':>11s} {'NFE':>7s} {'sec':>7s}"
          f"   (NN Hamming of test images: {metrics['test_nn_hamming']:.1f})")
    for r in metrics["by_steps"]:
        bound = f"{r['bound']:.4f} +- {r['bound_se']:.4f}" if "bound" in r else "-"
        print(f"{r['sampler']:8s} {r['steps']:4d} {bound:>20s} {r['nn_hamming']:11.1f} {r['nfe']:7.2f} "
              f"{r['sample_seconds']:7.2f}")
    print(f"\nwrote {cfg.out_dir}/ (metrics.json, samples_*.npy, overview.png, bounds.png, training.png) "
          f"in {metrics['seconds']:.0f}s")


# ----------------------------------------------------------------------------------------------------------
# Plots

def tile(images, cols):
    """(N, H, W) images -> one array, `cols` per row, a 1-pixel grey line between them."""
    n, h, w = images.shape
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1), 0.5)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = img
    return canvas


def plot_overview(path, cfg, data, metrics):
    """Rows: test images, then each sampler in metrics.json (read back from samples_*.npy); columns: step
    counts; each cell a 4 x 4 mosaic."""
    plt = common.pyplot()
    rows = ["data"] + [s for s in SAMPLERS if any(r["sampler"] == s for r in metrics["by_steps"])]
    fig, axes = plt.subplots(len(rows), len(cfg.steps), figsize=(max(6, 1.9 * len(cfg.steps)), 2 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, T in enumerate(cfg.steps):
            ax, saved = axes[r, c], os.path.join(cfg.out_dir, f"samples_{row}_T{T}.npy")
            images = data if row == "data" else np.load(saved) if os.path.exists(saved) else None
            if images is not None and (row != "data" or c == 0):
                ax.imshow(tile(images[:16], 4), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set(xticks=[], yticks=[], frame_on=row != "data" or c == 0)
            if r == 1:
                ax.set_title(f"T = {T}")
            if c == 0:
                ax.set_ylabel("test images" if row == "data" else SAMPLERS[row][0].split(" (")[0])
    fig.suptitle("binarized MNIST: samples after T denoising steps")
    common.savefig(fig, path)


if __name__ == "__main__":
    main()
