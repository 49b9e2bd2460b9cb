"""Command line: ``largebatch train|evaluate|hessian|cbs ...`` (also ``python -m largebatch``).

Bad input ends with one ``error: ...`` line on stderr and exit status 2, no traceback
(``--debug`` shows it). Ctrl-C ends with exit status 130. A ``train`` run whose batch
outgrew its processes under ``on_outgrown: stop`` ends with exit status 3 (:data:`OUTGROWN`).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from largebatch import __version__
from largebatch.errors import UsageError
from largebatch.interrupts import hold_interrupts

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one ``error:`` line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


# (flag, config key, type, help); every flag is also a config key.
_TRAIN_FLAGS: list[tuple[str, str, Callable[[str], Any] | None, str]] = [
    (
        "--dataset",
        "dataset",
        str,
        "fashion-mnist|mnist|cifar10|cifar100|svhn|tinyimagenet|imagenet|digits|mnist1d|synthetic"
        ", or package.module:callable returning (train, test) datasets",
    ),
    ("--data-dir", "data_dir", str, "folder with the dataset files"),
    ("--image-size", "image_size", int, "image-folder datasets: side of the decoded images"),
    ("--seq-len", "seq_len", int, "text dataset: tokens per sample (default 128)"),
    ("--d-model", "d_model", int, "transformer: width (default 128)"),
    ("--n-layers", "n_layers", int, "transformer: blocks (default 2)"),
    ("--n-heads", "n_heads", int, "transformer: attention heads (default 4)"),
    ("--workers", "loader_workers", int, "image-folder datasets: decoding processes"),
    ("--threads", "threads", int, "torch threads per process (default: auto)"),
    (
        "--parallel",
        "parallel",
        str,
        "how gradients meet under torchrun: ddp (default) | flat | fsdp",
    ),
    (
        "--model",
        "model",
        str,
        "mlp|c1|c2|resnet20|resnet18|resnet50|squeezenext|squeezenext-2x, or "
        "package.module:callable returning an nn.Module",
    ),
    ("--method", "method", str, "bl|fb|gg|abs|absa|gns"),
    ("--epochs", "epochs", int, "number of epochs"),
    ("--batch-size", "batch_size", int, "base (global) batch size B0"),
    ("--max-batch-size", "max_batch_size", int, "largest global batch Bmax"),
    ("--micro-batch-size", "micro_batch_size", int, "largest batch run at once (accumulation)"),
    ("--lr", "lr", float, "learning rate at the base batch"),
    ("--lr-decay", "lr_decay", float, "LR factor at each milestone"),
    ("--optimizer", "optimizer", str, "sgd (default) | adamw"),
    ("--momentum", "momentum", float, "SGD momentum"),
    ("--weight-decay", "weight_decay", float, "L2 weight decay"),
    ("--seed", "seed", int, "random seed"),
    ("--device", "device", str, "auto|cpu|cuda"),
    ("--precision", "precision", str, "fp32|bf16|fp16 (autocast; fp16 adds loss scaling)"),
    ("--out", "out", str, "output folder"),
]
# The train flags defined apart from _TRAIN_FLAGS (lists and switches); also config keys.
_TRAIN_SWITCHES = ("lr_decay_epochs", "resume", "tensorboard")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="largebatch", description="Large-batch training with adaptive batch size."
    )
    parser.add_argument("--version", action="version", version=f"largebatch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model", description="Train a model.")
    train.add_argument("--config", help="YAML file of config keys")
    train.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key (repeatable), e.g. --set lr_decay_epochs=[30,60]",
    )
    for flag, key, kind, text in _TRAIN_FLAGS:
        train.add_argument(flag, dest=key, type=kind, default=argparse.SUPPRESS, help=text)
    train.add_argument(
        "--lr-decay-epochs",
        dest="lr_decay_epochs",
        type=int,
        nargs="*",
        default=argparse.SUPPRESS,
        metavar="E",
        help="milestone epochs for LR decay",
    )
    train.add_argument(
        "--resume",
        dest="resume",
        action="store_true",
        default=argparse.SUPPRESS,
        help="continue the run in --out from its checkpoint",
    )
    train.add_argument(
        "--tensorboard",
        dest="tensorboard",
        action="store_true",
        default=argparse.SUPPRESS,
        help="also write TensorBoard scalars (against samples seen) to OUT/tensorboard",
    )
    train.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser(
        "evaluate",
        help="clean and adversarial accuracy of a checkpoint",
        description="Clean and adversarial test accuracy of a trained checkpoint.",
    )
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--attack", default="none", choices=("none", "fgsm", "pgd"))
    ev.add_argument("--eps", type=float, default=0.03, help="L-inf budget in raw input units")
    ev.add_argument("--steps", type=int, default=10, help="PGD steps")
    ev.add_argument(
        "--alpha", type=float, default=None, help="PGD step size (default 2.5*eps/steps)"
    )
    ev.add_argument("--data-dir", help="dataset folder, if not the one used in training")
    ev.add_argument("--limit", type=int, default=None, help="evaluate on the first N test samples")
    ev.add_argument("--batch-size", type=int, default=500)
    ev.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ev.add_argument("--seed", type=int, default=0, help="seed for PGD's random start")
    ev.add_argument("--out", help="write the result as JSON here")
    ev.set_defaults(func=_cmd_evaluate)

    hs = sub.add_parser(
        "hessian",
        help="top eigenvalues, trace and spectral density of a checkpoint",
        description="Curvature of the training loss of a checkpoint (batch-norm in eval mode).",
    )
    hs.add_argument("--checkpoint", required=True)
    hs.add_argument(
        "--samples",
        type=_samples_arg,
        default=256,
        help="training samples in the loss, or 'all' (the whole training set, streamed)",
    )
    hs.add_argument("--top-k", type=int, default=1, help="number of top eigenvalues")
    hs.add_argument(
        "--tol", type=float, default=1e-3, help="relative accuracy of each eigenvalue (bounded)"
    )
    hs.add_argument("--trace", action="store_true", help="also estimate the trace")
    hs.add_argument(
        "--trace-probes", type=int, default=30, help="probes (the least with --trace-tol)"
    )
    hs.add_argument(
        "--trace-tol",
        type=float,
        default=0.01,
        help="add probes until the trace's relative standard error is this (0: fixed count)",
    )
    hs.add_argument("--trace-method", default="hutch++", choices=("hutch++", "hutchinson"))
    hs.add_argument("--density", action="store_true", help="also the spectral density (+ PNG)")
    hs.add_argument("--density-probes", type=int, default=2)
    hs.add_argument("--lanczos-steps", type=int, default=80)
    hs.add_argument("--batch-size", type=int, default=128)
    hs.add_argument("--seed", type=int, default=0, help="probe sample and vector seed")
    hs.add_argument("--data-dir", help="dataset folder, if not the one used in training")
    hs.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    hs.add_argument("--out", help="write the result as JSON here (the density PNG beside it)")
    hs.set_defaults(func=_cmd_hessian)

    cb = sub.add_parser(
        "cbs",
        help="measure the critical batch size from a checkpoint",
        description="Branch short runs at several batch sizes from a checkpoint and report "
        "the loss each reaches, the critical batch and the gradient noise scale.",
    )
    cb.add_argument("--checkpoint", required=True)
    cb.add_argument("--batch-sizes", type=int, nargs="+", required=True, metavar="B")
    cb.add_argument("--samples", type=int, required=True, help="samples each branch trains on")
    cb.add_argument("--out", required=True, help="folder for cbs.json, cbs.md and cbs.png")
    cb.add_argument(
        "--tolerance", type=float, default=0.02,
        help="relative loss above the best batch's still counted as critical (0.02)",
    )  # fmt: skip
    cb.add_argument("--lr-scaling", choices=("linear", "sqrt"), help="default: the run's rule")
    cb.add_argument("--points", type=int, default=4, help="loss measurements per branch")
    cb.add_argument("--probe-samples", type=int, default=2048)
    cb.add_argument("--seed", type=int, default=0, help="sample order and probe seed")
    cb.add_argument("--data-dir", help="dataset folder, if not the one used in training")
    cb.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    cb.set_defaults(func=_cmd_cbs)

    cmp = sub.add_parser(
        "compare",
        help="run a grid of experiments",
        description="Run every run of an experiment grid (finished ones are skipped).",
    )
    cmp.add_argument("--config", required=True, help="experiment YAML (base, grid, evaluate)")
    cmp.add_argument("--out", required=True, help="output folder")
    cmp.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a base config key for every run, e.g. --set data_dir=/data/cifar",
    )
    cmp.add_argument("--no-report", action="store_true", help="do not write the report")
    cmp.set_defaults(func=_cmd_compare)

    lau = sub.add_parser(
        "launch",
        help="train on as many processes as the batch needs (torchrun, one machine)",
        description=(
            "Run 'largebatch train' under torchrun in rounds: when the run's batch outgrows "
            "its processes (config max_accumulation) it saves and asks for more "
            "(world.json), and the next round resumes on them, up to --nproc-max."
        ),
    )
    lau.add_argument("--nproc-max", type=int, required=True, help="the most processes")
    lau.add_argument("--nproc-start", type=int, default=1, help="processes of the first round")
    lau.add_argument(
        "train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN_ARGS",
        help="the arguments of largebatch train (--resume is added)",
    )  # fmt: skip
    lau.set_defaults(func=_cmd_launch)

    rep = sub.add_parser(
        "report",
        help="tables and figures from finished runs",
        description="Write DIR/report.md and PNG figures from the runs under DIR.",
    )
    rep.add_argument("folder", metavar="DIR")
    rep.set_defaults(func=_cmd_report)
    return parser


def _train_config(args: argparse.Namespace) -> Any:
    """The TrainConfig that ``train``'s arguments give (the file, then flags, then --set)."""
    from largebatch.config import apply_overrides, load_config, parse_assignment

    config = load_config(args.config)
    keys = [key for _, key, _, _ in _TRAIN_FLAGS] + list(_TRAIN_SWITCHES)
    flags = {key: getattr(args, key) for key in keys if hasattr(args, key)}
    config = apply_overrides(config, flags)
    return apply_overrides(config, dict(parse_assignment(a) for a in args.assignments))


