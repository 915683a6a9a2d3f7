"""VADD vs masked diffusion (MDM) on text: from a text file to samples, generative perplexity and honest
likelihoods, on one process or many (torchrun).

A sequence is --block-size tokens. MDM's denoiser predicts every masked position independently, so a sampler
with few steps writes tokens that do not agree with each other; VADD conditions the denoiser (a DiT) on a
latent z, one per sequence, inferred in training by a recognition transformer and drawn from its prior when
sampling.

    python vadd_text.py                     # tiny-shakespeare, MDM then VADD; a 6-layer DiT on a GPU
    python vadd_text.py --data my.txt --steps 1,2,4,8,128 --eval-model gpt2-large
    python vadd_text.py --data openwebtext --prepare    # once: download and tokenise (docs/text.md)
    torchrun --nproc_per_node 8 vadd_text.py --data openwebtext --max-iters 100000 --kl-warmup 100000

Read top to bottom: configuration, data, networks, objective, samplers, evaluation, training, main.
The method: docs/method.md; what all scripts share (schedule, reverse step, bounds, run utilities): common.py.
"""
import contextlib
import copy
import glob
import hashlib
import importlib
import json
import math
import os
import shutil
import time
import urllib.request

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------------------------------------
# Configuration

PRESETS = {  # sizes and budget; each value can be overridden by its flag. docs/text.md says how each was sized
    # cpu: a 4-layer DiT on characters, small enough for a 2-core CPU
    "cpu": dict(layers=4, width=128, heads=4, cond_dim=64, latent_dim=32, dropout=0.0, tokenizer="char",
                rec_layers=2, rec_width=64, rec_heads=2,  # as good as 4 x 128 at 38% less time (docs/text.md)
                block_size=128, max_iters=1000, batch_size=32, lr=1e-3, warmup_iters=100, ema=0.99,
                num_eval=256, iw_samples=8, log_interval=50, eval_interval=500, ckpt_interval=500),
    # gpu (text files): nanoGPT's Shakespeare-character model, 6 layers x 384, for corpora of about 1M tokens
    "gpu": dict(layers=6, width=384, heads=6, cond_dim=128, latent_dim=64, dropout=0.2, tokenizer="char",
                rec_layers=2, rec_width=256, rec_heads=4,  # VADD's training FLOPs 1.17 x MDM's (2.0 at 6 x 384)
                block_size=256, max_iters=5000, batch_size=64, lr=1e-3, warmup_iters=100, ema=0.999,
                num_eval=512, iw_samples=16, log_interval=100, eval_interval=1000, ckpt_interval=1000),
    # mdlm (openwebtext, lm1b): MDLM-small's DiT with GPT-2 tokens and MDLM's AdamW; z of 512 as in VADD
    "mdlm": dict(layers=12, width=768, heads=12, cond_dim=128, latent_dim=512, dropout=0.1, tokenizer="gpt2",
                 rec_layers=4, rec_width=768, rec_heads=12,  # VADD's training FLOPs 1.25 x MDM's (1.75: 12 x 768)
                 block_size=256, max_iters=5000, batch_size=64, lr=3e-4, warmup_iters=200, ema=0.999,
                 num_eval=512, iw_samples=16, log_interval=100, eval_interval=1000, ckpt_interval=1000),
}
BLOCK_SIZE = {"openwebtext": 1024, "lm1b": 128}  # MDLM's lengths, whatever the preset


def build_parser():
    p = common.parser(__doc__)
    a, whole, number, preset = p.add_argument, common.whole, common.number, " (default from --preset)"
    a("--data", default="shakespeare", help="a UTF-8 text file, a folder with train.bin/val.bin/meta.json, or "
      "one of: shakespeare (tiny-shakespeare, downloaded once), openwebtext, lm1b (first --prepare them)")
    a("--prepare", action="store_true", help="download and tokenise --data into --cache-dir, then stop: needed "
      "once for openwebtext and lm1b (on one process, every core), done by the first run for text files")
    a("--tokenizer", choices=("gpt2", "char"), help="for text files: GPT-2 BPE or characters" + preset)
    a("--steps", type=common.counts, default="5", help="step counts T to sample and bound, e.g. 1,2,4 (default 5)")
    a("--num-samples", type=whole(), default=64, help="sequences drawn per sampler and step count (default 64)")
    a("--sample-batch", type=whole(), default=32, help="sequences sampled at once (default 32)")
    a("--num-eval", type=whole(), help="validation windows for the likelihoods, the first ones of the split "
      "(all of them if it has fewer)" + preset)
    a("--eval-batch", type=whole(), default=32, help="windows per evaluation call (default 32)")
    a("--iw-samples", type=whole(), help="draws of z for the importance-weighted DELBO" + preset)
    a("--exact-bounds", action="store_true",
      help="sum all T steps of each T-step bound (T calls) instead of the unbiased one-random-step estimate")
    a("--eval-model", help="causal LM scoring the samples' generative perplexity, a Hugging Face name (downloaded "
      "if needed) or a local folder; 'none' skips it (default gpt2-large if it is in the Hugging Face cache)")
    a("--block-size", type=whole(2), help="tokens per sequence (default 1024 openwebtext, 128 lm1b, else preset)")
    a("--preset", choices=tuple(PRESETS), help="sizes and budget, the table PRESETS (default: where CUDA is, mdlm "
      "for openwebtext and lm1b and gpu for text files; else cpu)")
    for name, low, what in [("layers", 1, "denoiser blocks"), ("width", 2, "denoiser width"),
                            ("heads", 1, "denoiser attention heads"), ("cond-dim", 1, "adaLN conditioning width"),
                            ("latent-dim", 1, "size of z (VADD)")]:
        a(f"--{name}", type=whole(low), help=what + preset)
    a("--dropout", type=number(0, 1), help="dropout in the blocks" + preset)
    for name, low in (("layers", 1), ("width", 2), ("heads", 1)):
        a(f"--rec-{name}", type=whole(low), help=f"recognition model {name}" + preset)
    a("--positions", choices=("rotary", "learned"), default="rotary", help="rotary: MDLM's DiT, which cannot tell "
      "positions apart at an all-[M] input; learned: the denoiser also adds a learned embedding of each position, "
      "and the recognition reads a few features at every position instead of their mean, so that z can say where "
      "things are (docs/text.md, the copy task; default rotary)")
    a("--time-cond", action="store_true", help="condition the denoiser on t too (off, as MDLM: the optimal "
      "denoiser needs only x_t, and the samplers reuse its output while a sequence does not change)")
    a("--cache-dir", default=os.path.expanduser("~/.cache/vadd/text"), help="where downloads and tokens are kept")
    common.add_training_flags(p, {}, set().union(*PRESETS.values()))  # every training default from the preset
    return p


