"""Benchmark: data of any size through ``largebatch.fit`` (issue 37, step 5).

Each case runs in a fresh Python process (so that its peak memory is its own) and adds
one JSON line to ``--out`` when it finishes. Cases:

- ``rss``: a memory-mapped dataset of N samples (64 uint8 features and a label each,
  written to a temporary folder by this script and removed after), for N = 2M, 8M and
  32M: ``fit`` on a map-style Dataset whose ``__getitem__`` reads the memory map, an MLP,
  ``gns`` (the batch grows), 2 reading workers, for ``--seconds`` of training, then a
  SIGTERM. Peak memory of the training process and of its workers, sampled every 0.1 s
  from ``/proc``: the anonymous resident memory (``RssAnon``, what the process itself
  holds) and the whole resident set (``VmRSS``, which also counts the mapped file's
  pages that the kernel may drop at any time). Training samples per second.
- ``in-memory``: the same 2M samples as tensors in memory (the path ``fit`` takes for
  tensors), the same model and time: samples per second and peak memory.
- ``c1-feed``: does a lazy Dataset feed C1 as fast as C1 trains? Fashion-MNIST (the
  Debian files) behind a map-style Dataset of 28x28 uint8 images, read through the
  feed's worker pool (0 and 2 workers): batches per second of the feed alone against
  C1's training step on batches already in memory, at global batch 128 and 1024, medians.
- ``folder``: the built-in image-folder path (a generated Tiny-ImageNet-shaped folder of
  real JPEGs, decoded with augmentation by 2 workers): feed samples per second. Run once
  with this checkout and once with ``--before-src`` (the source tree before the change),
  side by side.
- ``stream``: an ``IterableDataset`` over the 2M memory map (blocks in a per-epoch order)
  through ``fit`` with ``gns``: ``samples_per_epoch`` 200k, 4 epochs, the batch sizes it
  chose, samples per second, peak memory.

    python benchmarks/bench_data.py --out docs/results/data/runs.jsonl \\
        --before-src /tmp/before/src

Timings are of this machine only (2 cores: the workers and training share them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FEATURES = 64
CLASSES = 10
SIZES = (2_000_000, 8_000_000, 32_000_000)


# ----------------------------------------------------------------------------- memory


def _status(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``RssAnon`` of a process, in bytes (empty once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


class PeakMemory:
    """Samples this process's and its children's memory every ``every`` seconds."""

    def __init__(self, every: float = 0.1) -> None:
        self.every, self.peak = every, {
            "main_rss_anon": 0, "main_vm_rss": 0, "workers_rss_anon": 0, "total_rss_anon": 0,
        }  # fmt: skip
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            main = _status(me)
            workers = sum(_status(c).get("RssAnon", 0) for c in _children(me))
            for key, value in (
                ("main_rss_anon", main.get("RssAnon", 0)),
                ("main_vm_rss", main.get("VmRSS", 0)),
                ("workers_rss_anon", workers),
                ("total_rss_anon", main.get("RssAnon", 0) + workers),
            ):
                self.peak[key] = max(self.peak[key], value)
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mib(self) -> dict[str, float]:
        return {f"peak_{k}_mib": round(v / 2**20, 1) for k, v in self.peak.items()}


# ----------------------------------------------------------------------------- data


def write_memmap(folder: Path, n: int) -> None:
    """``x.npy`` (n, 64) and ``y.npy`` (n,), uint8: scikit-learn's digits (8x8, values
    0-16) repeated, each copy with its own noise (0-5 added per pixel) and a tenth of the
    labels drawn at random (so the loss keeps a floor and the noise scale grows as
    training goes on); written block by block."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    base_x = digits.data.astype(np.uint8)
    base_y = digits.target.astype(np.uint8)
    x = np.lib.format.open_memmap(folder / "x.npy", "w+", np.uint8, (n, FEATURES))
    y = np.lib.format.open_memmap(folder / "y.npy", "w+", np.uint8, (n,))
    block = len(base_x) * 64
    tiled_x, tiled_y = np.tile(base_x, (64, 1)), np.tile(base_y, 64)
    for start in range(0, n, block):
        stop = min(start + block, n)
        rng = np.random.default_rng(start)
        x[start:stop] = tiled_x[: stop - start] + rng.integers(
            0, 6, (stop - start, FEATURES), np.uint8
        )
        labels = tiled_y[: stop - start].copy()
        flip = rng.random(stop - start) < 0.1
        labels[flip] = rng.integers(0, CLASSES, int(flip.sum()), np.uint8)
        y[start:stop] = labels
    x.flush()
    y.flush()
    del x, y


