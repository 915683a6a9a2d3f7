"""vadd_text.py on tiny configs through main(): the three kinds of --data, both methods, resume, DDP with gloo,
the scorer, the DiT's properties, the samplers' network-call counts, and bad input. GPT-2 tokens come from the
ranks file in tests/fixtures/text (no network)."""
import fnmatch
import functools
import json
import math
import os
import re
import subprocess
import sys
import time
import types
import urllib.error

import numpy as np
import pytest
import torch

import common
import vadd_text as vt

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "text")
WORDS = ("the king shall speak of love and war to his lords while the queen sings softly in the garden of "
         "roses; what light breaks there? good night, sweet prince, and may the stars keep thee").split()


@functools.lru_cache(maxsize=None)
def gpt2_from_fixture():
    """The GPT-2 encoding built from the committed ranks file (tiktoken would download it)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    ranks = load_tiktoken_bpe(os.path.join(FIXTURES, "gpt2.tiktoken"),
                              expected_hash="306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930")
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


@pytest.fixture(autouse=True)
def offline_gpt2(monkeypatch):
    monkeypatch.setattr(vt, "gpt2_encoding", gpt2_from_fixture)


def write_text(path, n_words=3000, seed=0):
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(4, 10))) for _ in range(n_words // 7)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_args(tmp_path, data, *extra):
    return ["--data", str(data), "--preset", "cpu", "--layers", "1", "--width", "32", "--heads", "2",
            "--rec-layers", "1", "--rec-width", "32", "--rec-heads", "2",
            "--cond-dim", "16", "--latent-dim", "4", "--block-size", "16", "--max-iters", "6", "--batch-size", "8",
            "--warmup-iters", "2", "--num-eval", "8", "--eval-batch", "8", "--num-samples", "4",
            "--sample-batch", "4",
            "--iw-samples", "2", "--steps", "1,2", "--eval-model", "none", "--log-interval", "2",
            "--eval-interval", "3", "--ckpt-interval", "3", "--out-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), *extra]


def check_outputs(out, metrics, vocab_size, samplers, steps=(1, 2), num=4, block=16):
    """Every output file is written; samples hold only real token ids; metrics.json has the shared shape (one
    entry per method under config, likelihood and training; by_steps rows)."""
    names = ["metrics.json", "training.png", "bounds.png"] + [f"ckpt_{m}.pt" for m in {s[:4] for s in samplers}]
    names += [f"samples_{s}_T{T}.{ext}" for s in samplers for T in steps for ext in ("npy", "txt")]
    for name in names:
        assert (out / name).stat().st_size > 0, name
    for s in samplers:
        for T in steps:
            a = np.load(out / f"samples_{s}_T{T}.npy")
            assert a.shape == (num, block) and a.dtype.kind == "i"
            assert a.min() >= 0 and a.max() < vocab_size  # no [M] (= vocab_size) left, nothing above
    saved = json.loads((out / "metrics.json").read_text())
    methods = {s[:4] for s in samplers}
    assert saved["unit"] == "nats per token" and set(saved["config"]) == methods
    assert all(saved["config"][m]["vocab_size"] == vocab_size for m in methods)
    assert (sorted((r["sampler"], r["steps"]) for r in saved["by_steps"])
            == sorted((s, T) for s in samplers for T in steps))
    for row in saved["by_steps"]:
        assert row["bound"] > 0 and row["nfe"] >= 1 and row["sample_seconds"] >= 0
        assert row["bound_ppl"] == pytest.approx(math.exp(row["bound"]))
        assert 0 <= row["entropy"] <= math.log(block)
    assert metrics["by_steps"] == saved["by_steps"]
    return saved


# ----------------------------------------------------------------------------------------------------------
# Data and end to end through main()

def test_fixture_builds_the_gpt2_encoding():
    assert gpt2_from_fixture().encode("Hello world") == [15496, 995]


def test_gpt2_text_file_both_methods(tmp_path, capsys):
    data = write_text(tmp_path / "poem.txt")
    metrics = vt.main(tiny_args(tmp_path, data, "--method", "both", "--tokenizer", "gpt2"))
    saved = check_outputs(tmp_path / "out", metrics, 50257, ["mdm", "vadd", "vadd_cs"])
    lik = saved["likelihood"]
    for method, key in (("mdm", "mdm_nelbo"), ("vadd", "delbo"), ("vadd", "iw_delbo"), ("vadd", "kl")):
        assert math.isfinite(lik[method][key]) and lik[method][key + "_se"] >= 0, key
    assert lik["vadd"]["iw_samples"] == 2 and "iw_samples" not in lik["mdm"]
    assert saved["bounds"] == {"mdm_nelbo": True, "delbo": False, "iw_delbo": False}
    # a KL is >= 0; at the prior common.gaussian_kl sums exp(lv) - 1 - lv in float32 and can round to -1e-8
    assert saved["training"]["vadd"]["tokens_per_s"] > 0 and saved["training"]["vadd"]["final_kl"] > -1e-6
    # the cached tokens are the GPT-2 ids of the file, 90% / 10%
    (cache,) = [p for p in (tmp_path / "cache").iterdir()]
    ids = gpt2_from_fixture().encode_ordinary(data.read_text())
    cut = int(0.9 * len(ids))
    assert np.fromfile(cache / "train.bin", np.uint16).tolist() == ids[:cut]
    assert np.fromfile(cache / "val.bin", np.uint16).tolist() == ids[cut:]
    text = (tmp_path / "out" / "samples_mdm_T2.txt").read_text(encoding="utf-8")
    assert text.count("=" * 40) == 3
    out = capsys.readouterr().out
    assert "tokens/s" in out and "eta" in out
    assert re.search(r"\[mdm\] mdm_nelbo [\d.]+ \+- [\d.]+ nats/token \(a bound\)", out)
    for key in ("delbo", "iw_delbo"):
        assert re.search(rf"\[vadd\] {key} [\d.]+ \+- [\d.]+ nats/token \(not a bound\)", out)
    for method, name in (("mdm", "NELBO"), ("vadd", "DELBO")):  # validation at --eval-interval 3 and at the end
        assert [f"[{method}] iter {it:7d} | validation {name}" in out for it in (3, 6)] == [True, True]
    assert "nats/token (EMA weights, lambda 1)" in out


def test_char_tokens_are_cached_and_decode_back(tmp_path, capsys):
    data = write_text(tmp_path / "poem.txt")
    args = tiny_args(tmp_path, data, "--tokenizer", "char", "--method", "vadd", "--max-iters", "3")
    check_outputs(tmp_path / "out", vt.main(args), len(set(data.read_text())), ["vadd", "vadd_cs"])
    (cache,) = [p for p in (tmp_path / "cache").iterdir()]
    meta = json.loads((cache / "meta.json").read_text())
    ids = np.concatenate([np.fromfile(cache / f"{s}.bin", np.uint16) for s in ("train", "val")])
    assert meta["tokenizer"] == "char" and "".join(meta["alphabet"][i] for i in ids) == data.read_text()
    stamp = os.path.getmtime(cache / "train.bin")
    vt.main(args + ["--eval-only"])  # the second run finds the cache and does not tokenise again
    assert os.path.getmtime(cache / "train.bin") == stamp and len(list((tmp_path / "cache").iterdir())) == 1
    samples = np.load(tmp_path / "out" / "samples_vadd_cs_T2.npy")
    text = (tmp_path / "out" / "samples_vadd_cs_T2.txt").read_text(encoding="utf-8")
    assert text.split(f"\n{'=' * 40}\n")[0] == "".join(meta["alphabet"][i] for i in samples[0])


def write_prepared(folder, vocab_size, n_train=3000, n_val=400, top=None, seed=0):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        rng.integers(0, vocab_size, n).astype(np.uint16).tofile(folder / f"{split}.bin")
    if top is not None:
        a = np.fromfile(folder / "val.bin", np.uint16)
        a[7] = top
        a.tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": vocab_size}))
    return folder


def test_prepared_folder_with_an_unusual_vocabulary(tmp_path):
    data = write_prepared(tmp_path / "ids", 37)
    metrics = vt.main(tiny_args(tmp_path, data, "--method", "both"))
    check_outputs(tmp_path / "out", metrics, 37, ["mdm", "vadd", "vadd_cs"])
    text = (tmp_path / "out" / "samples_mdm_T1.txt").read_text()
    assert all(0 <= int(w) < 37 for w in text.split("\n")[0].split())  # unknown tokeniser: ids as text
    assert not (tmp_path / "cache").exists()  # a prepared folder is read where it is


def test_eval_only_and_sample_only_reproduce_the_run(tmp_path):
    data = write_prepared(tmp_path / "ids", 23)
    first = vt.main(tiny_args(tmp_path, data, "--method", "vadd"))
    again = vt.main(tiny_args(tmp_path, data, "--method", "vadd", "--eval-only"))
    for key in ("delbo", "iw_delbo", "kl"):
        assert again["likelihood"]["vadd"][key] == first["likelihood"]["vadd"][key], key
    for a, b in zip(first["by_steps"], again["by_steps"]):
        assert a["bound"] == b["bound"] and a["entropy"] == b["entropy"]
    names = [f"samples_{s}_T{T}.npy" for s in ("vadd", "vadd_cs") for T in (1, 2)]
    saved = {name: np.load(tmp_path / "out" / name) for name in names}
    for name in names:
        os.remove(tmp_path / "out" / name)
    only = vt.main(tiny_args(tmp_path, data, "--method", "vadd", "--sample-only"))  # the same samples again
    assert all(np.array_equal(np.load(tmp_path / "out" / name), saved[name]) for name in names)
    assert [(r["sampler"], r["steps"], "bound" in r) for r in only["by_steps"]][-1] == ("vadd_cs", 2, False)


def fake_hub(monkeypatch, files, rows):
    """A stand-in for the Hugging Face hub: snapshot_download writes `files` ({path in the repository: texts})
    as parquet files in the real format (a `text` column, several row groups) into its local_dir, those that
    match its allow_patterns; SOURCES expects `rows` per split. Returns the list of what it was asked for."""
    hub, pa, pq = (pytest.importorskip(m) for m in ("huggingface_hub", "pyarrow", "pyarrow.parquet"))
    asked = []

    def snapshot_download(repo_id, repo_type, revision, allow_patterns, local_dir):
        asked.append((repo_id, repo_type, revision))
        for name, texts in files.items():
            if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                os.makedirs(os.path.dirname(os.path.join(local_dir, name)), exist_ok=True)
                pq.write_table(pa.table({"text": texts}), os.path.join(local_dir, name), row_group_size=7)
        return local_dir

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    for name, (repo, revision, patterns, _) in list(vt.SOURCES.items()):
        monkeypatch.setitem(vt.SOURCES, name, (repo, revision, patterns, rows))
    return asked


def documents(n, seed, low=20, high=60):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(low, high))) for _ in range(n)]


def prepare_openwebtext(tmp_path, monkeypatch, rows=30):
    """--prepare of openwebtext from two local parquet shards of 18 and 12 documents, the last 5 held out."""
    docs = documents(30, 1)
    asked = fake_hub(monkeypatch, {"data/train-00000-of-00002.parquet": docs[:18],
                                   "data/train-00001-of-00002.parquet": docs[18:]}, {"train": rows})
    monkeypatch.setattr(vt, "OWT_HELDOUT", 5)
    vt.main(["--data", "openwebtext", "--prepare", "--cache-dir", str(tmp_path / "cache")])
    return docs, asked


def test_openwebtext_is_prepared_from_parquet_as_mdlm_does(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match=r"--data openwebtext is not prepared in \S+: run `python vadd_text.py "
                                         r"--data openwebtext --prepare` first"):
        vt.main(tiny_args(tmp_path, "openwebtext"))
    docs, asked = prepare_openwebtext(tmp_path, monkeypatch)
    assert asked == [("Skylion007/openwebtext", "dataset", "refs/pr/18")]
    enc, folder = gpt2_from_fixture(), tmp_path / "cache" / "openwebtext"
    joined = lambda d: [t for doc in d for t in enc.encode_ordinary(doc) + [50256]]  # noqa: E731 (EOS after each)
    assert np.fromfile(folder / "train.bin", np.uint16).tolist() == joined(docs[:25])
    assert np.fromfile(folder / "val.bin", np.uint16).tolist() == joined(docs[25:])  # the last documents held out
    assert json.loads((folder / "meta.json").read_text())["vocab_size"] == 50257
    assert sorted(os.listdir(tmp_path / "cache")) == ["openwebtext", "openwebtext-parquet"]  # no temporary folder
    assert "--data openwebtext is prepared in" in capsys.readouterr().out and not (tmp_path / "out").exists()
    metrics = vt.main(tiny_args(tmp_path, "openwebtext", "--method", "mdm", "--max-iters", "2"))
    assert metrics["config"]["mdm"]["vocab_size"] == 50257


def test_a_source_with_other_row_counts_is_refused_and_leaves_no_tokens(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"the train split of Skylion007/openwebtext has 30 rows, not 31: the "
                                         r"download is incomplete or the source changed"):
        prepare_openwebtext(tmp_path, monkeypatch, rows=31)
    assert os.listdir(tmp_path / "cache") == ["openwebtext-parquet"]


def test_a_failed_download_of_the_parquet_files_is_one_sentence(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise hub.errors.LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(SystemExit, match=r"cannot download billion-word-benchmark/lm1b at refs/convert/parquet "
                                         r"\(Got: ConnectError: .*\): check the network, then run --prepare"):
        vt.main(["--data", "lm1b", "--prepare", "--cache-dir", str(tmp_path / "cache")])
    assert not (tmp_path / "cache" / "lm1b").exists()


def test_unprepared_data_stops_every_rank_before_the_process_group(tmp_path, monkeypatch):
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(SystemExit, match=r"--data lm1b is not prepared in \S+: run `python vadd_text.py "
                                             r"--data lm1b --prepare` first"):
            vt.main(tiny_args(tmp_path, "lm1b", "--device", "cpu"))
    assert not (tmp_path / "out").exists()


def test_lm1b_is_prepared_from_parquet_as_mdlm_wrap_does(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ";", "?", "."]
                               + sorted(set(WORDS))))
    tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
    train, test = [s + " ." for s in documents(200, 2, 5, 12)], [s + " ." for s in documents(40, 3, 5, 12)]
    asked = fake_hub(monkeypatch, {"plain_text/train/0000.parquet": train[:150],
                                   "plain_text/train/0001.parquet": train[150:],
                                   "plain_text/test/0000.parquet": test}, {"train": 200, "test": 40})
    monkeypatch.setattr(vt, "hf_tokenizer", lambda name: tok)
    vt.main(["--data", "lm1b", "--prepare", "--cache-dir", str(tmp_path / "cache")])
    assert asked == [("billion-word-benchmark/lm1b", "dataset", "refs/convert/parquet")]
    folder = tmp_path / "cache" / "lm1b"
    wrapped = lambda s: [t for x in s for t in tok(x)["input_ids"]]  # noqa: E731 ([CLS] ... [SEP] each)
    assert np.fromfile(folder / "train.bin", np.uint16).tolist() == wrapped(train)
    assert np.fromfile(folder / "val.bin", np.uint16).tolist() == wrapped(test)
    metrics = vt.main(tiny_args(tmp_path, "lm1b", "--method", "mdm", "--max-iters", "2"))
    assert metrics["config"]["mdm"]["block_size"] == 16
    assert metrics["config"]["mdm"]["vocab_size"] == tok.vocab_size
    assert vt.parse_config(["--data", "lm1b", "--cache-dir", str(tmp_path / "cache")]).block_size == 128


# ----------------------------------------------------------------------------------------------------------
# Resume and DDP

def test_resume_matches_a_run_straight_through(tmp_path, monkeypatch):
    data = write_text(tmp_path / "poem.txt")

    def args(d):
        return tiny_args(d, data, "--tokenizer", "char", "--method", "vadd", "--grad-accum", "2")

    vt.main(args(tmp_path / "straight"))
    update, calls = common.EMA.update, []

    def interrupted_update(self, model):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the run dies after the checkpoint at iteration 3
        update(self, model)

    monkeypatch.setattr(common.EMA, "update", interrupted_update)
    with pytest.raises(KeyboardInterrupt):
        vt.main(args(tmp_path / "resumed"))
    monkeypatch.setattr(common.EMA, "update", update)
    assert torch.load(tmp_path / "resumed" / "out" / "ckpt_vadd.pt", weights_only=True)["iter"] == 3
    vt.main(args(tmp_path / "resumed") + ["--resume"])
    a = torch.load(tmp_path / "straight" / "out" / "ckpt_vadd.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "out" / "ckpt_vadd.pt", weights_only=True)
    assert b["iter"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["params"]:
        assert torch.equal(a["ema"]["params"][k], b["ema"]["params"][k]), k


WORKER = """
import json, os, sys
sys.path.insert(0, {root!r})
import vadd_text as vt
get_batch, sample, seen = vt.get_batch, vt.sample, []


