"""VADD vs masked diffusion (MDM) on text: from a text file to samples, generative perplexity and honest
likelihoods, on one process or many (torchrun).

A sequence is --block-size tokens. MDM's denoiser predicts every masked position independently, so a sampler
with few steps writes tokens that do not agree with each other; VADD conditions the denoiser (a DiT) on a
latent z, one per sequence, inferred in training by a recognition transformer and drawn from N(0, I) when
sampling.

    python vadd_text.py --steps 5                  # small DiT, tiny-shakespeare, one GPU (~10 minutes, estimated)
    python vadd_text.py --model tiny --tokenizer char --block-size 128 --method both --max-iters 1000 \
        --batch-size 32 --lr 1e-3 --ema 0.99 --eval-model none --steps 1,2,4,8,128   # CPU: ~12 min on 2 cores
    torchrun --nproc_per_node 8 vadd_text.py --data openwebtext --method both --max-iters 100000 --kl-warmup 100000

Read top to bottom: configuration, data, networks, objective, samplers, evaluation, training, main.
The method and its pitfalls: REFERENCE.md; shared pieces (schedule, reverse step, bounds): common.py.
"""
import argparse
import datetime
import hashlib
import importlib
import importlib.util
import json
import math
import os
import shutil
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

NAMED = ("shakespeare", "openwebtext", "lm1b")
PRESETS = {  # small = MDLM-small's DiT (12 layers, 768 wide, 12 heads, conditioning 128), z of 512 as in VADD
    "small": dict(layers=12, width=768, heads=12, cond_dim=128, latent_dim=512, dropout=0.1),
    "tiny": dict(layers=4, width=128, heads=4, cond_dim=64, latent_dim=32, dropout=0.0),
}
BLOCK_SIZE = {"openwebtext": 1024, "lm1b": 128}  # MDLM's lengths; 256 for everything else
VADD_SAMPLERS = {"cs": ["vadd_cs"], "vanilla": ["vadd"], "both": ["vadd", "vadd_cs"]}  # --sampler -> samplers
SAMPLERS = {"mdm": "MDM", "vadd": "VADD vanilla (fresh z each step)", "vadd_cs": "VADD-CS (one z per sequence)"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default="shakespeare", help="a UTF-8 text file, a folder with train.bin/val.bin/meta.json, or "
      "one of: shakespeare (tiny-shakespeare, downloaded once), openwebtext, lm1b (via `datasets`)")
    a("--tokenizer", default=None, choices=("gpt2", "char"), help="for text files: GPT-2 BPE (default) or characters")
    a("--method", default="vadd", choices=("mdm", "vadd", "both"),
      help="train MDM, VADD, or both one after the other with the same seed and data (default vadd)")
    a("--steps", default="5", help="denoising step counts to sample and bound, comma separated, e.g. 1,2,4,8")
    a("--sampler", default="cs", choices=("cs", "vanilla", "both"), help="VADD sampler: one z per sequence "
      "(cs, default), a fresh z every step (vanilla), or both")
    a("--num-samples", type=int, default=64, help="sequences drawn per sampler and step count")
    a("--sample-batch", type=int, default=32, help="sequences sampled at once (a batch x length x vocabulary cache)")
    a("--num-eval", type=int, default=512, help="validation windows for the likelihoods (blocks cycled if fewer)")
    a("--eval-batch", type=int, default=32, help="windows per evaluation call")
    a("--iw-samples", type=int, default=16, help="draws of z for the importance-weighted DELBO")
    a("--exact-bounds", action="store_true", help="sum all T steps of each T-step bound (T calls per window) "
      "instead of the unbiased one-random-step estimate (one call)")
    a("--eval-model", default=None, help="causal LM scoring the samples' generative perplexity, a Hugging Face "
      "name or local folder (needs `transformers`); 'none' skips it (default gpt2-large when `transformers` "
      "is installed, else skipped with a note)")
    a("--eval-only", action="store_true", help="no training: evaluate and sample from ckpt_<method>.pt")
    a("--sample-only", action="store_true", help="no training and no likelihoods: only sample from the checkpoint")
    # budget and optimisation (MDLM: AdamW, lr 3e-4, betas 0.9/0.999, no weight decay, EMA, clip 1)
    a("--max-iters", type=int, default=5000, help="training iterations per method")
    a("--batch-size", type=int, default=64, help="sequences per iteration, over all processes and micro-steps")
    a("--grad-accum", type=int, default=1, help="micro-steps per iteration (gradient accumulation)")
    a("--block-size", type=int, default=None, help="tokens per sequence (default 1024 openwebtext, 128 lm1b, else 256)")
    a("--lr", type=float, default=3e-4, help="peak learning rate of AdamW")
    a("--warmup-iters", type=int, default=200, help="linear learning-rate warm-up, then cosine decay to lr/10")
    a("--grad-clip", type=float, default=1.0, help="gradient-norm clipping")
    a("--ema", type=float, default=0.999, help="EMA decay of the weights used for evaluation (0 = off; "
      "MDLM uses 0.9999 over 1M steps: keep 1/(1 - ema) well under --max-iters)")
    # model (a preset, every size overridable)
    a("--model", default="small", choices=tuple(PRESETS), help="size preset (small = MDLM-small, tiny = CPU)")
    for name, what in [("layers", "transformer blocks"), ("width", "hidden width"), ("heads", "attention heads"),
                       ("cond-dim", "width of the adaLN conditioning vector"), ("latent-dim", "size of z (VADD)")]:
        a(f"--{name}", type=int, default=None, help=f"denoiser {what} (default from --model)")
    a("--dropout", type=float, default=None, help="dropout in the blocks (default from --model)")
    for name in ("layers", "width", "heads"):
        a(f"--rec-{name}", type=int, default=None, help=f"recognition model {name} (default: the denoiser's)")
    a("--time-cond", action="store_true", help="give the denoiser t (MDLM keeps it off; it stops the samplers "
      "from reusing the denoiser output)")
    a("--kl-warmup", type=int, default=None, help="iterations over which lambda rises to 1 (default max-iters/2; "
      "the paper uses 100k on text)")
    a("--kl-start", type=float, default=0.0, help="lambda at iteration 0")
    a("--schedule", default="loglinear", choices=common.SCHEDULES, help="masking schedule alpha(t) (MDLM: loglinear)")
    a("--objective", default="delbo", choices=("delbo", "steps"),
      help="delbo: the paper's continuous-time DELBO (MDM: NELBO); steps: the valid bound of the K-step "
           "consistency sampler (MDM: of the K-step sampler), REFERENCE.md section 3b (default delbo)")
    a("--train-steps", default="1,2,4,8", help="budgets K for --objective steps, one drawn per sequence")
    # run
    a("--seed", type=int, default=0, help="seeds training, data order and sampling (same for both methods)")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N (torchrun: each process takes its local GPU)")
    a("--dtype", default=None, choices=("float32", "bfloat16"), help="autocast dtype (default bf16 on CUDA)")
    a("--compile", default=None, action=argparse.BooleanOptionalAction, help="torch.compile (default on CUDA)")
    a("--out-dir", default=None, help="output folder (default out/text/<data name>)")
    a("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "vadd", "text"),
      help="where downloads and tokenised data are kept")
    a("--resume", action="store_true", help="continue from ckpt_<method>.pt in --out-dir")
    a("--log-interval", type=int, default=100, help="iterations between progress lines")
    a("--eval-interval", type=int, default=1000, help="iterations between validation losses (one batch)")
    a("--ckpt-interval", type=int, default=1000, help="iterations between checkpoints (and one at the end)")
    return p