class Mapped:
    """A map-style Dataset over the memory map: ``(features / 16, label)``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._x = self._y = None

    def _open(self) -> None:
        import numpy as np

        self._x = np.load(Path(self.folder) / "x.npy", mmap_mode="r")
        self._y = np.load(Path(self.folder) / "y.npy", mmap_mode="r")

    def __len__(self) -> int:
        if self._x is None:
            self._open()
        return len(self._y)

    def __getitem__(self, i: int):
        import torch

        if self._x is None:
            self._open()
        return torch.from_numpy(self._x[i].astype("float32") / 16.0), int(self._y[i])


def _mlp():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, CLASSES),
    )  # fmt: skip


FIT = dict(
    method="gns", batch_size=64, max_batch_size=4096, lr=0.05, epochs=1, seed=0,
    device="cpu", safeguard=False,
)  # fmt: skip


def _fit_for(seconds: float, model, data, **kwargs) -> dict:
    """``fit`` stopped by SIGTERM after ``seconds`` of its training: samples, rate."""
    import largebatch
    from largebatch.checkpoint import load_checkpoint
    from largebatch.train import TrainingInterrupted

    out = Path(tempfile.mkdtemp(prefix="bench-data-run-")) / "run"
    started = [None]
    timer = threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGTERM))

    def alarm(module, inputs, output):  # the timer starts at the first training forward
        if module.training and started[0] is None:
            started[0] = time.perf_counter()
            timer.start()

    hook = model.register_forward_hook(alarm)
    t0 = time.perf_counter()
    try:
        largebatch.fit(model, data, out=out, verbose=False, **{**FIT, **kwargs})
        stopped = "finished"
    except TrainingInterrupted:
        stopped = "SIGTERM"
    ended = time.perf_counter()
    timer.cancel()
    hook.remove()
    run = load_checkpoint(out / "checkpoint.pt")["run"]
    shutil.rmtree(out.parent)
    trained = ended - (started[0] or ended)
    samples = run["samples"]
    return {
        "stopped": stopped,
        "samples": samples,
        "train_s": round(trained, 2),
        "start_s": round((started[0] or ended) - t0, 2),
        "samples_per_s": round(samples / trained, 1) if trained > 0 else None,
        "batch_sizes": sorted({c["batch_size"] for c in run["changes"]} | {FIT["batch_size"]}),
    }


# ----------------------------------------------------------------------------- cases


def case_rss(n: int, folder: Path, seconds: float) -> dict:
    with PeakMemory() as peak:
        result = _fit_for(seconds, _mlp(), Mapped(str(folder)), workers=2)
    return {"case": "rss", "n": n, "path": "lazy map-style, 2 workers", **result, **peak.mib()}


def case_in_memory(n: int, folder: Path, seconds: float) -> dict:
    import numpy as np
    import torch

    with PeakMemory() as peak:
        x = torch.from_numpy(np.load(folder / "x.npy").astype(np.float32) / 16.0)
        y = torch.from_numpy(np.load(folder / "y.npy").astype(np.int64))
        result = _fit_for(seconds, _mlp(), (x, y))
    return {"case": "in-memory", "n": n, "path": "tensors in memory", **result, **peak.mib()}


class Blocks:
    """An IterableDataset over the memory map: blocks of 4096 samples in an order drawn
    per epoch (``set_epoch``), each rank and worker its own blocks."""

    def __init__(self, folder: str) -> None:
        self.mapped, self.epoch = Mapped(folder), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import torch

        n = len(self.mapped)
        blocks = torch.randperm(-(-n // 4096), generator=torch.Generator().manual_seed(self.epoch))
        info = torch.utils.data.get_worker_info()
        if info is not None:
            blocks = blocks[info.id :: info.num_workers]
        for block in blocks.tolist():
            for i in range(block * 4096, min(block * 4096 + 4096, n)):
                yield self.mapped[i]


def case_stream(n: int, folder: Path, per_epoch: int) -> dict:
    from torch.utils.data import IterableDataset

    import largebatch

    class Stream(Blocks, IterableDataset):
        pass

    out = Path(tempfile.mkdtemp(prefix="bench-data-stream-")) / "run"
    with PeakMemory() as peak:
        t0 = time.perf_counter()
        summary = largebatch.fit(
            _mlp(), Stream(str(folder)), samples_per_epoch=per_epoch, out=out, verbose=False,
            workers=2, **{**FIT, "epochs": 4},
        )  # fmt: skip
        wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out.parent)
    return {
        "case": "stream", "n": n, "samples_per_epoch": per_epoch, "path": "IterableDataset, gns",
        "batch_sizes": [r["batch_size"] for r in records],
        "batch_changes": [
            (c["samples"], c["batch_size"]) for r in records for c in r.get("batch_changes", [])
        ],
        "train_loss": [round(r["train_loss"], 4) for r in records],
        "updates": summary["updates"], "wall_s": round(wall, 1),
        "samples_per_s": round(summary["samples"] / summary["wall_s"], 1), **peak.mib(),
    }  # fmt: skip


class Images:
    """Fashion-MNIST training images as a map-style Dataset: ``(1x28x28 / 255, label)``."""

    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i].float().div(255.0).unsqueeze(0), int(self.y[i])


def _median_rate(batches, count: int, samples: int) -> float:
    times = []
    it = iter(batches)
    next(it)  # warm-up (starts the workers)
    for _ in range(count):
        t = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - t)
    return samples / statistics.median(times)


def case_c1_feed(repeats: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from largebatch.data import load_dataset
    from largebatch.feed import Feed
    from largebatch.models import build_model
    from largebatch.sampler import EpochSampler
    from largebatch.source import as_source

    source = load_dataset("fashion-mnist")
    x8 = (source.train_x * 255).round().to(torch.uint8).squeeze(1)
    data = as_source(Images(x8, source.train_y))
    rows = []
    for batch in (128, 1024):
        model = build_model("c1", source.input_shape, source.num_classes)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        xb, yb = source.train_x[:batch], source.train_y[:batch]

        def step(model=model, opt=opt, xb=xb, yb=yb, batch=batch):
            for piece in range(0, batch, 128):
                loss = F.cross_entropy(model(xb[piece : piece + 128]), yb[piece : piece + 128])
                loss.backward()
            opt.step()
            opt.zero_grad()

        step()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        train_rate = batch / statistics.median(times)
        for workers in (0, 2):
            order = EpochSampler(len(source.train_y), 0)
            with Feed(data, torch.device("cpu"), workers=workers) as feed:
                batches = feed.train_batches(
                    order.batches(0, batch), min(batch, 128), False, torch.Generator(), 0
                )
                feed_rate = _median_rate(batches, repeats, batch)
            rows.append({
                "case": "c1-feed", "batch": batch, "workers": workers,
                "feed_samples_per_s": round(feed_rate, 1),
                "c1_train_samples_per_s": round(train_rate, 1),
                "feed_over_train": round(feed_rate / train_rate, 2),
            })  # fmt: skip
    return rows


def case_folder(repeats: int, label: str) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import write_tiny
    from largebatch.data import load_dataset
    from largebatch.feed import Feed
    from largebatch.sampler import EpochSampler

    root = Path(tempfile.mkdtemp(prefix="bench-data-folder-"))
    try:
        write_tiny(root / "tiny", n_train=64, n_val=2)  # 3 classes x 64 real JPEGs
        data = load_dataset("tinyimagenet", data_dir=str(root / "tiny"))
        order = EpochSampler(len(data.train_y), 0)
        with Feed(data, torch.device("cpu"), workers=2) as feed:
            rates = []
            for epoch in range(repeats):
                batches = feed.train_batches(
                    order.batches(epoch, 64), 64, True, torch.Generator(), epoch
                )
                t = time.perf_counter()
                count = sum(len(i) for i, _ in batches)
                rates.append(count / (time.perf_counter() - t))
    finally:
        shutil.rmtree(root)
    rate = round(statistics.median(rates), 1)
    return {"case": "folder", "code": label, "feed_samples_per_s": rate}


# ----------------------------------------------------------------------------- driver


def _child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.case == "c1-feed":
        rows = case_c1_feed(args.repeats)
    elif args.case == "folder":
        rows = [case_folder(args.repeats, args.label)]
    else:
        folder = Path(args.folder)
        case = {"rss": case_rss, "in-memory": case_in_memory}.get(args.case)
        if case is not None:
            rows = [case(args.n, folder, args.seconds)]
        else:
            rows = [case_stream(args.n, folder, args.per_epoch)]
    for row in rows:
        print("RESULT " + json.dumps(row), flush=True)


def _run_child(out: Path, env_src: str | None, *argv: str, timeout: float) -> None:
    env = dict(os.environ)
    if env_src is not None:
        env["PYTHONPATH"] = env_src
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *argv], capture_output=True, text=True,
        timeout=timeout, env=env,
    )  # fmt: skip
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not rows:
        rows = [{"case": argv[1], "argv": list(argv), "error": proc.stderr.strip()[-1500:]}]
    with open(out, "a") as f:
        for row in rows:
            row.update(case_s=round(time.perf_counter() - started, 1), host=platform.node())
            f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_data.jsonl"))
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--cases", default="c1-feed,folder,rss,in-memory,stream")
    parser.add_argument("--before-src", help="source tree before the change (folder case)")
    parser.add_argument("--per-epoch", type=int, default=200_000)
    # internal: one case in this process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--label", default="after", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    cases = args.cases.split(",")
    common = ["--threads", str(args.threads), "--repeats", str(args.repeats)]
    here = os.environ.get("PYTHONPATH")
    if "c1-feed" in cases:
        _run_child(args.out, here, "--case", "c1-feed", *common, timeout=900)
    if "folder" in cases:
        if args.before_src:
            _run_child(args.out, args.before_src, "--case", "folder", "--label", "before",
                       *common, timeout=600)  # fmt: skip
        _run_child(args.out, here, "--case", "folder", "--label", "after", *common, timeout=600)
    sizes = [int(s) for s in args.sizes.split(",")]
    for n in sizes:
        folder = Path(tempfile.mkdtemp(prefix=f"bench-data-{n}-"))
        try:
            t = time.perf_counter()
            write_memmap(folder, n)
            print(f"wrote {n} samples in {time.perf_counter() - t:.1f} s", flush=True)
            where = ["--n", str(n), "--folder", str(folder), "--seconds", str(args.seconds)]
            if "rss" in cases:
                _run_child(args.out, here, "--case", "rss", *where, *common, timeout=900)
            if n == sizes[0] and "in-memory" in cases:
                _run_child(args.out, here, "--case", "in-memory", *where, *common, timeout=900)
            if n == sizes[0] and "stream" in cases:
                _run_child(args.out, here, "--case", "stream", *where, *common,
                           "--per-epoch", str(args.per_epoch), timeout=1800)  # fmt: skip
        finally:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
