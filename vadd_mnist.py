"""VADD vs masked diffusion (MDM) on binarized MNIST: the paper's pixel-level binary-image experiment.

An image is 32 x 32 binary pixels (MNIST thresholded at 0.5 and padded by 2 zero pixels per side), so 1024
tokens over V = 2; the mask [M] is token 2. With few denoising steps MDM reveals many pixels at once, each
drawn independently, and the digits dissolve into noise; VADD conditions its UNet denoiser on a latent z
that a recognition network infers from the clean image during training, so one z carries the digit's shape.

    python vadd_mnist.py                              # full MNIST (downloaded, md5 checked), MDM then VADD, one GPU
    python vadd_mnist.py --preset cpu --data mnist5k  # a small model on a CPU, IDX files from a folder

Read top to bottom: configuration, data, networks, objective, samplers, evaluation, plots, training, main.
The method and its pitfalls: REFERENCE.md; shared pieces (schedule, reverse step, bounds): common.py.
"""
import argparse
import copy
import gzip
import hashlib
import json
import math
import os
import shutil
import struct
import time
import urllib.request

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------------------------------------
# Configuration

SAMPLERS = {"mdm": "MDM", "vadd": "VADD vanilla (fresh z each step)", "vadd_cs": "VADD-CS (one z per image)"}
SIZE, V, MASK = 32, 2, 2  # padded image side, pixel values {0, 1}, the mask token
BPD = SIZE * SIZE * math.log(2)  # nats per image -> bits per dimension

