"""VADD vs masked diffusion (MDM) on CIFAR-10 pixels: the paper's colour-image experiment.

Every sub-pixel is a token over V = 256 values, so an image is 32 x 32 x 3 = 3072 tokens. A UNet denoiser
predicts all masked sub-pixels at once; with few steps MDM draws them independently and gets noise, while
VADD conditions the UNet on a per-image latent z (test bpd 2.80 MDLM vs 2.74 VADD; FID at 10/20/50/100 steps
334/261/140/77 vs 170/109/65/51 in the paper).

    python vadd_cifar.py                                    # paper scale: both methods, one GPU (days)
    torchrun --nproc_per_node 8 vadd_cifar.py               # the same on 8 GPUs
    python vadd_cifar.py --preset cpu --data DIR            # a small smoke run on a CPU

Read top to bottom: configuration, data, networks, objective, samplers, evaluation, training, main, plots.
The method: docs/method.md; what all scripts share (schedule, reverse step, bounds, run utilities): common.py.
"""
import argparse
import contextlib
import copy
import hashlib
import math
import os
import tarfile
import tempfile
import time
import urllib.request

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common

# ----------------------------------------------------------------------------------------------------------
# Configuration

V, MASK, SHAPE = 256, 256, (32, 32, 3)  # sub-pixel values, the [M] id, token layout (height, width, colour)
D = 32 * 32 * 3  # tokens per image

# Presets fill every flag marked "(default from --preset)". gpu: the UNet of DDPM for CIFAR-10 (Ho et al. 2020,
# about 36M parameters), batch 128, lr 2e-4 with 5000 warm-up steps, EMA 0.9999, the paper's 2M iterations.
# cpu: a small UNet that trains in minutes on two cores, its recognition as small as measurement allowed
# (docs/cifar.md). gpu keeps the recognition at the denoiser's width: VADD's training FLOPs 1.27 times MDM's.
PRESETS = {
    "gpu": dict(channels=128, rec_channels=128, channel_mult="1,2,2,2", num_res_blocks=2, attn_res="16",
                dropout=0.1, embed_dim=32, latent_dim=128, max_iters=2_000_000, batch_size=128, lr=2e-4,
                warmup_iters=5000, ema=0.9999, kl_warmup=100_000, num_samples=50_000, sample_batch=1000,
                num_eval=10_000, eval_batch=500, iw_samples=32, val_images=1000, log_interval=100,
                eval_interval=20_000, ckpt_interval=5000),
    "cpu": dict(channels=32, rec_channels=16, channel_mult="1,2,2", num_res_blocks=1, attn_res="8", dropout=0.0,
                embed_dim=8, latent_dim=32, max_iters=1000, batch_size=32, lr=1e-3, warmup_iters=100, ema=0.99,
                kl_warmup=500, num_samples=128, sample_batch=128, num_eval=500, eval_batch=100, iw_samples=8,
                val_images=200, log_interval=50, eval_interval=500, ckpt_interval=500),
}