def parse_config(argv=None):
    """Parse and check every flag before anything is written; a bad value stops with one sentence."""
    p = build_parser()
    cfg = p.parse_args(argv)
    for flag in ("steps", "train_steps"):
        try:
            counts = [int(s) for s in str(getattr(cfg, flag)).split(",") if s.strip()]
        except ValueError:
            p.error(f"--{flag.replace('_', '-')} {getattr(cfg, flag)!r}: give whole numbers separated by commas, e.g. 1,2,4,8")
        if not counts or min(counts) < 1:
            p.error(f"--{flag.replace('_', '-')} {counts}: every step count must be a positive whole number")
        setattr(cfg, flag, counts)
    for key, value in PRESETS[cfg.model].items():
        setattr(cfg, key, value if getattr(cfg, key) is None else getattr(cfg, key))
    for key in ("layers", "width", "heads"):
        setattr(cfg, f"rec_{key}", getattr(cfg, f"rec_{key}") or getattr(cfg, key))
    name = cfg.data if cfg.data in NAMED else None
    cfg.block_size = cfg.block_size or BLOCK_SIZE.get(name, 256)
    for key, low in [("num_samples", 1), ("sample_batch", 1), ("num_eval", 1), ("eval_batch", 1), ("iw_samples", 1),
                     ("max_iters", 0), ("batch_size", 1), ("grad_accum", 1), ("block_size", 2), ("warmup_iters", 0),
                     ("layers", 1), ("width", 2), ("heads", 1), ("cond_dim", 1), ("latent_dim", 1), ("rec_layers", 1),
                     ("rec_width", 2), ("rec_heads", 1), ("log_interval", 1), ("eval_interval", 1),
                     ("ckpt_interval", 1)]:
        if getattr(cfg, key) < low:
            p.error(f"--{key.replace('_', '-')} must be at least {low}, got {getattr(cfg, key)}")
    for prefix in ("", "rec_"):
        width, heads = getattr(cfg, prefix + "width"), getattr(cfg, prefix + "heads")
        if width % heads or (width // heads) % 2:
            p.error(f"--{prefix.replace('_', '-')}width {width} must split into --{prefix.replace('_', '-')}heads "
                    f"{heads} heads of even size (rotary positions rotate pairs)")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % (world * cfg.grad_accum):
        p.error(f"--batch-size {cfg.batch_size} must be a multiple of processes x --grad-accum = {world * cfg.grad_accum}")
    if cfg.num_eval < world:
        p.error(f"--num-eval {cfg.num_eval} must be at least the number of processes, {world}")
    if cfg.lr <= 0 or cfg.grad_clip <= 0 or not 0 <= cfg.ema < 1 or not 0 <= cfg.kl_start <= 1 or not 0 <= cfg.dropout < 1:
        p.error("--lr and --grad-clip must be positive, --ema and --dropout in [0, 1), --kl-start in [0, 1]")
    if cfg.eval_only and cfg.sample_only:
        p.error("--eval-only already samples: give one of --eval-only and --sample-only")
    # the data: a name, a prepared folder or a non-empty text file
    if name is None and not os.path.exists(cfg.data):
        p.error(f"--data {cfg.data!r}: no such file or folder, and not one of {', '.join(NAMED)}")
    if os.path.isdir(cfg.data) and name is None:
        missing = [f for f in ("train.bin", "val.bin", "meta.json") if not os.path.isfile(os.path.join(cfg.data, f))]
        if missing:
            p.error(f"--data {cfg.data!r}: the folder lacks {', '.join(missing)} (a prepared folder holds train.bin, "
                    f"val.bin and meta.json)")
    elif name is None and os.path.getsize(cfg.data) == 0:
        p.error(f"--data {cfg.data!r} is empty: give a text file with some text in it")
    if cfg.tokenizer and (name in ("openwebtext", "lm1b") or os.path.isdir(cfg.data)):
        p.error(f"--tokenizer is for text files: --data {cfg.data} comes with its own tokens; drop the flag")
    cfg.tokenizer = cfg.tokenizer or "gpt2"
    if name in ("openwebtext", "lm1b") and not os.path.exists(prepared_folder(cfg)) and not have("datasets"):
        p.error(f"--data {name} needs the `datasets` package to download it: pip install datasets")
    if name == "lm1b" and not have("transformers"):
        p.error("--data lm1b uses the bert-base-uncased tokenizer (MDLM) from `transformers`: pip install transformers")
    if cfg.eval_model is None:  # the default: score when the optional package is there, never fail for it
        cfg.eval_model = "gpt2-large" if have("transformers") else "none"
        if cfg.eval_model == "none":
            print("note: generative perplexity is skipped: it needs `pip install transformers` (and GPT-2 Large)")
    cfg.eval_model = None if cfg.eval_model.lower() == "none" else cfg.eval_model
    if cfg.eval_model and not have("transformers"):
        p.error(f"--eval-model {cfg.eval_model} needs the `transformers` package: pip install transformers "
                f"(or pass --eval-model none to skip generative perplexity)")
    try:
        cfg.device = str(common.pick_device(cfg.device))
    except (ValueError, RuntimeError) as e:
        p.error(str(e))
    cuda = cfg.device.startswith("cuda")
    cfg.dtype = cfg.dtype or ("bfloat16" if cuda else "float32")
    cfg.compile = cuda if cfg.compile is None else cfg.compile
    cfg.kl_warmup = cfg.max_iters // 2 if cfg.kl_warmup is None else cfg.kl_warmup
    data_name = name or os.path.splitext(os.path.basename(os.path.normpath(cfg.data)))[0]
    cfg.out_dir = cfg.out_dir or os.path.join("out", "text", data_name)
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


def have(package):
    return importlib.util.find_spec(package) is not None


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
HUB_NAMES = {"openwebtext": "Skylion007/openwebtext", "lm1b": "billion-word-benchmark/lm1b"}
OWT_HELDOUT = 100_000  # MDLM holds out the last 100k OpenWebText documents for validation
GPT2_EOS = 50256


def gpt2_encoding():
    """tiktoken's GPT-2 BPE (tiktoken downloads it at first use; the tests build it from a local ranks file)."""
    return need("tiktoken").get_encoding("gpt2")


def hf_tokenizer(name):
    return need("transformers").AutoTokenizer.from_pretrained(name)


def load_hf_dataset(name):
    return need("datasets").load_dataset(HUB_NAMES[name])


def prepared_folder(cfg):
    """Where --data's tokens are cached: text files by content hash, so an edited file is tokenised again."""
    if cfg.data in ("openwebtext", "lm1b"):
        return os.path.join(cfg.cache_dir, cfg.data)
    if os.path.isdir(cfg.data):
        return cfg.data
    if cfg.data == "shakespeare":  # a fixed text, checked by its size when downloaded
        return os.path.join(cfg.cache_dir, f"shakespeare-{cfg.tokenizer}")
    with open(cfg.data, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(cfg.data))[0]
    return os.path.join(cfg.cache_dir, f"{stem}-{cfg.tokenizer}-{digest}")


def download_shakespeare(cache_dir):
    path = os.path.join(cache_dir, "shakespeare.txt")
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        print(f"downloading tiny-shakespeare from {SHAKESPEARE_URL}")
        tmp = f"{path}.tmp{os.getpid()}"
        urllib.request.urlretrieve(SHAKESPEARE_URL, tmp)
        if os.path.getsize(tmp) != SHAKESPEARE_BYTES:
            size = os.path.getsize(tmp)
            os.remove(tmp)
            raise SystemExit(f"the tiny-shakespeare download has {size} bytes, not {SHAKESPEARE_BYTES}: it is "
                             f"truncated or changed; run again, or pass --data with your own copy")
        os.replace(tmp, path)
    return path


def write_folder(folder, splits, meta):
    """Write train.bin / val.bin / meta.json into a temporary folder, then rename: never a half-written cache."""
    tmp = f"{folder}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    for split, chunks in splits.items():
        with open(os.path.join(tmp, f"{split}.bin"), "wb") as f:
            for ids in chunks:  # an iterable of id arrays, so corpora larger than memory stream through
                f.write(np.asarray(ids, dtype=np.uint16).tobytes())
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp)