def parse_config(argv=None):
    """Parse the flags; a value that would fail later (a traceback, or after training) stops with one sentence."""
    p = build_parser()
    first = p.parse_args(argv)
    cpu_run = "a 4-layer DiT on characters, 1000 iterations of 32 x 128 tokens per method"
    if first.preset is None and common.choose_preset(first, cpu_run) == "gpu" and first.data in BLOCK_SIZE:
        first.preset = "mdlm"  # MDLM-small for the corpora it was made for
    block_size = BLOCK_SIZE.get(first.data, PRESETS[first.preset]["block_size"])
    p.set_defaults(**{**PRESETS[first.preset], "preset": first.preset, "block_size": block_size})
    cfg = p.parse_args(argv)
    for prefix, width, heads in [("", cfg.width, cfg.heads), ("rec-", cfg.rec_width, cfg.rec_heads)]:
        if width % heads or (width // heads) % 2:
            p.error(f"--{prefix}width {width} must split into --{prefix}heads {heads} heads of even size (rotary "
                    f"positions rotate pairs)")
    name = os.path.splitext(os.path.basename(os.path.normpath(cfg.data)))[0]
    cfg.out_dir = cfg.out_dir or os.path.join("out", "text", name)
    return common.finish_config(cfg, p)


def need(package):
    """Import an optional package, or stop with how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise SystemExit(f"this needs the `{package}` package: pip install {package}")

# ----------------------------------------------------------------------------------------------------------
# Data: token ids in train.bin / val.bin (uint16) with meta.json, prepared once into --cache-dir

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_BYTES = 1_115_394  # no checksum is published: the size is the check
SOURCES = {  # parquet copies on the Hugging Face hub (`datasets` 4 runs no loading scripts): repository, pinned
    # revision, files and rows of each split. Not refs/convert/parquet for OpenWebText: past 5 GB that converter
    # keeps only part of the train split. The row order was not checked against the loading scripts' (docs/text.md)
    "openwebtext": ("Skylion007/openwebtext", "refs/pr/18", {"train": "data/train-*.parquet"},
                    {"train": 8_013_769}),
    "lm1b": ("billion-word-benchmark/lm1b", "refs/convert/parquet",
             {"train": "plain_text/train/*.parquet", "test": "plain_text/test/*.parquet"},
             {"train": 30_301_028, "test": 306_688}),
}
OWT_HELDOUT = 100_000  # MDLM holds out the last 100k OpenWebText documents for validation
GPT2_EOS = 50256


def gpt2_encoding():
    """tiktoken's GPT-2 BPE (tiktoken downloads it at first use; the tests build it from a local ranks file)."""
    return need("tiktoken").get_encoding("gpt2")


def hf_tokenizer(name):
    return need("transformers").AutoTokenizer.from_pretrained(name)


def prepared_folder(cfg):
    """Where --data's tokens are cached: text files by content hash, so an edited file is tokenised again."""
    if cfg.data in SOURCES:
        return os.path.join(cfg.cache_dir, cfg.data)
    if os.path.isdir(cfg.data):
        return cfg.data
    if cfg.data == "shakespeare":  # a fixed text, checked by its size when downloaded
        return os.path.join(cfg.cache_dir, f"shakespeare-{cfg.tokenizer}")
    if not os.path.isfile(cfg.data):
        raise SystemExit(f"--data {cfg.data!r}: no such file or folder, and not one of shakespeare, openwebtext, "
                         f"lm1b")
    with open(cfg.data, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(cfg.data))[0]
    return os.path.join(cfg.cache_dir, f"{stem}-{cfg.tokenizer}-{digest}")


def prepare_data(cfg):
    """--data's prepared folder, made first if needed, before any process group exists: rank 0 prepares a text
    file while the others wait for it to join; openwebtext and lm1b are prepared by --prepare alone (once, in
    parallel over the cores), and a run without them stops on every rank with that command."""
    folder, rank = prepared_folder(cfg), int(os.environ.get("RANK", 0))
    if os.path.exists(folder) or (rank > 0 and cfg.data not in SOURCES):
        return folder
    if cfg.data not in SOURCES:
        path = download_shakespeare(cfg.cache_dir) if cfg.data == "shakespeare" else cfg.data
        prepare_text_file(path, folder, cfg.tokenizer)
    elif not cfg.prepare:
        raise SystemExit(f"--data {cfg.data} is not prepared in {folder}: run `python vadd_text.py --data "
                         f"{cfg.data} --prepare` first (once, one process; it downloads and tokenises it)")
    elif rank == 0:
        prepare_hub(cfg.data, folder, cfg.cache_dir)
    return folder


def download_shakespeare(cache_dir):
    path = os.path.join(cache_dir, "shakespeare.txt")
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        print(f"downloading tiny-shakespeare (1.1 MB) from {SHAKESPEARE_URL}")
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            urllib.request.urlretrieve(SHAKESPEARE_URL, tmp)
        except OSError as e:
            raise SystemExit(f"cannot download tiny-shakespeare from {SHAKESPEARE_URL} ({getattr(e, 'reason', e)})"
                             f": check the network, or pass --data PATH with a text file or a prepared folder")
        size = os.path.getsize(tmp)
        if size != SHAKESPEARE_BYTES:
            os.remove(tmp)
            raise SystemExit(f"the tiny-shakespeare download has {size} bytes, not {SHAKESPEARE_BYTES}: it is "
                             f"truncated or changed; run again, or pass --data with your own copy")
        os.replace(tmp, path)
    return path


def write_folder(folder, splits, meta):
    """Write train.bin / val.bin / meta.json into a temporary folder, renamed when complete: never a half-written
    cache, and an interrupted preparation leaves nothing behind."""
    tmp = f"{folder}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    try:
        for split, chunks in splits.items():
            with open(os.path.join(tmp, f"{split}.bin"), "wb") as f:
                for ids in chunks:  # an iterable of id arrays, so corpora larger than memory stream through
                    f.write(np.asarray(ids, dtype=np.uint16).tobytes())
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone once renamed; else the partial folder


def prepare_text_file(path, folder, tokenizer):
    """Tokenise a UTF-8 text file (GPT-2 BPE or characters); the last 10% of tokens is validation."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise SystemExit(f"--data {path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it first")
    if not text:
        raise SystemExit(f"--data {path} is empty: give a text file with some text in it")
    if tokenizer == "char":
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)  # one code point per character
        alphabet = np.unique(codes)  # more than 65536 characters: refused by load_data (uint16 ids)
        ids = np.searchsorted(alphabet, codes)
        meta = {"vocab_size": len(alphabet), "tokenizer": "char", "alphabet": "".join(map(chr, alphabet))}
    else:
        ids = np.array(gpt2_encoding().encode_ordinary(text), np.uint16)  # "<|endoftext|>" in text is plain text
        meta = {"vocab_size": GPT2_EOS + 1, "tokenizer": "gpt2"}
    cut = int(0.9 * len(ids))
    write_folder(folder, {"train": [ids[:cut]], "val": [ids[cut:]]}, {**meta, "source": os.path.abspath(path)})


def download_parquet(name, folder):
    """SOURCES[name]'s parquet files, downloaded once into `folder`: {split: paths in order}."""
    repo, revision, patterns, _ = SOURCES[name]
    try:
        need("huggingface_hub").snapshot_download(repo, repo_type="dataset", revision=revision,
                                                  allow_patterns=list(patterns.values()), local_dir=folder)
    except OSError as e:  # no network, a failed request (requests' and the hub's errors are OSErrors)
        raise SystemExit(f"cannot download {repo} at {revision} ({str(e).splitlines()[0]}): check the network, "
                         f"then run --prepare again (finished files are kept)")
    return {split: sorted(glob.glob(os.path.join(folder, pattern))) for split, pattern in patterns.items()}


def prepare_hub(name, folder, cache_dir):
    """OpenWebText or LM1B as MDLM prepares them. openwebtext: GPT-2 tokens, each document followed by EOS
    (<|endoftext|>), the documents joined, the last 100k held out. lm1b (MDLM's lm1b-wrap): bert-base-uncased
    tokens, each sentence as [CLS] ... [SEP], joined; validation is the test split (MDLM's detokeniser is skipped:
    BERT's tokeniser splits punctuation, so the ids come out the same). Tokenised batch by batch on every core."""
    pq, repo = need("pyarrow.parquet"), SOURCES[name][0]
    files = download_parquet(name, os.path.join(cache_dir, f"{name}-parquet"))
    rows = {split: [pq.ParquetFile(f).metadata.num_rows for f in paths] for split, paths in files.items()}
    n = {split: sum(counts) for split, counts in rows.items()}
    for split, expected in SOURCES[name][3].items():
        if n[split] != expected:
            raise SystemExit(f"the {split} split of {repo} has {n[split]:,} rows, not {expected:,}: the download "
                             f"is incomplete or the source changed; delete {cache_dir}/{name}-parquet and run "
                             f"--prepare again")
    if name == "openwebtext":
        enc = gpt2_encoding()
        tokenize = lambda texts: [ids + [GPT2_EOS] for ids in enc.encode_ordinary_batch(  # noqa: E731
            texts, num_threads=os.cpu_count())]
        cut = n["train"] - OWT_HELDOUT
        splits = {"train": ("train", 0, cut), "val": ("train", cut, n["train"])}
        meta = {"vocab_size": GPT2_EOS + 1, "tokenizer": "gpt2"}
    else:
        tok = hf_tokenizer("bert-base-uncased")
        tokenize = lambda texts: tok(texts)["input_ids"]  # noqa: E731 ([CLS] ... [SEP] added by the tokeniser)
        splits = {"train": ("train", 0, n["train"]), "val": ("test", 0, n["test"])}
        meta = {"vocab_size": tok.vocab_size, "tokenizer": "bert-base-uncased"}
    total, done, start = sum(n.values()), [0], time.time()

    def tokens(split, lo, hi, batch=64 * (os.cpu_count() or 1)):
        """The token ids of rows [lo, hi) of the split's files, batch by batch; a progress line every 30 s."""
        end, report = 0, start + 30
        for path, count in zip(files[split], rows[split]):
            row, end = end, end + count
            if end <= lo or row >= hi:
                continue  # no row of [lo, hi) in this file
            for b in pq.ParquetFile(path).iter_batches(batch, columns=["text"]):
                texts, row = b.column("text").to_pylist()[max(0, lo - row):max(0, hi - row)], row + b.num_rows
                if texts:
                    yield np.concatenate([np.asarray(ids, np.uint16) for ids in tokenize(texts)])
                    done[0] += len(texts)
                if done[0] and time.time() > report:
                    rate, report = done[0] / (time.time() - start), time.time() + 30
                    print(f"{name}: {done[0]:,} of {total:,} documents, {rate:,.0f}/s, ETA "
                          f"{(total - done[0]) / rate / 60:.0f} min", flush=True)

    print(f"tokenising {name} ({total:,} documents) into {folder}")
    write_folder(folder, {s: tokens(*where) for s, where in splits.items()}, {**meta, "source": f"{repo}@"
                 f"{SOURCES[name][1]}"})


def load_data(folder, cfg):
    """Map the prepared folder's train.bin and val.bin: (train, val, meta), the splits as read-only uint16
    arrays; a folder that is incomplete or that does not fit the flags stops with one sentence. --num-eval is
    cut to the validation windows there are: a window counted twice would shrink the standard errors."""
    missing = [f for f in ("train.bin", "val.bin", "meta.json") if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise SystemExit(f"--data {cfg.data!r}: the folder lacks {', '.join(missing)} (a prepared folder holds "
                         f"train.bin, val.bin and meta.json)")
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
    except ValueError:
        meta = None
    V = meta.get("vocab_size") if isinstance(meta, dict) else None
    if (not isinstance(V, int) or not 1 <= V <= 65536
            or (meta.get("tokenizer") == "char" and len(meta.get("alphabet", "")) != V)):
        raise SystemExit(f"{folder}/meta.json must be JSON with a vocab_size from 1 to 65536 (uint16 ids) and, "
                         f"for a char tokenizer, an alphabet of vocab_size characters to decode the samples")
    splits = []
    for split in ("train", "val"):
        path = os.path.join(folder, f"{split}.bin")
        ids = np.memmap(path, dtype=np.uint16, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint16)
        if len(ids) < cfg.block_size:
            raise SystemExit(f"--block-size {cfg.block_size} is larger than the {split} split of {cfg.data} "
                             f"({len(ids)} tokens): choose a smaller --block-size or give more text")
        if folder == cfg.data and ids.max() >= V:  # a folder we did not write: every id is checked
            raise SystemExit(f"{path} holds token id {ids.max()}, not below vocab_size {V} of meta.json: fix the "
                             f"ids or the vocab_size")
        splits.append(ids)
    windows, world = len(splits[1]) // cfg.block_size, int(os.environ.get("WORLD_SIZE", 1))
    if windows < world:
        raise SystemExit(f"the validation split of {cfg.data} has {windows} windows of {cfg.block_size} tokens, "
                         f"fewer than the {world} processes: choose a smaller --block-size or give more text")
    if cfg.num_eval > windows:
        common.print0(f"--num-eval {cfg.num_eval}: the validation split has {windows} windows of "
                      f"{cfg.block_size} tokens, and each is used once")
        cfg.num_eval = windows
    return splits[0], splits[1], meta


def decoder(meta):
    """ids -> text for the sample files and the scorer; ids joined by spaces for unknown tokenisers."""
    kind = meta.get("tokenizer")
    if kind == "char":
        return lambda ids: "".join(meta["alphabet"][i] for i in ids)
    if kind == "gpt2":
        enc = gpt2_encoding()
        return lambda ids: enc.decode(list(ids))
    if kind == "bert-base-uncased":
        tok = hf_tokenizer(kind)
        return lambda ids: tok.decode(list(ids), skip_special_tokens=True)
    return lambda ids: " ".join(map(str, ids))


def window_offsets(rng, n_tokens, cfg, rank, world):
    """This rank's windows of the iteration, (grad_accum, micro-batch) offsets: its slice [rank::world] of a
    global batch drawn from one stream shared by every rank, so the same for any number of processes."""
    offsets = rng.integers(0, n_tokens - cfg.block_size + 1, size=cfg.batch_size)
    return offsets[rank::world].reshape(cfg.grad_accum, -1)


def get_batch(ids, offsets, block_size, device):
    x0 = np.stack([ids[o:o + block_size] for o in offsets]).astype(np.int64)
    return torch.from_numpy(x0).to(device, non_blocking=True)


def eval_windows(val, cfg, rank, world, num=None):
    """This rank's share of the first `num` (default --num-eval) validation blocks, cycled if there are fewer."""
    blocks = np.arange(num or cfg.num_eval) % (len(val) // cfg.block_size)
    return get_batch(val, blocks[rank::world] * cfg.block_size, cfg.block_size, "cpu")


# ----------------------------------------------------------------------------------------------------------
# Networks: DiT denoiser and recognition transformer (MDLM's DiT; docs/method.md)

def zero_init(linear):
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class Block(nn.Module):
    """DiT block with adaLN-zero: c (per sequence, or per position) sets both LayerNorms' shift and scale and
    both residual gates, zero at first (a fresh block is the identity); bidirectional attention, rotary."""

    def __init__(self, width, heads, cond_dim, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width, bias=False), nn.LayerNorm(width, bias=False)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * width, width))
        self.modulation = zero_init(nn.Linear(cond_dim, 6 * width))

    def forward(self, h, c, cos, sin):
        B, L, D = h.shape
        m = self.modulation(c)
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None] if m.dim() == 2 else m).chunk(6, -1)
        x = self.norm1(h) * (1 + scale1) + shift1
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D)
        h = h + gate1 * F.dropout(self.proj(a), self.dropout, self.training)
        x = self.norm2(h) * (1 + scale2) + shift2
        return h + gate2 * F.dropout(self.mlp(x), self.dropout, self.training)