def build_parser():
    p = common.parser(__doc__)
    a, whole, number, preset = p.add_argument, common.whole, common.number, " (default from --preset)"
    a("--preset", choices=tuple(PRESETS), help="defaults of the flags that say so (gpu with CUDA, else cpu)")
    a("--data", help="folder with the extracted data_batch_*.bin and test_batch.bin (no network); default: "
      "download cifar-10-binary.tar.gz once into --cache-dir")
    a("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "vadd"), help="download cache")
    a("--val-images", type=whole(), help="training images set aside for validation during training" + preset)
    a("--flip", default=True, action=argparse.BooleanOptionalAction, help="random horizontal flips (default on)")
    a("--channels", type=whole(4), help="UNet base channels" + preset)
    a("--rec-channels", type=whole(4), help="base channels of the recognition encoder" + preset)
    a("--channel-mult", type=common.counts, help="channel multiplier per resolution: 32, 16, 8, 4 pixels" + preset)
    a("--num-res-blocks", type=whole(), help="residual blocks per resolution" + preset)
    a("--attn-res", type=lambda text: common.counts(text) if text.strip() else [],
      help="resolutions with self-attention, comma separated, '' for none" + preset)
    a("--dropout", type=number(0, 1), help="dropout in the residual blocks" + preset)
    a("--embed-dim", type=whole(), help="size of one sub-pixel value's vector; three per pixel" + preset)
    a("--time-cond", default=False, action=argparse.BooleanOptionalAction, help="feed t to the denoiser (default "
      "off: the optimal masked denoiser ignores t, so samplers reuse its output while an image is unchanged)")
    a("--latent-dim", type=whole(), help="size of z (VADD), one per image: small next to its 3072 tokens" + preset)
    a("--weight-decay", type=number(0), default=0.0, help="AdamW weight decay (default 0)")
    a("--steps", type=common.counts, default="1,5,10,20,50,100", help="denoising step counts (%(default)s)")
    a("--num-samples", type=whole(), help="images drawn per sampler and step count" + preset)
    a("--sample-batch", type=whole(), help="images per sampling batch on each GPU" + preset)
    a("--num-eval", type=whole(), help="test images for the likelihoods, of 10000" + preset)
    a("--eval-batch", type=whole(), help="images per evaluation batch on each GPU" + preset)
    a("--iw-samples", type=whole(), help="draws of z for the importance-weighted DELBO" + preset)
    a("--fid", type=whole(0), default=0, help="FID on up to this many samples per sampler and step count, "
      "against the training set (needs torchmetrics and torch-fidelity; default 0 = off)")
    a("--fid-weights", help="a local copy of torch-fidelity's Inception weights (offline machines)")
    common.add_training_flags(p, dict(schedule="linear", out_dir=os.path.join("out", "cifar")), PRESETS["gpu"])
    return p


def parse_config(argv=None):
    """Parse with the preset's values as defaults (flags given still win); a bad value stops with one sentence."""
    p = build_parser()
    preset = common.choose_preset(p.parse_args(argv), "a small UNet, 1000 iterations of 32 images (minutes)")
    p.set_defaults(**PRESETS[preset], preset=preset)
    cfg = p.parse_args(argv)
    if len(cfg.channel_mult) > 4:
        p.error(f"--channel-mult {cfg.channel_mult}: give 1 to 4 multipliers (32 x 32 down to 4 x 4 pixels)")
    return common.finish_config(cfg, p)


# ----------------------------------------------------------------------------------------------------------
# Data: CIFAR-10's binary batches, parsed with numpy (no pickle is ever loaded)

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = "test_batch.bin"
RECORD = 1 + 3072  # one label byte, then 1024 red, 1024 green and 1024 blue bytes, row-major


def read_batch(path):
    """One binary batch: (images uint8 (n, 32, 32, 3), labels uint8 (n,))."""
    if not os.path.isfile(path):
        raise SystemExit(f"no {path}: give --data the folder that holds the extracted binary batches "
                         f"(cifar-10-batches-bin), or leave --data out to download them")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD:
        raise SystemExit(f"{path} holds {raw.size} bytes, not a whole number of {RECORD}-byte CIFAR-10 records: "
                         f"it is truncated or not a binary batch; delete it and download the data again")
    records = raw.reshape(-1, RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), records[:, 0].copy()


def cifar_folder(cfg):
    """--data, or the cache, downloading the archive once and checking its md5: nothing broken is ever cached."""
    if cfg.data is not None:
        return cfg.data
    folder = os.path.join(cfg.cache_dir, "cifar-10-batches-bin")
    if all(os.path.isfile(os.path.join(folder, f)) for f in TRAIN_FILES + [TEST_FILE]):
        return folder
    os.makedirs(cfg.cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cfg.cache_dir) as tmp:  # removed with whatever it holds, come what may
        archive = os.path.join(tmp, "cifar-10-binary.tar.gz")
        print(f"downloading {CIFAR_URL} (163 MB) into {cfg.cache_dir}", flush=True)
        try:
            urllib.request.urlretrieve(CIFAR_URL, archive)
        except OSError as e:
            raise SystemExit(f"cannot download {CIFAR_URL} ({e}): check the network, or pass --data DIR with "
                             f"the extracted binary batches")
        with open(archive, "rb") as f:
            md5 = hashlib.md5(f.read()).hexdigest()
        if md5 != CIFAR_MD5:
            raise SystemExit(f"the download of {CIFAR_URL} is corrupt or partial (md5 {md5}, expected "
                             f"{CIFAR_MD5}); it was deleted: run again")
        os.makedirs(os.path.join(tmp, "batches"))
        with tarfile.open(archive, "r:gz") as tar:  # only the six known members, by name: no path from the archive
            for name in TRAIN_FILES + [TEST_FILE]:
                with open(os.path.join(tmp, "batches", name), "wb") as f:
                    f.write(tar.extractfile(f"cifar-10-batches-bin/{name}").read())
        os.replace(os.path.join(tmp, "batches"), folder)
    return folder


def load_cifar(cfg):
    """(train, val, test) uint8 arrays (n, 32, 32, 3); val is a fixed part of the training images (any --seed)."""
    folder = cifar_folder(cfg)
    train = np.concatenate([read_batch(os.path.join(folder, f))[0] for f in TRAIN_FILES])
    test = read_batch(os.path.join(folder, TEST_FILE))[0]
    if cfg.val_images >= len(train):
        raise SystemExit(f"--val-images {cfg.val_images} leaves none of the {len(train)} training images to train")
    order = np.random.default_rng(12345).permutation(len(train))
    return train[order[cfg.val_images:]], train[order[:cfg.val_images]], test


def draw_batch(images, n, rng, flip):
    """n training images drawn with replacement (as nanoGPT draws its offsets), half of them mirrored."""
    x0 = images[rng.integers(0, len(images), n)]
    if flip:
        mirror = rng.random(n) < 0.5
        x0[mirror] = x0[mirror, :, ::-1]
    return torch.from_numpy(x0).long()


# ----------------------------------------------------------------------------------------------------------
# Networks: a DDPM-style UNet whose residual blocks are modulated by a conditioning vector (time and/or z)

def group_norm(channels):
    return nn.GroupNorm(math.gcd(32, channels // 4) or 1, channels)


def zeroed(layer):
    """`layer` with zero weights and bias: a fresh block starts as the identity, a fresh head at its prior."""
    for p in layer.parameters():
        nn.init.zeros_(p)
    return layer


class ResBlock(nn.Module):
    """Two 3x3 convolutions with a skip; the second normalisation is scaled and shifted by the conditioning
    vector c (as the paper's UNet does with time + MLP(z)), zero-initialised so a fresh block ignores c."""

    def __init__(self, c_in, c_out, cond_width=0, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), zeroed(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.modulation = zeroed(nn.Linear(cond_width, 2 * c_out)) if cond_width else None

    def forward(self, x, c=None):
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if self.modulation is not None:
            scale, shift = self.modulation(c)[:, :, None, None].chunk(2, 1)
            h = h * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))


class Attention(nn.Module):
    """Self-attention over the pixels of one resolution, heads of 64 channels (scaled_dot_product_attention)."""

    def __init__(self, channels):
        super().__init__()
        self.heads = max(1, channels // 64)
        self.norm, self.qkv = group_norm(channels), nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zeroed(nn.Conv2d(channels, channels, 1))

    def forward(self, x, c=None):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).view(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2)
        q, k, v = qkv.contiguous().unbind(1)  # (B, heads, pixels, channels), channels contiguous: fused kernels
        h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class SubPixelEmbedding(nn.Module):
    """A learned vector per sub-pixel value and colour channel ([M] = V too, with `mask`), a pixel's three
    concatenated (as MD4 does): tokens (B, 32, 32, 3) -> features (B, 3 * dim, 32, 32)."""

    def __init__(self, dim, mask=True):
        super().__init__()
        self.rows = V + 1 if mask else V
        self.table = nn.Embedding(3 * self.rows, dim)

    def forward(self, tokens):
        h = self.table(tokens + self.rows * torch.arange(3, device=tokens.device))  # (B, H, W, 3, dim)
        return h.flatten(3).permute(0, 3, 1, 2)


class Encoder(nn.Module):
    """The UNet's downsampling path: `num_res_blocks` residual blocks per resolution (attention where asked),
    a stride-2 convolution between resolutions. Returns every intermediate map for the skips."""

    def __init__(self, cfg, c_in, cond_width, channels=None):
        super().__init__()
        ch = channels or cfg.channels
        self.conv_in = nn.Conv2d(c_in, ch, 3, padding=1)
        self.layers, self.channels, c, res = nn.ModuleList(), [ch], ch, 32
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.layers.append(ResBlock(c, ch * mult, cond_width, cfg.dropout))
                c = ch * mult
                if res in cfg.attn_res:
                    self.layers.append(Attention(c))
                self.channels.append(c)
            if level < len(cfg.channel_mult) - 1:
                self.layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                self.channels.append(c)
                res //= 2
        self.out_channels, self.out_res = c, res

    def forward(self, x, c=None):
        hs = [self.conv_in(x)]
        for layer in self.layers:
            if isinstance(layer, Attention):
                hs[-1] = layer(hs[-1])
            else:
                hs.append(layer(hs[-1], c) if isinstance(layer, ResBlock) else layer(hs[-1]))
        return hs


class Denoiser(nn.Module):
    """mu_theta(x0 | x_t, z, t): a UNet over the embedded sub-pixels, 256 logits per sub-pixel ([M] is never
    predicted); an MLP of z (VADD) plus, with --time-cond, a time embedding modulates every residual block."""

    def __init__(self, cfg, latent_dim=0):
        super().__init__()
        ch = cfg.channels
        cond = 4 * ch if (latent_dim or cfg.time_cond) else 0
        self.time = nn.Sequential(nn.Linear(ch, cond), nn.SiLU(), nn.Linear(cond, cond)) if cfg.time_cond else None
        self.latent = (nn.Sequential(nn.Linear(latent_dim, cond), nn.SiLU(), nn.Linear(cond, cond))
                       if latent_dim else None)
        self.embed = SubPixelEmbedding(cfg.embed_dim)
        self.encoder = Encoder(cfg, 3 * cfg.embed_dim, cond)
        c, res = self.encoder.out_channels, self.encoder.out_res
        self.middle = nn.ModuleList([ResBlock(c, c, cond, cfg.dropout), Attention(c),
                                     ResBlock(c, c, cond, cfg.dropout)])
        self.decoder, skips = nn.ModuleList(), list(self.encoder.channels)
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.decoder.append(ResBlock(c + skips.pop(), ch * mult, cond, cfg.dropout))
                c = ch * mult
                if res in cfg.attn_res:
                    self.decoder.append(Attention(c))
            if level:
                self.decoder.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1)))
                res *= 2
        # a per-pixel readout (1x1, like a transformer's output layer): a 3x3 convolution to 768 channels
        # would cost as much as the rest of a small UNet. Zeroed: a fresh denoiser is uniform, NELBO = D log V
        self.out = nn.Sequential(group_norm(c), nn.SiLU(), zeroed(nn.Conv2d(c, 3 * V, 1)))

    def forward(self, xt, t=None, z=None):
        c = None if self.latent is None else self.latent(z)
        if self.time is not None:  # sinusoids of 1000 t, as DDPM embeds its step
            half = self.time[0].in_features // 2
            freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=xt.device) / half)
            angles = 1000 * t.float()[:, None] * freqs
            c = (0 if c is None else c) + self.time(torch.cat([angles.sin(), angles.cos()], 1))
        hs = self.encoder(self.embed(xt), c)
        h = hs[-1]
        for layer in self.middle:
            h = layer(h, c)
        for layer in self.decoder:  # each residual block takes one skip
            h = layer(torch.cat([h, hs.pop()], 1), c) if isinstance(layer, ResBlock) else layer(h)
        return self.out(h).view(-1, 3, V, 32, 32).permute(0, 3, 4, 1, 2)  # (B, 32, 32, 3, V), like the tokens