def _cmd_launch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from largebatch.launch import launch

    given = list(args.train_args)
    if given[:1] == ["--"]:
        given = given[1:]
    if not given:
        raise UsageError("launch: give the train arguments after --, e.g. -- --config run.yaml")
    train_args = build_parser().parse_args(["train", *given])  # bad ones: exit status 2
    folder = Path(_train_config(train_args).out)
    return launch(given, folder, args.nproc_max, args.nproc_start, echo=_say)


def _cmd_train(args: argparse.Namespace) -> int:
    from largebatch.train import train

    config = _train_config(args)
    from largebatch.distributed import teardown

    try:
        result = train(
            config,
            show_progress=None if not args.quiet else False,
            echo=None if args.quiet else _say,
        )
    finally:
        teardown()
    asked = result.get("outgrown")
    if asked is not None:  # saved; world.json holds the request
        sys.stderr.write(
            f"outgrown: {asked['reason']}; saved, resume with {asked['processes']} processes "
            f"(--resume)\n"
        )
        return OUTGROWN
    return 0


def _samples_arg(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'all', got {text!r}") from None


def _call_with_args(func: Callable[..., Any], args: argparse.Namespace) -> Any:
    """Call ``func`` with the parsed flags whose names match its parameters."""
    names = inspect.signature(func).parameters
    return func(**{k: v for k, v in vars(args).items() if k in names})


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from largebatch.evaluate import evaluate_checkpoint

    result = _call_with_args(evaluate_checkpoint, args)
    line = f"clean accuracy {result['clean_acc']:.4f}"
    if result.get("adv_acc") is not None:
        line += f", {args.attack} accuracy {result['adv_acc']:.4f} (eps {args.eps:g})"
    _say(line + f" on {result['samples']} test samples")
    return 0


def _cmd_hessian(args: argparse.Namespace) -> int:
    from largebatch.analysis import analyze_checkpoint

    result = _call_with_args(analyze_checkpoint, args)
    eig = result["eigenvalues"]
    values = ", ".join(f"{v:.6g}" for v in eig["values"])
    _say(
        f"top eigenvalues: {values} (max residual {max(eig['residuals']):.1e}, "
        f"{eig['matvecs']} Hessian-vector products, {result['samples']} samples)"
    )
    if "trace" in result:
        tr = result["trace"]
        _say(
            f"trace: {tr['estimate']:.6g} +- {tr['stderr']:.2g} (standard error, "
            f"{tr['matvecs']} products, {tr['method']})"
        )
    if "density" in result:
        sd = result["density"]
        _say(
            f"spectral density: {100 * sd['negative_mass']:.2f}% of it below "
            f"-{sd['negative_threshold']:g} x the spectral radius, most negative Ritz value "
            f"{sd['min_eigenvalue']:.4g} ({sd['matvecs']} products)"
        )
    if "density_png" in result:
        _say(f"spectral density: {result['density_png']}")
    if args.out:
        _say(f"written: {args.out}")
    return 0


def _cmd_cbs(args: argparse.Namespace) -> int:
    from largebatch.cbs import measure_critical_batch

    result = _call_with_args(measure_critical_batch, args)
    for branch in result["branches"]:
        _say(f"batch {branch['batch_size']:>6}: loss {branch['final_loss']:.4f} "
             f"({branch['updates']} updates, lr {branch['lr']:.4g})")  # fmt: skip
    phi = result["noise_scale"]
    _say(
        f"critical batch {result['critical_batch']} (within {100 * result['tolerance']:g}% of "
        f"the best loss); noise scale "
        f"{'not measured' if phi is None else f'{phi:.4g}'}; written: {args.out}/cbs.md"
    )
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from largebatch.compare import load_experiment, run_experiment
    from largebatch.config import parse_assignment
    from largebatch.report import collect_runs, markdown_table, summarize, write_report

    overrides = dict(parse_assignment(a) for a in args.assignments)
    status = run_experiment(load_experiment(args.config, overrides), args.out, echo=_say)
    failed = [name for name, state in status.items() if state == "failed"]
    if not args.no_report and len(failed) < len(status):
        _say(markdown_table(summarize(collect_runs(args.out))))
        _say(f"report: {write_report(args.out)}")
    if failed:
        print(
            f"{len(failed)} of {len(status)} runs failed (see their error.txt): "
            + ", ".join(failed),
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from largebatch.report import collect_runs, markdown_table, summarize, write_report

    if not args.folder.strip():
        raise UsageError("DIR must name a folder of runs, got an empty string")
    path = write_report(args.folder)
    _say(markdown_table(summarize(collect_runs(args.folder))))
    _say(f"report: {path}")
    return 0


class _Stdout:
    """Prints to stdout until the reader goes away (``largebatch ... | head -1``); then
    the output is dropped and the work goes on, so a closed pipe never stops a run
    half-way. :func:`main` reports it at the end."""

    closed = False

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        if _Stdout.closed:
            return
        try:
            print(*args, **kwargs, flush=True)
        except BrokenPipeError:
            _Stdout.closed = True
            # later writes by anything else (and the interpreter's final flush) go nowhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


_say = _Stdout()


#: the exit status of a run whose batch outgrew its processes (``on_outgrown: stop``):
#: it saved at that point and wrote ``world.json``; 2 is an error, 130 an interrupt
OUTGROWN = 3


def _error(message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    _Stdout.closed = False
    try:
        # A Ctrl-C from here on is one line and exit status 130. It is held during the
        # imports, and for `train` until the loop takes over (see largebatch.interrupts).
        with hold_interrupts():
            args = build_parser().parse_args(argv)
            import torch  # noqa: F401  (the heavy import, done under the hold)

            from largebatch.engine import TrainingInterrupted

        try:
            with hold_interrupts() if args.command == "train" else contextlib.nullcontext():
                status = int(args.func(args))
        except TrainingInterrupted as exc:
            sys.stderr.write(f"interrupted: {exc}\n")
            return 130
    except UsageError as exc:
        return _error(str(exc), debug)
    except OSError as exc:  # a path the user named: full disk, read-only, no permission
        from largebatch.outputs import describe_os_error

        return _error(describe_os_error(exc), debug)
    except KeyboardInterrupt as exc:  # the message names the user's code it landed in
        sys.stderr.write(f"interrupted: {exc}\n" if str(exc) else "interrupted\n")
        return 130
    if _Stdout.closed:
        return _error("standard output was closed before the end (broken pipe)", debug)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