def prepare_text_file(path, folder, tokenizer):
    """Tokenise a UTF-8 text file (GPT-2 BPE or characters); the last 10% of tokens is validation."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise SystemExit(f"--data {path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it first")
    if tokenizer == "char":
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)  # one code point per character
        alphabet = np.unique(codes)
        if len(alphabet) > 65536:
            raise SystemExit(f"--data {path} has {len(alphabet)} distinct characters, more than uint16 ids hold")
        ids = np.searchsorted(alphabet, codes)
        meta = {"vocab_size": len(alphabet), "tokenizer": "char", "alphabet": "".join(map(chr, alphabet))}
    else:
        ids = np.array(gpt2_encoding().encode_ordinary(text), np.uint16)  # "<|endoftext|>" in text is plain text
        meta = {"vocab_size": GPT2_EOS + 1, "tokenizer": "gpt2"}
    cut = int(0.9 * len(ids))
    meta["source"] = os.path.abspath(path)
    write_folder(folder, {"train": [ids[:cut]], "val": [ids[cut:]]}, meta)


def prepare_openwebtext(folder):
    """MDLM's convention: GPT-2 tokens, every document followed by EOS (<|endoftext|>), the documents joined;
    the last 100k documents are validation. Streams in shards, so the 8M documents need not fit in memory."""
    docs = load_hf_dataset("openwebtext")
    docs = docs["train"] if hasattr(docs, "keys") else docs
    if len(docs) <= OWT_HELDOUT:
        raise SystemExit(f"openwebtext has {len(docs)} documents, not more than the {OWT_HELDOUT} held out")
    enc, cut = gpt2_encoding(), len(docs) - OWT_HELDOUT

    def tokens(lo, hi, shard=4096):
        for i in range(lo, hi, shard):
            for ids in enc.encode_ordinary_batch(docs[i:min(hi, i + shard)]["text"]):
                yield ids + [GPT2_EOS]

    write_folder(folder, {"train": tokens(0, cut), "val": tokens(cut, len(docs))},
                 {"vocab_size": GPT2_EOS + 1, "tokenizer": "gpt2", "source": "openwebtext"})


def prepare_lm1b(folder):
    """MDLM's wrapped LM1B (lm1b-wrap, as in MDLM's and DUO's code): bert-base-uncased tokens, each sentence
    as [CLS] ... [SEP], the sentences joined and cut into windows of 128; validation = the test split.
    MDLM's detokeniser is skipped: BERT's tokeniser splits punctuation, so the ids come out the same."""
    splits, tok = load_hf_dataset("lm1b"), hf_tokenizer("bert-base-uncased")

    def tokens(split, shard=4096):
        for i in range(0, len(split), shard):
            yield from tok(split[i:i + shard]["text"])["input_ids"]  # [CLS] ... [SEP] added by the tokeniser

    write_folder(folder, {"train": tokens(splits["train"]), "val": tokens(splits["test"])},
                 {"vocab_size": tok.vocab_size, "tokenizer": "bert-base-uncased", "source": "lm1b"})


def load_data(cfg, rank):
    """Prepare --data once (rank 0; the others wait), then map train.bin and val.bin. Returns
    (train, val, meta) with train/val read-only uint16 arrays."""
    folder = prepared_folder(cfg)
    if rank == 0 and not os.path.exists(folder):
        if cfg.data in ("openwebtext", "lm1b"):
            print(f"preparing {cfg.data} into {folder} (once)")
            (prepare_openwebtext if cfg.data == "openwebtext" else prepare_lm1b)(folder)
        else:
            path = download_shakespeare(cfg.cache_dir) if cfg.data == "shakespeare" else cfg.data
            prepare_text_file(path, folder, cfg.tokenizer)
    if dist.is_initialized():
        dist.barrier()
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    V = meta.get("vocab_size")
    if not isinstance(V, int) or not 1 <= V <= 65536:
        raise SystemExit(f"{folder}/meta.json: vocab_size must be a whole number from 1 to 65536 (uint16 ids), got {V!r}")
    splits = []
    for split in ("train", "val"):
        path = os.path.join(folder, f"{split}.bin")
        if os.path.getsize(path) % 2:
            raise SystemExit(f"{path} has an odd number of bytes: it is not uint16 token ids")
        ids = np.memmap(path, dtype=np.uint16, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint16)
        if folder == cfg.data:  # a folder we did not write: check every id once
            top = max((int(ids[i:i + 2**24].max()) for i in range(0, len(ids), 2**24)), default=-1)
            if top >= V:
                raise SystemExit(f"{path} holds token id {top}, not below vocab_size {V} of meta.json: fix the "
                                 f"ids or the vocab_size")
        if len(ids) < cfg.block_size:
            raise SystemExit(f"--block-size {cfg.block_size} is larger than the {split} split of {cfg.data} "
                             f"({len(ids)} tokens): choose a smaller --block-size or give more text")
        splits.append(ids)
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


def window_offsets(rng, n_tokens, cfg, world):
    """This iteration's windows, drawn from one stream shared by every rank: shape (grad_accum, world,
    micro-batch), so each rank reads its own windows and the global batch is the same for any world size."""
    offsets = rng.integers(0, n_tokens - cfg.block_size + 1, size=cfg.batch_size)
    return offsets.reshape(cfg.grad_accum, world, -1)


def get_batch(ids, offsets, block_size, device):
    x0 = np.stack([ids[o:o + block_size] for o in offsets]).astype(np.int64)
    return torch.from_numpy(x0).to(device, non_blocking=True)


def eval_windows(val, cfg, rank, world):
    """The first --num-eval consecutive blocks of the validation split (cycled if fewer), this rank's share."""
    blocks = np.arange(cfg.num_eval) % (len(val) // cfg.block_size)
    return get_batch(val, blocks[rank::world] * cfg.block_size, cfg.block_size, "cpu")


# ----------------------------------------------------------------------------------------------------------
# Networks: DiT denoiser and recognition transformer (MDLM's DiT; REFERENCE.md section 2)

def zero_init(linear):
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class Block(nn.Module):
    """DiT block with adaLN-zero: the conditioning c (one vector per sequence, or per position) sets the shift
    and scale of both LayerNorms and the gates of both residual branches; zero-initialised, so a fresh block is
    the identity. Bidirectional attention with rotary positions."""

    def __init__(self, width, heads, cond_dim, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width, bias=False), nn.LayerNorm(width, bias=False)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
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

    def __init__(self, rows, width, layers, heads, cond_dim, dropout):
        super().__init__()
        self.embed = nn.Embedding(rows, width)
        self.blocks = nn.ModuleList([Block(width, heads, cond_dim, dropout) for _ in range(layers)])
        half = width // heads // 2
        self.register_buffer("inv_freq", 10_000 ** (-torch.arange(half).float() / half), persistent=False)

    def forward(self, tokens, c):
        angles = torch.outer(torch.arange(tokens.shape[1], device=tokens.device).float(), self.inv_freq)
        angles = torch.cat([angles, angles], -1)
        cos, sin = angles.cos(), angles.sin()
        h = self.embed(tokens)
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
    """mu_theta(x0 | x_t, z): logits over the V real tokens at every position. [M] = id V has an embedding but
    no output row, and the output is padded to a multiple of 64 rows (faster matmuls) and cut back to V, so
    neither [M] nor a padding row can be predicted. The conditioning vector that drives every adaLN is a learned
    constant (MDLM without time conditioning), plus an embedding of t with --time-cond, plus MLP(z) for VADD.
    The output layer and its adaLN start at zero: a fresh denoiser predicts the uniform distribution."""

    def __init__(self, V, cfg, latent_dim):
        super().__init__()
        self.vocab_size, c = V, cfg.cond_dim
        self.transformer = Transformer(V + 1, cfg.width, cfg.layers, cfg.heads, c, cfg.dropout)
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
    (x0, x_t) does; mean-pooled. Its output starts at zero: r starts at the prior and the KL at 0."""

    def __init__(self, V, cfg):
        super().__init__()
        self.transformer = Transformer(V, cfg.rec_width, cfg.rec_layers, cfg.rec_heads, cfg.cond_dim, cfg.dropout)
        self.mask_vector = nn.Parameter(torch.randn(cfg.cond_dim))
        self.norm = nn.LayerNorm(cfg.rec_width, bias=False)
        self.head = zero_init(nn.Linear(cfg.rec_width, 2 * cfg.latent_dim))

    def forward(self, x0, masked):
        c = F.silu(masked.unsqueeze(-1).float() * self.mask_vector)
        h = self.norm(self.transformer(x0, c)).mean(1)
        mean, logvar = self.head(h).float().chunk(2, -1)
        return mean, logvar


class Model(nn.Module):
    """The denoiser and, for VADD, the recognition model: one module, so one optimizer, EMA, checkpoint, and
    one forward (the training objective) for DDP and torch.compile."""

    def __init__(self, cfg, method, vocab_size):
        super().__init__()
        self.vocab_size, self.schedule = vocab_size, common.Schedule(cfg.schedule)
        self.objective, self.train_steps = cfg.objective, cfg.train_steps
        self.latent_dim = cfg.latent_dim if method == "vadd" else 0
        self.denoiser = Denoiser(vocab_size, cfg, self.latent_dim)
        self.recognition = Recognition(vocab_size, cfg) if self.latent_dim else None

    def forward(self, x0, kl_weight):
        if self.objective == "steps":  # the valid bound of the K-step consistency sampler (REFERENCE.md 3b)
            return common.steps_loss(x0, self.denoise, self.schedule, self.vocab_size, self.train_steps,
                                     self.recognition, kl_weight)
        return delbo(self, x0, kl_weight)

    def denoise(self, xt, t, z):  # the signature common.py's estimators call
        return self.denoiser(xt, t, z)


# ----------------------------------------------------------------------------------------------------------
# Objective: the paper's DELBO (REFERENCE.md section 2; MDM's NELBO is the same without z). --objective steps
# trains the valid bound of the K-step sampler instead (section 3b), common.steps_loss

def delbo(model, x0, kl_weight):
    """Per sequence: w(t) * (sum_masked -log mu(x0 | x_t, z) + kl_weight * KL(r(z | x0, x_t) || N(0, I))),
    t drawn low-discrepancy over the batch, x_t ~ q(x_t | x0), z ~ r reparameterised. Returns (loss, kl) per
    sequence in nats; the KL, not weighted by w(t), is logged to watch for posterior collapse."""
    V, schedule = model.vocab_size, model.schedule
    t = common.sample_times(x0.shape[0], schedule.eps, x0.device)
    xt = common.forward_mask(x0, schedule.alpha(t), V)
    masked = xt == V
    z, kl = None, torch.zeros(x0.shape[0], device=x0.device)
    if model.recognition is not None:
        mean, logvar = model.recognition(x0, masked)
        z, kl = common.sample_latent(mean, logvar), common.gaussian_kl(mean, logvar)
    nll = common.masked_nll(model.denoiser(xt, t, z), x0, masked)
    return schedule.weight(t) * (nll + kl_weight * kl), kl


# ----------------------------------------------------------------------------------------------------------
# Samplers: start from all-[M], T reverse steps on the grid t_i = i/T (common.reverse_step, float64 draws)

@torch.no_grad()
def sample(model, num, T, sampler, cfg):
    """sampler 'mdm': no z; 'vadd' (vanilla): a fresh z ~ N(0, I) at every step; 'vadd_cs' (consistency): one z
    per sequence for all steps. The denoiser runs only on sequences that still hold a [M] and, for MDM and
    VADD-CS without time conditioning, whose input changed since its last call (the output is then the
    same); the vanilla sampler's new z always needs a call. Returns (tokens, network evaluations per sequence)."""
    device, V, L = torch.device(cfg.device), model.vocab_size, cfg.block_size
    reuse = sampler != "vadd" and not cfg.time_cond
    out, evaluations = [], 0
    for first in range(0, num, cfg.sample_batch):
        b = min(cfg.sample_batch, num - first)
        xt = torch.full((b, L), V, dtype=torch.long, device=device)
        z = torch.randn(b, model.latent_dim, device=device) if sampler == "vadd_cs" else None
        logits, stale = None, torch.ones(b, dtype=torch.bool, device=device)
        for i in range(T, 0, -1):
            if sampler == "vadd":
                z = torch.randn(b, model.latent_dim, device=device)
            rows = ((xt == V).any(1) & (stale if reuse else True)).nonzero().squeeze(1)
            for part in rows.split(common.rows_per_call(L, V)) if len(rows) else ():
                t = torch.full((len(part),), i / T, device=device)
                with common.autocast(device, cfg.dtype):
                    new = model.denoise(xt[part], t, None if z is None else z[part])
                logits = logits if logits is not None else torch.empty(b, L, V, dtype=new.dtype, device=device)
                logits[part] = new  # kept in the network's dtype: b x L x V floats is the memory that counts
            evaluations += len(rows)
            alpha_t, alpha_s = model.schedule.alpha_grid(torch.tensor([i / T, (i - 1) / T], dtype=torch.float64))
            xs = common.reverse_step(xt, logits, alpha_t, alpha_s, V)
            stale, xt = (xs != xt).any(1), xs
        out.append(xt.cpu())
    return torch.cat(out).numpy(), evaluations / num


# ----------------------------------------------------------------------------------------------------------
# Evaluation: likelihoods on validation windows (all ranks), sample statistics (rank 0)

def mean_se(values, device):
    """Mean and standard error of per-window values gathered over all ranks."""
    x = torch.cat(values).double()
    s = torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(len(x)), dtype=torch.float64)]).to(device)
    if dist.is_initialized():
        dist.all_reduce(s)
    mean = s[0] / s[2]
    var = (s[1] / s[2] - mean ** 2) * s[2] / (s[2] - 1) if s[2] > 1 else torch.zeros_like(mean)
    return float(mean), float(var.clamp_min(0).sqrt() / s[2].sqrt())


