"""vadd_cifar.py on tiny configs: the binary-batch reader and the checked download on files written here,
the UNet's embeddings and conditioning, the samplers, end-to-end runs through main() (one process and two
under torchrun with gloo), the FID path, and bad input stopping with one clear message."""
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.error

import numpy as np
import pytest
import torch

import common
import vadd_cifar as vc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(n, seed=0):
    """n CIFAR-10 binary records: colour ramps (a label byte, then the red, green and blue planes)."""
    rng = np.random.default_rng(seed)
    colour, ramp = rng.integers(0, 256, (n, 3, 1, 1)), np.linspace(0, 1, 32)
    planes = colour * ramp[None, None, :, None] + (255 - colour) * ramp[None, None, None, :]
    labels = rng.integers(0, 10, (n, 1))
    return np.concatenate([labels, planes.astype(np.uint8).reshape(n, -1)], 1).astype(np.uint8).tobytes()


def write_cifar(folder, n=24):
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(vc.TRAIN_FILES + [vc.TEST_FILE]):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(records(n, seed=i))
    return str(folder)


def tiny_args(tmp_path, *extra):
    data = tmp_path / "data"
    if not data.exists():
        write_cifar(data)
    return ["--preset", "cpu", "--channels", "8", "--rec-channels", "8", "--channel-mult", "1,2",
            "--attn-res", "16", "--embed-dim", "4", "--latent-dim", "4", "--max-iters", "4", "--batch-size", "8",
            "--num-samples", "6", "--sample-batch", "4",
            "--steps", "1,3", "--num-eval", "10", "--eval-batch", "5", "--iw-samples", "2", "--val-images", "8",
            "--log-interval", "2", "--eval-interval", "2", "--ckpt-interval", "2", "--data", str(data),
            "--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *extra]


def tiny_model(tmp_path, method, seed=0):
    torch.manual_seed(seed)
    return vc.Model(vc.parse_config(tiny_args(tmp_path)), method).eval()


def sample_config(tmp_path, batch):
    return vc.parse_config(tiny_args(tmp_path, "--sample-batch", str(batch)))


def randomise(module):
    """Give zero-initialised layers (output convolution, modulations) random weights, so every path shows."""
    torch.manual_seed(1)
    for p in module.parameters():
        if p.dim() > 1 and not p.detach().abs().sum():
            torch.nn.init.normal_(p, std=0.1)
    return module


# ----------------------------------------------------------------------------------------------------------
# Data: binary batches and the checked download

def test_read_batch_parses_labels_and_channel_planes(tmp_path):
    raw = bytearray()
    for label in (3, 9):
        raw += bytes([label]) + bytes(range(256)) * 4 + bytes([label * 10]) * 1024 + bytes(1024)
    (tmp_path / "b.bin").write_bytes(bytes(raw))
    images, labels = vc.read_batch(str(tmp_path / "b.bin"))
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8 and labels.tolist() == [3, 9]
    assert images[0, 0, :, 0].tolist() == list(range(32)) and images[0, 1, 0, 0] == 32  # red, row-major
    assert (images[1, :, :, 1] == 90).all() and (images[:, :, :, 2] == 0).all()


def test_truncated_batch_is_a_clear_error(tmp_path, capsys):
    folder = write_cifar(tmp_path / "data")
    path = os.path.join(folder, "data_batch_3.bin")
    with open(path, "rb+") as f:
        f.truncate(2 * vc.RECORD + 100)
    with pytest.raises(SystemExit, match="truncated or not a binary batch"):
        vc.read_batch(path)
    with pytest.raises(SystemExit, match="data_batch_3.bin holds 6246 bytes"):
        vc.main(tiny_args(tmp_path))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(SystemExit, match="holds 0 bytes"):
        vc.read_batch(str(tmp_path / "empty.bin"))


def cifar_archive(path, n=4):
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate(vc.TRAIN_FILES + [vc.TEST_FILE]):
            payload = records(n, seed=i)
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def test_download_with_a_wrong_checksum_is_deleted_and_reported(tmp_path, monkeypatch):
    md5 = cifar_archive(tmp_path / "cifar.tar.gz")
    monkeypatch.setattr(vc, "CIFAR_URL", (tmp_path / "cifar.tar.gz").as_uri())
    cfg = vc.parse_config(["--preset", "cpu", "--cache-dir", str(tmp_path / "cache"), "--val-images", "4"])
    with pytest.raises(SystemExit, match=f"corrupt or partial \\(md5 {md5}, expected c32a1d4ab5d03f1284b6"):
        vc.cifar_folder(cfg)
    assert os.listdir(tmp_path / "cache") == []  # nothing cached
    monkeypatch.setattr(vc, "CIFAR_URL", (tmp_path / "missing.tar.gz").as_uri())
    with pytest.raises(SystemExit, match="cannot download .* pass --data DIR"):
        vc.cifar_folder(cfg)
    assert os.listdir(tmp_path / "cache") == []
    # the archive with its right checksum: unpacked once into the cache, then read from there
    monkeypatch.setattr(vc, "CIFAR_URL", (tmp_path / "cifar.tar.gz").as_uri())
    monkeypatch.setattr(vc, "CIFAR_MD5", md5)
    train, val, test = vc.load_cifar(cfg)
    assert sorted(os.listdir(tmp_path / "cache")) == ["cifar-10-batches-bin"]
    assert len(train) == 5 * 4 - 4 and len(val) == 4 and test.shape == (4, 32, 32, 3)
    os.remove(tmp_path / "cifar.tar.gz")  # a second load needs no download
    assert np.array_equal(vc.load_cifar(cfg)[2], test)


# ----------------------------------------------------------------------------------------------------------
# Networks

def test_unet_output_shape_and_per_sub_pixel_embeddings(tmp_path):
    model = randomise(tiny_model(tmp_path, "mdm"))
    xt = torch.randint(0, vc.V + 1, (2, 32, 32, 3))  # values and [M]
    logits = model.denoiser(xt)
    assert logits.shape == (2, 32, 32, 3, vc.V)  # 256 logits per sub-pixel: [M] is never predicted
    embed = model.denoiser.embed
    assert embed(xt).shape == (2, 3 * 4, 32, 32)
    same_value = torch.full((1, 32, 32, 3), 7)  # one value in each colour: three different vectors
    h = embed(same_value)[0, :, 0, 0].view(3, 4)
    assert not torch.allclose(h[0], h[1]) and not torch.allclose(h[1], h[2])
    changed = xt.clone()
    changed[0, 5, 9, 2] = (changed[0, 5, 9, 2] + 1) % (vc.V + 1)  # one sub-pixel
    out = model.denoiser(changed)
    assert not torch.allclose(out[0], logits[0]) and torch.allclose(out[1], logits[1])


def test_latent_conditions_the_denoiser_and_the_mask_conditions_recognition(tmp_path):
    model = tiny_model(tmp_path, "vadd")
    xt, z = torch.randint(0, vc.V + 1, (2, 32, 32, 3)), torch.randn(2, 4)
    fresh = model.denoiser(xt, None, z)
    assert torch.equal(fresh, model.denoiser(xt, None, torch.randn(2, 4)))  # zero-initialised: uniform output
    randomise(model)
    assert not torch.allclose(model.denoiser(xt, None, z), model.denoiser(xt, None, torch.randn(2, 4)))
    assert model.denoiser.latent is not None and tiny_model(tmp_path, "mdm").denoiser.latent is None
    x0 = torch.randint(0, vc.V, (2, 32, 32, 3))
    masked = torch.rand(2, 32, 32, 3) < 0.5
    mean, logvar = model.recognition(x0, masked)
    assert mean.shape == logvar.shape == (2, 4)
    assert not torch.allclose(model.recognition(x0, ~masked)[0], mean)


def test_uniform_denoiser_gives_nelbo_d_log_v(tmp_path):
    """A fresh denoiser is uniform over the 256 values (zero output layer): NELBO = D log V per image,
    since E_t[w(t) * 1{masked}] = 1 per position (docs/method.md)."""
    torch.manual_seed(2)
    model = tiny_model(tmp_path, "mdm")
    x0 = torch.randint(0, vc.V, (256, 32, 32, 3))
    with torch.no_grad():
        loss, _ = vc.delbo(model, x0, 0.0)
    assert model.schedule.name == "linear"
    se = loss.std().item() / math.sqrt(len(loss))
    assert abs(loss.mean().item() - vc.D * math.log(vc.V)) < 4 * se


def test_samplers_reveal_everything_and_the_consistency_sampler_keeps_z(tmp_path, monkeypatch):
    """The spy sees the z of every image the denoiser runs on. VADD-CS: every z is one of the first call's;
    vanilla: every call brings new z. Every sampler's last reverse step leaves no [M]."""
    model = tiny_model(tmp_path, "vadd")
    seen, forward = [], model.denoiser.forward
    model.denoiser.forward = lambda xt, t=None, z=None: (seen.append(z.clone()), forward(xt, t, z))[1]
    finals, reverse = [], common.reverse_step
    monkeypatch.setattr(common, "reverse_step", lambda xt, *a: finals.append(reverse(xt, *a)) or finals[-1])
    for sampler in ("vadd_cs", "vadd"):
        seen.clear()
        images, nfe = vc.sample(model, 5, 4, sampler, sample_config(tmp_path, 5))
        assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
        assert not (finals[-1] == vc.MASK).any()
        assert torch.equal(finals[-1].to(torch.uint8), torch.from_numpy(images))
        assert len(seen) == 4 and nfe == sum(len(z) for z in seen) / 5
        for i, z in enumerate(seen[1:], 1):
            earlier = (z[:, None, :] == torch.cat(seen[:i])[None]).all(-1).any(1)
            assert torch.all(earlier) if sampler == "vadd_cs" else not torch.any(earlier)


def test_mdm_sampler_reuses_the_output_of_unchanged_images(tmp_path):
    """With T = 1024 steps, a step reveals nothing in a given image with chance about exp(-3072 / T): the
    time-free denoiser is not rerun on such an image (about 51 steps of 1024), and the evaluations counted
    are the rows it ran on."""
    model = tiny_model(tmp_path, "mdm")
    rows = []
    model.denoiser.forward = lambda xt, t=None, z=None: (rows.append(len(xt)), torch.zeros(*xt.shape, vc.V))[1]
    torch.manual_seed(5)
    T = 1024
    images, nfe = vc.sample(model, 2, T, "mdm", sample_config(tmp_path, 2))
    assert images.shape == (2, 32, 32, 3) and nfe == sum(rows) / 2
    assert 0.9 * T < nfe < 0.99 * T  # about (1 - exp(-3)) T = 0.95 T


# ----------------------------------------------------------------------------------------------------------
# End to end through main()

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    metrics = vc.main(tiny_args(tmp, "--grad-accum", "2"))
    return tmp, metrics


def test_main_writes_every_output(trained_run):
    tmp, metrics = trained_run
    out = tmp / "out"
    names = ["metrics.json", "samples.png", "by_steps.png", "training.png", "ckpt_mdm.pt", "ckpt_vadd.pt"]
    names += [f"samples_{s}_T{T}.{ext}" for s in vc.SAMPLERS for T in (1, 3) for ext in ("npy", "png")]
    for name in names:
        assert (out / name).stat().st_size > 0, name
    for s in vc.SAMPLERS:
        a = np.load(out / f"samples_{s}_T3.npy")
        assert a.shape == (6, 32, 32, 3) and a.dtype == np.uint8
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["unit"].startswith("bits per dimension")
    assert saved["config"]["mdm"]["channels"] == saved["config"]["vadd"]["channels"] == 8
    for method, key in [("mdm", "mdm_nelbo"), ("mdm", "mdm_nelbo_se"), ("vadd", "delbo"), ("vadd", "delbo_se"),
                        ("vadd", "iw_delbo"), ("vadd", "iw_delbo_se"), ("vadd", "iw_samples")]:
        assert key in saved["likelihood"][method], (method, key)
    assert 7 < saved["likelihood"]["mdm"]["mdm_nelbo"] < 9  # four steps from uniform (8 bpd)
    for method in ("mdm", "vadd"):
        summary = saved["training"][method]
        assert summary["iters"] == 4 and summary["seconds"] > 0 and summary["images_per_s"] > 0, summary
    assert len(saved["by_steps"]) == 6 and metrics["by_steps"] == saved["by_steps"]
    for row in saved["by_steps"]:
        assert row["bound"] > 0 and row["nfe"] == row["steps"] and row["sample_seconds"] > 0, row
    ckpt = torch.load(out / "ckpt_vadd.pt", weights_only=True)
    assert ckpt["iter"] == 4 and [v[0] for v in ckpt["history"]["val"]] == [2, 4]
    assert ckpt["config"]["method"] == "vadd"


def test_eval_only_and_sample_only_from_the_checkpoints(trained_run, tmp_path):
    src, metrics = trained_run
    out = tmp_path / "out"
    shutil.copytree(src / "out", out)

    def args(*extra):
        return tiny_args(tmp_path, "--data", str(src / "data"), "--grad-accum", "2", *extra)

    before = torch.load(out / "ckpt_mdm.pt", weights_only=True)
    again = vc.main(args("--eval-only", "--method", "mdm", "--steps", "2"))
    assert torch.load(out / "ckpt_mdm.pt", weights_only=True)["iter"] == before["iter"]  # no training
    rows = {(r["sampler"], r["steps"]) for r in again["by_steps"]}
    assert ("mdm", 2) in rows and ("mdm", 1) not in rows  # the evaluated method's rows are replaced whole
    assert ("vadd_cs", 3) in rows and again["likelihood"]["vadd"] == metrics["likelihood"]["vadd"]  # others kept
    assert abs(again["likelihood"]["mdm"]["mdm_nelbo"] - metrics["likelihood"]["mdm"]["mdm_nelbo"]) < 1
    sampled = vc.main(args("--sample-only", "--method", "vadd", "--num-samples", "3"))
    row = next(r for r in sampled["by_steps"] if (r["sampler"], r["steps"]) == ("vadd", 3))
    assert row["num_samples"] == 3 and "bound" not in row and sampled["likelihood"]["vadd"] == {}  # no likelihoods
    assert sampled["likelihood"]["mdm"] == again["likelihood"]["mdm"]
    assert np.load(out / "samples_vadd_T3.npy").shape == (3, 32, 32, 3)


def test_resume_matches_a_run_straight_through(tmp_path, monkeypatch):
    args = lambda d: tiny_args(d, "--method", "vadd", "--steps", "1", "--num-samples", "2")  # noqa: E731
    vc.main(args(tmp_path / "straight"))
    update, calls = common.EMA.update, []

    def interrupted_update(self, model):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run dies after the checkpoint at iteration 2
        update(self, model)

    monkeypatch.setattr(common.EMA, "update", interrupted_update)
    with pytest.raises(KeyboardInterrupt):
        vc.main(args(tmp_path / "resumed"))
    monkeypatch.setattr(common.EMA, "update", update)
    assert torch.load(tmp_path / "resumed" / "out" / "ckpt_vadd.pt", weights_only=True)["iter"] == 2
    vc.main(args(tmp_path / "resumed") + ["--resume"])
    a = torch.load(tmp_path / "straight" / "out" / "ckpt_vadd.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "out" / "ckpt_vadd.pt", weights_only=True)
    assert b["iter"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_two_processes_under_torchrun_with_gloo(tmp_path):
    args = tiny_args(tmp_path, "--method", "vadd", "--max-iters", "2", "--steps", "2", "--num-samples", "5",
                     "--iw-samples", "1", "--device", "cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "vadd_cifar.py"), *args],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [r["num_samples"] for r in saved["by_steps"]] == [5, 5]  # 3 + 2 images gathered from the ranks
    assert np.load(tmp_path / "out" / "samples_vadd_cs_T2.npy").shape == (5, 32, 32, 3)
    assert run.stdout.count("iter       2/2") == 1  # only rank 0 prints


def test_the_overview_names_the_data_it_shows(tmp_path, monkeypatch):
    import matplotlib.figure
    titles, real = [], matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda fig, title, **kw: titles.append(title) or real(fig, title, **kw))
    for args in (tiny_args(tmp_path), ["--preset", "cpu", "--out-dir", str(tmp_path / "out")]):
        vc.plot_overview(str(tmp_path / "overview.png"), vc.parse_config(args), None, {"by_steps": []})
    assert titles[0].endswith("trained on data (--data)") and titles[1].endswith("trained on CIFAR-10")


# ----------------------------------------------------------------------------------------------------------
# FID through torchmetrics (its Inception comes from torch-fidelity, which needs torchvision and the network)

def test_fid_without_the_packages_stops_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)
    with pytest.raises(SystemExit, match="--fid needs torchmetrics and torch-fidelity"):
        vc.main(tiny_args(tmp_path, "--fid", "4"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_fid_without_torch_fidelity_or_its_weights_is_a_clear_error(tmp_path, monkeypatch):
    fid_module = pytest.importorskip("torchmetrics.image.fid")
    try:
        import torch_fidelity  # noqa: F401
        has_fidelity = True
    except Exception:
        has_fidelity = False
    if not has_fidelity:  # this machine: torchmetrics alone, as CI installs it
        with pytest.raises(SystemExit, match="--fid needs torch-fidelity as well as torchmetrics"):
            vc.main(tiny_args(tmp_path, "--fid", "4"))

    def offline(**kwargs):  # what torch.hub raises for the weights without a network
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fid_module, "FrechetInceptionDistance", offline)
    with pytest.raises(SystemExit, match="could not load the Inception weights .* --fid-weights PATH"):
        vc.main(tiny_args(tmp_path, "--fid", "4"))
    assert not (tmp_path / "out").exists()


class StandInFeatures(torch.nn.Module):
    """A fixed random projection of 8 x 8 average-pooled images in place of Inception (offline)."""
    num_features = 16

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)  # what Inception takes
        return torch.nn.functional.avg_pool2d(x.float() / 255, 4).flatten(1) @ self.w


def test_fid_path_with_stand_in_features(tmp_path, monkeypatch):
    fid_module = pytest.importorskip("torchmetrics.image.fid")
    real_class = fid_module.FrechetInceptionDistance
    monkeypatch.setattr(fid_module, "FrechetInceptionDistance",
                        lambda feature, feature_extractor_weights_path, **kw:
                            real_class(feature=StandInFeatures(), **kw))
    metric = vc.fid_metric(vc.parse_config(tiny_args(tmp_path)))
    images = vc.load_cifar(vc.parse_config(tiny_args(tmp_path)))[0]
    vc.fid_update(metric, images, real=True, batch=7)
    vc.fid_update(metric, images, real=False)
    assert float(metric.compute()) < 1e-3  # a set against itself
    metric.reset()  # keeps the reference statistics
    vc.fid_update(metric, np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8), real=False)
    assert float(metric.compute()) > 0.1
    metrics = vc.main(tiny_args(tmp_path, "--method", "mdm", "--fid", "10"))  # more than the 6 samples drawn
    assert all(r["fid"] > 0 and r["fid_samples"] == 6 for r in metrics["by_steps"])
    assert (tmp_path / "out" / "by_steps.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear message, nothing written

@pytest.mark.parametrize("extra, message", [
    (["--method", "gpt"], "invalid choice: 'gpt'"),
    (["--steps", "0"], "positive whole number"),
    (["--steps", "1,x"], "whole numbers separated by commas"),
    (["--channel-mult", "1,2,2,2,2"], "give 1 to 4 multipliers"),
    (["--channel-mult", "1,0"], "positive whole numbers separated by commas"),
    (["--channels", "3"], "argument --channels: '3' is not a whole number from 4"),
    (["--num-samples", "0"], "argument --num-samples: '0' is not a whole number from 1"),
    (["--batch-size", "8", "--grad-accum", "3"], "must split evenly"),
    (["--eval-only", "--resume"], "argument --resume: not allowed with argument --eval-only"),
    (["--lr", "-1"], "argument --lr: '-1' is not a finite number from 0"),
])
def test_bad_flags_stop_before_writing(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        vc.main(tiny_args(tmp_path, *extra))
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_data_folder_without_the_batches_is_one_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .*empty/data_batch_1.bin: give --data the folder that holds the "
                                         "extracted binary batches"):
        vc.main(tiny_args(tmp_path, "--data", str(tmp_path / "empty")))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_out_dir_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit, match="file/out is not a folder this run can write to"):
        vc.main(tiny_args(tmp_path, "--out-dir", str(tmp_path / "file" / "out")))
    assert (tmp_path / "file").read_text() == "not a folder"


def test_missing_or_incompatible_checkpoint_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="ckpt_mdm.pt does not exist: train first"):
        vc.main(tiny_args(tmp_path, "--method", "mdm", "--eval-only"))
    assert not (tmp_path / "out").exists()
    vc.main(tiny_args(tmp_path, "--method", "mdm", "--max-iters", "2", "--steps", "1", "--num-samples", "2"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(SystemExit, match="was trained with .* pass the same flags"):
        vc.main(tiny_args(tmp_path, "--method", "mdm", "--channels", "12", "--resume"))
    (tmp_path / "out" / "ckpt_vadd.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read .*ckpt_vadd.pt"):
        vc.main(tiny_args(tmp_path, "--method", "vadd", "--sample-only"))
    before["ckpt_vadd.pt"] = b"not a checkpoint"
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


# ----------------------------------------------------------------------------------------------------------
# --objective steps (docs/method.md)

def test_steps_objective_end_to_end_and_its_recognition_sees_everything_masked(tmp_path):
    metrics = vc.main(tiny_args(tmp_path, "--objective", "steps", "--train-steps", "1,3"))
    assert metrics["config"]["vadd"]["objective"] == "steps" and metrics["config"]["vadd"]["train_steps"] == [1, 3]
    assert {r["sampler"] for r in metrics["by_steps"]} == {"mdm", "vadd", "vadd_cs"}
    assert all(math.isfinite(r["bound"]) for r in metrics["by_steps"])
    model = vc.Model(vc.parse_config(tiny_args(tmp_path, "--objective", "steps")), "vadd")
    masks, forward = [], model.recognition.forward
    model.recognition.forward = lambda x0, masked: (masks.append(masked.clone()), forward(x0, masked))[1]
    loss, _ = model(torch.randint(0, 256, (2, 32, 32, 3)), 1.0)
    assert len(masks) == 1 and masks[0].all() and loss.shape == (2,) and torch.isfinite(loss).all()
    with pytest.raises(SystemExit, match="was trained with"):  # a checkpoint of the other objective is refused
        vc.main(tiny_args(tmp_path, "--objective", "delbo", "--resume"))
