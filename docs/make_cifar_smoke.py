"""Write a CIFAR-10-format smoke set from the two photos scikit-learn ships (china.jpg, flower.jpg): 10,000
training patches of 32 x 32 from the left three quarters of each photo and 1,000 test patches from the right
quarter, in the binary batches `vadd_cifar.py --data` reads (label byte, then the red, green, blue planes).

    pip install scikit-learn && python docs/make_cifar_smoke.py data/smoke
"""
import os
import sys

import numpy as np
from sklearn.datasets import load_sample_images


def main(out):
    photos = [im[::2, ::2] for im in load_sample_images().images]  # 214 x 320 each
    rng = np.random.default_rng(0)
    os.makedirs(out, exist_ok=True)

    def batch(n, test):
        label = rng.integers(0, 2, n)
        x = rng.integers(240, 320 - 32, n) if test else rng.integers(0, 240 - 32, n)
        y = rng.integers(0, 214 - 32, n)
        patches = np.stack([photos[k][b:b + 32, a:a + 32].transpose(2, 0, 1) for k, a, b in zip(label, x, y)])
        return np.concatenate([label[:, None], patches.reshape(n, -1)], 1).astype(np.uint8).tobytes()

    for i in range(1, 6):
        with open(os.path.join(out, f"data_batch_{i}.bin"), "wb") as f:
            f.write(batch(2000, test=False))
    with open(os.path.join(out, "test_batch.bin"), "wb") as f:
        f.write(batch(1000, test=True))
    print(f"wrote {out}/: 10,000 training and 1,000 test patches")


if __name__ == "__main__":
    main(sys.argv[1])
