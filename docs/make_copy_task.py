"""The copy task: a binary token source whose every window is one of about a hundred codes, to measure whether
VADD's z carries a code that few denoising steps cannot guess position by position (docs/text.md).

    python docs/make_copy_task.py write copy.txt        # 2M characters '0'/'1' (vadd_text.py --tokenizer char)
    python vadd_text.py --data copy.txt --tokenizer char --preset cpu --block-size 32 --out-dir out/copy
    python docs/make_copy_task.py score out/copy        # valid windows and true NLL of every samples_*.npy

The source: 12 fixed patterns of 8 bits (drawn once from seed 0; none is a rotation of another or of itself,
so a pattern and its phase can be read off any 8 bits in a row), written one after the other; at each boundary
between two 8-bit blocks the pattern switches to one of the other 11 with probability 0.02. A window of 32
starts anywhere, so it is one of 12 x 8 (pattern, phase) codes, about 4.6 nats, plus its rare switches.
Its exact likelihood is a forward pass over the 96 (pattern, phase) states of this Markov chain, and a window
is valid when that likelihood is not zero. With T = 1 MDM draws the 32 bits independently from their
marginals (about 1/2 each), so practically none of its windows is valid.
"""
import json
import os
import sys

import numpy as np

PATTERNS, PERIOD, SWITCH = 12, 8, 0.02


def patterns(seed=0):
    """PATTERNS distinct 8-bit patterns, none a rotation of another or of itself (an aperiodic code)."""
    rng, chosen, seen = np.random.default_rng(seed), [], set()
    while len(chosen) < PATTERNS:
        p = tuple(int(b) for b in rng.integers(0, 2, PERIOD))
        rotations = {p[i:] + p[:i] for i in range(PERIOD)}
        if len(rotations) == PERIOD and not rotations & seen:
            chosen.append(p)
            seen |= rotations
    return np.array(chosen)


def write(path, n_chars=2_000_000, seed=1):
    """The source's bits as a text of '0' and '1', n_chars long."""
    rng, codes = np.random.default_rng(seed), patterns()
    blocks = n_chars // PERIOD
    switches = (rng.random(blocks) < SWITCH) * rng.integers(1, PATTERNS, blocks)  # to one of the other 11
    which = (rng.integers(PATTERNS) + np.cumsum(switches)) % PATTERNS
    bits = codes[which].ravel()
    with open(path, "w") as f:
        f.write("".join("01"[b] for b in bits))
    print(f"wrote {path}: {len(bits):,} characters, {PATTERNS} patterns of {PERIOD} bits, switch {SWITCH}")


def log_likelihood(windows):
    """Exact log p(window) under the source, per row of a (N, L) array of bits: a forward pass over the
    (pattern, phase) states, which start uniform (the chain's stationary distribution)."""
    codes = patterns()
    emit = codes.T.ravel()  # state s = phase * PATTERNS + pattern emits codes[pattern, phase]
    states = PATTERNS * PERIOD
    move = np.zeros((states, states))
    for phase in range(PERIOD):
        for k in range(PATTERNS):
            s = phase * PATTERNS + k
            if phase < PERIOD - 1:
                move[s, s + PATTERNS] = 1.0
            else:  # the end of a block: same pattern, or a switch to one of the others
                move[s, :PATTERNS] = SWITCH / (PATTERNS - 1)
                move[s, k] = 1 - SWITCH
    windows = np.asarray(windows)
    alpha = (emit[None] == windows[:, :1]) / states
    log_p = np.zeros(len(windows))
    for n in range(1, windows.shape[1] + 1):
        total = alpha.sum(1)
        log_p += np.log(np.where(total > 0, total, 1.0)) + np.where(total > 0, 0.0, -np.inf)
        alpha = alpha / np.where(total > 0, total, 1.0)[:, None]
        if n < windows.shape[1]:
            alpha = (alpha @ move) * (emit[None] == windows[:, n:n + 1])
    return log_p


def score(out_dir):
    """The share of valid windows and the true NLL per token of the valid ones, for every samples_*.npy, beside
    the source's entropy per token (estimated on 20,000 windows of the source)."""
    results, length = {}, None
    for name in sorted(f for f in os.listdir(out_dir) if f.startswith("samples_") and f.endswith(".npy")):
        windows = np.load(os.path.join(out_dir, name))
        length = windows.shape[1]
        log_p = log_likelihood(windows)
        valid = np.isfinite(log_p)
        results[name[8:-4]] = {"valid": float(valid.mean()),
                               "nll_valid": float(-log_p[valid].mean() / length) if valid.any() else None}
    entropy = source_entropy(length or 32)
    print(f"source entropy {entropy:.4f} nats per token (windows of {length})")
    for key, r in results.items():
        nll = f"{r['nll_valid']:.4f}" if r["nll_valid"] is not None else "-"
        print(f"{key:14s} valid {100 * r['valid']:5.1f}%   true NLL of the valid ones {nll} nats per token")
    with open(os.path.join(out_dir, "copy_task.json"), "w") as f:
        json.dump({"entropy_per_token": entropy, "samples": results}, f, indent=1)
    return results


def source_entropy(length, n=20_000, seed=3):
    """-E log p(window) per token, over n windows of the source at random offsets."""
    rng, codes = np.random.default_rng(seed), patterns()
    blocks = length // PERIOD + 2
    switches = (rng.random((n, blocks)) < SWITCH) * rng.integers(1, PATTERNS, (n, blocks))
    which = (rng.integers(PATTERNS, size=(n, 1)) + np.cumsum(switches, 1)) % PATTERNS
    bits = codes[which].reshape(n, -1)
    start = rng.integers(0, PERIOD, n)
    windows = np.stack([bits[i, s:s + length] for i, s in enumerate(start)])
    return float(-log_likelihood(windows).mean() / length)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "score"):
        sys.exit(__doc__.split("\n\n")[1])
    if sys.argv[1] == "write":
        write(sys.argv[2])
    else:
        score(sys.argv[2])