def spy(ids, offsets, block_size, device):
    seen.append((len(ids), [int(o) for o in offsets]))
    return get_batch(ids, offsets, block_size, device)


def failing_sample(*args):
    raise RuntimeError("rank 0 failed while sampling")


vt.get_batch = spy
sys.path.insert(0, os.path.join({root!r}, "tests"))
import test_text
vt.gpt2_encoding = test_text.gpt2_from_fixture  # no download
if os.environ.get("FAIL_SAMPLING") and os.environ["RANK"] == "0":
    vt.sample = failing_sample
vt.main(sys.argv[1:])
with open(f"{record}.{{os.environ['RANK']}}.json", "w") as f:
    json.dump(seen, f)
"""


def torchrun(tmp_path, argv, **env):
    """argv on two processes with gloo (torchrun --standalone picks and holds the port): (result, seconds)."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    record=str(tmp_path / "seen")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           *argv]
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    return done, time.time() - start


def test_prepared_openwebtext_on_two_processes_and_a_failing_rank_ends_the_job(tmp_path, monkeypatch):
    """--prepare, then torchrun with gloo: each rank reads its own windows of the global batch. Rerun into the
    same --out-dir, and with rank 0 failing while the other is in a collective: each run exits non-zero within
    60 s with the failing rank's message (no barrier waits for a rank that has gone)."""
    prepare_openwebtext(tmp_path, monkeypatch)
    argv = tiny_args(tmp_path, "openwebtext", "--max-iters", "4", "--device", "cpu")
    done, _ = torchrun(tmp_path, argv)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = [json.loads((tmp_path / f"seen.{r}.json").read_text()) for r in (0, 1)]
    n_train = max(n for n, _ in seen[0])
    windows = [[o for n, o in s if n == n_train] for s in seen]  # training reads (the validation split is smaller)
    assert len(windows[0]) == len(windows[1]) == 8 and all(len(w) == 4 for w in windows[0] + windows[1])
    assert windows[0][:4] == windows[0][4:]  # MDM, then VADD on the same windows
    for a, b in zip(*windows):
        assert a != b  # each rank reads its own windows of the iteration's global batch
    # the two ranks together read the global batch one process reads with the same seed
    rng = np.random.default_rng(0)
    cfg = vt.parse_config(argv)
    for it in range(4):
        one_process = vt.window_offsets(rng, n_train, cfg, 0, 1).ravel().tolist()
        assert sorted(windows[0][it] + windows[1][it]) == sorted(one_process)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())  # rank 0 finished and wrote the results
    assert {r["sampler"] for r in saved["by_steps"]} == {"mdm", "vadd", "vadd_cs"}
    # rank 0 fails in MDM's sampling while rank 1 is in a collective of VADD's likelihoods
    for extra, env, message in [([], {}, "already holds a mdm run"),
                                (["--eval-only"], {"FAIL_SAMPLING": "1"}, "rank 0 failed while sampling")]:
        done, seconds = torchrun(tmp_path, argv + extra, **env)
        assert done.returncode != 0 and seconds < 60 and message in done.stderr, (seconds, done.stderr[-2000:])