@torch.no_grad()
def likelihoods(model, x0_all, cfg, samplers):
    """Validation figures in nats per token, each with its standard error: the continuous-time NELBO (MDM, a
    bound) or the DELBO and its importance-weighted version (VADD; comparison figures, not bounds), the KL of
    r to the prior (nats per sequence), and the valid T-step bound of every sampler at every step count."""
    device, L, V, rec = torch.device(cfg.device), cfg.block_size, model.vocab_size, model.recognition
    values = {}
    for x0 in x0_all.split(min(cfg.eval_batch, common.rows_per_call(L, V))):
        x0 = x0.to(device)
        with common.autocast(device, cfg.dtype):
            loss, kl = delbo(model, x0, 1.0)
            batch = {"mdm_nelbo" if rec is None else "delbo": loss / L}
            if rec is not None:
                batch["kl"] = kl
                batch["iw_delbo"] = common.iw_delbo(x0, model.denoise, rec, model.schedule, V, cfg.iw_samples) / L
            for sampler in samplers:
                for T in cfg.steps:
                    batch[(sampler, T)] = common.step_bound(x0, model.denoise, model.schedule, V, T, rec, sampler,
                                                            exact=cfg.exact_bounds) / L
        for key, v in batch.items():
            values.setdefault(key, []).append(v.float().cpu())
    return {key: mean_se(v, device) for key, v in values.items()}