class Recognition(nn.Module):
    """r_phi(z | x0, x_t) = N(mean, diag exp(logvar)): the UNet's encoder ("siamese") over the embedded x0 and
    the mask map of x_t (together what (x0, x_t) carries), averaged over pixels; r starts at the prior."""

    def __init__(self, cfg, latent_dim):
        super().__init__()
        self.embed = SubPixelEmbedding(cfg.embed_dim, mask=False)
        self.encoder = Encoder(cfg, 3 * cfg.embed_dim + 3, 0, cfg.rec_channels)
        c = self.encoder.out_channels
        self.head = nn.Sequential(group_norm(c), nn.SiLU())
        self.out = zeroed(nn.Linear(c, 2 * latent_dim))

    def forward(self, x0, masked):
        h = torch.cat([self.embed(x0), masked.permute(0, 3, 1, 2).float()], 1)
        h = self.head(self.encoder(h)[-1]).mean((2, 3))
        return self.out(h).float().chunk(2, -1)  # z's noise in float32


class Model(nn.Module):
    """The denoiser and, for VADD, the recognition model: one module, so one optimizer, EMA, checkpoint and
    DDP wrapper. denoise() is the only way anything calls the denoiser; forward() is the training loss."""

    def __init__(self, cfg, method):
        super().__init__()
        self.method, self.objective, self.train_steps = method, cfg.objective, cfg.train_steps
        self.latent_dim, self.mask_id = cfg.latent_dim if method == "vadd" else 0, MASK
        self.time_cond = cfg.time_cond  # the samplers rerun the denoiser at every step when it reads t
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
    """Per image, in nats: w(t) * (sum_masked -log mu(x0 | x_t, z) + kl_weight * KL(r(z | x0, x_t) || p(z))),
    t drawn low-discrepancy, x_t ~ q(x_t | x0), z ~ r reparameterised. Returns (loss, kl) per image; the KL,
    unweighted by w(t), is logged to watch for posterior collapse."""
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
    """num images from `sampler` in T steps, in batches of --sample-batch. The denoiser runs only on images
    that still hold a [M] and whose input (x_t, z or, with --time-cond, t) changed since its last call.
    Returns (uint8 images (num, 32, 32, 3), network evaluations per image)."""
    device, latent, images, evaluations = next(model.parameters()).device, SAMPLERS[sampler][2], [], 0
    for start in range(0, num, cfg.sample_batch):
        n = min(cfg.sample_batch, num - start)
        xt = torch.full((n, *SHAPE), model.mask_id, dtype=torch.long, device=device)
        logits = torch.empty(n, *SHAPE, V, device=device)
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
        images.append(xt.to(torch.uint8).cpu())
    return torch.cat(images).numpy(), evaluations / num