# The defaults fit one GPU. The paper gives the task (threshold 0.5, 32 x 32, test bpd) but not the UNet or the
# budget: width, depth, latent size, batch and iterations are our choices, sized like the small DDPM/MD4 UNets.
PRESETS = {
    "gpu": {},
    # both methods in about 16 minutes on 2 CPU cores (README): 2 x 2 patches, a narrow UNet, a short budget
    "cpu": dict(width=32, mults="1,2", num_blocks=1, attn_res=8, patch=2, dropout=0.0, latent_dim=16,
                max_iters=4000, batch_size=64, lr=1e-3, warmup_iters=100, ema=0.995, val_size=250, eval_batch=250,
                eval_repeats=4, eval_interval=1000, num_samples=64, sample_batch=64, iw_samples=8, log_interval=250,
                ckpt_interval=1000),
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", default="gpu", choices=tuple(PRESETS), help="default set: gpu (below) or cpu (small, minutes)")
    a("--method", default="both", choices=("mdm", "vadd", "both"),
      help="train MDM, VADD, or both one after the other with the same seed, data and budget (default both)")
    a("--data", default=None, help="folder with the four MNIST IDX files (gzipped or not); no network, no md5")
    a("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "vadd", "mnist"),
      help="where full MNIST is downloaded to when --data is not given")
    a("--val-size", type=int, default=5000, help="training images carved out for validation")
    a("--num-test", type=int, default=0, help="test images for the likelihoods (0 = all, 10k for MNIST)")
    a("--steps", default="1,5,10,20,50,100", help="denoising step counts to sample and bound, comma separated")
    a("--num-samples", type=int, default=1000, help="images drawn per sampler and step count")
    a("--sample-batch", type=int, default=500, help="images per sampling batch")
    a("--iw-samples", type=int, default=100, help="draws of z for the importance-weighted DELBO (paper: 1000?)")
    a("--eval-batch", type=int, default=500, help="test images per likelihood batch")
    a("--eval-repeats", type=int, default=1, help="passes over the test set for the one-random-step estimates")
    # budget and optimisation
    a("--max-iters", type=int, default=100_000, help="training iterations per method")
    a("--batch-size", type=int, default=128, help="images per iteration (split over DDP ranks)")
    a("--lr", type=float, default=2e-4, help="peak learning rate of AdamW")
    a("--warmup-iters", type=int, default=1000, help="linear learning-rate warm-up, then cosine decay to lr/10")
    a("--grad-clip", type=float, default=1.0, help="gradient-norm clipping")
    a("--ema", type=float, default=0.9999, help="EMA decay of the weights used for evaluation (0 = off)")
    # model
    a("--width", type=int, default=64, help="channels of the UNets' first level (a multiple of 8)")
    a("--mults", default="1,2,2", help="channel multiplier per UNet level; each level halves the resolution")
    a("--num-blocks", type=int, default=2, help="residual blocks per UNet level")
    a("--attn-res", type=int, default=8, help="resolution with self-attention after each block (0 = none)")
    a("--patch", type=int, default=1, choices=(1, 2, 4), help="pixels per side folded into one UNet input cell")
    a("--dropout", type=float, default=0.1, help="dropout inside the residual blocks")
    a("--time-cond", action="store_true",
      help="condition the denoiser on t too (off: the optimal masked denoiser needs only x_t, MDLM, "
           "and the samplers can reuse its output while an image does not change)")
    a("--latent-dim", type=int, default=32, help="size of z (VADD)")
    a("--kl-warmup", type=int, default=None, help="iterations over which lambda rises to 1 (default max-iters/2)")
    a("--kl-start", type=float, default=0.0, help="lambda at iteration 0")
    a("--schedule", default="loglinear", choices=common.SCHEDULES, help="masking schedule alpha(t) (MDLM's)")
    a("--objective", default="delbo", choices=("delbo", "steps"),
      help="delbo: the paper's continuous-time DELBO (MDM: NELBO); steps: the valid bound of the K-step "
           "consistency sampler (MDM: of the K-step sampler), REFERENCE.md section 3b (default delbo)")
    a("--train-steps", default="1,2,4,8", help="budgets K for --objective steps, one drawn per image")
    # run
    a("--seed", type=int, default=0, help="seeds training, data order and sampling (same for both methods)")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    a("--dtype", default=None, choices=("float32", "bfloat16"), help="autocast dtype (default bf16 on CUDA)")
    a("--compile", default=None, action=argparse.BooleanOptionalAction, help="torch.compile (default on CUDA)")
    a("--out-dir", default=os.path.join("out", "mnist"), help="output folder (default %(default)s)")
    a("--resume", action="store_true", help="continue training from ckpt_<method>.pt in --out-dir")
    only = p.add_mutually_exclusive_group().add_argument
    only("--eval-only", action="store_true", help="no training: evaluate and sample from ckpt_<method>.pt")
    only("--sample-only", action="store_true", help="no training, no likelihoods: sample from ckpt_<method>.pt")
    a("--log-interval", type=int, default=500, help="iterations between progress lines")
    a("--eval-interval", type=int, default=5000, help="iterations between validation figures (EMA weights)")
    a("--ckpt-interval", type=int, default=5000, help="iterations between checkpoints (and one at the end)")
    return p


def parse_config(argv=None):
    """Parse and check every flag before anything is written; a bad value stops with one sentence."""
    p = build_parser()
    cfg = p.parse_args(argv)
    p.set_defaults(**PRESETS[cfg.preset])  # the preset changes defaults; flags given still win
    cfg = p.parse_args(argv)
    for name in ("steps", "train_steps", "mults"):
        try:
            setattr(cfg, name, [int(s) for s in str(getattr(cfg, name)).split(",") if s.strip()])
        except ValueError:
            p.error(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: give whole numbers separated by commas, e.g. 1,2,2")
        if not getattr(cfg, name) or min(getattr(cfg, name)) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(cfg, name)}: every entry must be a positive whole number")
    for name, low in [("val_size", 1), ("num_test", 0), ("num_samples", 1), ("sample_batch", 1), ("iw_samples", 1),
                      ("eval_batch", 1), ("eval_repeats", 1), ("max_iters", 0), ("batch_size", 1), ("width", 8),
                      ("num_blocks", 1), ("latent_dim", 1), ("warmup_iters", 0), ("log_interval", 1),
                      ("eval_interval", 1), ("ckpt_interval", 1)]:
        if getattr(cfg, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(cfg, name)}")
    if cfg.width % 8:
        p.error(f"--width {cfg.width}: must be a multiple of 8 (group normalisation uses 8 groups)")
    resolutions = [SIZE // cfg.patch // 2 ** i for i in range(len(cfg.mults))]
    if SIZE // cfg.patch % 2 ** (len(cfg.mults) - 1):
        p.error(f"--mults {cfg.mults} with --patch {cfg.patch}: too many levels to halve {SIZE // cfg.patch} pixels")
    if cfg.attn_res and cfg.attn_res not in resolutions:
        p.error(f"--attn-res {cfg.attn_res}: the UNet's resolutions are {resolutions}; pick one or 0")
    if cfg.lr <= 0 or not 0 <= cfg.ema < 1 or not 0 <= cfg.kl_start <= 1 or not 0 <= cfg.dropout < 1:
        p.error("--lr must be positive, --ema and --dropout in [0, 1) and --kl-start in [0, 1]")
    if cfg.data is not None and not os.path.isdir(cfg.data):
        p.error(f"--data {cfg.data!r} is not a folder: give the folder that holds the MNIST IDX files")
    try:
        cfg.device = str(common.pick_device(cfg.device))
    except (ValueError, RuntimeError) as e:
        p.error(str(e))
    cuda = cfg.device.startswith("cuda")
    cfg.dtype = cfg.dtype or ("bfloat16" if cuda else "float32")
    cfg.compile = cuda if cfg.compile is None else cfg.compile
    cfg.kl_warmup = cfg.max_iters // 2 if cfg.kl_warmup is None else cfg.kl_warmup
    for folder in [cfg.out_dir] + ([] if cfg.data else [cfg.cache_dir]):
        existing = os.path.abspath(folder)
        while not os.path.exists(existing):  # the deepest part of the path that exists must be a folder
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            p.error(f"cannot create folder {folder!r}: {existing!r} is a file, not a folder; choose another path")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Data: the four MNIST IDX files, binarised at 0.5 and padded to 32 x 32

MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's first mirror
           "https://storage.googleapis.com/cvdf-datasets/mnist/",  # TensorFlow's
           "http://yann.lecun.com/exdb/mnist/"]  # the original, often unavailable
MNIST_MD5 = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}


def file_md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()  # 10 MB at most