def unigram_entropy(tokens):
    """Mean over sequences of the entropy (nats) of each sequence's token histogram: low values flag the
    repetitive samples that a low generative perplexity can hide."""
    out = []
    for row in tokens:
        p = np.unique(row, return_counts=True)[1] / len(row)
        out.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(out))


def load_scorer(name, device):
    transformers = need("transformers")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(name)
        lm = transformers.AutoModelForCausalLM.from_pretrained(name).to(device).eval()
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot load the scorer --eval-model {name} ({e.__class__.__name__}): give a Hugging Face "
                         f"name or a local folder, or --eval-model none; checkpoints already written are kept")
    return tok, lm


@torch.no_grad()
def generative_perplexity(texts, scorer, device):
    """exp(corpus-mean NLL per scorer token) of the decoded samples, retokenised by the scorer. Each text starts
    with the scorer's BOS (or EOS) so its first token is scored too; our GPT-2 EOS becomes the scorer's EOS and
    other special tokens were dropped when decoding; texts longer than the scorer's context go in windows."""
    tok, lm = scorer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    context = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", 1024)
    nll, count = 0.0, 0
    for text in texts:
        text = text.replace("<|endoftext|>", tok.eos_token or "")
        ids = [start] + tok(text, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids) - 1, context - 1):
            window = torch.tensor([ids[i:i + context]], device=device)
            logits = lm(window).logits.float()
            nll += F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    return math.exp(nll / max(count, 1))