# ----------------------------------------------------------------------------------------------------------
# Generative perplexity with a tiny random GPT-2 saved to a folder

def tiny_scorer(folder, text, context):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(fast), n_positions=context, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return fast


def load_scorer(folder):
    return vt.load_scorer(types.SimpleNamespace(eval_model=str(folder), device="cpu"))


def test_generative_perplexity_scores_every_token_once(tmp_path):
    text = write_text(tmp_path / "poem.txt").read_text()
    fast = tiny_scorer(tmp_path / "scorer", text, context=512)
    scorer = load_scorer(tmp_path / "scorer")
    texts = ["the king shall speak<|endoftext|>of love", "good night, sweet prince"]
    nll, count = 0.0, 0
    for t in texts:  # by hand: EOS first, every token scored given all before it
        ids = torch.tensor([[fast.eos_token_id] + fast(t)["input_ids"]])
        assert (fast.eos_token_id in ids[0, 1:].tolist()) == ("<|endoftext|>" in t)  # our EOS is the scorer's
        nll += scorer[1](ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert vt.generative_perplexity(texts, scorer, "cpu") == pytest.approx(math.exp(nll / count), rel=1e-5)
    # a context shorter than the text: scored in windows, every token still once
    small = tiny_scorer(tmp_path / "short", text, context=4)
    short = load_scorer(tmp_path / "short")
    ppl = vt.generative_perplexity(texts, short, "cpu")
    assert math.isfinite(ppl) and 1 < ppl < 10 * len(small)


def test_main_reports_gen_ppl_with_a_local_scorer(tmp_path):
    data = write_text(tmp_path / "poem.txt")
    tiny_scorer(tmp_path / "scorer", data.read_text(), context=64)
    metrics = vt.main(tiny_args(tmp_path, data, "--tokenizer", "char", "--method", "mdm",
                                "--eval-model", str(tmp_path / "scorer")))
    scorer = load_scorer(tmp_path / "scorer")
    meta_alphabet = "".join(sorted(set(data.read_text())))
    for row in metrics["by_steps"]:
        tokens = np.load(tmp_path / "out" / f"samples_mdm_T{row['steps']}.npy")
        texts = ["".join(meta_alphabet[i] for i in r) for r in tokens]
        assert row["gen_ppl"] == pytest.approx(vt.generative_perplexity(texts, scorer, "cpu"), rel=1e-6)
    assert math.isfinite(metrics["data"]["gen_ppl"])


# ----------------------------------------------------------------------------------------------------------
# The networks and the samplers

def small_cfg(tmp_path, *extra):
    cfg = vt.parse_config(tiny_args(tmp_path, "shakespeare", *extra))  # the data is not read here
    cfg.vocab_size = 11
    return cfg


def test_presets_fit_the_data_and_flags_given_win(tmp_path, monkeypatch):
    """Where CUDA is, a text file gets nanoGPT's Shakespeare-character model and OpenWebText / LM1B get
    MDLM-small; without CUDA the cpu preset; a preset or a flag given wins."""
    cpu = small_cfg(tmp_path, "--width", "64", "--rec-heads", "4")  # tiny_args: --preset cpu --layers 1 ...
    assert (cpu.layers, cpu.width, cpu.heads, cpu.cond_dim, cpu.latent_dim, cpu.dropout) == (1, 64, 2, 16, 4, 0.0)
    assert (cpu.rec_layers, cpu.rec_width, cpu.rec_heads) == (1, 32, 4)
    base = ["--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    cpu = vt.parse_config(["--data", "shakespeare", "--preset", "cpu", *base])
    assert (cpu.layers, cpu.width, cpu.rec_layers, cpu.rec_width, cpu.rec_heads) == (4, 128, 2, 64, 2)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)  # no global change
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = vt.parse_config(["--data", "shakespeare", *base])
    assert ((gpu.preset, gpu.layers, gpu.width, gpu.heads, gpu.dropout, gpu.tokenizer)
            == ("gpu", 6, 384, 6, 0.2, "char"))
    assert (gpu.block_size, gpu.batch_size, gpu.max_iters, gpu.lr) == (256, 64, 5000, 1e-3)
    for data, block_size in (("openwebtext", 1024), ("lm1b", 128)):
        mdlm = vt.parse_config(["--data", data, *base])
        assert ((mdlm.preset, mdlm.layers, mdlm.width, mdlm.heads, mdlm.cond_dim, mdlm.latent_dim, mdlm.dropout)
                == ("mdlm", 12, 768, 12, 128, 512, 0.1))
        assert (mdlm.block_size, mdlm.tokenizer, mdlm.lr) == (block_size, "gpt2", 3e-4)
    assert vt.parse_config(["--data", "openwebtext", "--preset", "gpu", *base]).width == 384
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vt.parse_config(["--data", "openwebtext", *base]).preset == "cpu"


@pytest.mark.parametrize("preset, vocab_size, block_size", [("gpu", 65, 256), ("mdlm", 50257, 1024)])
def test_gpu_presets_keep_vadd_within_1_3_times_mdm_training_flops(preset, vocab_size, block_size):
    """The recognition of the GPU presets is sized so that VADD's training FLOPs per token are at most 1.3
    times MDM's (built on the meta device: shapes only)."""
    cfg = vt.parse_config(["--preset", preset, "--device", "cpu"])
    with torch.device("meta"):
        mdm, vadd = vt.Model(cfg, "mdm", vocab_size), vt.Model(cfg, "vadd", vocab_size)
    ratio = vt.flops_per_token(vadd, block_size) / vt.flops_per_token(mdm, block_size)
    assert 1.1 < ratio <= 1.3


def test_fresh_denoiser_is_uniform_over_real_tokens(tmp_path):
    torch.manual_seed(0)
    cfg = small_cfg(tmp_path)
    model = vt.Model(cfg, "vadd", 11)
    xt = torch.randint(0, 12, (64, 16))  # ids 0..11, 11 = [M]
    logits = model.denoise(xt, torch.rand(64), torch.randn(64, cfg.latent_dim))
    assert logits.shape == (64, 16, 11) and torch.all(logits == 0)  # adaLN-zero: uniform over the 11 real tokens
    # hence the NELBO of any data is log V per token
    x0 = torch.randint(0, 11, (4096, 16))
    loss, kl = vt.delbo(model, x0, 1.0)
    per_token = loss.double() / 16
    assert torch.all(kl == 0)
    assert abs(per_token.mean().item() - math.log(11)) < 4 * per_token.std().item() / math.sqrt(len(per_token))


def test_z_matters_once_trained_and_recognition_reads_x0_and_mask(tmp_path):
    data = write_text(tmp_path / "poem.txt")
    cfg = vt.parse_config(tiny_args(tmp_path, data, "--tokenizer", "char", "--max-iters", "20", "--lr", "3e-3"))
    train_ids, val_ids, meta = vt.load_data(vt.prepare_data(cfg), cfg)
    cfg.vocab_size = meta["vocab_size"]
    os.makedirs(cfg.out_dir)
    val_x0 = vt.eval_windows(val_ids, cfg, 0, 1)
    model, history, _ = vt.train(cfg, "vadd", train_ids, val_x0, None, 0, 1)
    x0 = val_x0[:4]
    xt = torch.full_like(x0, cfg.vocab_size)
    with torch.no_grad():
        a, b = (model.denoise(xt, None, torch.randn(4, cfg.latent_dim)) for _ in range(2))
        assert (a - b).abs().max() > 1e-3
        masked = torch.rand(x0.shape) < 0.5
        m0, v0 = model.recognition(x0, masked)
        m1, v1 = model.recognition(x0, ~masked)  # same x0, other mask pattern
        m2, v2 = model.recognition(x0.roll(1, 0), masked)  # other x0, same mask pattern
    assert (m0 - m1).abs().max() > 1e-4 and (m0 - m2).abs().max() > 1e-4
    assert (v0 - v1).abs().max() > 1e-4 and (v0 - v2).abs().max() > 1e-4


def test_only_learned_positions_let_one_step_give_positions_different_tokens(tmp_path):
    """At an all-[M] input a rotary-only DiT gives every position the same distribution, whatever its weights
    and z (docs/text.md, the copy task); with --positions learned the positions differ. A fresh recognition's
    blocks are the identity, so its features do not see positions: its mean is the same for the tokens of a
    window in another order, while the features read side by side are not."""
    torch.manual_seed(0)
    xt, z = torch.full((2, 16), 11), torch.randn(2, 4)
    x0 = torch.randint(0, 11, (1, 16))
    x0 = torch.cat([x0, x0.roll(3, 1)])
    spread, moved = {}, {}
    for positions in ("rotary", "learned"):
        model = vt.Model(small_cfg(tmp_path, "--positions", positions), "vadd", 11)
        torch.nn.init.normal_(model.recognition.head.weight)
        with torch.no_grad():
            mean, _ = model.recognition(x0, torch.zeros(2, 16, dtype=torch.bool))
            moved[positions] = (mean[0] - mean[1]).abs().max().item()
            for p in model.parameters():  # weights that are not the zero start
                torch.nn.init.normal_(p, std=0.3)
            logits = model.denoise(xt, None, z)
            spread[positions] = (logits - logits[:, :1]).abs().max().item()
            assert (logits[0] - logits[1]).abs().max() > 1e-2  # z matters either way
    assert spread["rotary"] < 1e-4 and spread["learned"] > 1e-1, spread
    assert moved["rotary"] < 1e-4 and moved["learned"] > 1e-2, moved


def test_learned_positions_end_to_end_and_a_checkpoint_keeps_them(tmp_path):
    data = write_prepared(tmp_path / "ids", 13)
    first = vt.main(tiny_args(tmp_path, data, "--method", "vadd", "--positions", "learned"))
    assert first["config"]["vadd"]["positions"] == "learned"
    again = vt.main(tiny_args(tmp_path, data, "--method", "vadd", "--positions", "learned", "--eval-only"))
    assert again["likelihood"]["vadd"]["kl"] == first["likelihood"]["vadd"]["kl"]
    with pytest.raises(SystemExit, match=r"was trained with --positions 'learned' \(now None\)"):
        vt.main(tiny_args(tmp_path, data, "--method", "vadd", "--eval-only"))


def test_samplers_count_calls_and_reuse_only_where_valid(tmp_path):
    """The spy sees every denoiser call. MDM and VADD-CS skip sequences whose input did not change (so at T much
    larger than L they make far fewer than T calls), VADD-CS keeps one z, vanilla brings a new z every call."""
    torch.manual_seed(1)
    cfg = small_cfg(tmp_path, "--sample-batch", "6")  # one batch: a second would bring its own z
    model = vt.Model(cfg, "vadd", 11).eval()
    for p in model.parameters():  # random weights: an informative, non-uniform denoiser
        torch.nn.init.normal_(p, std=0.3)
    seen, forward = [], model.denoiser.forward
    model.denoiser.forward = lambda xt, t=None, z=None: (seen.append((len(xt), z.clone())), forward(xt, t, z))[1]
    T = 64
    for sampler in ("vadd_cs", "vadd"):
        seen.clear()
        tokens, nfe = vt.sample(model, 6, T, sampler, cfg)
        assert tokens.shape == (6, 16) and tokens.max() < 11 and tokens.min() >= 0
        assert nfe == sum(n for n, _ in seen) / 6
        zs = [z for _, z in seen]
        for i, z in enumerate(zs[1:], 1):
            earlier = (z[:, None, :] == torch.cat(zs[:i])[None]).all(-1).any(1)
            assert torch.all(earlier) if sampler == "vadd_cs" else not torch.any(earlier)
        if sampler == "vadd_cs":
            assert nfe <= 16  # one call per step in which the sequence changed: at most L
        else:
            assert nfe > 16  # a new z each step: no reuse
    cfg.time_cond = True  # with t as input the output changes every step: no reuse for MDM either
    timed = vt.Model(cfg, "mdm", 11).eval()
    _, nfe = vt.sample(timed, 6, T, "mdm", cfg)
    assert nfe > 16


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear message, nothing written

@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "positive whole number"),
    (["--steps", "1,x"], "whole numbers separated by commas"),
    (["--width", "30"], "heads of even size"),
    (["--batch-size", "6", "--grad-accum", "4"], "must split evenly over 1 process(es) x --grad-accum 4"),
    (["--eval-only", "--sample-only"], "argument --sample-only: not allowed with argument --eval-only"),
    (["--tokenizer", "bpe"], "invalid choice: 'bpe'"),
    (["--num-samples", "0"], "argument --num-samples: '0' is not a whole number from 1 to inf"),
])
def test_bad_flags_stop_before_writing(tmp_path, capsys, extra, message):
    data = write_text(tmp_path / "poem.txt")
    with pytest.raises(SystemExit) as e:
        vt.main(tiny_args(tmp_path, data, *extra))
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_missing_empty_and_unprepared_data_are_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.bin").write_bytes(b"")
    for data, message in [(tmp_path / "nothing.txt", "no such file or folder, and not one of shakespeare"),
                          (tmp_path / "empty.txt", "is empty: give a text file with some text in it"),
                          (tmp_path / "half", "the folder lacks val.bin, meta.json")]:
        with pytest.raises(SystemExit, match=message):
            vt.main(tiny_args(tmp_path, data))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_num_eval_beyond_the_validation_split_uses_each_window_once(tmp_path, capsys):
    """A window counted twice would make its figures look like independent examples (standard errors too small):
    --num-eval past the split's windows takes each window once, says so, and records what it used."""
    data = write_prepared(tmp_path / "ids", 37, n_val=100)  # 6 windows of 16 tokens
    cfg = vt.parse_config(tiny_args(tmp_path, data, "--num-eval", "50"))
    val = vt.load_data(vt.prepare_data(cfg), cfg)[1]
    assert cfg.num_eval == 6 and "--num-eval 50: the validation split has 6 windows of 16 tokens" in \
        capsys.readouterr().out
    windows = torch.cat([vt.eval_windows(val, cfg, rank, 2) for rank in (0, 1)])
    assert len(windows) == len(torch.unique(windows, dim=0)) == 6