def download_mnist(cache_dir):
    """Fetch the four gzipped IDX files into cache_dir, each from the first mirror that serves it intact.
    A download that fails its md5 (corrupt or cut short) is deleted and reported, never used; so is a cached
    file that no longer matches."""
    os.makedirs(cache_dir, exist_ok=True)
    for name, md5 in MNIST_MD5.items():
        path = os.path.join(cache_dir, name)
        if os.path.exists(path):
            if file_md5(path) == md5:
                continue
            print(f"{path} fails its md5 check: deleted, downloading it again")
            os.remove(path)
        errors, part = [], f"{path}.part{os.getpid()}"
        for mirror in MIRRORS:
            try:
                print(f"downloading {mirror}{name}")
                with urllib.request.urlopen(mirror + name, timeout=60) as r, open(part, "wb") as f:
                    shutil.copyfileobj(r, f)
                got = file_md5(part)
            except OSError as e:  # URLError, HTTP errors, timeouts, a full disk
                errors.append(f"{mirror}: {e}")
                got = None
            if got == md5:
                os.replace(part, path)
                break
            if os.path.exists(part):
                os.remove(part)
            if got is not None:
                print(f"{mirror}{name} has md5 {got}, not {md5} (corrupt or partial): deleted")
                errors.append(f"{mirror}: md5 mismatch")
        else:
            raise SystemExit(f"could not download {name} intact ({'; '.join(errors)}): put the MNIST files into "
                             f"{cache_dir} by hand, or pass --data with a folder that holds them")


def read_idx(path):
    """An IDX file of unsigned bytes (gzipped or raw) as a numpy array; ValueError with the reason otherwise."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # a bad or truncated gzip stream
        raise ValueError(f"{path} cannot be read ({e}): it is corrupt or cut short; fetch it again") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} has magic number {data[:4].hex()}, not 000008xx: it is not an IDX file of bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else ()
    if len(data) < header or len(data) != header + math.prod(dims):
        raise ValueError(f"{path} holds {len(data)} bytes where its header promises "
                         f"{header + math.prod(dims) if dims else header}: it is cut short or corrupt; fetch it again")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def find_idx(folder, name):
    for candidate in (name, name + ".gz"):
        if os.path.exists(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    raise SystemExit(f"{folder} has no {name} (nor {name}.gz): put the MNIST IDX files there")


def binarize(images):
    """uint8 (N, 28, 28) grey levels -> int64 (N, 32, 32) pixels in {0, 1}: threshold 0.5 (pixel > 127) and
    2 zero pixels on every side, as in the paper."""
    x = torch.from_numpy((np.asarray(images) > 127).astype(np.int64))
    return F.pad(x, (2, 2, 2, 2))


def load_mnist(cfg):
    """(train, val, test) as int64 tensors (N, 32, 32): the images of --data, or of full MNIST downloaded
    into the cache. Validation is a fixed random carve-out of the training images (the same for every
    seed). The label files are downloaded with the rest but not read: the model is unconditional."""
    folder = cfg.data or cfg.cache_dir
    if cfg.data is None:
        download_mnist(cfg.cache_dir)
    split = {}
    for part in ("train", "t10k"):
        try:
            images = read_idx(find_idx(folder, f"{part}-images-idx3-ubyte"))
        except ValueError as e:
            raise SystemExit(f"MNIST in {folder}: {e}") from None
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise SystemExit(f"MNIST in {folder}: the {part} images have shape {images.shape}, not (N, 28, 28)")
        split[part] = binarize(images)
    train, test = split["train"], split["t10k"]
    if cfg.val_size >= len(train):
        raise SystemExit(f"--val-size {cfg.val_size} leaves no training images of the {len(train)}: lower it")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234))
    test = test[:cfg.num_test] if cfg.num_test else test
    return train[order[cfg.val_size:]], train[order[:cfg.val_size]], test


# ----------------------------------------------------------------------------------------------------------
# Networks: UNets whose residual blocks are modulated by a conditioning vector (time and z)

EMBED = 16  # channels per pixel of the input embedding: three symbols (0, 1, [M]) need few


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a skip; the second normalisation is scaled and shifted by the
    conditioning vector c (adaptive group norm, the images' counterpart of adaLN), zero-initialised so that
    a fresh block ignores c. The last conv starts at zero too: each block starts as the identity."""

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
    """Levels of residual blocks at halving resolutions (average pooling down, nearest-neighbour up) with
    one skip connection per level, a middle block with attention, all modulated by c. decoder=False keeps
    the contracting half only: the recognition network, the same family as the denoiser ("siamese")."""

    def __init__(self, cfg, in_channels, cond_dim, decoder=True):
        super().__init__()
        chans, res, attn = [cfg.width * m for m in cfg.mults], SIZE // cfg.patch, cfg.attn_res

        def level(c_in, c_out, res):
            layers = []
            for j in range(cfg.num_blocks):
                layers.append(ResBlock(c_in if j == 0 else c_out, c_out, cond_dim, cfg.dropout))
                if res == attn:
                    layers.append(Attention(c_out))
            return nn.ModuleList(layers)

        self.stem = nn.Conv2d(in_channels, cfg.width, 3, padding=1)
        # a learned embedding of position: convolutions alone know where they are only from the zero padding,
        # so neither a z that modulates channels could place strokes nor a pooled recognition locate them
        self.position = nn.Parameter(0.1 * torch.randn(1, cfg.width, res, res))
        self.down, c = nn.ModuleList(), cfg.width
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
        h, skips = self.stem(x) + self.position, []
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


