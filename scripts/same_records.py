"""Are two versions of largebatch the same training loop? Run, then compare.

    python scripts/same_records.py run OUT          # each method on digits, fixed seed
    python scripts/same_records.py resume OUT       # continue OUT's runs for one epoch
    python scripts/same_records.py compare A B      # metrics.jsonl equal but for timings?

``run`` trains every method (and bl with the curvature guard) on scikit-learn's digits
with an MLP for 3 epochs of 4 and stops (a checkpoint to resume); ``resume`` continues
each to its 4th epoch, so runs made by one version can be resumed by another. ``compare``
reads ``A/NAME/metrics.jsonl`` and ``B/NAME/metrics.jsonl`` for every run and prints,
per run, whether they are byte-identical once the timing fields (``*_s``) are dropped.
Run it on one machine: kernels differ between CPUs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = {
    "bl": {"method": "bl", "lr_decay_epochs": [2]},
    "fb": {"method": "fb", "warmup_epochs": 2},
    "gg": {"method": "gg", "lr_decay_epochs": [1, 2]},
    "abs": {"method": "abs", "abs_duration": 1},
    "absa": {"method": "absa", "abs_duration": 1},
    "gns": {"method": "gns", "gns_every": 0.25, "gns_confirmations": 1},
    "bl-guard": {"method": "bl", "curvature_guard": True, "guard_samples": 256},
}
BASE = {
    "dataset": "digits",
    "model": "mlp",
    "epochs": 4,
    "batch_size": 32,
    "max_batch_size": 256,
    "micro_batch_size": 64,
    "lr": 0.05,
    "seed": 3,
    "device": "cpu",
    "hessian_samples": 256,
}


def _config(out: Path, name: str, resume: bool):
    from largebatch.config import TrainConfig

    return TrainConfig(**BASE, **RUNS[name], out=str(out / name), resume=resume).validate()


def _records(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return [
        json.dumps({k: v for k, v in json.loads(line).items() if not k.endswith("_s")})
        for line in lines
    ]


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)
    command, *folders = argv
    if command in ("run", "resume"):
        from largebatch.train import train

        out = Path(folders[0])
        for name in RUNS:
            resume = command == "resume"
            train(_config(out, name, resume), echo=None, stop_after=None if resume else 3)
            print(f"{command} {name}: done")
        return 0
    a, b = (Path(f) for f in folders)
    same = True
    for name in RUNS:
        equal = _records(a / name / "metrics.jsonl") == _records(b / name / "metrics.jsonl")
        same &= equal
        print(f"{name:9s} {'identical' if equal else 'DIFFERENT'} (timing fields aside)")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
