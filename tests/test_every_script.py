"""What every script must do the same way, checked on each of the four through its own code on tiny configs:
its DELBO is the formula written by hand, its recognition model reads x0 and the mask and returns float32,
lambda reaches the objective at every iteration and compiles once, evaluation and sampling use the EMA
weights, every network call of evaluation and sampling fits the logit budget, and the image UNets hand the
attention kernels the layout the fused kernels take."""
import functools
import math
import re

import numpy as np
import pytest
import torch
import torch.utils.flop_counter

import common
import test_cifar
import test_mnist
import test_text
import test_toy
import vadd_cifar
import vadd_mnist
import vadd_text
import vadd_toy
from helpers import fix_draws, kl_by_hand, nll_by_hand, perturb

SCRIPTS = ("toy", "text", "mnist", "cifar")
MODULES = {"toy": vadd_toy, "text": vadd_text, "mnist": vadd_mnist, "cifar": vadd_cifar}


def tiny_args(name, tmp_path, *extra):
    if name == "toy":
        return test_toy.tiny_args(tmp_path, *extra)
    if name == "text":
        return test_text.tiny_args(tmp_path, test_text.write_text(tmp_path / "poem.txt"), "--tokenizer", "char",
                                   *extra)
    return (test_mnist if name == "mnist" else test_cifar).tiny_args(tmp_path, *extra)


def tiny_model(name, tmp_path, method):
    """(model with every parameter perturbed, a batch x0, the mask id, its schedule, its DELBO(model, x0, lam)).
    The recognition's output layer is perturbed most, so that r is far from the prior (a KL of several nats)."""
    model, x0, mask_id, schedule, delbo = build(name, tmp_path, method)
    perturb(model)
    if model.recognition is not None:
        perturb([m for m in model.recognition.modules() if isinstance(m, torch.nn.Linear)][-1], std=0.5)
    return model.eval(), x0, mask_id, schedule, delbo


def build(name, tmp_path, method, *extra):
    m = MODULES[name]
    cfg = m.parse_config(tiny_args(name, tmp_path, *extra))
    torch.manual_seed(0)
    if name == "toy":
        model, x0 = m.Model(cfg, method), torch.randint(0, cfg.bins, (4, 2))
    elif name == "text":
        model, x0 = m.Model(cfg, method, 11), torch.randint(0, 11, (4, cfg.block_size))
    elif name == "mnist":
        model, x0 = m.Model(cfg, method), torch.randint(0, 2, (4, 32, 32))
    else:
        model, x0 = m.Model(cfg, method), torch.randint(0, 256, (4, 32, 32, 3))
    return model, x0, model.mask_id, model.schedule, m.delbo


