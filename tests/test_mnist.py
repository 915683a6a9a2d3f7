"""vadd_mnist.py: reading the IDX files and the md5-checked download on files the tests write, binarisation
and padding, the presets, the networks' conditioning paths, the samplers, and tiny end-to-end runs through
main()."""
import gzip
import hashlib
import json
import math
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import vadd_mnist as mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def idx_bytes(array):
    """An IDX file of unsigned bytes: magic 0x0000 08 ndim, big-endian dimensions, then the data."""
    return struct.pack(f">I{array.ndim}I", 0x800 + array.ndim, *array.shape) + array.astype(np.uint8).tobytes()


def digits(n, rng):
    """n 28 x 28 grey images, each a bright random bar on a dark background: data with some structure."""
    images = rng.integers(0, 60, (n, 28, 28))
    for img in images:
        r, c = rng.integers(4, 18, 2)
        img[r:r + rng.integers(3, 10), c:c + rng.integers(3, 10)] = rng.integers(128, 256)
    return images.astype(np.uint8)


def write_mnist(folder, n_train=120, n_test=24, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for part, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (("images-idx3", digits(n, rng)), ("labels-idx1", rng.integers(0, 10, n))):
            data = idx_bytes(array)
            name = os.path.join(folder, f"{part}-{kind}-ubyte")
            with (gzip.open(name + ".gz", "wb") if gz else open(name, "wb")) as f:
                f.write(data)
    return folder


def tiny_args(tmp_path, *extra):
    data = tmp_path / "data"
    if not data.exists():
        write_mnist(data)
    return ["--data", str(data), "--channels", "8", "--rec-channels", "8", "--channel-mult", "1,2", "--patch", "4",
            "--attn-res", "4", "--num-res-blocks", "1", "--latent-dim", "4", "--dropout", "0", "--max-iters", "6",
            "--batch-size", "8",
            "--warmup-iters", "2", "--ema", "0.5", "--val-images", "16", "--num-eval", "16", "--eval-batch", "16",
            "--num-samples", "6", "--sample-batch", "6", "--steps", "1,3", "--iw-samples", "2",
            "--log-interval", "3", "--eval-interval", "3", "--ckpt-interval", "3", "--device", "cpu",
            "--out-dir", str(tmp_path / "out"), *extra]


# ----------------------------------------------------------------------------------------------------------
# IDX files and the download

@pytest.mark.parametrize("gz", [False, True])
def test_images_are_read_as_written(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    path = tmp_path / ("t10k-images-idx3-ubyte.gz" if gz else "t10k-images-idx3-ubyte")
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(idx_bytes(images))
    assert np.array_equal(mnist.read_images(str(tmp_path), "t10k"), images)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("damage", [
    lambda b: b"\x00\x00\x0d\x03" + b[4:],  # float data, not bytes
    lambda b: b"\x08\x03" + b[2:],  # a magic number that is not IDX
    lambda b: b[:-100],  # cut short
    lambda b: b[:10],  # cut inside the header
    lambda b: idx_bytes(np.zeros(24)),  # a labels file under the images' name
    lambda b: idx_bytes(np.zeros((3, 28, 27))),  # images of another size
])
def test_damaged_image_files_stop_with_one_sentence(tmp_path, gz, damage):
    path = tmp_path / ("t10k-images-idx3-ubyte.gz" if gz else "t10k-images-idx3-ubyte")
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(damage(idx_bytes(np.zeros((3, 28, 28)))))
    with pytest.raises(SystemExit, match="t10k-images-idx3-ubyte(.gz)? is not an intact IDX file of 28 x 28 "
                                         "images of bytes .*: fetch it again"):
        mnist.read_images(str(tmp_path), "t10k")


def test_truncated_gzip_stream_is_refused(tmp_path):
    blob = gzip.compress(idx_bytes(np.arange(3 * 784).reshape(3, 28, 28) % 256))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(blob[:len(blob) // 2])
    with pytest.raises(SystemExit, match="is not an intact IDX file"):
        mnist.read_images(str(tmp_path), "train")


def serve(tmp_path, monkeypatch):
    """A good mirror (the four gzipped files of write_mnist, their md5s as the known ones) behind a missing one."""
    good = write_mnist(str(tmp_path / "mirror"), gz=True)
    md5 = {name: hashlib.md5(open(os.path.join(good, name), "rb").read()).hexdigest() for name in mnist.MNIST_MD5}
    monkeypatch.setattr(mnist, "MNIST_MD5", md5)
    monkeypatch.setattr(mnist, "MIRRORS", [f"file://{tmp_path}/missing/", f"file://{good}/"])
    return good


def test_download_tries_the_next_mirror_and_keeps_only_checked_files(tmp_path, monkeypatch):
    good = serve(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    mnist.download_mnist(str(cache))
    assert sorted(os.listdir(cache)) == sorted(mnist.MNIST_MD5)
    cfg = mnist.parse_config(["--cache-dir", str(cache), "--val-images", "20", "--device", "cpu"])
    train, val, test = mnist.load_mnist(cfg)
    assert (len(train), len(val), len(test)) == (100, 20, 24)
    expected = mnist.binarize(mnist.read_images(good, "t10k"))
    assert torch.equal(test, expected)


def test_corrupt_download_is_deleted_and_reported(tmp_path, monkeypatch, capsys):
    serve(tmp_path, monkeypatch)
    bad = write_mnist(str(tmp_path / "bad"), gz=True, seed=1)  # same names, other bytes: md5 mismatch
    monkeypatch.setattr(mnist, "MIRRORS", [f"file://{bad}/", f"file://{tmp_path}/missing/"])
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit, match="could not download train-images-idx3-ubyte.gz intact .*md5 mismatch"):
        mnist.download_mnist(str(cache))
    assert os.listdir(cache) == []  # nothing cached, no partial file left
    assert "bad/train-images-idx3-ubyte.gz has md5 " in capsys.readouterr().out  # and why it was deleted


def test_cached_file_that_fails_its_md5_is_fetched_again(tmp_path, monkeypatch, capsys):
    serve(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    mnist.download_mnist(str(cache))
    path = cache / "t10k-images-idx3-ubyte.gz"
    intact = path.read_bytes()
    path.write_bytes(intact[:-7])
    mnist.download_mnist(str(cache))
    assert path.read_bytes() == intact
    assert f"{path} has md5 " in capsys.readouterr().out  # the cached copy, deleted and fetched again


def test_binarize_thresholds_at_half_and_pads_two_zero_pixels():
    images = np.full((3, 28, 28), 255, np.uint8)
    images[0] = 127  # just below 0.5: off
    images[1] = 128  # just above: on
    images[2, 5:9, 3] = 0
    x = mnist.binarize(images)
    assert x.shape == (3, 32, 32) and x.dtype == torch.int64 and set(x.unique().tolist()) <= {0, 1}
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert not x[:, border].any()  # the 2-pixel frame is zero
    assert not x[0, 2:30, 2:30].any() and x[1, 2:30, 2:30].all()
    assert torch.equal(x[2, 2:30, 2:30], torch.from_numpy((images[2] > 127).astype(np.int64)))


def test_every_preset_sets_the_same_flags_and_help_says_so(capsys):
    assert set(mnist.PRESETS["gpu"]) == set(mnist.PRESETS["cpu"])
    for preset in mnist.PRESETS:
        cfg = mnist.parse_config(["--preset", preset, "--device", "cpu"])
        assert all(getattr(cfg, key) is not None for key in mnist.PRESETS[preset])
    assert mnist.parse_config(["--preset", "gpu", "--device", "cpu"]).channel_mult == [1, 2, 2]
    with pytest.raises(SystemExit):
        mnist.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--channels CHANNELS channels of the UNets' first level (a multiple of 8) (default from --preset)" \
        in out


# ----------------------------------------------------------------------------------------------------------
# Networks, objective, samplers

def randomise(module):
    """Give the zero-initialised layers (modulation, output) random weights, as training would."""
    torch.manual_seed(0)
    for p in module.parameters():
        if not p.abs().sum():
            torch.nn.init.normal_(p, std=0.3)


def test_denoiser_shape_and_conditioning_on_z(tmp_path):
    cfg = mnist.parse_config(tiny_args(tmp_path))
    model = mnist.Model(cfg, "vadd").eval()
    xt = torch.randint(0, 3, (4, 32, 32))
    z = torch.randn(4, cfg.latent_dim)
    out = model.denoise(xt, None, z)
    assert out.shape == (4, 32, 32, 2)
    assert torch.equal(out, torch.zeros_like(out))  # zero head: uniform predictions at the start
    randomise(model.denoiser.head)
    a = model.denoise(xt, None, z)
    assert torch.allclose(a, model.denoise(xt, None, torch.randn_like(z)))  # zero modulation ignores z ...
    randomise(model.denoiser)
    a = model.denoise(xt, None, z)
    b = model.denoise(xt, None, torch.randn_like(z))
    assert (a - b).abs().mean() > 1e-3  # ... a trained one does not
    assert torch.allclose(a[1:], model.denoise(xt[1:], None, z[1:]), atol=1e-5)  # one z per image, no mixing


def test_time_conditioning_is_optional(tmp_path):
    cfg = mnist.parse_config(tiny_args(tmp_path, "--time-cond"))
    model = mnist.Model(cfg, "mdm").eval()
    randomise(model)
    xt = torch.randint(0, 3, (2, 32, 32))
    assert not torch.allclose(model.denoise(xt, torch.tensor([0.1, 0.1]), None),
                              model.denoise(xt, torch.tensor([0.9, 0.9]), None))
    assert mnist.Model(mnist.parse_config(tiny_args(tmp_path)), "mdm").denoiser.time is None


def test_recognition_sees_x0_and_the_mask(tmp_path):
    cfg = mnist.parse_config(tiny_args(tmp_path))
    model = mnist.Model(cfg, "vadd").eval()
    x0 = torch.randint(0, 2, (3, 32, 32))
    masked = torch.rand(3, 32, 32) < 0.5
    mean, logvar = model.recognition(x0, masked)
    assert mean.shape == logvar.shape == (3, cfg.latent_dim)
    randomise(model.recognition)
    mean, _ = model.recognition(x0, masked)
    assert (mean - model.recognition(1 - x0, masked)[0]).abs().mean() > 1e-3
    assert (mean - model.recognition(x0, ~masked)[0]).abs().mean() > 1e-3


def test_fresh_denoiser_gives_nelbo_1024_log_2(tmp_path):
    """A uniform denoiser costs L log V per image in expectation over t and x_t (docs/method.md)."""
    torch.manual_seed(1)
    cfg = mnist.parse_config(tiny_args(tmp_path))
    model = mnist.Model(cfg, "mdm")
    x0 = torch.randint(0, 2, (4096, 32, 32))
    with torch.no_grad():
        loss, _ = mnist.delbo(model, x0, 0.0)
    se = loss.std().item() / math.sqrt(len(loss))
    assert abs(loss.mean().item() - 1024 * math.log(2)) < 4 * se


def test_standard_errors_with_repeats_are_over_distinct_images(tmp_path, monkeypatch):
    """--eval-repeats R passes over n images: each image's R estimates are averaged first, then the mean and
    its standard error are taken over the n image means (R passes are not R n independent images)."""
    cfg = mnist.parse_config(tiny_args(tmp_path, "--eval-repeats", "3", "--eval-batch", "4", "--steps", "2"))
    g, drawn = torch.Generator().manual_seed(0), {"nelbo": [], "bound": []}

    def draw(key, x):  # a different figure for every image and every pass, remembered in call order
        values = 700 + 50 * torch.randn(len(x), generator=g, dtype=torch.float64)
        drawn[key].append(values)
        return values

    monkeypatch.setattr(mnist, "delbo", lambda model, x, lam: (draw("nelbo", x), None))
    monkeypatch.setattr(common, "step_bound", lambda x, *args, **kwargs: draw("bound", x))
    x0 = torch.randint(0, 2, (10, 32, 32))
    figures = mnist.likelihoods(mnist.Model(cfg, "mdm"), x0, cfg)
    for key, figure in [("nelbo", figures["mdm_nelbo"]), ("bound", figures["mdm", 2])]:
        per_image = np.mean(np.split(torch.cat(drawn[key]).numpy() / (1024 * math.log(2)), 3), axis=0)
        assert len(per_image) == 10  # the figures are float32: equal to about 1e-7
        assert figure == pytest.approx((per_image.mean(), per_image.std(ddof=1) / math.sqrt(10)), rel=1e-6)


def test_samplers_end_binary_and_count_evaluations_honestly(tmp_path):
    """The spy sees every batch the denoiser runs on. VADD-CS: every z is one of the first call's; vanilla:
    every call brings new z. Without a time input MDM and VADD-CS skip images that did not change, so a
    sampler with more steps than pixels runs the network at most once per revealed pixel (and a first
    time); with --time-cond every step that leaves a [M] runs it."""
    torch.manual_seed(2)
    for flags in ([], ["--time-cond"]):
        cfg, calls = mnist.parse_config(tiny_args(tmp_path, *flags)), []
        models = {method: mnist.Model(cfg, method).eval() for method in ("mdm", "vadd")}
        for model in models.values():
            randomise(model.denoiser)
            forward = model.denoiser.forward
            model.denoiser.forward = (lambda xt, t=None, z=None, f=forward:
                                      (calls.append((len(xt), z)), f(xt, t, z))[1])
        for sampler, T, n in [("vadd_cs", 4, 6), ("vadd", 4, 6), ("mdm", 4, 6), ("vadd_cs", 1100, 2)]:
            calls.clear()
            images, nfe = mnist.sample(models["mdm" if sampler == "mdm" else "vadd"], n, T, sampler, cfg)
            assert images.shape == (n, 32, 32) and images.dtype == np.uint8 and images.max() <= 1
            assert nfe == sum(k for k, _ in calls) / n
            if T == 4:
                assert nfe == 4  # 1024 pixels: every image changes and keeps a [M] until the last step
            else:
                assert nfe > 1025 if flags else nfe <= 1025
            if sampler != "mdm" and T == 4:
                seen = [z for _, z in calls]
                for i, z in enumerate(seen[1:], 1):
                    earlier = (z[:, None, :] == torch.cat(seen[:i])[None]).all(-1).any(1)
                    assert torch.all(earlier) if sampler == "vadd_cs" else not torch.any(earlier)


# ----------------------------------------------------------------------------------------------------------
# End to end through main()

def test_main_writes_every_output(tmp_path, capsys):
    metrics = mnist.main(tiny_args(tmp_path))
    out = tmp_path / "out"
    names = ["metrics.json", "overview.png", "bounds.png", "training.png", "ckpt_mdm.pt", "ckpt_vadd.pt"]
    names += [f"samples_{s}_T{T}.npy" for s in ("mdm", "vadd", "vadd_cs") for T in (1, 3)]
    for name in names:
        assert (out / name).stat().st_size > 0, name
    for s in ("mdm", "vadd", "vadd_cs"):
        for T in (1, 3):
            a = np.load(out / f"samples_{s}_T{T}.npy")
            assert a.shape == (6, 32, 32) and a.dtype == np.uint8 and set(np.unique(a)) <= {0, 1}  # no [M] = 2
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["unit"].startswith("bits per dimension") and saved["config"]["vadd"]["channels"] == 8
    assert set(saved["likelihood"]["mdm"]) == {"mdm_nelbo", "mdm_nelbo_se"}
    assert set(saved["likelihood"]["vadd"]) == {"delbo", "delbo_se", "iw_delbo", "iw_delbo_se", "iw_samples"}
    assert saved["training"]["mdm"]["iters"] == saved["training"]["vadd"]["iters"] == 6
    assert len(saved["by_steps"]) == 6
    for row in saved["by_steps"]:
        for key in ("sampler", "steps", "bound", "bound_se", "sample_seconds", "nfe", "nn_hamming"):
            assert key in row, key
        assert 0.5 < row["bound"] < 1.5 and 1 <= row["nfe"] <= row["steps"]  # near 1 bpd: a barely trained model
    assert metrics["by_steps"] == saved["by_steps"]
    printed = capsys.readouterr().out
    assert "VADD DELBO (not a bound)" in printed and "images/s" in printed and "eta" in printed


def test_grad_accum_runs_each_batch_in_micro_batches_and_steps_once(tmp_path, monkeypatch):
    """--grad-accum 2: each iteration runs the objective on two halves of the batch at the same lambda, then
    steps the optimizer (and the EMA) once."""
    seen, updates, forward, update = [], [], mnist.Model.forward, common.EMA.update

    def spy(self, x0, kl_weight):
        if torch.is_grad_enabled():  # training, not validation or evaluation
            seen.append((len(x0), float(kl_weight)))
        return forward(self, x0, kl_weight)

    monkeypatch.setattr(mnist.Model, "forward", spy)
    monkeypatch.setattr(common.EMA, "update", lambda self, model: (updates.append(1), update(self, model)))
    mnist.main(tiny_args(tmp_path, "--method", "vadd", "--grad-accum", "2", "--max-iters", "4", "--kl-warmup", "4",
                         "--steps", "1", "--num-samples", "2"))
    assert seen == [(4, 0.0), (4, 0.0), (4, 0.25), (4, 0.25), (4, 0.5), (4, 0.5), (4, 0.75), (4, 0.75)]
    assert len(updates) == 4


def test_resume_matches_a_run_straight_through(tmp_path, monkeypatch):
    args = lambda d: tiny_args(d, "--method", "vadd", "--steps", "1", "--num-samples", "2")  # noqa: E731
    mnist.main(args(tmp_path / "straight"))
    update, calls = common.EMA.update, []

    def interrupted_update(self, model):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the run dies after the checkpoint at iteration 3
        update(self, model)

    monkeypatch.setattr(common.EMA, "update", interrupted_update)
    with pytest.raises(KeyboardInterrupt):
        mnist.main(args(tmp_path / "resumed"))
    monkeypatch.setattr(common.EMA, "update", update)
    assert torch.load(tmp_path / "resumed" / "out" / "ckpt_vadd.pt", weights_only=True)["iter"] == 3
    mnist.main(args(tmp_path / "resumed") + ["--resume"])
    a = torch.load(tmp_path / "straight" / "out" / "ckpt_vadd.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "out" / "ckpt_vadd.pt", weights_only=True)
    assert b["iter"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_eval_only_and_sample_only_use_the_checkpoint_and_replace_the_methods_figures(tmp_path):
    mnist.main(tiny_args(tmp_path, "--method", "mdm"))
    ckpt = tmp_path / "out" / "ckpt_mdm.pt"
    before = ckpt.read_bytes()
    metrics = mnist.main(tiny_args(tmp_path, "--method", "mdm", "--eval-only", "--steps", "1,2"))
    assert ckpt.read_bytes() == before  # nothing trained
    assert [r["steps"] for r in metrics["by_steps"]] == [1, 2] and all("bound" in r for r in metrics["by_steps"])
    assert "mdm_nelbo" in metrics["likelihood"]["mdm"]
    metrics = mnist.main(tiny_args(tmp_path, "--method", "mdm", "--sample-only", "--steps", "2",
                                   "--num-samples", "3"))
    assert np.load(tmp_path / "out" / "samples_mdm_T2.npy").shape == (3, 32, 32)
    assert [r["steps"] for r in metrics["by_steps"]] == [2] and "bound" not in metrics["by_steps"][0]
    assert metrics["likelihood"]["mdm"] == {} and ckpt.read_bytes() == before


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear message, nothing written

@pytest.mark.parametrize("extra, message", [
    (["--method", "ddpm"], "invalid choice: 'ddpm'"),
    (["--channels", "12"], "must be a multiple of 8"),
    (["--rec-channels", "12"], "--rec-channels 12: must be a multiple of 8"),
    (["--steps", "0"], "positive whole number"),
    (["--channel-mult", "1,x"], "whole numbers separated by commas"),
    (["--channel-mult", "1,2,2,2,2"], "too many levels"),
    (["--attn-res", "5"], "the UNet's resolutions are [8, 4]"),
    (["--attn-res", "4,x"], "whole numbers separated by commas"),
    (["--patch", "3"], "invalid choice: 3"),
    (["--num-samples", "0"], "argument --num-samples: '0' is not a whole number from 1 to inf"),
    (["--lr", "-1"], "argument --lr: '-1' is not a finite number from 0"),
    (["--dropout", "1.5"], "argument --dropout: '1.5' is not a finite number from 0 to 1"),
    (["--batch-size", "8", "--grad-accum", "3"], "must split evenly"),
    (["--eval-only", "--sample-only"], "argument --sample-only: not allowed with argument --eval-only"),
])
def test_bad_flags_stop_before_writing(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        mnist.main(tiny_args(tmp_path, *extra))
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_or_damaged_data_stops_before_writing(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "nonexistent"):
        with pytest.raises(SystemExit, match=re.escape(f"{folder} has no train-images-idx3-ubyte (nor .gz)")):
            mnist.main(tiny_args(tmp_path, "--data", str(folder)))
    data = write_mnist(str(tmp_path / "cut"))
    with open(os.path.join(data, "t10k-images-idx3-ubyte"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(SystemExit, match="t10k-images-idx3-ubyte is not an intact IDX file"):
        mnist.main(tiny_args(tmp_path, "--data", data))
    with pytest.raises(SystemExit, match="--val-images 500 leaves no training images"):
        mnist.main(tiny_args(tmp_path, "--val-images", "500"))
    (tmp_path / "file").write_text("not a folder")
    args = tiny_args(tmp_path, "--cache-dir", str(tmp_path / "file" / "mnist"))
    del args[args.index("--data"):args.index("--data") + 2]  # full MNIST, into a cache that cannot be made
    with pytest.raises(SystemExit, match="--cache-dir .* cannot be made a folder"):
        mnist.main(args)
    assert not (tmp_path / "out").exists()


def test_out_dir_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit, match="is not a folder this run can write to"):
        mnist.main(tiny_args(tmp_path, "--out-dir", str(tmp_path / "file" / "out")))
    assert (tmp_path / "file").read_text() == "not a folder"


def test_incompatible_or_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="ckpt_mdm.pt does not exist: train first"):
        mnist.main(tiny_args(tmp_path, "--method", "mdm", "--eval-only"))
    assert not (tmp_path / "out").exists()
    mnist.main(tiny_args(tmp_path, "--method", "mdm"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(SystemExit, match="was trained with .* pass the same flags"):
        mnist.main(tiny_args(tmp_path, "--method", "mdm", "--channels", "16", "--resume"))
    (tmp_path / "out" / "ckpt_vadd.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read .*ckpt_vadd.pt"):
        mnist.main(tiny_args(tmp_path, "--method", "vadd", "--eval-only"))
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.name != "ckpt_vadd.pt"}
    assert after == before


def test_ddp_on_two_cpu_processes(tmp_path):
    """torchrun with the gloo backend: both ranks train on their halves of each batch (in two micro-batches,
    the first without DDP's all-reduce) and stay in step; rank 0 alone writes the outputs."""
    args = tiny_args(tmp_path, "--method", "vadd", "--steps", "1", "--num-samples", "2", "--max-iters", "3",
                     "--grad-accum", "2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "vadd_mnist.py"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on 2 process(es)" in done.stdout and done.stdout.count("validation DELBO") == 1
    ckpt = torch.load(tmp_path / "out" / "ckpt_vadd.pt", weights_only=True)
    assert ckpt["iter"] == 3 and (tmp_path / "out" / "metrics.json").exists()


# ----------------------------------------------------------------------------------------------------------
# --objective steps (docs/method.md)

def test_steps_objective_end_to_end_and_its_recognition_sees_everything_masked(tmp_path):
    metrics = mnist.main(tiny_args(tmp_path, "--objective", "steps", "--train-steps", "1,3"))
    assert metrics["config"]["vadd"]["objective"] == "steps" and metrics["config"]["vadd"]["train_steps"] == [1, 3]
    assert {r["sampler"] for r in metrics["by_steps"]} == {"mdm", "vadd", "vadd_cs"}
    assert all(math.isfinite(r["bound"]) for r in metrics["by_steps"])
    cfg = mnist.parse_config(tiny_args(tmp_path, "--objective", "steps"))
    model = mnist.Model(cfg, "vadd")
    masks, forward = [], model.recognition.forward
    model.recognition.forward = lambda x0, masked: (masks.append(masked.clone()), forward(x0, masked))[1]
    loss, _ = model(torch.randint(0, 2, (4, 32, 32)), 1.0)
    assert len(masks) == 1 and masks[0].all() and loss.shape == (4,) and torch.isfinite(loss).all()
    with pytest.raises(SystemExit, match="was trained with"):  # a checkpoint of the other objective is refused
        mnist.main(tiny_args(tmp_path, "--objective", "delbo", "--resume"))


def test_steps_objective_with_one_step_is_the_t1_bound(tmp_path):
    torch.manual_seed(0)
    model = mnist.Model(mnist.parse_config(tiny_args(tmp_path, "--objective", "steps", "--train-steps", "1")),
                        "mdm")
    for p in model.parameters():  # a denoiser that is not uniform
        torch.nn.init.normal_(p, std=0.2)
    x0 = torch.randint(0, 2, (4, 32, 32))
    with torch.no_grad():
        loss, _ = model.eval()(x0, 1.0)
        bound = common.step_bound(x0, model.denoise, model.schedule, mnist.MASK, 1, exact=True)
    assert torch.allclose(loss, bound, rtol=1e-5)