# ----------------------------------------------------------------------------------------------------------
# Training

def lr_at(it, cfg):
    lr = cfg.lr * min(1.0, (it + 1) / max(1, cfg.warmup_iters))
    return lr * (0.55 + 0.45 * math.cos(math.pi * it / max(1, cfg.max_iters)))  # cosine decay to lr / 10


PEAK_BF16_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("GH200", 989),
                    ("A100", 312), ("L40S", 362), ("L4", 121), ("RTX 4090", 165)]  # dense bf16 spec sheets


def flops_per_token(model, L):
    """Training FLOPs per token (nanoGPT / PaLM appendix B): 6 x weights outside embedding tables plus
    12 x layers x width x L for attention, for every network that is trained."""
    total = 0
    for net in (model.denoiser, model.recognition):
        if net is not None:
            n = sum(p.numel() for name, p in net.named_parameters() if "embed." not in name)
            blocks = net.transformer.blocks
            total += 6 * n + 12 * len(blocks) * blocks[0].proj.in_features * L
    return total


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def train(cfg, method, train_ids, val_x0, ckpt, rank, world):
    """Train one method, from a checkpoint if given; returns the model with its EMA weights loaded, the
    loss history and a summary (throughput, final KL)."""
    device = torch.device(cfg.device)
    common.seed_everything(cfg.seed)  # both methods, and every rank, start from the same weights
    model = Model(cfg, method, cfg.vocab_size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    ema = common.EMA(model, cfg.ema)
    rng = np.random.default_rng(cfg.seed)  # window offsets: one stream, the same on every rank
    torch.manual_seed(cfg.seed + rank)  # times and masks: different on every rank
    ckpt_path = os.path.join(cfg.out_dir, f"ckpt_{method}.pt")
    start, history = 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        ema.load_state_dict(ckpt["ema"])
        rng.bit_generator.state = ckpt["rng"]
        if len(ckpt["torch_rng"]) == world:
            torch.set_rng_state(ckpt["torch_rng"][rank][0])
            if device.type == "cuda" and ckpt["torch_rng"][rank][1] is not None:
                torch.cuda.set_rng_state(ckpt["torch_rng"][rank][1], device)
        start, history = ckpt["iter"], [tuple(h) for h in ckpt["history"]]
        log0(rank, f"[{method}] resumed from {ckpt_path} at iteration {start}")
    step_fn = torch.compile(model) if cfg.compile else model
    if world > 1:
        step_fn = nn.parallel.DistributedDataParallel(step_fn, device_ids=[device.index] if device.type == "cuda" else None)
    tokens_per_iter, flops, peak = cfg.batch_size * cfg.block_size, flops_per_token(model, cfg.block_size), peak_flops(device)
    log0(rank, f"[{method}] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {cfg.max_iters} "
               f"iterations of {cfg.batch_size} x {cfg.block_size} tokens on {world} process(es)")
    t0 = time.time()
    curve, log = torch.zeros(4, device=device), torch.zeros(4, device=device)  # sums of (loss, KL, grad norm, n)
    for it in range(start, cfg.max_iters):
        for group in opt.param_groups:
            group["lr"] = lr_at(it, cfg)
        lam = common.kl_weight(it, cfg.kl_warmup, cfg.kl_start) if method == "vadd" else 0.0
        offsets = window_offsets(rng, len(train_ids), cfg, world)
        kl_weight = torch.tensor(lam)  # a 0-d CPU tensor: compiled once for every lambda, no copy to the GPU
        stats = torch.zeros(4, device=device)
        for m in range(cfg.grad_accum):
            x0 = get_batch(train_ids, offsets[m, rank], cfg.block_size, device)
            if world > 1:
                step_fn.require_backward_grad_sync = m == cfg.grad_accum - 1  # all-reduce once per iteration
            with common.autocast(device, cfg.dtype):
                loss, kl = step_fn(x0, kl_weight)
            loss = loss.mean() / cfg.block_size  # nats per token
            (loss / cfg.grad_accum).backward()
            stats[:2] += torch.stack([loss.detach(), kl.detach().mean()]) / cfg.grad_accum
        stats[2:] = torch.stack([torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip), stats.new_ones(())])
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        curve += stats  # no .item() here: the GPU runs ahead, and syncs only every few iterations
        log += stats
        point = (it + 1) % HISTORY_EVERY == 0 or it == cfg.max_iters - 1
        save = (it + 1) % cfg.ckpt_interval == 0 or it == cfg.max_iters - 1
        if point or save:  # every loss and gradient norm is checked before any checkpoint holds its update
            loss_sum, kl_sum, norm_sum, n = curve.tolist()
            if not math.isfinite(loss_sum + norm_sum):
                raise SystemExit(f"[{method}] the loss or its gradient became {loss_sum + norm_sum} by iteration "
                                 f"{it + 1}: lower --lr (now {cfg.lr}); checkpoints already written are kept")
            if point:
                history.append((it + 1, loss_sum / n, kl_sum / n, lam))
                curve.zero_()
        if (it + 1) % cfg.log_interval == 0 or it == cfg.max_iters - 1:
            loss_sum, kl_sum, _, n = log.tolist()
            log.zero_()
            speed = (it + 1 - start) / (time.time() - t0)
            mfu = f" | mfu {100 * flops * tokens_per_iter * speed / peak:4.1f}%" if peak else ""
            log0(rank, f"[{method}] iter {it + 1:6d}/{cfg.max_iters} | loss {loss_sum / n:6.3f} | kl {kl_sum / n:7.3f} "
                       f"| lambda {lam:4.2f} | {tokens_per_iter * speed:8.0f} tok/s{mfu} | "
                       f"eta {(cfg.max_iters - it - 1) / speed:6.0f}s")
        if (it + 1) % cfg.eval_interval == 0 and it < cfg.max_iters - 1:
            log0(rank, f"[{method}] iter {it + 1:6d} | validation loss (lambda 1, current weights, one batch) "
                       f"{validation_loss(model, val_x0, cfg):.3f} nats/token")
        if save:
            rng_states = [(torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)]
            if world > 1:
                gathered = [None] * world
                dist.all_gather_object(gathered, rng_states[0])
                rng_states = gathered
            if rank == 0:
                common.save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                    "iter": it + 1, "config": arch_config(cfg, method), "history": history,
                                    "rng": rng.bit_generator.state, "torch_rng": rng_states}, ckpt_path)
    seconds = time.time() - t0
    summary = {"iters": cfg.max_iters - start, "seconds": seconds, "params": sum(p.numel() for p in model.parameters()),
               "tokens_per_s": tokens_per_iter * (cfg.max_iters - start) / seconds if cfg.max_iters > start else None,
               "final_kl": history[-1][2] if history else None, "flops_per_token": flops}
    if peak and summary["tokens_per_s"]:
        summary["mfu"] = flops * summary["tokens_per_s"] / peak
    if device.type == "cuda":
        summary["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    ema.copy_to(model)
    return model.eval(), history, summary


@torch.no_grad()
def validation_loss(model, val_x0, cfg):
    model.eval()
    with common.autocast(torch.device(cfg.device), cfg.dtype):
        n = min(cfg.eval_batch, common.rows_per_call(cfg.block_size, model.vocab_size))
        loss = delbo(model, val_x0[:n].to(cfg.device), 1.0)[0].mean() / cfg.block_size
    model.train()
    return loss.item()


HISTORY_EVERY = 10  # iterations averaged into one point of the training curves

ARCH_KEYS = ("data", "tokenizer", "vocab_size", "block_size", "layers", "width", "heads", "cond_dim", "latent_dim",
             "rec_layers", "rec_width", "rec_heads", "time_cond", "schedule", "objective", "train_steps")


def arch_config(cfg, method):
    """What a checkpoint must share with the flags; MDM has no z and no recognition model to compare."""
    keys = [k for k in ARCH_KEYS if method == "vadd" or k not in ("latent_dim", "rec_layers", "rec_width", "rec_heads")]
    return {"method": method, **{k: getattr(cfg, k) for k in keys}}


def read_checkpoint(cfg, method, required):
    """The checkpoint to continue from or evaluate (None without --resume or file); one trained with other
    flags stops the run before anything is written."""
    path = os.path.join(cfg.out_dir, f"ckpt_{method}.pt")
    if not os.path.exists(path):
        if required:
            raise SystemExit(f"{path} does not exist: train first (drop --eval-only / --sample-only) or point "
                             f"--out-dir at the run's folder")
        return None
    if not (cfg.resume or required):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"cannot read {path} ({e.__class__.__name__}): delete it or choose another --out-dir")
    saved, wanted = ckpt.get("config") or {}, arch_config(cfg, method)
    if saved != wanted:
        diff = ", ".join(f"{k} {saved.get(k)!r} (now {wanted.get(k)!r})" for k in wanted if saved.get(k) != wanted.get(k))
        raise SystemExit(f"{path} was trained with {diff}: pass the same flags, or another --out-dir to start afresh")
    return ckpt