@pytest.mark.parametrize("method", ["mdm", "vadd"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_delbo_is_its_formula_by_hand(name, method, tmp_path, monkeypatch):
    """w(t) * (sum_masked -log mu(x0 | x_t, z) + lambda * KL(r(z | x0, x_t) || N(0, I))), with the draws fixed:
    a KL not weighted by w(t), a lambda ignored, or a recognition that is not given the mask of x_t fails."""
    model, x0, mask_id, schedule, delbo = tiny_model(name, tmp_path, method)
    t = torch.tensor([0.2, 0.45, 0.7, 0.95])
    mask = fix_draws(monkeypatch, t)
    with torch.no_grad():
        loss, kl = delbo(model, x0, torch.tensor(0.3))
        xt = mask(x0, schedule.alpha(t), mask_id)
        masked = xt == mask_id
        z, kl_hand = None, torch.zeros(len(x0), dtype=torch.float64)
        if method == "vadd":
            mean, logvar = model.recognition(x0, masked)
            z, kl_hand = mean + 0.7 * torch.exp(0.5 * logvar), kl_by_hand(mean, logvar)
        nll = nll_by_hand(model.denoise(xt, t, z), x0, masked)
        expected = schedule.weight(t.double()) * (nll + 0.3 * kl_hand)
    assert masked.any() and not masked.all()
    assert torch.allclose(loss.double(), expected, rtol=1e-5), (loss, expected)
    assert torch.allclose(kl.double(), kl_hand, rtol=1e-4, atol=1e-6)
    if method == "vadd":  # the KL part alone: thousands of nats of NLL (CIFAR) would hide it in a relative check
        assert kl_hand.min() > 1  # r is far from the prior
        kl_part = loss.double() / schedule.weight(t.double()) - nll
        assert torch.allclose(kl_part, 0.3 * kl_hand, rtol=1e-3, atol=1e-5 * nll.max().item()), (kl_part, kl_hand)


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("objective", ["delbo", "steps"])
def test_a_mixture_prior_is_learned_with_the_model_and_sampled_from(name, objective, tmp_path):
    """The objective's gradient reaches every parameter of the mixture (its KL is log r(z) - log p(z)), and
    both VADD samplers draw their z from it."""
    model, x0, *_ = build(name, tmp_path, "vadd", "--prior", "mixture", "--prior-components", "2",
                          "--objective", objective)
    loss, kl = model(x0, torch.tensor(1.0))
    loss.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prior.parameters())
    with torch.no_grad():
        model.prior.means.fill_(7.0)
        model.prior.logvars.fill_(math.log(1e-4))
    for sampler in ("vadd", "vadd_cs"):
        z = MODULES[name].SAMPLERS[sampler][2](None, 50, model)
        assert z.shape == (50, model.latent_dim) and torch.allclose(z, torch.full_like(z, 7.0), atol=0.1)


@pytest.mark.parametrize("name", ["text", "mnist", "cifar"])
def test_a_mixture_prior_is_saved_and_restored_with_the_model(name, tmp_path):
    """--eval-only after training gives the very figures and samples of the run: the learned prior (its EMA)
    came back from the checkpoint with the networks."""
    args = tiny_args(name, tmp_path, "--method", "vadd", "--prior", "mixture", "--prior-components", "3")
    trained = MODULES[name].main(args)
    out = tmp_path / "out"
    saved = {path.name: np.load(path) for path in out.glob("samples_vadd*.npy")}
    assert len(saved) >= 2
    assert torch.load(out / "ckpt_vadd.pt", weights_only=True)["ema"]["params"]["prior.means"].shape[0] == 3
    evaluated = MODULES[name].main(args + ["--eval-only"])
    assert evaluated["likelihood"]["vadd"] == trained["likelihood"]["vadd"]
    for file, samples in saved.items():
        assert np.array_equal(np.load(out / file), samples), file


@pytest.mark.parametrize("name", SCRIPTS)
def test_recognition_reads_x0_and_the_mask_and_returns_float32(name, tmp_path):
    """r(z | x0, x_t) must see which tokens are masked (a recognition without the mask collapses to the prior,
    the paper's ablation) and return float32 under bf16 autocast, so z's noise is not drawn in bf16."""
    model, x0, _, _, _ = tiny_model(name, tmp_path, "vadd")
    half = torch.rand(x0.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    with torch.no_grad():
        outputs = [torch.cat(model.recognition(x, m), -1) for x, m in
                   [(x0, torch.zeros_like(half)), (x0, torch.ones_like(half)), (x0, half), (x0.flip(0), half)]]
        for a, b in zip(outputs, outputs[1:]):
            assert (a - b).abs().max() > 1e-4
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mean, logvar = model.recognition(x0, half)
    assert mean.dtype == logvar.dtype == torch.float32


@pytest.mark.parametrize("name, flag, first_layer", [
    ("toy", "--rec-width", lambda r: r.net[0].out_features),
    ("mnist", "--rec-channels", lambda r: r.unet.stem.out_channels),
    ("cifar", "--rec-channels", lambda r: r.encoder.conv_in.out_channels)])
def test_the_recognition_is_sized_on_its_own_and_its_checkpoints_say_so(name, flag, first_layer, tmp_path):
    """The recognition flag changes the recognition model alone; a checkpoint is refused at another size, and
    one saved before the flag existed (no such setting) loads at the denoiser's size (the tiny configs')."""
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    default, small = build(name, tmp_path, "vadd")[0], build(name, tmp_path, "vadd", flag, "16")[0]
    assert first_layer(small.recognition) == 16 != first_layer(default.recognition)
    assert count(small.denoiser) == count(default.denoiser)
    module, run = MODULES[name], ("--method", "vadd", "--max-iters", "2", "--steps", "1")
    module.main(tiny_args(name, tmp_path, *run, flag, "16"))
    with pytest.raises(SystemExit, match=f"trained with {flag} 16 \\(now None\\)"):
        module.main(tiny_args(name, tmp_path, *run, "--resume"))
    module.main(tiny_args(name, tmp_path, *run, "--out-dir", str(tmp_path / "old")))
    path = tmp_path / "old" / "ckpt_vadd.pt"
    state = torch.load(path, weights_only=True)
    del state["config"][flag[2:].replace("-", "_")]
    torch.save(state, path)
    module.main(tiny_args(name, tmp_path, *run, "--resume", "--out-dir", str(tmp_path / "old")))


@pytest.mark.parametrize("name", ["mnist", "cifar"])
def test_gpu_presets_keep_vadd_within_1_3_times_mdm_training_flops(name):
    """Training runs each network forward and backward once per image, so VADD's training FLOPs over MDM's are
    those of one forward pass: counted on the meta device (shapes only) for the gpu preset's networks."""
    module = MODULES[name]
    cfg = module.parse_config(["--preset", "gpu", "--device", "cpu"])
    flops = {}
    with torch.device("meta"):
        x0 = torch.zeros((1, 32, 32) if name == "mnist" else (1, 32, 32, 3), dtype=torch.long)
        for method in ("mdm", "vadd"):
            model = module.Model(cfg, method)
            z = torch.zeros(1, model.latent_dim) if model.latent_dim else None
            with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
                model.denoise(x0, torch.ones(1), z)
                if model.recognition is not None:
                    model.recognition(x0, torch.zeros_like(x0, dtype=torch.bool))
            flops[method] = counter.get_total_flops()
    assert 1.0 < flops["vadd"] / flops["mdm"] <= 1.3


@pytest.mark.parametrize("name", SCRIPTS)
def test_lambda_reaches_the_objective_at_every_iteration(name, tmp_path, monkeypatch):
    """The KL weight of the training objective rises 0, 1/4, ..., 1 over --kl-warmup 4 iterations."""
    module, seen = MODULES[name], []
    real = module.delbo

    def spy(*args):
        if torch.is_grad_enabled():  # training, not the evaluation at lambda = 1
            seen.append(float(args[-1]))
        return real(*args)

    monkeypatch.setattr(module, "delbo", spy)
    module.main(tiny_args(name, tmp_path, "--method", "vadd", "--max-iters", "6", "--kl-warmup", "4",
                          "--kl-start", "0"))
    assert seen == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1])