# ----------------------------------------------------------------------------------------------------------
# Evaluation: held-out likelihoods in bits per dimension, FID through torchmetrics

def bpd(nats):
    """Nats per image -> bits per dimension (sub-pixel), the unit of every CIFAR-10 likelihood."""
    return nats / (D * math.log(2))


@torch.no_grad()
def likelihoods(model, x0, cfg):
    """Test figures in bpd, each (mean, standard error over every rank's share x0): the continuous-time NELBO
    (MDM, a bound) or the DELBO and IW-DELBO (VADD, not bounds), and under (sampler, T) each sampler's valid
    T-step bound from one random step per image (unbiased)."""
    device, vadd = torch.device(cfg.device), model.recognition is not None
    samplers = [s for s, (_, method, _) in SAMPLERS.items() if method == model.method]
    keys = ["delbo", "iw_delbo"] if vadd else ["mdm_nelbo"]
    figures = {key: [] for key in keys + [(s, T) for s in samplers for T in cfg.steps]}
    for x in torch.from_numpy(x0).long().split(min(cfg.eval_batch, common.rows_per_call(D, V))):
        x = x.to(device)
        with common.autocast(device, cfg.dtype):
            figures[keys[0]].append(delbo(model, x, 1.0)[0])
            if vadd:
                figures["iw_delbo"].append(common.iw_delbo(x, model.denoise, model.recognition, model.schedule,
                                                           model.mask_id, cfg.iw_samples, prior=model.prior))
            for s in samplers:
                for T in cfg.steps:
                    figures[s, T].append(common.step_bound(x, model.denoise, model.schedule, model.mask_id, T,
                                                           model.recognition, s, prior=model.prior))
    return {k: tuple(bpd(v) for v in common.mean_se(parts, device)) for k, parts in figures.items()}