def test_bad_data_contents_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="holds token id 40, not below vocab_size 37"):
        vt.main(tiny_args(tmp_path, write_prepared(tmp_path / "ids", 37, top=40)))
    with pytest.raises(SystemExit, match="--block-size 16 is larger than the val split"):
        vt.main(tiny_args(tmp_path, write_prepared(tmp_path / "short", 37, n_val=10)))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1") * 100)
    with pytest.raises(SystemExit, match="is not UTF-8 text"):
        vt.main(tiny_args(tmp_path, tmp_path / "latin1.txt"))
    assert not (tmp_path / "out").exists()


def test_corrupt_shakespeare_download_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(vt.urllib.request, "urlretrieve",
                        lambda url, path: open(path, "w").write("First Citizen:"))
    with pytest.raises(SystemExit, match="has 14 bytes, not 1115394"):
        vt.main(tiny_args(tmp_path, "shakespeare"))
    assert os.listdir(tmp_path / "cache") == [] and not (tmp_path / "out").exists()


def test_offline_shakespeare_download_is_one_sentence(tmp_path, monkeypatch):
    def offline(url, path):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(vt.urllib.request, "urlretrieve", offline)
    with pytest.raises(SystemExit, match=r"cannot download tiny-shakespeare from https://\S+ "
                                         r"\(.*name resolution\): "
                                         r"check the network, or pass --data PATH"):
        vt.main(tiny_args(tmp_path, "shakespeare"))
    assert not (tmp_path / "out").exists()


