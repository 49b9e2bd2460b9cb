"""The main job of ``make demo``: a short training run on data this machine has offline.

Fashion-MNIST (Debian's ``dataset-fashion-mnist``) with the paper's C1 network when the
files are there; otherwise MNIST-1D, generated locally, with an MLP. Re-running continues
or reprints the finished run in ``--out`` instead of starting over.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from largebatch.cli import main as cli_main
from largebatch.data import DEFAULT_DATA_DIRS

__all__ = ["demo_arguments", "main"]


def demo_arguments(out: str, fashion_mnist_available: bool) -> list[str]:
    """The ``largebatch`` command line the demo runs."""
    if fashion_mnist_available:
        job = ["--dataset", "fashion-mnist", "--model", "c1", "--epochs", "2", "--lr", "0.02"]
    else:
        job = ["--dataset", "mnist1d", "--model", "mlp", "--epochs", "10", "--lr", "0.05"]
    return ["train", *job, "--batch-size", "128", "--method", "bl", "--out", out, "--resume"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="largebatch.demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args(argv)
    folder = Path(DEFAULT_DATA_DIRS["fashion-mnist"])
    available = (folder / "train-images-idx3-ubyte.gz").exists() or (
        folder / "train-images-idx3-ubyte"
    ).exists()
    if not available:
        print(f"demo: Fashion-MNIST not found in {folder}; using MNIST-1D (generated locally)")
    command = demo_arguments(args.out, available)
    print("demo: largebatch " + " ".join(command), flush=True)
    return cli_main(command)


if __name__ == "__main__":
    sys.exit(main())