def fid_metric(cfg):
    """torchmetrics' FID with torch-fidelity's port of the TensorFlow Inception and its resizing (antialias off),
    so figures compare with published FIDs; built before training, so a missing package stops the run at once."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except Exception as e:  # torch-fidelity imports torchvision, which fails to import against another torch
        raise SystemExit(f"--fid needs torchmetrics and torch-fidelity (pip install torchmetrics torch-fidelity, "
                         f"with the torchvision build that matches your torch); importing them failed: {e}")
    try:
        return FrechetInceptionDistance(feature=2048, reset_real_features=False, antialias=False,
                                        feature_extractor_weights_path=cfg.fid_weights, sync_on_compute=False)
    except ModuleNotFoundError as e:
        raise SystemExit(f"--fid needs torch-fidelity as well as torchmetrics: pip install torch-fidelity ({e})")
    except Exception as e:
        raise SystemExit(f"--fid could not load the Inception weights ({e.__class__.__name__}: {e}): on a machine "
                         f"without the network, copy torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                         f"and pass --fid-weights PATH")


def fid_update(metric, images, real, batch=500):
    for chunk in torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).split(batch):
        metric.update(chunk.to(metric.device), real=real)


def evaluate(model, method, cfg, data, fid, rank, world):
    """The likelihood entry (none with --sample-only) and by_steps rows of `method`: each of its samplers at every
    --steps count, drawn over the ranks; rank 0 saves samples_<sampler>_T<T>.npy and .png and scores the FID."""
    common.seed_everything(cfg.seed + 3 + 1000 * rank)  # each rank its own draws for its share of the test set
    figures = {} if cfg.sample_only else likelihoods(model, data[2][:cfg.num_eval][rank::world], cfg)
    for key in [k for k in figures if isinstance(k, str)]:
        kind = "a bound, continuous time" if key == "mdm_nelbo" else "not a bound"
        common.print0(f"[{method}] {key} {figures[key][0]:.4f} +- {figures[key][1]:.4f} bpd ({kind})")
    rows = []
    for sampler in [s for s, (_, m, _) in SAMPLERS.items() if m == method]:
        for T in cfg.steps:
            common.seed_everything(cfg.seed + 4 + 1000 * rank)
            t0 = time.time()
            images, nfe = sample(model, len(range(rank, cfg.num_samples, world)), T, sampler, cfg)
            parts = [images] * world  # every rank's images (their counts may differ), in rank order
            if world > 1:
                dist.all_gather_object(parts, images)
            images = np.concatenate(parts)
            row = {"sampler": sampler, "steps": T, "sample_seconds": time.time() - t0, "nfe": nfe,
                   "num_samples": len(images)}
            line = f"[{sampler}] T={T}: {len(images)} samples in {row['sample_seconds']:.1f}s"
            if (sampler, T) in figures:
                row["bound"], row["bound_se"] = figures[sampler, T]
                line += f", valid bound {row['bound']:.4f} +- {row['bound_se']:.4f} bpd"
            if rank == 0:
                np.save(os.path.join(cfg.out_dir, f"samples_{sampler}_T{T}.npy"), images)
                common.pyplot().imsave(os.path.join(cfg.out_dir, f"samples_{sampler}_T{T}.png"),
                                       tile(images[:64], 8))
            if fid is not None:  # rank 0's
                fid.reset()  # keeps the training-set statistics (reset_real_features=False)
                fid_update(fid, images[:cfg.fid], real=False)
                row["fid"], row["fid_samples"] = float(fid.compute()), min(cfg.fid, len(images))
                line += f", FID {row['fid']:.2f}"
            common.print0(line)
            rows.append(row)
    return common.likelihood_entry(figures, cfg.iw_samples), rows


# ----------------------------------------------------------------------------------------------------------
# Training

def train(cfg, method, data, ckpt, rank, world):
    """Train one method on every rank; returns the model with its EMA weights, the history ({"train":
    (iteration, loss bpd, KL nats, lambda), "val": (iteration, bpd)}) and the training summary."""
    device, train_images, val_images = torch.device(cfg.device), data[0], torch.from_numpy(data[1]).long()
    common.seed_everything(cfg.seed)  # same initialisation on every rank and for both methods
    model = Model(cfg, method).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    ema = common.EMA(model, cfg.ema)
    rng = np.random.default_rng(cfg.seed)  # one data stream: each rank takes its slice of every global batch
    if world > 1:
        torch.manual_seed(cfg.seed + 1 + rank)  # ... and draws its own times, masks and z
    path, start, history = os.path.join(cfg.out_dir, f"ckpt_{method}.pt"), 0, {"train": [], "val": []}
    if ckpt is not None:
        start, history = common.resume(ckpt, model, opt, ema, rng, device, rank, world, cfg.seed + 1)
    ddp = DDP(model, [device.index] if device.type == "cuda" else None) if world > 1 else model
    step = torch.compile(ddp) if cfg.compile else ddp
    evaluator = copy.deepcopy(model).eval()  # receives the EMA weights for validation
    sizes = [f"{name} {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M" for name, m in model.named_children()]
    common.print0(f"[{method}] parameters: {', '.join(sizes)}; iterations {start} to {cfg.max_iters}")
    meter = common.Meter(method, start, cfg.max_iters, cfg.batch_size, "images/s")
    curve_every = max(1, cfg.log_interval // 5)  # five points of the training curve per progress line
    for it in range(start, cfg.max_iters):
        for group in opt.param_groups:
            group["lr"] = common.lr_at(it, cfg)
        lam = common.kl_weight(it, cfg.kl_warmup, cfg.kl_start) if method == "vadd" else 0.0
        kl_weight = torch.tensor(lam)  # a tensor: one compiled graph for every value
        figures = torch.zeros(2, device=device)  # (loss, KL), the mean over the micro-batches
        for m in range(cfg.grad_accum):  # each rank's slice of every global micro-batch
            x = draw_batch(train_images, cfg.batch_size // cfg.grad_accum, rng, cfg.flip)[rank::world].to(device)
            with ddp.no_sync() if world > 1 and m < cfg.grad_accum - 1 else contextlib.nullcontext():
                with common.autocast(device, cfg.dtype):
                    loss, kl = step(x, kl_weight)
                loss = loss.mean()  # nats per image
                (loss / D / cfg.grad_accum).backward()  # per sub-pixel: a scale that suits Adam and clipping
            figures += torch.stack([loss.detach(), kl.detach().mean()]) / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        meter.add(*figures)
        it += 1  # iterations done
        save = it % cfg.ckpt_interval == 0 or it == cfg.max_iters
        if it % curve_every == 0 or save:  # a NaN stops the run here, before the checkpoint below
            loss, kl = meter.mean("curve", it)
            history["train"].append((it, bpd(loss), kl, lam))
        if it % cfg.log_interval == 0 or it == cfg.max_iters:
            loss, kl = meter.mean("line", it)
            common.print0(meter.line(it, loss=bpd(loss), kl=kl, **{"lambda": lam}))
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:  # the EMA weights, at lambda 1
            ema.copy_to(evaluator)
            chunks = val_images[rank::world].split(min(cfg.eval_batch, common.rows_per_call(D, V)))
            with torch.no_grad(), common.autocast(device, cfg.dtype):
                per_image = [delbo(evaluator, x.to(device), 1.0)[0] for x in chunks]
            history["val"].append((it, bpd(common.mean_se(per_image, device)[0])))
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
    keys = ("channels", "channel_mult", "num_res_blocks", "attn_res", "dropout", "embed_dim", "time_cond",
            "latent_dim", "schedule", "objective", "train_steps")
    return {"method": method, "prior": prior, "rec_channels": rec, **{k: getattr(cfg, k) for k in keys}}


# ----------------------------------------------------------------------------------------------------------
# Main

def main(argv=None):
    cfg = parse_config(argv)
    with common.distributed(cfg) as (rank, world):
        methods = ["mdm", "vadd"] if cfg.method == "both" else [cfg.method]
        training = not (cfg.eval_only or cfg.sample_only)
        checkpoints = {m: common.check_checkpoint(cfg, m, weight_settings(cfg, m), training) for m in methods}
        fid = fid_metric(cfg) if cfg.fid and rank == 0 else None  # rank 0 scores the samples
        if rank > 0:
            dist.barrier()  # rank 0 downloads into the cache and makes --out-dir first, the others then read
        data = load_cifar(cfg) if not cfg.sample_only or cfg.fid else None
        if rank == 0:  # after the data is read, before any training
            common.make_out_dir(cfg)
            if world > 1:
                dist.barrier()
        run_start, histories = time.time(), {}
        if fid is not None:  # reference statistics of the training set, once for every sampler and step count
            fid_update(fid.to(cfg.device), np.concatenate([data[0], data[1]]), real=True)
        metrics = {"unit": "bits per dimension (sub-pixel); KL in nats per image", "config": {}, "likelihood": {},
                   "training": {}, "by_steps": []}
        for method in methods:
            if training:
                model, histories[method], metrics["training"][method] = train(cfg, method, data,
                                                                              checkpoints[method], rank, world)
            else:  # the checkpoint's EMA weights
                model = Model(cfg, method).to(cfg.device)
                histories[method] = common.load_weights(checkpoints[method], model)
            metrics["config"][method] = dict(vars(cfg))
            metrics["likelihood"][method], rows = evaluate(model.eval(), method, cfg, data, fid, rank, world)
            metrics["by_steps"] += rows
        if rank > 0:
            return None
        metrics["seconds"] = time.time() - run_start
        metrics = common.save_metrics(cfg.out_dir, metrics, methods, SAMPLERS)
        plot_overview(os.path.join(cfg.out_dir, "samples.png"), cfg, data[2] if data else None, metrics)
        panels = [("bound", "valid T-step bound (bits per dim)")]
        panels += [("fid", "FID")] if any("fid" in r for r in metrics["by_steps"]) else []
        common.plot_by_steps(os.path.join(cfg.out_dir, "by_steps.png"), metrics["by_steps"], SAMPLERS, panels)
        common.plot_training(os.path.join(cfg.out_dir, "training.png"), histories, "loss (MDM NELBO; VADD DELBO "
                             "at lambda), bits per dim", "VADD: KL(r || p), nats per image")
        print_table(cfg, metrics)
        return metrics


def data_name(cfg):
    """What the run trained on: CIFAR-10 when downloaded, else the --data folder by name."""
    return "CIFAR-10" if cfg.data is None else f"{os.path.basename(os.path.normpath(cfg.data))} (--data)"


def print_table(cfg, metrics):
    """Every sampler at every T side by side (the likelihoods were printed as they were computed)."""
    print(f"\n{data_name(cfg)}, valid T-step bounds on {cfg.num_eval} test images (bits per dimension):")
    print(f"{'sampler':8s} {'T':>4s} {'valid bound (bpd)':>19s} {'FID':>7s} {'NFE':>7s} {'sec':>7s}")
    for r in metrics["by_steps"]:
        bound = f"{r['bound']:8.4f} +- {r['bound_se']:.4f}" if "bound" in r else "-"
        fid = f"{r['fid']:7.2f}" if "fid" in r else "-"
        print(f"{r['sampler']:8s} {r['steps']:4d} {bound:>19s} {fid:>7s} {r['nfe']:7.2f} "
              f"{r['sample_seconds']:7.1f}")
    print(f"\nwrote {cfg.out_dir}/ (metrics.json, samples_*.npy, samples_*.png, samples.png, by_steps.png, "
          f"training.png) in {metrics['seconds']:.0f}s")


# ----------------------------------------------------------------------------------------------------------
# Plots

def tile(images, cols):
    """A grid of images (n, 32, 32, 3) with a 2-pixel white border, as one uint8 picture."""
    rows = math.ceil(len(images) / cols)
    grid = np.full((rows * 34 + 2, cols * 34 + 2, 3), 255, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        grid[2 + 34 * r:34 * (r + 1), 2 + 34 * c:34 * (c + 1)] = im
    return grid


def plot_overview(path, cfg, data, metrics):
    """Rows: test images, then each sampler in metrics.json (from samples_*.npy); columns: step counts."""
    rows = ["data"] + [s for s in SAMPLERS if any(r["sampler"] == s for r in metrics["by_steps"])]
    fig, axes = common.pyplot().subplots(len(rows), len(cfg.steps), squeeze=False,
                                         figsize=(max(6, 2 * len(cfg.steps)), 2.1 * len(rows)))
    for r, row in enumerate(rows):
        for c, T in enumerate(cfg.steps):
            saved = os.path.join(cfg.out_dir, f"samples_{row}_T{T}.npy")
            if row == "data" and data is not None:
                axes[r, c].imshow(tile(data[16 * c:16 * (c + 1)], 4))
            elif row != "data" and os.path.exists(saved):
                axes[r, c].imshow(tile(np.load(saved)[:16], 4))
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(f"T = {T}", fontsize=9)
            if c == 0:
                axes[r, c].text(-0.08, 0.5, "data" if row == "data" else SAMPLERS[row][0].split(" (")[0],
                                rotation=90, va="center", ha="right", transform=axes[r, c].transAxes, fontsize=9)
    fig.suptitle(f"samples after T denoising steps, trained on {data_name(cfg)}", fontsize=10)
    common.savefig(fig, path)


if __name__ == "__main__":
    main()