def to_cells(h, patch):
    """(B, 32, 32, E) per-pixel features -> (B, E * patch^2, 32/patch, 32/patch) UNet input."""
    return F.pixel_unshuffle(h.permute(0, 3, 1, 2), patch)


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
        self.patch, cond_dim = cfg.patch, 4 * cfg.width
        self.embed = nn.Embedding(V + 1, EMBED)
        mlp = lambda d: nn.Sequential(nn.Linear(d, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))  # noqa: E731
        self.latent = mlp(latent_dim) if latent_dim else None
        self.time = mlp(cfg.width) if cfg.time_cond else None
        has_cond = latent_dim or cfg.time_cond
        self.unet = UNet(cfg, EMBED * self.patch ** 2, cond_dim if has_cond else 0)
        self.head = nn.Sequential(nn.GroupNorm(8, self.unet.out_channels), nn.SiLU(),
                                  nn.Conv2d(self.unet.out_channels, V * self.patch ** 2, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)  # uniform predictions at the start: NELBO = 1024 ln 2 (MDLM)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, xt, t=None, z=None):
        c = None
        if self.latent is not None:
            c = self.latent(z)
        if self.time is not None:
            c = (0 if c is None else c) + self.time(timestep_embedding(t, self.time[0].in_features))
        h = self.head(self.unet(to_cells(self.embed(xt), self.patch), c))
        return F.pixel_shuffle(h, self.patch).permute(0, 2, 3, 1)  # (B, 32, 32, V)


class Recognition(nn.Module):
    """r_phi(z | x0, x_t) = N(mean, diag exp(logvar)): the contracting half of a UNet over (x0, mask) pairs,
    each of the four embedded (the pair carries what (x0, x_t) does), mean-pooled. The output weights start
    random, not zero: with r at the prior and the denoiser's modulation at zero neither network has a
    gradient that opens the path through z, and the KL stays near 0 (seen in CPU runs)."""

    def __init__(self, cfg, latent_dim):
        super().__init__()
        self.patch = cfg.patch
        self.embed = nn.Embedding(2 * V, EMBED)
        self.unet = UNet(cfg, EMBED * self.patch ** 2, 0, decoder=False)
        self.norm = nn.GroupNorm(8, self.unet.out_channels)
        self.out = nn.Linear(self.unet.out_channels, 2 * latent_dim)
        nn.init.zeros_(self.out.bias)

    def forward(self, x0, masked):
        h = self.unet(to_cells(self.embed(x0 + V * masked.long()), self.patch))
        mean, logvar = self.out(F.silu(self.norm(h)).mean((2, 3))).float().chunk(2, -1)  # z's noise in float32
        return mean, logvar


class Model(nn.Module):
    """The denoiser and, for VADD, the recognition network: one module, so one optimizer, EMA and checkpoint.
    forward() is the training loss, so DDP and torch.compile wrap the whole objective."""

    def __init__(self, cfg, method):
        super().__init__()
        self.latent_dim = cfg.latent_dim if method == "vadd" else 0
        self.time_cond = cfg.time_cond
        self.schedule = common.Schedule(cfg.schedule)
        self.objective, self.train_steps = cfg.objective, cfg.train_steps
        self.denoiser = Denoiser(cfg, self.latent_dim)
        self.recognition = Recognition(cfg, self.latent_dim) if self.latent_dim else None

    def denoise(self, xt, t, z):  # the signature common.py's estimators call
        return self.denoiser(xt, t, z)

    def forward(self, x0, kl_weight):
        if self.objective == "steps":  # the valid bound of the K-step consistency sampler (REFERENCE.md 3b)
            return common.steps_loss(x0, self.denoise, self.schedule, MASK, self.train_steps, self.recognition,
                                     kl_weight)
        return delbo(self, x0, self.schedule, kl_weight)


# ----------------------------------------------------------------------------------------------------------
# Objective: the paper's DELBO (REFERENCE.md section 2; MDM's NELBO is the same without z). --objective steps
# trains the valid bound of the K-step sampler instead (section 3b), common.steps_loss

def delbo(model, x0, schedule, kl_weight):
    """Per image: w(t) * (sum_masked -log mu(x0 | x_t, z) + kl_weight * KL(r(z | x0, x_t) || N(0, I))), with t
    drawn low-discrepancy, x_t ~ q(x_t | x0) and z ~ r reparameterised. Returns (loss, kl) per image in nats;
    the KL, unweighted by w(t), is logged to watch for posterior collapse."""
    t = common.sample_times(x0.shape[0], device=x0.device)
    xt = common.forward_mask(x0, schedule.alpha(t), MASK)
    masked = xt == MASK
    z, kl = None, torch.zeros(x0.shape[0], device=x0.device)
    if model.recognition is not None:
        mean, logvar = model.recognition(x0, masked)
        z, kl = common.sample_latent(mean, logvar), common.gaussian_kl(mean, logvar)
    nll = common.masked_nll(model.denoise(xt, t, z), x0, masked)
    return schedule.weight(t) * (nll + kl_weight * kl), kl


# ----------------------------------------------------------------------------------------------------------
# Samplers: start from all-[M], T reverse steps on the grid t_i = i/T (common.reverse_step, float64 draws)

@torch.no_grad()
def sample(model, num, T, sampler, cfg):
    """sampler 'mdm': no z; 'vadd' (vanilla): a fresh z ~ N(0, I) at every step; 'vadd_cs' (consistency):
    one z per image for all steps. The denoiser runs only on images that still hold a [M] and whose input
    changed since its last call (MDM and VADD-CS without --time-cond) or, for the vanilla sampler, got a new
    z. Returns (uint8 images (num, 32, 32), network evaluations per image)."""
    device = next(model.parameters()).device
    out, evaluations = [], 0
    for start in range(0, num, cfg.sample_batch):
        n = min(cfg.sample_batch, num - start)
        xt = torch.full((n, SIZE, SIZE), MASK, dtype=torch.long, device=device)
        logits = torch.empty(n, SIZE, SIZE, V, device=device)
        z = torch.randn(n, model.latent_dim, device=device) if sampler == "vadd_cs" else None
        stale = torch.ones(n, dtype=torch.bool, device=device)
        for i in range(T, 0, -1):
            if sampler == "vadd":
                z = torch.randn(n, model.latent_dim, device=device)
            if sampler == "vadd" or model.time_cond:
                stale = torch.ones_like(stale)
            rows = (stale & (xt == MASK).flatten(1).any(1)).nonzero().squeeze(1)
            for part in rows.split(common.rows_per_call(SIZE * SIZE, V)) if len(rows) else ():
                with common.autocast(device, cfg.dtype):
                    t = torch.full((len(part),), i / T, device=device)
                    logits[part] = model.denoise(xt[part], t, None if z is None else z[part]).float()
            evaluations += len(rows)
            alpha_t, alpha_s = model.schedule.alpha_grid(torch.tensor([i / T, (i - 1) / T], dtype=torch.float64))
            xs = common.reverse_step(xt, logits, alpha_t, alpha_s, MASK)
            stale, xt = (xs != xt).flatten(1).any(1), xs
        out.append(xt.to(torch.uint8).cpu())
    return torch.cat(out).numpy(), evaluations / num


# ----------------------------------------------------------------------------------------------------------
# Evaluation: likelihoods of the test images (bits per dimension), nearness of samples to training digits

def mean_se(x):
    x = x.double()
    return float(x.mean()), float(x.std() / math.sqrt(len(x))) if len(x) > 1 else 0.0


@torch.no_grad()
def likelihoods(model, x0_all, cfg, samplers):
    """Test figures in bits per dimension, each (mean, standard error): the continuous-time NELBO (MDM, a
    bound) or DELBO and its importance-weighted version (VADD; comparison figures, not bounds), and for
    every sampler and step count the valid T-step bound (REFERENCE.md section 3), estimated without bias
    from one random step per image (exact=False: one network call instead of T)."""
    device, schedule, per = torch.device(cfg.device), model.schedule, {}
    key = "delbo" if model.recognition is not None else "mdm_nelbo"
    for _ in range(cfg.eval_repeats):
        for x0 in x0_all.split(min(cfg.eval_batch, common.rows_per_call(SIZE * SIZE, V))):
            x0, figures = x0.to(device), {}
            with common.autocast(device, cfg.dtype):
                figures[key] = delbo(model, x0, schedule, 1.0)[0]
                if model.recognition is not None:
                    figures["iw_delbo"] = common.iw_delbo(x0, model.denoise, model.recognition, schedule, MASK,
                                                          cfg.iw_samples)
                for sampler in samplers:
                    for T in cfg.steps:
                        figures[(sampler, T)] = common.step_bound(x0, model.denoise, schedule, MASK, T,
                                                                  model.recognition, sampler, exact=False)
            for k, v in figures.items():
                per.setdefault(k, []).append(v.float().cpu() / BPD)
    return {k: mean_se(torch.cat(v)) for k, v in per.items()}


def nearest_hamming(images, reference, chunk=1000):
    """Mean over images of the Hamming distance (pixels) to the nearest reference image: near the data's
    own figure (test vs train) for digit-like samples, far above it for pixel noise with the right density."""
    ref = torch.as_tensor(reference).flatten(1).float()
    dists = []
    for x in torch.as_tensor(images).flatten(1).float().split(chunk):
        dists.append((x.sum(1, keepdim=True) + ref.sum(1) - 2 * x @ ref.T).min(1).values)
    return float(torch.cat(dists).mean())


# ----------------------------------------------------------------------------------------------------------
# Plots

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


def tile(images, cols):
    """(N, H, W) images -> one array, `cols` per row, a 1-pixel grey line between them."""
    n, h, w = images.shape
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1), 0.5)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = img
    return canvas