def log0(rank, message):
    if rank == 0:
        print(message, flush=True)


def init_distributed(cfg):
    """torchrun sets RANK and WORLD_SIZE: NCCL on CUDA (one GPU per process), gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1
    cuda = cfg.device.startswith("cuda")
    if cuda:
        cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(cfg.device)
    # rank 0 samples and scores alone while the others wait at the next collective: allow it an hour
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1))
    return dist.get_rank(), dist.get_world_size()


# ----------------------------------------------------------------------------------------------------------
# Main

def main(argv=None):
    cfg = parse_config(argv)
    rank, world = init_distributed(cfg)
    try:
        metrics = run(cfg, rank, world)
        if world > 1:
            dist.barrier()  # no rank leaves (and tears down the process group) before rank 0 has written its files
        return metrics
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(cfg, rank, world):
    methods = ["mdm", "vadd"] if cfg.method == "both" else [cfg.method]
    train_ids, val_ids, meta = load_data(cfg, rank)
    cfg.vocab_size, cfg.tokenizer = meta["vocab_size"], meta.get("tokenizer", "ids")
    no_training = cfg.eval_only or cfg.sample_only
    checkpoints = {method: read_checkpoint(cfg, method, required=no_training) for method in methods}
    decode = decoder(meta)
    scorer = None
    if cfg.eval_model and rank == 0:
        scorer = load_scorer(cfg.eval_model, cfg.device)  # before training: a bad name fails at once
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
    run_start = time.time()
    val_x0 = eval_windows(val_ids, cfg, rank, world)
    reference = get_batch(val_ids, np.arange(cfg.num_samples) % (len(val_ids) // cfg.block_size) * cfg.block_size,
                          cfg.block_size, "cpu").numpy()
    data_stats = {"entropy": unigram_entropy(reference)}
    if scorer is not None:
        data_stats["gen_ppl"] = generative_perplexity([decode(r) for r in reference], scorer, cfg.device)

    likelihood, rows, training, histories = {}, [], {}, {}
    for method in methods:
        samplers = ["mdm"] if method == "mdm" else VADD_SAMPLERS[cfg.sampler]
        ckpt = checkpoints[method]
        if no_training:
            model = Model(cfg, method, cfg.vocab_size).to(cfg.device)
            model.load_state_dict(ckpt["ema"]["params"])
            model.eval()
            histories[method] = [tuple(h) for h in ckpt["history"]]
        else:
            model, histories[method], training[method] = train(cfg, method, train_ids, val_x0, ckpt, rank, world)
        common.seed_everything(cfg.seed + 1 + rank)
        bounds = {}
        if not cfg.sample_only:
            lik = likelihoods(model, val_x0, cfg, samplers)
            for key, (mean, se) in lik.items():
                if isinstance(key, tuple):
                    bounds[key] = (mean, se)
                else:
                    likelihood.update({key: mean, f"{key}_se": se})
                    if key != "kl":
                        likelihood[f"{key}_ppl"] = math.exp(mean)
            if method == "vadd":
                likelihood["iw_samples"] = cfg.iw_samples
        if rank != 0:
            continue
        common.seed_everything(cfg.seed + 2)  # every method's samples from the same noise seed
        for sampler in samplers:
            for T in cfg.steps:
                t0 = time.time()
                tokens, nfe = sample(model, cfg.num_samples, T, sampler, cfg)
                row = {"sampler": sampler, "steps": T, "sample_seconds": time.time() - t0, "nfe": nfe}
                if (sampler, T) in bounds:
                    row.update(bound=bounds[(sampler, T)][0], bound_se=bounds[(sampler, T)][1],
                               bound_ppl=math.exp(bounds[(sampler, T)][0]))
                texts = [decode(r) for r in tokens]
                row["entropy"] = unigram_entropy(tokens)
                if scorer is not None:
                    row["gen_ppl"] = generative_perplexity(texts, scorer, cfg.device)
                np.save(os.path.join(cfg.out_dir, f"samples_{sampler}_T{T}.npy"), tokens)
                with open(os.path.join(cfg.out_dir, f"samples_{sampler}_T{T}.txt"), "w", encoding="utf-8") as f:
                    f.write(f"\n{'=' * 40}\n".join(texts) + "\n")
                rows.append(row)
    if rank != 0:
        return None

    likelihood["bounds"] = {"mdm_nelbo": True, "delbo": False, "iw_delbo": False}  # which figures bound -log p
    metrics = {"config": dict(vars(cfg)), "unit": "nats per token", "likelihood": likelihood, "data": data_stats,
               "training": training, "by_steps": rows, "seconds": time.time() - run_start}
    metrics = merge_earlier_run(cfg, metrics)
    with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    plot_training(os.path.join(cfg.out_dir, "training.png"), histories)
    plot_bounds(os.path.join(cfg.out_dir, "bounds.png"), metrics["by_steps"])
    print_table(cfg, metrics)
    return metrics


RUN_ONLY_KEYS = ("method", "sampler", "steps", "resume", "device", "dtype", "compile", "out_dir", "cache_dir", "log_interval",
                 "eval_interval", "ckpt_interval", "eval_only", "sample_only")


def merge_earlier_run(cfg, metrics):
    """Keep the other method's results when one method is run into a folder that holds them (same flags
    otherwise), so `--method mdm` then `--method vadd` end with one metrics.json for both."""
    path = os.path.join(cfg.out_dir, "metrics.json")
    if not os.path.exists(path):
        return metrics
    with open(path) as f:
        old = json.load(f)
    same_run = lambda c: {k: v for k, v in c.items() if k not in RUN_ONLY_KEYS}  # noqa: E731
    if same_run(old.get("config", {})) != same_run(metrics["config"]):
        return metrics
    fresh = {(r["sampler"], r["steps"]) for r in metrics["by_steps"]}
    metrics["by_steps"] = [r for r in old["by_steps"] if (r["sampler"], r["steps"]) not in fresh] + metrics["by_steps"]
    metrics["likelihood"] = {**old["likelihood"], **metrics["likelihood"]}
    metrics["training"] = {**old.get("training", {}), **metrics["training"]}
    return metrics


def print_table(cfg, metrics):
    lik, data = metrics["likelihood"], metrics["data"]
    print(f"\n{cfg.data}: {cfg.vocab_size} tokens ({cfg.tokenizer}), windows of {cfg.block_size}; nats per token, "
          f"perplexity = exp")
    for key, label in [("mdm_nelbo", "MDM NELBO (bound, continuous time)"), ("delbo", "VADD DELBO (not a bound)"),
                       ("iw_delbo", f"VADD IW-DELBO, K = {lik.get('iw_samples')} (not a bound)")]:
        if key in lik:
            print(f"  {label:45s} {lik[key]:7.4f} +- {lik[key + '_se']:.4f}   ppl {lik[key + '_ppl']:9.2f}")
    if "kl" in lik:
        print(f"  {'VADD KL(r || p) on validation, nats/sequence':45s} {lik['kl']:7.3f}")
    print(f"  validation windows: unigram entropy {data['entropy']:.3f}"
          + (f", gen-PPL {data['gen_ppl']:.2f}" if "gen_ppl" in data else ""))
    print(f"\n{'sampler':8s} {'T':>5s} {'valid bound':>18s} {'ppl <=':>9s} {'gen-PPL':>9s} {'entropy':>8s} {'NFE':>7s} {'sec':>7s}")
    for r in metrics["by_steps"]:
        bound = f"{r['bound']:8.4f} +- {r['bound_se']:.4f}" if "bound" in r else f"{'-':>18s}"
        ppl = f"{r['bound_ppl']:9.2f}" if "bound" in r else f"{'-':>9s}"
        gen = f"{r['gen_ppl']:9.2f}" if "gen_ppl" in r else f"{'-':>9s}"
        print(f"{r['sampler']:8s} {r['steps']:5d} {bound} {ppl} {gen} {r['entropy']:8.3f} {r['nfe']:7.2f} "
              f"{r['sample_seconds']:7.2f}")
    print(f"\nwrote {cfg.out_dir}/ (metrics.json, samples_*.npy/.txt, training.png, bounds.png) "
          f"in {metrics['seconds']:.0f}s")


# ----------------------------------------------------------------------------------------------------------
# Plots

def pyplot():
    """matplotlib without a display, imported only when plotting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_training(path, histories):
    """Loss of each method; KL and lambda of VADD (a KL falling to 0 is posterior collapse)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for method, h in histories.items():
        h = np.asarray(h, dtype=float).reshape(-1, 4)
        axes[0].plot(h[:, 0], h[:, 1], label=method)
        if method == "vadd":
            axes[1].plot(h[:, 0], h[:, 2], label=method)
            axes[2].plot(h[:, 0], h[:, 3], label=method)
    titles = ["loss (MDM: NELBO; VADD: DELBO at lambda), nats/token", "VADD: KL(r || p), nats/sequence", "VADD: lambda"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9), ax.set_xlabel("iteration")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bounds(path, rows):
    """Valid T-step bound (nats/token) against T for every sampler: the few-step gap VADD targets."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for sampler, label in SAMPLERS.items():
        pts = sorted((r["steps"], r["bound"]) for r in rows if r["sampler"] == sampler and "bound" in r)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log"), ax.set_xlabel("denoising steps T"), ax.set_ylabel("valid T-step bound, nats/token")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