def rotate(x, cos, sin):
    """Rotary positions (RoFormer): rotate pairs of features by an angle that grows with the position."""
    x1, x2 = x.chunk(2, -1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], -1) * sin.to(x.dtype)


class Transformer(nn.Module):
    """Token embedding and a stack of adaLN-zero blocks: the trunk of both the denoiser and the recognition."""

    def __init__(self, rows, width, layers, heads, cond_dim, dropout, length=0):
        super().__init__()
        self.embed = nn.Embedding(rows, width)
        self.position = nn.Embedding(length, width) if length else None  # --positions learned
        self.blocks = nn.ModuleList([Block(width, heads, cond_dim, dropout) for _ in range(layers)])
        half = width // heads // 2
        self.register_buffer("inv_freq", 10_000 ** (-torch.arange(half).float() / half), persistent=False)

    def forward(self, tokens, c):
        angles = torch.outer(torch.arange(tokens.shape[1], device=tokens.device).float(), self.inv_freq)
        angles = torch.cat([angles, angles], -1)
        cos, sin = angles.cos(), angles.sin()
        h = self.embed(tokens)
        if self.position is not None:
            h = h + self.position.weight[:tokens.shape[1]]
        for block in self.blocks:
            h = block(h, c, cos, sin)
        return h


class TimeEmbedding(nn.Module):
    """t -> sinusoidal features -> MLP (DiT's timestep embedder); only with --time-cond."""

    def __init__(self, cond_dim, freqs=128):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(10_000) * torch.arange(freqs) / freqs), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * freqs, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t):
        angles = 1000 * t.float()[:, None] * self.freqs
        return self.mlp(torch.cat([angles.cos(), angles.sin()], -1))


