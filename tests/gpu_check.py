"""Every CUDA check of the four scripts, for a machine with one GPU, in two groups of a few minutes each.

    python tests/gpu_check.py --only a --out DIR    # toy and text (MDLM-small DiT, windows of 1024 GPT-2 ids)
    python tests/gpu_check.py --only b --out DIR    # MNIST and CIFAR-10 (the paper-sized UNets)
    python tests/gpu_check.py --smoke --out DIR     # tiny configs on the CPU: checks this script itself

Per script and method (MDM, VADD) it runs, each stage recorded on its own:
- a 10-iteration run of the script's own main() with its GPU defaults (compiled, bf16), short evaluation and
  sampling, then `--resume` to 30 iterations: the checkpoint must continue (iteration 10 -> 30), and every
  graph torch.compile builds is counted (one per model is right; more means recompilation);
- the compiled bf16 training step alone (forward, backward, AdamW; no data loading, no EMA): items per second
  after warm-up, peak memory, and MFU from the step's FLOPs (counted by torch.utils.flop_counter) against the
  GPU's dense bf16 peak;
- the loss of one batch in float32 and under bf16 autocast, with the same draws: their relative difference;
- sampling time and network evaluations per sampler and step count, from the run's metrics.json;
- text only: the run's likelihoods at windows of 1024 GPT-2 tokens (the IW-DELBO and T-step bounds), whose
  peak memory shows that the logit budget of the evaluation fits.
The machine needs torch with CUDA, numpy and matplotlib, and no network: the data is synthetic (random
tokens, digits and colour images in each script's real file format), so the likelihoods and samples mean
nothing; speed, memory, graphs and agreement do not depend on it. A failing stage is recorded with its
traceback and the next one runs. <out>/gpu_check.json and <out>/gpu_check.md are rewritten after every stage.
"""
import argparse
import contextlib
import functools
import io
import json
import os
import struct
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import vadd_cifar  # noqa: E402
import vadd_mnist  # noqa: E402
import vadd_text  # noqa: E402
import vadd_toy  # noqa: E402

GROUPS = {"a": ["toy", "text"], "b": ["mnist", "cifar"]}
PEAK_BF16_TFLOPS = {"H100": 989, "H200": 989, "A100": 312}  # dense bf16, vendor datasheets


def write_data(root, rng, smoke):
    """Synthetic inputs in each script's real format: a prepared token folder, IDX files, CIFAR binary batches."""
    text = os.path.join(root, "text")
    os.makedirs(text, exist_ok=True)
    for split, n in (("train", 200_000 if smoke else 4_000_000), ("val", 50_000 if smoke else 200_000)):
        rng.integers(0, 50257, n).astype(np.uint16).tofile(os.path.join(text, f"{split}.bin"))
    with open(os.path.join(text, "meta.json"), "w") as f:
        json.dump({"vocab_size": 50257}, f)  # no tokenizer named: samples are written as ids, nothing to download
    mnist = os.path.join(root, "mnist")
    os.makedirs(mnist, exist_ok=True)
    for part, n in (("train", 2_000 if smoke else 12_000), ("t10k", 500 if smoke else 2_000)):
        images = (rng.random((n, 28, 28)) < 0.13).astype(np.uint8) * 255
        with open(os.path.join(mnist, f"{part}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
    cifar = os.path.join(root, "cifar")
    os.makedirs(cifar, exist_ok=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        n = 200 if smoke else 2000
        records = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], 1)
        records.astype(np.uint8).tofile(os.path.join(cifar, name))
    return {"text": text, "mnist": mnist, "cifar": cifar}


def script_argv(name, data, smoke):
    """Each script's GPU defaults (the paper-sized networks and batches), with evaluation and sampling cut short;
    for --smoke, tiny networks on the CPU."""
    if name == "toy":
        return ["--steps", "1,5", "--num-samples", "2000" if smoke else "50000", "--num-eval", "500",
                "--iw-samples", "4", "--ref-points", "100000"] + (["--width", "32"] if smoke else [])
    if name == "text":
        tiny = ["--preset", "cpu", "--layers", "1", "--width", "32", "--heads", "2", "--rec-layers", "1",
                "--rec-width", "32", "--rec-heads", "2", "--block-size", "64", "--batch-size", "4",
                "--num-eval", "4"]
        real = ["--preset", "mdlm", "--block-size", "1024", "--num-eval", "16"]  # MDLM's OpenWebText shape
        return [*(tiny if smoke else real), "--data", data["text"], "--eval-model", "none", "--steps", "1,10",
                "--num-samples", "2" if smoke else "8", "--iw-samples", "4",
                "--eval-interval", "1000"]
    if name == "mnist":
        tiny = ["--preset", "cpu", "--batch-size", "8", "--channels", "8", "--rec-channels", "8", "--channel-mult",
                "1,2", "--patch", "4", "--attn-res", "4"]
        return [*(tiny if smoke else []), "--data", data["mnist"],
                "--steps", "1,10", "--num-samples", "4" if smoke else "256",
                "--num-eval", "32" if smoke else "500",
                "--val-images", "100", "--iw-samples", "4", "--eval-interval", "1000"]
    tiny = ["--preset", "cpu", "--batch-size", "8", "--channels", "8", "--rec-channels", "8", "--channel-mult",
            "1,2", "--embed-dim", "4"]
    return [*(tiny if smoke else []), "--data", data["cifar"],
            "--steps", "1,10", "--num-samples", "4" if smoke else "256", "--num-eval", "32" if smoke else "500",
            "--val-images", "100", "--iw-samples", "4", "--eval-interval", "1000"]


MODULES = {"toy": vadd_toy, "text": vadd_text, "mnist": vadd_mnist, "cifar": vadd_cifar}
UNITS = {"toy": "points/s", "text": "tokens/s", "mnist": "images/s", "cifar": "images/s"}


def model_and_batch(name, cfg, method):
    """The script's Model (its forward(x0, lambda) is the per-example training loss, what the script compiles),
    one training batch of random tokens, and the tokens, points or images in it."""
    m, B = MODULES[name], cfg.batch_size
    if name == "toy":
        return m.Model(cfg, method), torch.randint(0, cfg.bins, (B, 2)), B
    if name == "text":
        return m.Model(cfg, method, 50257), torch.randint(0, 50257, (B, cfg.block_size)), B * cfg.block_size
    shape = (B, 32, 32) if name == "mnist" else (B, 32, 32, 3)
    return m.Model(cfg, method), torch.randint(0, 2 if name == "mnist" else 256, shape), B


class GraphCounter:
    """A torch.compile backend that counts the graphs it is given and hands each to inductor (or, on the CPU
    smoke run, runs it eagerly): one graph per compiled model means no recompilation and no graph break."""

    def __init__(self, smoke):
        self.graphs, self.smoke = 0, smoke

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        if self.smoke:
            return gm.forward
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend("inductor")(gm, example_inputs)


@contextlib.contextmanager
def counting_compile(counter):
    """Every torch.compile call of the scripts goes through `counter`."""
    real = torch.compile
    torch.compile = functools.partial(real, backend=counter)
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch.compile = real


def run_main(module, argv):
    """module.main(argv) with its output captured (and echoed); returns (metrics, output)."""
    buffer = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s):
            sys.__stdout__.write(s)
            buffer.write(s)
            return len(s)

    with contextlib.redirect_stdout(Tee()):
        metrics = module.main(argv)
    return metrics, buffer.getvalue()


