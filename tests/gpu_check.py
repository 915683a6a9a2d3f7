"""Every CUDA check in one run, for a session that is lent a GPU: the compiled bf16 training step of each script,
short runs of MDM and VADD side by side (throughput, peak memory), and sampling time per sampler.

    python tests/gpu_check.py --out "$OUT"            # on the GPU machine: about 10 minutes on an H100 (estimate)
    python tests/gpu_check.py --smoke --out /tmp/gc   # tiny configs on the CPU: checks this script itself

The GPU machine has no network, so the data is synthetic (random tokens, random binary digits, random colour
images): the throughput and memory figures do not depend on it, the likelihoods and samples mean nothing.
Writes <out>/gpu_check.md (a table for the README) and <out>/gpu_check.json; each run keeps its own folder.
"""
import argparse
import json
import os
import struct
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vadd_cifar  # noqa: E402
import vadd_mnist  # noqa: E402
import vadd_text  # noqa: E402
import vadd_toy  # noqa: E402


def write_data(root, rng):
    """Synthetic inputs in each script's real format: a prepared token folder, IDX files, CIFAR binary batches."""
    text = os.path.join(root, "text")
    os.makedirs(text, exist_ok=True)
    for split, n in (("train", 4_000_000), ("val", 200_000)):
        rng.integers(0, 50257, n).astype(np.uint16).tofile(os.path.join(text, f"{split}.bin"))
    with open(os.path.join(text, "meta.json"), "w") as f:
        json.dump({"vocab_size": 50257}, f)  # no tokenizer: samples are written as ids (no network needed)
    mnist = os.path.join(root, "mnist")
    os.makedirs(mnist, exist_ok=True)
    for part, n in (("train", 12_000), ("t10k", 2_000)):
        images = (rng.random((n, 28, 28)) < 0.13).astype(np.uint8) * 255
        with open(os.path.join(mnist, f"{part}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
    cifar = os.path.join(root, "cifar")
    os.makedirs(cifar, exist_ok=True)
    for name, n in [(f"data_batch_{i}.bin", 2000) for i in range(1, 6)] + [("test_batch.bin", 1000)]:
        records = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], 1)
        records.astype(np.uint8).tofile(os.path.join(cifar, name))
    return text, mnist, cifar


def runs(data, smoke):
    """(name, module, argv per method): short runs of the default (paper-sized) models, or tiny ones for --smoke."""
    text, mnist, cifar = data
    if smoke:
        return [
            ("toy", vadd_toy, ["--max-iters", "50", "--num-samples", "500", "--num-eval", "200", "--iw-samples", "2",
                               "--ref-points", "100000", "--steps", "1,5"]),
            ("text", vadd_text, ["--data", text, "--model", "tiny", "--layers", "1", "--width", "32", "--heads", "2",
                                 "--block-size", "32", "--max-iters", "5", "--batch-size", "4", "--eval-model", "none",
                                 "--steps", "1,5", "--num-samples", "4", "--num-eval", "8", "--iw-samples", "2"]),
            ("mnist", vadd_mnist, ["--preset", "cpu", "--data", mnist, "--max-iters", "5", "--steps", "1,5",
                                   "--num-samples", "4", "--num-test", "16", "--iw-samples", "2"]),
            ("cifar", vadd_cifar, ["--preset", "cpu", "--data", cifar, "--max-iters", "3", "--batch-size", "4",
                                   "--steps", "1,5", "--num-samples", "4", "--num-eval", "8", "--iw-samples", "2"]),
        ]
    return [
        ("toy", vadd_toy, ["--max-iters", "3000", "--steps", "1,5,100"]),
        ("text", vadd_text, ["--data", text, "--model", "small", "--block-size", "256", "--max-iters", "300",
                             "--eval-model", "none", "--steps", "1,5,256", "--num-samples", "64", "--num-eval", "256",
                             "--iw-samples", "4", "--log-interval", "50"]),
        ("mnist", vadd_mnist, ["--data", mnist, "--max-iters", "600", "--steps", "1,10,100", "--num-samples", "256",
                               "--num-test", "1000", "--iw-samples", "4", "--log-interval", "100"]),
        ("cifar", vadd_cifar, ["--data", cifar, "--max-iters", "200", "--steps", "1,10,100", "--num-samples", "256",
                               "--num-eval", "500", "--iw-samples", "4", "--log-interval", "50"]),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join("out", "gpu_check"))
    p.add_argument("--smoke", action="store_true", help="tiny configs on the CPU, to check this script")
    p.add_argument("--only", default="toy,text,mnist,cifar", help="which scripts, comma separated")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.cuda.get_device_name() if cuda else "CPU (smoke)"
    data = write_data(os.path.join(args.out, "data"), np.random.default_rng(0))
    results = []
    for name, module, argv in runs(data, args.smoke):
        if name not in args.only.split(","):
            continue
        for method in ("mdm", "vadd"):
            out_dir = os.path.join(args.out, f"{name}_{method}")
            full = argv + ["--method", method, "--out-dir", out_dir] + ([] if cuda else ["--device", "cpu"])
            if name == "toy":
                full += ["--cache-dir", os.path.join(args.out, "cache")]
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            print(f"\n=== {name} {method}: python {module.__name__}.py {' '.join(full)}", flush=True)
            metrics = module.main(full)
            rows = [r for r in metrics["by_steps"] if r["sampler"] in ("mdm", "vadd_cs")]
            results.append({"script": name, "method": method, "seconds": time.time() - t0,
                            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                            "training": metrics.get("training", {}).get(method),
                            "sampling": [{k: r.get(k) for k in ("sampler", "steps", "sample_seconds", "nfe")}
                                         for r in rows]})
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "results": results}, f, indent=1)
    command = "python tests/gpu_check.py" + (" --smoke" if args.smoke else "")
    lines = [f"Device: {device}, torch {torch.__version__}. Command: `{command}`.", "",
             "| script | method | wall s (train + eval + sample) | peak GPU memory GB | sampling seconds by T |",
             "|---|---|---|---|---|"]
    for r in results:
        sampling = ", ".join(f"{s['sampler']} T={s['steps']}: {s['sample_seconds']:.2f}" for s in r["sampling"])
        memory = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        lines.append(f"| {r['script']} | {r['method']} | {r['seconds']:.0f} | {memory} | {sampling} |")
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("Training throughput (tokens/s, images/s, MFU) is in each run's log lines above and its metrics.json.")


if __name__ == "__main__":
    main()