class Denoiser(nn.Module):
    """mu_theta(x0 | x_t, z): logits over the V real tokens at every position; [M] = id V has an embedding but no
    output row (the output is padded to a multiple of 64 rows for faster matmuls, then cut back to V). Every adaLN
    is driven by a learned constant (MDLM without t), + an embedding of t with --time-cond, + MLP(z) for VADD.
    The output layer and its adaLN start at zero: a fresh denoiser predicts the uniform distribution."""

    def __init__(self, V, cfg, latent_dim):
        super().__init__()
        self.vocab_size, c = V, cfg.cond_dim
        self.transformer = Transformer(V + 1, cfg.width, cfg.layers, cfg.heads, c, cfg.dropout,
                                       cfg.block_size if cfg.positions == "learned" else 0)
        self.cond = nn.Parameter(torch.randn(c))
        self.time_embed = TimeEmbedding(c) if cfg.time_cond else None
        self.latent = nn.Sequential(nn.Linear(latent_dim, c), nn.SiLU(), nn.Linear(c, c)) if latent_dim else None
        self.final_norm = nn.LayerNorm(cfg.width, bias=False)
        self.final_modulation = zero_init(nn.Linear(c, 2 * cfg.width))
        self.out = zero_init(nn.Linear(cfg.width, -(-V // 64) * 64))

    def forward(self, xt, t=None, z=None):
        c = self.cond.expand(xt.shape[0], -1)
        if self.time_embed is not None:
            c = c + self.time_embed(t)
        if self.latent is not None:
            c = c + self.latent(z)
        c = F.silu(c)
        h = self.transformer(xt, c)
        shift, scale = self.final_modulation(c)[:, None].chunk(2, -1)
        return self.out(self.final_norm(h) * (1 + scale) + shift)[..., :self.vocab_size]


class Recognition(nn.Module):
    """r_phi(z | x0, x_t) = N(mean, diag exp(logvar)): a transformer over the clean x0 whose adaLN at each
    position is driven by a learned vector times that position's mask indicator, so (x0, mask) carries what
    (x0, x_t) does; mean-pooled, or with --positions learned 8 features of every position side by side (a
    mean keeps what the window holds but not where). Its output starts at zero: r starts at the prior, KL 0."""

    def __init__(self, V, cfg):
        super().__init__()
        self.transformer = Transformer(V, cfg.rec_width, cfg.rec_layers, cfg.rec_heads, cfg.cond_dim, cfg.dropout)
        self.mask_vector = nn.Parameter(torch.randn(cfg.cond_dim))
        self.norm = nn.LayerNorm(cfg.rec_width, bias=False)
        self.readout = nn.Linear(cfg.rec_width, 8) if cfg.positions == "learned" else None  # 8 per position
        pooled = cfg.block_size * self.readout.out_features if self.readout is not None else cfg.rec_width
        self.head = zero_init(nn.Linear(pooled, 2 * cfg.latent_dim))

    def forward(self, x0, masked):
        c = F.silu(masked.unsqueeze(-1).float() * self.mask_vector)
        h = self.norm(self.transformer(x0, c))
        h = self.readout(h).flatten(1) if self.readout is not None else h.mean(1)
        return self.head(h).float().chunk(2, -1)  # mean, logvar


class Model(nn.Module):
    """The denoiser and, for VADD, the recognition model: one module, so one optimizer, EMA, checkpoint, and one
    forward (the training loss) for DDP and torch.compile. Everything calls the denoiser through denoise()."""

    def __init__(self, cfg, method, vocab_size):
        super().__init__()
        self.method, self.objective, self.train_steps = method, cfg.objective, cfg.train_steps
        self.vocab_size, self.mask_id, self.time_cond = vocab_size, vocab_size, cfg.time_cond
        self.latent_dim = cfg.latent_dim if method == "vadd" else 0
        self.schedule = common.Schedule(cfg.schedule)
        self.denoiser = Denoiser(vocab_size, cfg, self.latent_dim)
        self.recognition = Recognition(vocab_size, cfg) if self.latent_dim else None
        self.prior = common.Prior(self.latent_dim, cfg.prior, cfg.prior_components) if method == "vadd" else None

    def denoise(self, xt, t, z):
        return self.denoiser(xt, t, z)

    def forward(self, x0, kl_weight):
        if self.objective == "steps":  # the valid bound of the K-step consistency sampler (docs/method.md)
            return common.steps_loss(x0, self.denoise, self.schedule, self.mask_id, self.train_steps,
                                     self.recognition, kl_weight, self.prior)
        return delbo(self, x0, kl_weight)


# ----------------------------------------------------------------------------------------------------------
# Objective: the paper's DELBO (docs/method.md; without z, MDM's NELBO); --objective steps: Model.forward

def delbo(model, x0, kl_weight):
    """Per sequence: w(t) * (sum_masked -log mu(x0 | x_t, z) + kl_weight * KL(r(z | x0, x_t) || p(z))),
    t drawn low-discrepancy over the batch, x_t ~ q(x_t | x0), z ~ r reparameterised. Returns (loss, kl) per
    sequence in nats; the KL, not weighted by w(t), is logged to watch for posterior collapse."""
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
    "vadd_cs": ("VADD-CS (one z per sequence)", "vadd", one_latent),
}


@torch.no_grad()
def sample(model, num, T, sampler, cfg):
    """num sequences from `sampler` in T steps, --sample-batch at a time. The denoiser runs only on sequences
    that still hold a [M] and whose input (x_t or z) changed since its last call: without a time input its
    output would be the same. Returns (tokens, network evaluations per sequence)."""
    device, latent, V, L = torch.device(cfg.device), SAMPLERS[sampler][2], model.vocab_size, cfg.block_size
    out, evaluations = [], 0
    for first in range(0, num, cfg.sample_batch):
        b = min(cfg.sample_batch, num - first)
        xt = torch.full((b, L), model.mask_id, dtype=torch.long, device=device)
        logits, z, stale = None, None, torch.ones(b, dtype=torch.bool, device=device)
        for i in range(T, 0, -1):
            new_z = latent(z, b, model)
            stale |= new_z is not z or model.time_cond
            z, t = new_z, torch.full((b,), i / T, device=device)
            rows = (stale & (xt == model.mask_id).any(1)).nonzero().squeeze(1)
            for part in rows.split(common.rows_per_call(L, V)) if len(rows) else ():
                with common.autocast(device, cfg.dtype):
                    new = model.denoise(xt[part], t[part], None if z is None else z[part])
                if logits is None:  # kept in the network's dtype: b x L x V floats is the memory that counts
                    logits = torch.empty(b, L, V, dtype=new.dtype, device=device)
                logits[part] = new
            evaluations += len(rows)
            alpha_t, alpha_s = model.schedule.alpha_grid(torch.tensor([i / T, (i - 1) / T], dtype=torch.float64))
            xs = common.reverse_step(xt, logits, alpha_t, alpha_s, model.mask_id)
            stale, xt = (xs != xt).any(1), xs
        out.append(xt.cpu())
    return torch.cat(out).numpy(), evaluations / num


# ----------------------------------------------------------------------------------------------------------
# Evaluation: likelihoods on validation windows (every rank its share), sample statistics (rank 0)

@torch.no_grad()
def likelihoods(model, x0, cfg):
    """Validation figures per token, each (mean, standard error) over all ranks: the NELBO (MDM, a bound) or the
    DELBO, IW-DELBO (VADD, not bounds) and KL (per sequence), and under (sampler, T) each sampler's valid
    T-step bound at every --steps T."""
    device, L, V, rec = torch.device(cfg.device), cfg.block_size, model.mask_id, model.recognition
    values = {}
    for x in x0.split(min(cfg.eval_batch, common.rows_per_call(L, V))):
        x = x.to(device)
        with common.autocast(device, cfg.dtype):
            loss, kl = delbo(model, x, 1.0)
            batch = {"mdm_nelbo" if rec is None else "delbo": loss / L}
            if rec is not None:
                batch["kl"] = kl
                batch["iw_delbo"] = common.iw_delbo(x, model.denoise, rec, model.schedule, V, cfg.iw_samples,
                                                    prior=model.prior) / L
            for sampler in [s for s, (_, m, _) in SAMPLERS.items() if m == model.method]:
                for T in cfg.steps:
                    batch[sampler, T] = common.step_bound(x, model.denoise, model.schedule, V, T, rec, sampler,
                                                          exact=cfg.exact_bounds, prior=model.prior) / L
        for key, v in batch.items():
            values.setdefault(key, []).append(v.float().cpu())
    return {key: common.mean_se(v, device) for key, v in values.items()}


def unigram_entropy(tokens):
    """Mean over sequences of the entropy (nats) of each sequence's token histogram: low values flag the
    repetitive samples that a low generative perplexity can hide."""
    p = [np.unique(row, return_counts=True)[1] / len(row) for row in tokens]
    return float(np.mean([float(-(q * np.log(q)).sum()) for q in p]))


def load_scorer(cfg):
    """The causal LM of --eval-model: asked for by name it must load (downloaded if needed); the default, GPT-2
    Large, is used only if it is already in the Hugging Face cache (no run downloads 3.2 GB nobody asked for)."""
    name, cached_only = cfg.eval_model or "gpt2-large", cfg.eval_model is None
    if name.lower() == "none":
        return None
    try:
        import transformers
        tok = transformers.AutoTokenizer.from_pretrained(name, local_files_only=cached_only)
        lm = transformers.AutoModelForCausalLM.from_pretrained(name, local_files_only=cached_only)
    except (ImportError, OSError, ValueError) as e:
        if cached_only:
            print("gen-PPL is skipped: GPT-2 Large is not in the Hugging Face cache; --eval-model gpt2-large "
                  "downloads it (about 3.2 GB, with `pip install transformers`)")
            return None
        why = "pip install transformers" if isinstance(e, ImportError) else str(e).splitlines()[0]
        raise SystemExit(f"cannot load the scorer --eval-model {name} ({why}): give a Hugging Face name or a "
                         f"local folder, or --eval-model none")
    return tok, lm.to(cfg.device).eval()


@torch.no_grad()
def generative_perplexity(texts, scorer, device):
    """exp(corpus-mean NLL per scorer token) of the texts, retokenised by the scorer: each from its BOS (or EOS),
    so the first token is scored too; our GPT-2 EOS becomes the scorer's; texts past its context go in windows."""
    tok, lm = scorer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    context = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", 1024)
    nll, count = 0.0, 0
    for text in texts:
        text = text.replace("<|endoftext|>", tok.eos_token or "")
        ids = [start] + tok(text, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids) - 1, context - 1):
            window = torch.tensor([ids[i:i + context]], device=device)
            nll += F.cross_entropy(lm(window).logits[0, :-1].float(), window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    return math.exp(nll / max(count, 1))


def evaluate(model, method, x0, decode, scorer, cfg, rank):
    """The likelihoods (each rank its share of the windows x0), then on rank 0 every sampler of `method` at every
    --steps T into samples_<sampler>_T<T>.npy/.txt. Returns (likelihood entry, by_steps rows)."""
    common.seed_everything(cfg.seed + 1 + rank)
    figures = {} if cfg.sample_only else likelihoods(model, x0, cfg)
    entry = common.likelihood_entry(figures, cfg.iw_samples)
    for key in [k for k in ("mdm_nelbo", "delbo", "iw_delbo", "kl") if k in entry]:
        unit = {"mdm_nelbo": "nats/token (a bound)", "kl": "nats/sequence"}.get(key, "nats/token (not a bound)")
        common.print0(f"[{method}] {key} {entry[key]:.4f} +- {entry[key + '_se']:.4f} {unit}")
        if key != "kl":
            entry[key + "_ppl"] = math.exp(entry[key])
    rows = []
    if rank != 0:  # the others wait at the next collective
        return entry, rows
    common.seed_everything(cfg.seed + 2)  # every method's samples from the same noise seed
    for sampler in [s for s, (_, m, _) in SAMPLERS.items() if m == method]:
        for T in cfg.steps:
            t0 = time.time()
            tokens, nfe = sample(model, cfg.num_samples, T, sampler, cfg)
            row = {"sampler": sampler, "steps": T, "sample_seconds": time.time() - t0, "nfe": nfe}
            line = f"[{sampler}] T={T}: {cfg.num_samples} samples in {row['sample_seconds']:.1f}s"
            if (sampler, T) in figures:
                row["bound"], row["bound_se"] = figures[sampler, T]
                row["bound_ppl"] = math.exp(row["bound"])
                line += f", valid bound {row['bound']:.4f} +- {row['bound_se']:.4f}"
            texts, row["entropy"] = [decode(r) for r in tokens], unigram_entropy(tokens)
            line += f", unigram entropy {row['entropy']:.3f}"
            if scorer is not None:
                row["gen_ppl"] = generative_perplexity(texts, scorer, cfg.device)
                line += f", gen-PPL {row['gen_ppl']:.2f}"
            print(line)
            np.save(os.path.join(cfg.out_dir, f"samples_{sampler}_T{T}.npy"), tokens)
            with open(os.path.join(cfg.out_dir, f"samples_{sampler}_T{T}.txt"), "w", encoding="utf-8") as f:
                f.write(f"\n{'=' * 40}\n".join(texts) + "\n")
            rows.append(row)
    return entry, rows


# ----------------------------------------------------------------------------------------------------------
# Training

HISTORY_EVERY = 10  # iterations averaged into one point of the training curves
PEAK_BF16_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("GH200", 989),
                    ("A100", 312), ("L40S", 362), ("L4", 121), ("RTX 4090", 165)]  # dense bf16 spec sheets


def flops_per_token(model, L):
    """Training FLOPs per token (nanoGPT / PaLM appendix B): 6 x weights outside embedding tables plus
    12 x layers x width x L for attention, for every network that is trained."""
    nets = [net for net in (model.denoiser, model.recognition) if net is not None]
    weights = sum(p.numel() for net in nets for name, p in net.named_parameters() if "embed." not in name)
    widths = sum(len(net.transformer.blocks) * net.transformer.blocks[0].proj.in_features for net in nets)
    return 6 * weights + 12 * widths * L


def train(cfg, method, train_ids, val_x0, ckpt, rank, world):
    """Train one method (from `ckpt` if given): (the model with its EMA weights, its history, its summary)."""
    device = torch.device(cfg.device)
    common.seed_everything(cfg.seed)  # both methods, and every rank, start from the same weights
    model = Model(cfg, method, cfg.vocab_size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    ema = common.EMA(model, cfg.ema)
    rng = np.random.default_rng(cfg.seed)  # window offsets: one stream, the same on every rank
    if world > 1:
        torch.manual_seed(cfg.seed + 1 + rank)  # times, masks and z: different on every rank
    path, start, history = os.path.join(cfg.out_dir, f"ckpt_{method}.pt"), 0, {"train": [], "val": []}
    if ckpt is not None:
        start, history = common.resume(ckpt, model, opt, ema, rng, device, rank, world, cfg.seed + 1)
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids) if world > 1 else model
    step = torch.compile(ddp) if cfg.compile else ddp
    evaluator = copy.deepcopy(model).eval()  # holds the EMA weights for validation
    params, flops = sum(p.numel() for p in model.parameters()), flops_per_token(model, cfg.block_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS if key in name), None)  # one GPU's; None: no MFU
    common.print0(f"[{method}] {params / 1e6:.2f}M parameters, iterations {start} to {cfg.max_iters} of "
                  f"{cfg.batch_size} x {cfg.block_size} tokens on {world} process(es)")
    meter = common.Meter(method, start, cfg.max_iters, cfg.batch_size * cfg.block_size, "tokens/s")
    for it in range(start, cfg.max_iters):
        for group in opt.param_groups:
            group["lr"] = common.lr_at(it, cfg)
        lam = common.kl_weight(it, cfg.kl_warmup, cfg.kl_start) if method == "vadd" else 0.0
        offsets = window_offsets(rng, len(train_ids), cfg, rank, world)
        figures = torch.zeros(2, device=device)  # (loss, KL), the mean over the micro-steps
        for m in range(cfg.grad_accum):
            x0 = get_batch(train_ids, offsets[m], cfg.block_size, device)
            with ddp.no_sync() if world > 1 and m < cfg.grad_accum - 1 else contextlib.nullcontext():
                with common.autocast(device, cfg.dtype):
                    loss, kl = step(x0, torch.tensor(lam))  # lambda as a tensor: one compiled graph for all
                loss = loss.mean() / cfg.block_size  # nats per token
                (loss / cfg.grad_accum).backward()
            figures += torch.stack([loss.detach(), kl.detach().mean()]) / cfg.grad_accum
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        meter.add(*figures, norm)
        it += 1  # iterations done
        save = it % cfg.ckpt_interval == 0 or it == cfg.max_iters
        if it % HISTORY_EVERY == 0 or save:  # a NaN stops the run here, before the checkpoint below
            history["train"].append((it, *meter.mean("curve", it)[:2], lam))
        if it % cfg.log_interval == 0 or it == cfg.max_iters:
            loss, kl = meter.mean("line", it)[:2]
            mfu = f" | mfu {100 * flops * meter.rate(it) / world / peak:4.1f}%" if peak else ""
            common.print0(meter.line(it, loss=loss, kl=kl, **{"lambda": lam}) + mfu)
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:  # one batch per rank, EMA weights, lambda 1
            ema.copy_to(evaluator)
            with torch.no_grad(), common.autocast(device, cfg.dtype):
                x = val_x0[:min(cfg.eval_batch, common.rows_per_call(cfg.block_size, model.mask_id))].to(device)
                val = common.mean_se(delbo(evaluator, x, 1.0)[0].float().cpu() / cfg.block_size, device)[0]
            history["val"].append((it, val))
            common.print0(f"[{method}] iter {it:7d} | validation {'DELBO' if method == 'vadd' else 'NELBO'} "
                          f"{val:.4f} nats/token (EMA weights, lambda 1)")
        if save:
            state = common.training_state(model, opt, ema, it, weight_settings(cfg, method), history, rng, device)
            if rank == 0:
                common.save_atomic(state, path)
    summary = {**meter.summary(device), "params": params, "flops_per_token": flops,
               "final_kl": history["train"][-1][2] if history["train"] else None}
    if peak:  # per GPU: the global rate over the processes, against one GPU's peak
        summary["mfu"] = flops * summary["tokens_per_s"] / world / peak
    ema.copy_to(model)
    return model.eval(), history, summary