def test_meta_json_is_checked_when_the_data_is_loaded(tmp_path):
    """A broken meta.json, or a char folder whose alphabet cannot decode its ids, stops before training."""
    data = write_prepared(tmp_path / "ids", 37)
    message = r"meta.json must be JSON with a vocab_size from 1 to 65536 \(uint16 ids\) and, for a char tokenizer"
    for meta in ('{"vocab_size": 37,', json.dumps({"vocab_size": 37, "tokenizer": "char", "alphabet": "abc"})):
        (data / "meta.json").write_text(meta)
        with pytest.raises(SystemExit, match=message):
            vt.main(tiny_args(tmp_path, data))
    assert not (tmp_path / "out").exists()


def test_the_default_scorer_is_used_only_from_the_cache_and_an_asked_one_must_load(tmp_path, monkeypatch,
                                                                                  capsys):
    """Left to its default, GPT-2 Large is only looked up in the local Hugging Face cache, never downloaded
    (3.2 GB nobody asked for): where it is not there one line says how to get it and the run goes on. A scorer
    asked for by name may be downloaded, and must load before any training."""
    transformers = pytest.importorskip("transformers")
    data = write_text(tmp_path / "poem.txt")
    tiny_scorer(tmp_path / "scorer", data.read_text(), context=64)
    calls, cache = [], {}

    def from_pretrained(cls):
        real = cls.from_pretrained

        def load(name, **kwargs):
            calls.append((name, kwargs.get("local_files_only")))
            if name not in cache:
                raise OSError(f"{name} is not in the cache")
            return real(cache[name])
        return load

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", from_pretrained(cls))
    args = [a for a in tiny_args(tmp_path, data, "--tokenizer", "char", "--method", "mdm", "--steps", "1")
            if a not in ("--eval-model", "none")]
    metrics = vt.main(args)
    assert "gen-PPL is skipped: GPT-2 Large is not in the Hugging Face cache; --eval-model gpt2-large " \
           "downloads it (about 3.2 GB" in capsys.readouterr().out
    assert calls == [("gpt2-large", True)] and all("gen_ppl" not in r for r in metrics["by_steps"])
    cache["gpt2-large"] = str(tmp_path / "scorer")  # now in the cache: used, still never downloaded
    metrics = vt.main(args + ["--out-dir", str(tmp_path / "cached")])
    assert calls[1:] == [("gpt2-large", True)] * 2 and math.isfinite(metrics["by_steps"][0]["gen_ppl"])
    capsys.readouterr()
    with pytest.raises(SystemExit, match="cannot load the scorer --eval-model my-scorer"):
        vt.main(args + ["--eval-model", "my-scorer", "--out-dir", str(tmp_path / "asked")])
    assert calls[-1] == ("my-scorer", False) and "] iter" not in capsys.readouterr().out


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    data = write_prepared(tmp_path / "ids", 19)
    vt.main(tiny_args(tmp_path, data, "--method", "mdm"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(SystemExit, match=r"was trained with --width 32 \(now 48\): pass the same flags"):
        vt.main(tiny_args(tmp_path, data, "--method", "mdm", "--width", "48", "--resume"))
    with pytest.raises(SystemExit, match="ckpt_vadd.pt does not exist"):
        vt.main(tiny_args(tmp_path, data, "--method", "vadd", "--eval-only"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_without_transformers_the_default_scorer_is_skipped_and_an_asked_one_says_what_to_install(monkeypatch,
                                                                                              capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    assert vt.load_scorer(types.SimpleNamespace(eval_model=None, device="cpu")) is None
    assert "gen-PPL is skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--eval-model gpt2 \(pip install transformers\)"):
        vt.load_scorer(types.SimpleNamespace(eval_model="gpt2", device="cpu"))
    assert vt.load_scorer(types.SimpleNamespace(eval_model="none", device="cpu")) is None


# ----------------------------------------------------------------------------------------------------------
# --objective steps (docs/method.md)

def test_steps_objective_end_to_end_and_its_recognition_sees_everything_masked(tmp_path):
    data = write_prepared(tmp_path / "ids", 37)
    metrics = vt.main(tiny_args(tmp_path, data, "--method", "both", "--objective", "steps",
                                "--train-steps", "1,3"))
    saved = check_outputs(tmp_path / "out", metrics, 37, ["mdm", "vadd", "vadd_cs"])
    assert all(saved["config"][m]["objective"] == "steps" and saved["config"][m]["train_steps"] == [1, 3]
               for m in ("mdm", "vadd"))
    cfg = small_cfg(tmp_path, "--objective", "steps")
    model = vt.Model(cfg, "vadd", 11)
    masks, forward = [], model.recognition.forward
    model.recognition.forward = lambda x0, masked: (masks.append(masked.clone()), forward(x0, masked))[1]
    loss, kl = model(torch.randint(0, 11, (8, 16)), 1.0)
    assert len(masks) == 1 and masks[0].all() and loss.shape == (8,) and torch.isfinite(loss).all()


def test_steps_objective_with_one_step_is_the_t1_bound(tmp_path):
    """K = 1 for MDM: everything masked and one step, so the loss is the valid T = 1 bound exactly."""
    torch.manual_seed(0)
    cfg = small_cfg(tmp_path, "--objective", "steps", "--train-steps", "1")
    model = vt.Model(cfg, "mdm", 11)
    torch.nn.init.normal_(model.denoiser.out.weight, std=0.5)  # a denoiser that is not uniform
    x0 = torch.randint(0, 11, (8, 16))
    with torch.no_grad():
        loss, _ = model(x0, 1.0)
        bound = common.step_bound(x0, model.denoise, model.schedule, 11, 1, exact=True)
    assert torch.allclose(loss, bound, rtol=1e-5)