class GraphCounter:
    """A torch.compile backend that counts the graphs it is handed and runs them eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("name", SCRIPTS)
def test_compiled_bf16_training_is_one_graph_whatever_lambda(name, tmp_path, monkeypatch):
    """--compile --dtype bfloat16 through the real training loop: lambda changes at every iteration for 10 of
    the 20, and the step must still be one graph. Floats are specialised here as torch 2.3-2.5 did, so a
    lambda passed as a Python float would be a new graph per value."""
    counter = GraphCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    torch._dynamo.reset()
    # config.patch, not monkeypatch: undoing a monkeypatch deletes the setting on newer pytest, hiding it
    with torch._dynamo.config.patch(specialize_float=True):
        metrics = MODULES[name].main(tiny_args(name, tmp_path, "--method", "vadd", "--compile", "--dtype",
                                               "bfloat16", "--max-iters", "20", "--kl-warmup", "10",
                                               "--log-interval", "10", "--ckpt-interval", "20"))
    assert counter.graphs == 1
    assert metrics["by_steps"]
    torch._dynamo.reset()


@pytest.mark.parametrize("name", SCRIPTS)
def test_evaluation_and_sampling_use_the_ema_weights(name, tmp_path, monkeypatch):
    module, used = MODULES[name], {}
    for fn in ("likelihoods", "sample"):
        real = getattr(module, fn)

        def spy(model, *args, real=real, fn=fn, **kwargs):
            used.setdefault(fn, {k: v.detach().clone() for k, v in model.state_dict().items()})
            return real(model, *args, **kwargs)

        monkeypatch.setattr(module, fn, spy)
    module.main(tiny_args(name, tmp_path, "--method", "vadd", "--max-iters", "6"))
    ckpt = torch.load(tmp_path / "out" / "ckpt_vadd.pt", weights_only=True)
    ema, raw = ckpt["ema"]["params"], ckpt["model"]
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # the test can tell them apart
    for state in used.values():
        assert all(torch.equal(state[k].float(), ema[k]) for k in ema)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_evaluation_and_sampling_call_fits_the_logit_budget(name, tmp_path, monkeypatch):
    """With a budget of 3 examples per call, no network call outside training sees more than 3."""
    module, sizes = MODULES[name], []
    monkeypatch.setattr(common, "rows_per_call", lambda tokens_per_row, vocab_size, budget=None: 3)
    real = module.Denoiser.forward

    def spy(self, xt, *args, **kwargs):
        if not torch.is_grad_enabled():
            sizes.append(len(xt))
        return real(self, xt, *args, **kwargs)

    monkeypatch.setattr(module.Denoiser, "forward", spy)
    module.main(tiny_args(name, tmp_path, "--method", "vadd", "--max-iters", "3"))
    assert sizes and max(sizes) == 3


@pytest.mark.parametrize("name", ["mnist", "cifar"])
def test_image_attention_inputs_have_contiguous_channels(name, tmp_path, monkeypatch):
    """The fused attention kernels take q, k, v whose last (channel) dimension is contiguous; a transposed
    view sends scaled_dot_product_attention to its slow math fallback. Each attention layer gets a plain
    (N, C, H, W) input here, whatever memory format the layers before it would hand on."""
    model, _, _, _, _ = tiny_model(name, tmp_path, "vadd")
    layers = [m for m in model.modules() if isinstance(m, MODULES[name].Attention)]
    strides, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        strides.extend(x.stride(-1) for x in (q, k, v))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        for layer in layers:
            layer(torch.randn(2, layer.qkv.in_channels, 4, 4))
    assert layers and len(strides) == 3 * len(layers) and set(strides) == {1}


@pytest.mark.parametrize("name", SCRIPTS)
def test_checkpoints_keep_the_cuda_random_state(name, tmp_path):
    """--resume is bit-exact on CUDA only if the CUDA generator is saved too (None on a CPU run)."""
    MODULES[name].main(tiny_args(name, tmp_path, "--method", "mdm", "--max-iters", "2"))
    ckpt = torch.load(tmp_path / "out" / "ckpt_mdm.pt", weights_only=True)
    (cpu, cuda), = ckpt["torch_rng"]  # one (CPU, CUDA) pair per rank, as common.random_states writes them
    assert cpu.dtype == torch.uint8 and cpu.numel() > 0 and cuda is None


@pytest.mark.slow  # inductor compiles on the CPU: about 15 s each; the UNets (MNIST, CIFAR) take 50 s each, so
# there the graph test above (dynamo, eager backend) and tests/gpu_check.py (inductor, on a GPU) stand in
@pytest.mark.parametrize("name", ["toy", "text"])
def test_inductor_compiles_and_trains_in_bf16(name, tmp_path):
    metrics = MODULES[name].main(tiny_args(name, tmp_path, "--method", "vadd", "--compile", "--dtype", "bfloat16",
                                           "--max-iters", "3"))
    assert metrics["by_steps"] and all(math.isfinite(r["bound"]) for r in metrics["by_steps"] if "bound" in r)


# ----------------------------------------------------------------------------------------------------------
# A user's mistakes and long waits: outputs never silently replaced, clear sentences, progress lines

@pytest.mark.parametrize("name", SCRIPTS)
def test_a_run_in_the_out_dir_is_continued_only_with_resume_and_never_deleted(name, tmp_path, capsys):
    """A second run of a method already in --out-dir stops in one sentence that names --resume, before it
    writes or deletes anything; a method not yet there may be added; modes that ask for different runs are
    refused by the parser."""
    module = MODULES[name]
    module.main(tiny_args(name, tmp_path, "--method", "mdm", "--max-iters", "2", "--steps", "1"))
    out = tmp_path / "out"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(SystemExit, match="already holds a mdm run .*: pass --resume to continue it, or remove the "
                                         "folder or choose another --out-dir"):
        module.main(tiny_args(name, tmp_path, "--method", "both", "--max-iters", "2"))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    metrics = module.main(tiny_args(name, tmp_path, "--method", "vadd", "--max-iters", "2", "--steps", "1"))
    assert set(metrics["likelihood"]) == {"mdm", "vadd"}  # the mdm entry of the first run is kept
    assert {r["sampler"] for r in metrics["by_steps"]} == {"mdm", "vadd", "vadd_cs"}
    second = "--eval-only" if name != "toy" else "--help"
    with pytest.raises(SystemExit) as e:
        module.main(tiny_args(name, tmp_path, "--resume", second))
    assert name == "toy" or (e.value.code == 2 and "not allowed with argument --resume" in capsys.readouterr().err)


@pytest.mark.parametrize("name", SCRIPTS)
def test_an_out_dir_that_cannot_be_written_stops_before_training(name, tmp_path, capsys):
    with pytest.raises(SystemExit, match="is not a folder this run can write to"):
        MODULES[name].main(tiny_args(name, tmp_path, "--method", "mdm", "--out-dir", "/proc/vadd-test/out"))
    assert "] iter" not in capsys.readouterr().out  # no training line


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_without_a_checkpoint_says_so(name, tmp_path, capsys):
    MODULES[name].main(tiny_args(name, tmp_path, "--method", "mdm", "--max-iters", "0", "--resume"))
    assert "holds no ckpt_mdm.pt, so mdm starts from scratch" in capsys.readouterr().out


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--ema", "nan"),
                                         ("--kl-start", "-inf")])
def test_numbers_that_are_not_finite_are_refused(name, flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        MODULES[name].main(tiny_args(name, tmp_path, f"{flag}={value}"))
    assert e.value.code == 2 and f"argument {flag}: '{value}' is not a finite number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, flag", [("toy", "--num-eval"), ("text", "--num-eval"), ("mnist", "--num-eval"),
                                        ("mnist", "--val-images"), ("cifar", "--num-eval"),
                                        ("cifar", "--val-images")])
def test_fewer_evaluation_examples_than_processes_are_refused(name, flag, tmp_path, capsys, monkeypatch):
    """torchrun's WORLD_SIZE 2: a process without an example would fail or skip a collective."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        MODULES[name].main(tiny_args(name, tmp_path, flag, "1"))
    assert e.value.code == 2 and f"{flag} 1 is fewer than the 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_batch_that_does_not_split_over_the_processes_is_refused(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as e:
        MODULES[name].main(tiny_args(name, tmp_path, "--batch-size", "64"))
    assert e.value.code == 2 and "--batch-size 64 must split evenly over 3 process(es)" in capsys.readouterr().err