def weight_settings(cfg, method):
    """The flags that shape the trained weights: a checkpoint trained with others is refused."""
    prior = f"mixture of {cfg.prior_components}" if method == "vadd" and cfg.prior == "mixture" else None
    keys = ("data", "tokenizer", "vocab_size", "block_size", "layers", "width", "heads", "cond_dim", "time_cond",
            "schedule", "objective", "train_steps")
    keys += ("latent_dim", "rec_layers", "rec_width", "rec_heads") if method == "vadd" else ()
    positions = "learned" if cfg.positions == "learned" else None  # None: as before the flag existed
    return {"method": method, "prior": prior, "positions": positions, **{k: getattr(cfg, k) for k in keys}}


# ----------------------------------------------------------------------------------------------------------
# Main

def main(argv=None):
    cfg = parse_config(argv)
    folder = prepare_data(cfg)
    if cfg.prepare:
        print(f"--data {cfg.data} is prepared in {folder}")
        return None
    with common.distributed(cfg) as (rank, world):
        train_ids, val_ids, meta = load_data(folder, cfg)
        cfg.vocab_size, cfg.tokenizer = meta["vocab_size"], meta.get("tokenizer", "ids")
        methods = ["mdm", "vadd"] if cfg.method == "both" else [cfg.method]
        training = not (cfg.eval_only or cfg.sample_only)
        checkpoints = {m: common.check_checkpoint(cfg, m, weight_settings(cfg, m), training) for m in methods}
        if rank == 0:
            common.make_out_dir(cfg)
        scorer = load_scorer(cfg) if rank == 0 else None  # before training: a scorer asked for must load
        decode, run_start = decoder(meta), time.time()
        val_x0 = eval_windows(val_ids, cfg, rank, world)
        reference = eval_windows(val_ids, cfg, 0, 1, cfg.num_samples).numpy()  # validation text, as a reference
        data = {"entropy": unigram_entropy(reference)}
        if scorer is not None:
            data["gen_ppl"] = generative_perplexity([decode(r) for r in reference], scorer, cfg.device)
        metrics = {"unit": "nats per token", "data": data, "config": {}, "likelihood": {}, "training": {},
                   "by_steps": [], "bounds": {"mdm_nelbo": True, "delbo": False, "iw_delbo": False}}
        histories = {}
        for method in methods:
            if training:
                model, histories[method], metrics["training"][method] = train(cfg, method, train_ids, val_x0,
                                                                              checkpoints[method], rank, world)
            else:
                model = Model(cfg, method, cfg.vocab_size).to(cfg.device).eval()
                histories[method] = common.load_weights(checkpoints[method], model)
            metrics["config"][method] = dict(vars(cfg))
            metrics["likelihood"][method], rows = evaluate(model, method, val_x0, decode, scorer, cfg, rank)
            metrics["by_steps"] += rows
        if rank == 0:
            metrics["seconds"] = time.time() - run_start
            metrics = common.save_metrics(cfg.out_dir, metrics, methods, SAMPLERS)
            common.plot_training(os.path.join(cfg.out_dir, "training.png"), histories, "loss (MDM: NELBO; VADD: "
                                 "DELBO at lambda), nats/token", "VADD: KL(r || p), nats/sequence")
            common.plot_by_steps(os.path.join(cfg.out_dir, "bounds.png"), metrics["by_steps"], SAMPLERS,
                                 [("bound", "valid T-step bound, nats/token")])
            print_table(cfg, metrics)
        return metrics