def stage_runs(name, method, argv, out_dir, smoke, cuda, counter):
    """10 iterations (one step count, few samples), then --resume to 30 with the full evaluation: checkpoint,
    resume, compiled graphs, sampling times."""
    module = MODULES[name]
    common_argv = argv + ["--method", method, "--out-dir", out_dir, "--log-interval", "10",
                          "--ckpt-interval", "10"]
    if not cuda:
        common_argv += ["--device", "cpu", "--compile", "--dtype", "bfloat16"]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    with counting_compile(counter):
        run_main(module, common_argv + ["--max-iters", "10", "--steps", "1", "--num-samples", "4"])
        first_graphs = counter.graphs
        metrics, log = run_main(module, common_argv + ["--max-iters", "30", "--resume"])
    ckpt = torch.load(os.path.join(out_dir, f"ckpt_{method}.pt"), map_location="cpu", weights_only=True)
    out = {"runs_seconds": time.time() - t0, "graphs_first_run": first_graphs,
           "graphs_resumed_run": counter.graphs - first_graphs,
           "resumed": "iterations 10 to 30" in log and ckpt["iter"] == 30,
           "sampling": [{k: r.get(k) for k in ("sampler", "steps", "sample_seconds", "nfe")}
                        for r in metrics["by_steps"]]}
    if cuda:
        out["run_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if name == "text":
        lik = metrics["likelihood"][method]
        out["likelihood_at_block"] = {"block_size": metrics["config"][method]["block_size"], "vocab_size": 50257,
                                      **{k: v for k, v in lik.items() if k in ("mdm_nelbo", "delbo", "iw_delbo")}}
    return out


def stage_step(name, method, argv, device, counter):
    """Throughput, memory and MFU of the compiled bf16 training step (compiled as the script compiles it, so
    the graph of the runs before is reused); bf16 vs float32 loss on one batch of random tokens."""
    cfg = MODULES[name].parse_config(argv + ["--device", str(device)])
    torch.manual_seed(0)
    model, x0, items = model_and_batch(name, cfg, method)
    with torch.no_grad():  # zero-initialised layers make a fresh network uniform in any precision: perturb them
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(0.02 * torch.randn_like(p))
    model, x0 = model.to(device), x0.to(device)
    graphs_before = counter.graphs
    compiled = torch.compile(model, backend=counter)
    lam = torch.tensor(0.5)
    out = {}
    out = {}
    with torch.no_grad():  # the same draws (seeded) in float32 and under bf16 autocast
        losses = []
        for dtype in ("float32", "bfloat16"):
            torch.manual_seed(1)
            with common.autocast(device, dtype):
                losses.append(model(x0, lam)[0].float().mean().item())
    out["loss_float32"], out["loss_bf16"] = losses
    out["loss_relative_difference"] = abs(losses[1] - losses[0]) / abs(losses[0])

    from torch.utils.flop_counter import FlopCounterMode
    flops = FlopCounterMode(display=False)
    with flops, common.autocast(device, "bfloat16"):
        model(x0, lam)[0].mean().backward()
    out["flops_per_iteration"] = flops.get_total_flops()
    model.zero_grad(set_to_none=True)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def one():
        with common.autocast(device, "bfloat16"):
            loss = compiled(x0, lam)[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        one()
    sync()
    n, t0 = (2 if counter.smoke else 10), time.time()
    for _ in range(n):
        one()
    sync()
    seconds = (time.time() - t0) / n
    out.update(step_seconds=seconds, throughput=items / seconds, unit=UNITS[name],
               graphs=counter.graphs - graphs_before,
               params_million=sum(p.numel() for p in model.parameters()) / 1e6)
    if device.type == "cuda":
        out["step_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        gpu = torch.cuda.get_device_name()
        peak = next((tf for key, tf in PEAK_BF16_TFLOPS.items() if key in gpu), None)
        if peak:
            out["mfu"] = out["flops_per_iteration"] / seconds / (peak * 1e12)
    return out


def write_report(path, report):
    with open(os.path.join(path, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"Device: {report['device']}, torch {report['torch']}. Command: `{report['command']}`.", "",
             "| script | method | compiled step | MFU | peak GB (step / run) | graphs (run/resumed/step) | resume "
             "| loss f32 vs bf16 | sampling s (T: seconds) | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        s, runs = r.get("step", {}), r.get("runs", {})
        speed = f"{s['throughput']:,.0f} {s['unit']}" if "throughput" in s else "-"
        mfu = f"{100 * s['mfu']:.1f}%" if "mfu" in s else "-"
        mem = (f"{s.get('step_peak_memory_gb', float('nan')):.1f} / "
               f"{runs.get('run_peak_memory_gb', float('nan')):.1f}")
        graphs = "/".join(str(x.get(k, "-")) for x, k in [(runs, "graphs_first_run"), (runs, "graphs_resumed_run"),
                                                          (s, "graphs")])
        agree = f"{s['loss_relative_difference']:.1e}" if "loss_relative_difference" in s else "-"
        sampling = ", ".join(f"{x['sampler']} {x['steps']}: {x['sample_seconds']:.2f}"
                             for x in runs.get("sampling", []))
        errors = "; ".join(f"{k}: {v.strip().splitlines()[-1]}" for k, v in r.get("errors", {}).items()) or "none"
        lines.append(f"| {r['script']} | {r['method']} | {speed} | {mfu} | {mem} | {graphs} | "
                     f"{runs.get('resumed', '-')} | {agree} | {sampling} | {errors} |")
    for r in report["results"]:
        if "likelihood_at_block" in r.get("runs", {}):
            lines.append(f"\nText {r['method']} likelihoods at the real shape: {r['runs']['likelihood_at_block']}")
    with open(os.path.join(path, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join("out", "gpu_check"),
                   help="report folder")
    p.add_argument("--smoke", action="store_true", help="tiny configs on the CPU, to check this script")
    p.add_argument("--only", default="a,b", help="groups (a: toy, text; b: mnist, cifar) or script names")
    args = p.parse_args(argv)
    names = [n for part in args.only.split(",") for n in GROUPS.get(part, [part])]
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        p.error(f"--only {args.only}: unknown {', '.join(unknown)}; "
                "give a, b or script names (toy, text, mnist, cifar)")
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        p.error("no CUDA device here: run with --smoke to check this script on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    os.makedirs(args.out, exist_ok=True)
    data = write_data(os.path.join(args.out, "data"), np.random.default_rng(0), args.smoke)
    report = {"device": torch.cuda.get_device_name() if cuda else "CPU (smoke)", "torch": torch.__version__,
              "command": "python tests/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "results": []}
    for name in names:
        for method in ("mdm", "vadd"):
            record = {"script": name, "method": method, "errors": {}}
            report["results"].append(record)
            argv_ = script_argv(name, data, args.smoke)
            out_dir, counter = os.path.join(args.out, f"{name}_{method}"), GraphCounter(args.smoke)
            stages = [("runs", lambda: stage_runs(name, method, argv_, out_dir, args.smoke, cuda, counter)),
                      ("step", lambda: stage_step(name, method, argv_, device, counter))]
            for stage, fn in stages:
                print(f"\n=== {name} {method}: {stage}", flush=True)
                t0 = time.time()
                try:
                    record[stage] = fn()
                except BaseException as e:  # SystemExit of a script too: record it and go on
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    record["errors"][stage] = traceback.format_exc()
                    print(record["errors"][stage], flush=True)
                record[f"{stage}_wall_seconds"] = time.time() - t0
                if cuda:
                    torch.cuda.empty_cache()
                write_report(args.out, report)
    print(open(os.path.join(args.out, "gpu_check.md")).read())
    return report


if __name__ == "__main__":
    main()