@pytest.mark.parametrize("name", SCRIPTS)
def test_after_a_nan_the_checkpoint_kept_is_the_last_finite_one(name, tmp_path, monkeypatch):
    module, calls = MODULES[name], []
    real = module.delbo

    def exploding(model, x0, kl_weight):
        loss, kl = real(model, x0, kl_weight)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) >= 5:  # iteration 5 on
                loss = loss * float("nan")
        return loss, kl

    monkeypatch.setattr(module, "delbo", exploding)
    with pytest.raises(SystemExit, match="the loss .*became nan"):
        module.main(tiny_args(name, tmp_path, "--method", "vadd", "--max-iters", "8", "--ckpt-interval", "2"))
    ckpt = torch.load(tmp_path / "out" / "ckpt_vadd.pt", weights_only=True)
    assert ckpt["iter"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("name", SCRIPTS)
def test_evaluation_prints_each_figure_and_each_sampling_with_its_time(name, tmp_path, capsys):
    MODULES[name].main(tiny_args(name, tmp_path, "--method", "vadd", "--max-iters", "4", "--log-interval", "2",
                                 "--steps", "1,2"))
    out = capsys.readouterr().out
    assert "[vadd] iter       2/4 | loss " in out and " | eta " in out
    assert "[vadd] delbo " in out and "[vadd] iw_delbo " in out
    for sampler in ("vadd", "vadd_cs"):
        for T in (1, 2):
            assert re.search(rf"\[{sampler}\] T={T}: \d+ samples in [\d.]+s, valid bound [\d.]+ \+- ", out)


@pytest.mark.parametrize("name", ["text", "mnist", "cifar"])
def test_without_cuda_the_default_preset_is_the_cpu_one_and_says_so(name, tmp_path, capsys, monkeypatch):
    args = tiny_args(name, tmp_path)
    for flag in ("--preset", "--device"):  # left to their defaults
        if flag in args:
            del args[args.index(flag):args.index(flag) + 2]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert MODULES[name].parse_config(args).preset == "cpu"
    assert "no CUDA device: --preset cpu" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert MODULES[name].parse_config(args).preset == "gpu"
    assert MODULES[name].parse_config(args + ["--device", "cpu"]).preset == "cpu"


@pytest.mark.parametrize("name", SCRIPTS)
def test_overview_titles_fit_with_one_step_count(name, tmp_path, monkeypatch):
    import matplotlib.figure
    widths = []
    real = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        if fig._suptitle is not None:
            fig.canvas.draw()
            box = fig._suptitle.get_window_extent()
            widths.append((box.x0, box.x1, fig.bbox.width))
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    MODULES[name].main(tiny_args(name, tmp_path, "--method", "mdm", "--max-iters", "2", "--steps", "1"))
    assert all(x0 >= 0 and x1 <= width for x0, x1, width in widths)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_the_default_of_every_training_flag(name, capsys):
    with pytest.raises(SystemExit) as e:
        MODULES[name].main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and ("--eval-only" in out) == (name != "toy")
    shown = "(default 6000)" if name == "toy" else "(default from --preset)"
    assert f"--max-iters MAX_ITERS training iterations per method {shown}" in out
    assert "--method {mdm,vadd,both} train MDM, VADD, or both" in out and "(default both)" in out


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_refused_flag_costs_two_lines(name, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        MODULES[name].main(tiny_args(name, tmp_path, "--seed", "-1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 2 and err[0].endswith("[options]; --help lists them")
    assert "argument --seed: '-1' is not a whole number from 0 to 4294967295" in err[1]