def print_table(cfg, metrics):
    """Every sampler at every T side by side (the likelihoods were printed as they were computed)."""
    data = metrics["data"]
    print(f"\nvalid T-step bounds in nats per token; validation text of {cfg.data}: unigram entropy "
          f"{data['entropy']:.3f}" + (f", gen-PPL {data['gen_ppl']:.2f}" if "gen_ppl" in data else ""))
    print(f"{'sampler':8s} {'T':>5s} {'valid bound':>18s} {'gen-PPL':>9s} {'entropy':>8s} {'NFE':>7s} {'sec':>7s}")
    for r in metrics["by_steps"]:
        bound = f"{r['bound']:8.4f} +- {r['bound_se']:.4f}" if "bound" in r else f"{'-':>18s}"
        gen = f"{r['gen_ppl']:9.2f}" if "gen_ppl" in r else f"{'-':>9s}"
        print(f"{r['sampler']:8s} {r['steps']:5d} {bound} {gen} {r['entropy']:8.3f} {r['nfe']:7.2f} "
              f"{r['sample_seconds']:7.2f}")
    print(f"wrote {cfg.out_dir}/ (metrics.json, samples_*.npy/.txt, training.png, bounds.png) in "
          f"{metrics['seconds']:.0f}s")


if __name__ == "__main__":
    main()