def save_grid(path, images, title):
    plt = pyplot()
    cols = min(10, math.ceil(math.sqrt(len(images))))
    fig, ax = plt.subplots(figsize=(cols * 0.6 + 0.4, math.ceil(min(len(images), cols * cols) / cols) * 0.6 + 0.5))
    ax.imshow(tile(images[:cols * cols], cols), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off(), ax.set_title(title, fontsize=8)
    savefig(fig, path)


def plot_overview(path, cfg, data, samples, per_cell=16):
    """Rows: test images, then each sampler; columns: step counts; each cell a 4 x 4 mosaic."""
    plt = pyplot()
    rows = ["data"] + [s for s in SAMPLERS if any(k[0] == s for k in samples)]
    fig, axes = plt.subplots(len(rows), len(cfg.steps), figsize=(1.9 * len(cfg.steps), 2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, T in enumerate(cfg.steps):
            ax, images = axes[r, c], data if row == "data" else samples.get((row, T))
            if images is not None and (row != "data" or c == 0):
                ax.imshow(tile(images[:per_cell], 4), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(row != "data" or c == 0)
            if r == 1:
                ax.set_title(f"T = {T}")
            if c == 0:
                ax.set_ylabel("test images" if row == "data" else SAMPLERS[row].split(" (")[0])
    fig.suptitle("binarized MNIST: samples after T denoising steps")
    savefig(fig, path)


def plot_bounds(path, rows, likelihood):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for sampler, label in SAMPLERS.items():
        pts = sorted((r["steps"], r["bound"], r["bound_se"]) for r in rows if r["sampler"] == sampler and "bound" in r)
        if pts:
            ax.errorbar(*zip(*pts), marker="o", capsize=2, label=f"{label}: valid T-step bound")
    for key, label, style in [("mdm_nelbo", "MDM NELBO (continuous time, a bound)", ":"),
                              ("delbo", "VADD DELBO (not a bound)", "--")]:
        if key in likelihood:
            ax.axhline(likelihood[key], color="gray", ls=style, label=label)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("denoising steps T"), ax.set_ylabel("test bits per dimension")
    ax.legend(fontsize=7)
    savefig(fig, path)


def plot_training(path, histories):
    """Loss of each method (bpd), VADD's KL and lambda (a KL falling to 0 is posterior collapse), and the
    validation NELBO / DELBO of the EMA weights."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for method, h in histories.items():
        train = np.array([p[:4] for p in h["train"]]).reshape(-1, 4)
        axes[0].plot(train[:, 0], train[:, 1], label=method)
        if h["val"]:
            axes[3].plot(*zip(*h["val"]), marker="o", label=method)
        if method == "vadd":
            axes[1].plot(train[:, 0], train[:, 2])
            axes[2].plot(train[:, 0], train[:, 3])
    titles = ["training loss (bpd; VADD at lambda)", "VADD: KL(r || p), nats per image", "VADD: lambda",
              "validation NELBO / DELBO (bpd, EMA)"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9), ax.set_xlabel("iteration")
    axes[0].legend(fontsize=7), axes[3].legend(fontsize=7)
    savefig(fig, path)


# ----------------------------------------------------------------------------------------------------------
# Training (DDP through torchrun: each rank takes its slice of the global batch, rank 0 writes)

def train(cfg, method, data, ckpt=None, rank=0, world=1):
    """Train one method, from a checkpoint if given; returns the model with its EMA weights loaded and the
    history (training curve, validation points)."""
    device, (train_x, val_x) = torch.device(cfg.device), data
    common.seed_everything(cfg.seed + rank)  # both methods see the same initialisation and data order
    rng = np.random.default_rng(cfg.seed)  # the same on every rank: each takes its slice of one global batch
    model = Model(cfg, method).to(device)
    if world > 1:  # identical initial weights on every rank
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = common.EMA(model, cfg.ema)
    ckpt_path = os.path.join(cfg.out_dir, f"ckpt_{method}.pt")
    start, history = 0, {"train": [], "val": []}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        ema.load_state_dict(ckpt["ema"])
        rng.bit_generator.state = ckpt["rng"]
        if rank == 0:
            torch.set_rng_state(ckpt["torch_rng"])
            if device.type == "cuda" and ckpt["cuda_rng"] is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        else:  # only rank 0's state is saved: the others draw afresh
            torch.manual_seed(cfg.seed + rank + ckpt["iter"])
        start, history = ckpt["iter"], ckpt["history"]
        log0(rank, f"[{method}] resumed from {ckpt_path} at iteration {start}")
    step_fn = torch.compile(model) if cfg.compile else model
    if world > 1:
        step_fn = nn.parallel.DistributedDataParallel(step_fn, device_ids=None if device.index is None else [device.index])
    ema_model = copy.deepcopy(model).eval()
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in model.named_children()}
    log0(rank, f"[{method}] parameters: {', '.join(f'{k} {v / 1e6:.2f}M' for k, v in n_params.items())}; "
               f"{cfg.max_iters} iterations of {cfg.batch_size} images on {world} process(es)")
    t0, curve, log = time.time(), np.zeros(3), np.zeros(3)  # (loss, KL, count) since the last point / log line
    model.train()
    for it in range(start, cfg.max_iters):
        lr = cfg.lr * min(1.0, (it + 1) / max(1, cfg.warmup_iters))
        lr *= 0.55 + 0.45 * math.cos(math.pi * it / cfg.max_iters)  # cosine decay to lr / 10
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.from_numpy(rng.integers(0, len(train_x), cfg.batch_size))[rank::world]
        x0 = train_x[idx].to(device, non_blocking=True)
        lam = common.kl_weight(it, cfg.kl_warmup, cfg.kl_start) if method == "vadd" else 0.0
        with common.autocast(device, cfg.dtype):
            loss, kl = step_fn(x0, torch.tensor(lam))  # a tensor: compiled once for every lambda
        loss = loss.mean()
        if not torch.isfinite(loss):
            raise SystemExit(f"[{method}] the loss became {loss.item()} at iteration {it}: lower --lr "
                             f"(now {cfg.lr}); checkpoints already written are kept")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model)
        curve += (loss.item() / BPD, kl.mean().item(), 1)  # one batch is noisy (w(t) = 1/t): report means
        log += (loss.item() / BPD, kl.mean().item(), 1)
        last = it == cfg.max_iters - 1
        if (it + 1) % HISTORY_EVERY == 0 or last:
            history["train"].append((it + 1, float(curve[0] / curve[2]), float(curve[1] / curve[2]), lam))
            curve[:] = 0
        if (it + 1) % cfg.log_interval == 0 or last:
            speed = (it + 1 - start) * cfg.batch_size / (time.time() - t0)
            log0(rank, f"[{method}] iter {it + 1:6d}/{cfg.max_iters} | loss {log[0] / log[2]:.4f} bpd | "
                       f"kl {log[1] / log[2]:7.3f} | lambda {lam:4.2f} | {speed:6.1f} img/s | "
                       f"eta {(cfg.max_iters - it - 1) * cfg.batch_size / speed:6.0f}s")
            log[:] = 0
        if rank == 0 and ((it + 1) % cfg.eval_interval == 0 or last):
            ema.copy_to(ema_model)
            val = validation_loss(ema_model, val_x, cfg)
            history["val"].append((it + 1, val))
            log0(rank, f"[{method}] iter {it + 1:6d} | validation {'DELBO' if method == 'vadd' else 'NELBO'} "
                       f"{val:.4f} bpd (EMA weights)")
        if rank == 0 and ((it + 1) % cfg.ckpt_interval == 0 or last):
            common.save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                "iter": it + 1, "config": arch_config(cfg, method), "history": history,
                                "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                               ckpt_path)
    ema.copy_to(ema_model)
    return ema_model, history


HISTORY_EVERY = 20  # iterations averaged into one point of the training curve


@torch.no_grad()
def validation_loss(model, x0_all, cfg):
    """Mean NELBO (MDM) or DELBO at lambda = 1 (VADD) of the validation images, bits per dimension."""
    model.eval()
    device, total = torch.device(cfg.device), 0.0
    for x0 in x0_all.split(min(cfg.eval_batch, common.rows_per_call(SIZE * SIZE, V))):
        with common.autocast(device, cfg.dtype):
            total += delbo(model, x0.to(device), model.schedule, 1.0)[0].float().sum().item()
    return total / len(x0_all) / BPD


def log0(rank, line):
    if rank == 0:
        print(line, flush=True)


ARCH_KEYS = ("width", "mults", "num_blocks", "attn_res", "patch", "time_cond", "latent_dim", "schedule", "objective",
             "train_steps")


def arch_config(cfg, method):
    return {"method": method, **{k: getattr(cfg, k) for k in ARCH_KEYS if k != "latent_dim" or method == "vadd"}}


def read_checkpoint(cfg, method):
    """The checkpoint to continue from (--resume) or to evaluate (--eval-only, --sample-only); None when there
    is nothing to read. One trained with other flags, or one missing where needed, stops the run before
    anything is written."""
    path = os.path.join(cfg.out_dir, f"ckpt_{method}.pt")
    needed = cfg.eval_only or cfg.sample_only
    if not os.path.exists(path):
        if needed:
            raise SystemExit(f"{path} does not exist: train the {method} model first (same --out-dir), "
                             f"or drop --eval-only / --sample-only")
        return None
    if not (cfg.resume or needed):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"cannot read {path} ({e.__class__.__name__}): delete it or choose another --out-dir")
    if ckpt.get("config") != arch_config(cfg, method):
        raise SystemExit(f"{path} was trained with {ckpt.get('config')}, not {arch_config(cfg, method)}: "
                         f"pass the same flags, or another --out-dir to start afresh")
    return ckpt


def trained_model(cfg, method, ckpt):
    """The EMA weights of a checkpoint, for --eval-only and --sample-only."""
    model = Model(cfg, method).to(cfg.device)
    model.load_state_dict(ckpt["ema"]["params"])
    return model.eval(), ckpt["history"]


# ----------------------------------------------------------------------------------------------------------
# Main

def setup_ddp(cfg):
    """(rank, world size): torchrun sets RANK and WORLD_SIZE; a plain run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1
    cuda = cfg.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(cfg.device)
    if cfg.batch_size % dist.get_world_size():
        raise SystemExit(f"--batch-size {cfg.batch_size} does not split over {dist.get_world_size()} processes")
    return dist.get_rank(), dist.get_world_size()


def main(argv=None):
    cfg = parse_config(argv)
    rank, world = setup_ddp(cfg)
    methods = ["mdm", "vadd"] if cfg.method == "both" else [cfg.method]
    checkpoints = {method: read_checkpoint(cfg, method) for method in methods}
    train_x, val_x, test_x = load_mnist(cfg)
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
    log0(rank, f"MNIST: {len(train_x)} training, {len(val_x)} validation, {len(test_x)} test images of 32 x 32")
    run_start, likelihood, rows, samples, histories = time.time(), {}, [], {}, {}
    for method in methods:
        if cfg.eval_only or cfg.sample_only:
            model, histories[method] = trained_model(cfg, method, checkpoints[method])
        else:
            model, histories[method] = train(cfg, method, (train_x, val_x), checkpoints[method], rank, world)
        if rank:
            continue  # rank 0 evaluates and samples alone: cheap next to training
        samplers = ["mdm"] if method == "mdm" else ["vadd", "vadd_cs"]
        common.seed_everything(cfg.seed + 1)
        figures = {} if cfg.sample_only else likelihoods(model, test_x, cfg, samplers)
        for k, (mean, se) in figures.items():
            if isinstance(k, str):
                likelihood.update({k: mean, f"{k}_se": se})
        if method == "vadd" and not cfg.sample_only:
            likelihood["iw_samples"] = cfg.iw_samples
        for sampler in samplers:
            for T in cfg.steps:
                t0 = time.time()
                images, nfe = sample(model, cfg.num_samples, T, sampler, cfg)
                row = {"sampler": sampler, "steps": T, "sample_seconds": time.time() - t0, "nfe": nfe,
                       "nn_hamming": nearest_hamming(images, train_x)}
                if (sampler, T) in figures:
                    row["bound"], row["bound_se"] = figures[(sampler, T)]
                rows.append(row)
                np.save(os.path.join(cfg.out_dir, f"samples_{sampler}_T{T}.npy"), images)
                samples[(sampler, T)] = images
                save_grid(os.path.join(cfg.out_dir, f"samples_{sampler}_T{T}.png"), images,
                          f"{SAMPLERS[sampler]}, T = {T}")
    if rank:
        dist.destroy_process_group()
        return None
    spread = lambda n: test_x[np.linspace(0, len(test_x) - 1, n).astype(int)]  # noqa: E731 (files may be sorted)
    data_nn = nearest_hamming(spread(min(cfg.num_samples, len(test_x))), train_x)
    metrics = {"config": dict(vars(cfg)), "unit": "bits per dimension (nats per image / (1024 ln 2))",
               "likelihood": likelihood, "test_nn_hamming": data_nn, "by_steps": rows,
               "seconds": time.time() - run_start}
    metrics = merge_earlier_run(cfg, metrics, samples)
    with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    plot_overview(os.path.join(cfg.out_dir, "overview.png"), cfg, spread(16).numpy(), samples)
    plot_bounds(os.path.join(cfg.out_dir, "bounds.png"), metrics["by_steps"], metrics["likelihood"])
    plot_training(os.path.join(cfg.out_dir, "training.png"), histories)
    print_table(cfg, metrics)
    if world > 1:
        dist.destroy_process_group()
    return metrics


# flags that do not change the trained weights: results of runs that differ only in these are merged
RUN_ONLY_KEYS = ("method", "resume", "eval_only", "sample_only", "device", "dtype", "compile", "out_dir", "cache_dir",
                 "log_interval", "eval_interval", "ckpt_interval", "steps", "num_samples", "sample_batch",
                 "iw_samples", "eval_batch", "eval_repeats", "num_test", "preset")


def merge_earlier_run(cfg, metrics, samples):
    """Keep earlier results of the same trained models: `--method mdm` then `--method vadd` into one folder end
    with one metrics.json and one figure for both, and `--sample-only` keeps the bounds already measured.
    Rows are matched by (sampler, steps); a fresh value replaces an old one."""
    path = os.path.join(cfg.out_dir, "metrics.json")
    if not os.path.exists(path):
        return metrics
    with open(path) as f:
        old = json.load(f)
    same_run = lambda c: {k: v for k, v in c.items() if k not in RUN_ONLY_KEYS}  # noqa: E731
    if same_run(old.get("config", {})) != same_run(metrics["config"]):
        return metrics
    merged = {(r["sampler"], r["steps"]): r for r in old["by_steps"]}
    for r in metrics["by_steps"]:
        merged[(r["sampler"], r["steps"])] = {**merged.get((r["sampler"], r["steps"]), {}), **r}
    for sampler, T in merged:
        saved = os.path.join(cfg.out_dir, f"samples_{sampler}_T{T}.npy")
        if (sampler, T) not in samples and os.path.exists(saved) and T in cfg.steps:
            samples[(sampler, T)] = np.load(saved)
    metrics["by_steps"] = sorted(merged.values(), key=lambda r: (list(SAMPLERS).index(r["sampler"]), r["steps"]))
    metrics["likelihood"] = {**old["likelihood"], **metrics["likelihood"]}
    if len({r["sampler"] for r in metrics["by_steps"]}) == 3:
        metrics["config"]["method"] = "both"
    return metrics


def print_table(cfg, metrics):
    lik = metrics["likelihood"]
    print("\nbinarized MNIST 32 x 32, test set, bits per dimension (paper, full MNIST: MDLM 0.075, VADD 0.063)")
    for key, label in [("mdm_nelbo", "MDM NELBO (bound, continuous time)"),
                       ("delbo", "VADD DELBO (not a bound)"),
                       ("iw_delbo", f"VADD IW-DELBO, K = {lik.get('iw_samples')} (not a bound)")]:
        if key in lik:
            print(f"  {label:45s} {lik[key]:.4f} +- {lik[key + '_se']:.4f}")
    print(f"\n{'sampler':8s} {'T':>4s} {'valid T-step bound':>20s} {'NN Hamming':>11s} {'NFE':>7s} {'sec':>7s}"
          f"   (NN Hamming of test images: {metrics['test_nn_hamming']:.1f})")
    for r in metrics["by_steps"]:
        bound = f"{r['bound']:.4f} +- {r['bound_se']:.4f}" if "bound" in r else "-"
        print(f"{r['sampler']:8s} {r['steps']:4d} {bound:>20s} {r['nn_hamming']:11.1f} {r['nfe']:7.2f} "
              f"{r['sample_seconds']:7.2f}")
    print(f"\nwrote {cfg.out_dir}/ (metrics.json, samples_*.npy and .png, overview.png, bounds.png, training.png) "
          f"in {metrics['seconds']:.0f}s")


if __name__ == "__main__":
    main()
