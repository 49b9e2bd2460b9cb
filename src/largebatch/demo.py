"""The main job of ``make demo``: a compact comparison of BL, FB, GG, ABS, ABSA and gns.

Fashion-MNIST (Debian's ``dataset-fashion-mnist``) with the paper's C1 network on a subset
(``configs/demo.yaml``, 5 to 8 minutes on 2 CPU cores) when the files are there;
otherwise MNIST-1D, generated locally, with an MLP (``configs/demo-mnist1d.yaml``).
Re-running skips the finished runs and reprints the table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from largebatch.cli import main as cli_main
from largebatch.data import DEFAULT_DATA_DIRS

__all__ = ["demo_arguments", "main"]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def demo_arguments(out: str, fashion_mnist_available: bool, configs: Path = CONFIGS) -> list[str]:
    """The ``largebatch`` command line the demo runs."""
    config = configs / ("demo.yaml" if fashion_mnist_available else "demo-mnist1d.yaml")
    return ["compare", "--config", str(config), "--out", out]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="largebatch.demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--configs", type=Path, default=CONFIGS, help="folder of demo configs")
    args = parser.parse_args(argv)
    folder = Path(DEFAULT_DATA_DIRS["fashion-mnist"])
    available = any((folder / f"train-images-idx3-ubyte{ext}").exists() for ext in ("", ".gz"))
    if not available:
        print(f"demo: Fashion-MNIST not found in {folder}; using MNIST-1D (generated locally)")
    command = demo_arguments(args.out, available, args.configs)
    print("demo: largebatch " + " ".join(command), flush=True)
    return cli_main(command)


if __name__ == "__main__":
    sys.exit(main())
