"""Training configuration: dataclass defaults, then a YAML file, then command-line overrides.

The resolved configuration is written next to every run's results as ``config.yaml``.
Unknown keys, values of the wrong type and out-of-range values raise
:class:`~largebatch.errors.ConfigError` with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from largebatch.checks import MAX_SEED
from largebatch.controllers import GROWTH_RULES
from largebatch.errors import ConfigError
from largebatch.parallel import PARALLEL_KINDS

__all__ = [
    "METHODS",
    "DEVICES",
    "PRECISIONS",
    "MAX_SEED",
    "TrainConfig",
    "check_finite",
    "check_number",
    "check_seed",
    "load_config",
    "read_yaml",
    "apply_overrides",
    "parse_assignment",
    "config_to_dict",
    "save_config",
    "CONFIG_HEADER",
]

METHODS: tuple[str, ...] = ("bl", "fb", "gg", "abs", "absa", "gns", "seesaw", "schedule")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")


@dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults are the paper's small-network settings."""

    # data
    dataset: str = "fashion-mnist"
    data_dir: str | None = None  # None: the dataset's default folder (or cache)
    augment: bool = False  # random crop + flip (CIFAR, SVHN)
    limit_train: int | None = None  # use only the first N training samples
    limit_test: int | None = None
    image_size: int | None = None  # image-folder datasets: side of the decoded images
    loader_workers: int | None = None  # lazily read data: reading processes (None: auto)
    seq_len: int = 128  # text: tokens per sample
    d_model: int = 128  # transformer: width
    n_layers: int = 2  # transformer: blocks
    n_heads: int = 4  # transformer: attention heads (d_model a multiple of it)
    threads: int | None = None  # torch threads per process (None: auto, see README)
    parallel: str = "ddp"  # how the ranks' gradients meet under torchrun: ddp | flat | fsdp
    # fsdp: reduce-scatter after every micro-batch (no unsharded gradient kept between
    # them: less memory, one reduce-scatter per micro-batch) instead of after the last
    fsdp_sync_each_micro_batch: bool = False
    # fsdp: checkpoints "sharded" (each rank writes its shards through
    # torch.distributed.checkpoint, beside checkpoint.pt) or "full" (rank 0 gathers the
    # whole state into checkpoint.pt)
    fsdp_checkpoint: str = "sharded"
    # a world that grows with the batch: the most micro-batches per process per update
    # (None: no limit); past it the run goes on ("continue") or saves, writes world.json
    # (the processes it asks for) and exits with status 3 ("stop": under the launcher)
    max_accumulation: int | None = None
    on_outgrown: str = "continue"
    # model and method
    model: str = "c1"
    method: str = "bl"
    # schedule
    epochs: int = 10
    # train to a loss: stop at the first epoch end whose training loss is at most this
    target_train_loss: float | None = None
    max_epochs: int | None = None  # with target_train_loss: the most epochs (None: epochs)
    batch_size: int = 128  # base batch B0 (global, over all ranks)
    max_batch_size: int = 16384  # cap Bmax for growing / large-batch methods
    micro_batch_size: int | None = None  # largest batch run at once; None: batch_size
    loss_weights: str = "samples"  # micro-batch weights: samples | tokens (targets != -100)
    lr: float = 0.02  # learning rate at the base batch
    lr_decay: float = 0.2  # factor applied at each milestone epoch
    lr_decay_epochs: list[int] = field(default_factory=list)
    optimizer: str = "sgd"  # sgd (with momentum) | adamw (with betas; momentum unused)
    momentum: float = 0.9
    weight_decay: float = 0.0  # sgd: L2 penalty; adamw: decoupled decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # adamw's (beta1, beta2)
    # fb: gradual warm-up (Goyal et al.)
    warmup_epochs: int = 5
    # abs / absa: the eigenvalue rule (reference values as defaults)
    abs_decrease_ratio: float = 2.0  # grow when the eigenvalue fell to 1/ratio of the reference
    abs_growth_factor: int = 2  # batch multiple per growth; the LR scales by the same factor
    abs_duration: int = 10  # grow anyway after this many epochs without a growth
    # gns: the batch doubles while below the measured gradient noise scale
    gns_every: float = 0.25  # epochs between decision points
    # gns_rule budget: double while the run gives up at most gns_tolerance of the fixed
    # batch's training progress (counted from the noise scale); kappa: double when
    # batch <= gns_kappa * noise scale, whatever it costs (the rule before budget)
    gns_rule: str = "budget"
    gns_tolerance: float = 0.2
    gns_kappa: float = 1.0
    gns_confirmations: int = 2  # decision points in a row that must agree on a growth
    gns_micro_batch: int | None = None  # noise meter's part of an update (None: half the batch)
    gns_decay: float = 0.95  # per-update decay of the meter's moving averages
    batch_schedule: str | None = None  # schedule: "0:32 200k:64 800k:128" (samples)
    schedule_unit: str = "samples"  # batch_schedule's points: samples | tokens (of targets)
    lr_scaling: str = "auto"  # abs/gns LR rule: auto (by optimizer) | linear | sqrt | adascale
    gns_milestones: str = "samples"  # gns: lr_decay_epochs count samples, or progress
    # curvature guard (any method): lr <= guard_fraction * 2 (1 + momentum) / eigenvalue
    curvature_guard: bool = False
    guard_fraction: float = 0.5
    guard_every: float = 1.0  # epochs between estimates
    guard_samples: int = 1024  # probe samples of the guard's eigenvalue estimates
    # stability safeguard (any growth that raises the LR): the LR factor of a growth is
    # capped at the largest stable LR that the gauge reads along the grown batch's step
    safeguard: bool = True  # on for the methods that grow the batch (not bl, fb)
    safeguard_samples: int = 256  # probe samples of the gauge
    # recovery after a growth: when the training loss of one of the two decision windows
    # after a growth that raised the LR exceeds the window before it by more than
    # recovery_tolerance times that loss (at least a tenth of the run's first window
    # loss), the growth's LR step is undone (null: off)
    recovery_tolerance: float | None = 0.5
    # adversarial training: on for absa by default; true/false forces it for any method
    adversarial: bool | None = None
    adv_ratio: float = 0.2  # initial fraction g0 of each micro-batch replaced by attacks
    adv_eps: float = 0.005  # L-inf budget, raw input units
    adv_attack: str = "fgsm"  # fgsm | pgd
    adv_pgd_steps: int = 3
    adv_clamp: str = "range"  # range: the data's valid range; batch: the reference's min/max
    adv_stop_fraction: float = 0.5  # no adversarial examples from epoch epochs * fraction on
    # curvature probe (abs, absa)
    hessian_samples: int = 128  # probe set drawn once from the training data
    hessian_every: int = 1  # epochs between estimates
    hessian_every_samples: int | None = None  # and at least this many samples between them
    hessian_mode: str = "tracker"  # tracker: warm-started Lanczos; reference: cold power, 10 its
    hessian_tol: float = 1e-2  # relative residual target of the tracker
    hessian_max_matvecs: int = 20  # product budget per estimate
    # divergence guard: a non-finite loss or gradient either stops the run ("stop") or
    # restores the last checkpoint and multiplies the LR by divergence_lr_factor ("rollback")
    on_divergence: str = "stop"
    divergence_lr_factor: float = 0.5
    max_rollbacks: int = 3
    # run
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds loss scaling)
    channels_last: bool | None = None  # None: on for image models on CUDA
    eval_batch_size: int = 1000
    tensorboard: bool = False  # also write TensorBoard scalars to OUT/tensorboard
    out: str = "runs/train"
    resume: bool = False

    def validate(self, names: bool = True) -> TrainConfig:
        """Check ranges and combinations; raise ConfigError on the first problem.

        ``names``: ``dataset`` and ``model`` must be built-in names or
        ``package.module:callable`` paths (False: they are labels, as :func:`largebatch.fit`
        sets them).
        """
        from largebatch.data import DATASETS
        from largebatch.models import MODELS

        _check_types(self)

        for key, choices in (("dataset", DATASETS), ("model", MODELS)):
            value = getattr(self, key)
            if names and ":" not in value:
                _choice(key, value, choices)
        _choice("method", self.method, METHODS)
        _choice("device", self.device, DEVICES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("adv_attack", self.adv_attack, ("fgsm", "pgd"))
        _choice("adv_clamp", self.adv_clamp, ("range", "batch"))
        _choice("schedule_unit", self.schedule_unit, ("samples", "tokens"))
        _choice("hessian_mode", self.hessian_mode, ("tracker", "reference"))
        _choice("on_divergence", self.on_divergence, ("stop", "rollback"))
        _choice("lr_scaling", self.lr_scaling, ("adascale", "auto", "linear", "sqrt"))
        _choice("loss_weights", self.loss_weights, ("samples", "tokens"))
        _choice("parallel", self.parallel, PARALLEL_KINDS)
        if (self.method == "schedule") != (self.batch_schedule is not None):
            raise ConfigError(
                'method schedule follows batch_schedule (e.g. "0:32 200k:64 800k:128"): '
                "set both, or neither"
            )
        if self.batch_schedule is not None:
            from largebatch.controllers import parse_schedule

            try:
                schedule = parse_schedule(self.batch_schedule)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            largest = max(b for _, b in schedule)
            if largest > self.max_batch_size:
                raise ConfigError(
                    f"batch_schedule reaches batch {largest}, above max_batch_size "
                    f"{self.max_batch_size}"
                )
        if self.lr_scaling == "adascale" and self.method in ("abs", "absa", "schedule"):
            raise ConfigError(
                f"lr_scaling adascale needs the gradient noise scale, which method "
                f"{self.method} does not measure; use gns, or linear, sqrt or auto"
            )
        _choice("gns_milestones", self.gns_milestones, ("samples", "progress"))
        for key in ("gns_every", "guard_every"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(f"{key} must be in (0, 1], got {getattr(self, key)}")
        _choice("gns_rule", self.gns_rule, GROWTH_RULES)
        _choice("fsdp_checkpoint", self.fsdp_checkpoint, ("sharded", "full"))
        _choice("on_outgrown", self.on_outgrown, ("continue", "stop"))
        if self.max_accumulation is not None and self.max_accumulation < 1:
            raise ConfigError(f"max_accumulation must be >= 1 or null, got {self.max_accumulation}")
        if not self.gns_kappa > 0:
            raise ConfigError(f"gns_kappa must be > 0, got {self.gns_kappa}")
        if not 0 <= self.gns_tolerance <= 1:
            raise ConfigError(f"gns_tolerance must be in [0, 1], got {self.gns_tolerance}")
        if not 0 <= self.gns_decay < 1:
            raise ConfigError(f"gns_decay must be in [0, 1), got {self.gns_decay}")
        if self.recovery_tolerance is not None and not self.recovery_tolerance > 0:
            raise ConfigError(
                f"recovery_tolerance must be > 0 (or null: off), got {self.recovery_tolerance}"
            )
        if not 0 < self.guard_fraction <= 1:
            raise ConfigError(f"guard_fraction must be in (0, 1], got {self.guard_fraction}")
        for key in ("gns_confirmations", "guard_samples", "safeguard_samples"):
            _at_least(key, getattr(self, key), 1)
        if self.gns_micro_batch is not None:
            _at_least("gns_micro_batch", self.gns_micro_batch, 1)
        _at_least("max_rollbacks", self.max_rollbacks, 0)
        if not 0 < self.divergence_lr_factor < 1:
            raise ConfigError(
                f"divergence_lr_factor must be in (0, 1), got {self.divergence_lr_factor}"
            )
        for key in (
            "abs_growth_factor",
            "abs_duration",
            "hessian_samples",
            "hessian_every",
            "hessian_max_matvecs",
            "adv_pgd_steps",
        ):
            _at_least(key, getattr(self, key), 1)
        _at_least("warmup_epochs", self.warmup_epochs, 0)
        if self.abs_growth_factor < 2:
            raise ConfigError(f"abs_growth_factor must be >= 2, got {self.abs_growth_factor}")
        if not self.abs_decrease_ratio > 1:
            raise ConfigError(f"abs_decrease_ratio must be > 1, got {self.abs_decrease_ratio}")
        if not 0 <= self.adv_ratio <= 1:
            raise ConfigError(f"adv_ratio must be in [0, 1], got {self.adv_ratio}")
        if not 0 <= self.adv_stop_fraction <= 1:
            raise ConfigError(f"adv_stop_fraction must be in [0, 1], got {self.adv_stop_fraction}")
        if self.adv_eps < 0:
            raise ConfigError(f"adv_eps must be >= 0, got {self.adv_eps}")
        if not 0 < self.hessian_tol < 1:
            raise ConfigError(f"hessian_tol must be in (0, 1), got {self.hessian_tol}")
        for key in ("epochs", "batch_size", "max_batch_size", "eval_batch_size"):
            _at_least(key, getattr(self, key), 1)
        if self.loader_workers is not None:
            _at_least("loader_workers", self.loader_workers, 0)
        for key in ("seq_len", "d_model", "n_layers", "n_heads"):
            _at_least(key, getattr(self, key), 1)
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})"
            )
        if self.threads is not None:
            _at_least("threads", self.threads, 1)
        if self.target_train_loss is not None and not self.target_train_loss > 0:
            raise ConfigError(f"target_train_loss must be > 0, got {self.target_train_loss}")
        if self.max_epochs is not None:
            if self.target_train_loss is None:
                raise ConfigError("max_epochs bounds a run to target_train_loss; set that too")
            _at_least("max_epochs", self.max_epochs, 1)
        for key in (
            "micro_batch_size",
            "limit_train",
            "limit_test",
            "image_size",
            "hessian_every_samples",
        ):
            if getattr(self, key) is not None:
                _at_least(key, getattr(self, key), 1)
        check_seed(self.seed)
        if not self.out.strip():
            raise ConfigError("out must name a folder, got an empty string")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if any(e < 1 for e in self.lr_decay_epochs) or sorted(self.lr_decay_epochs) != list(
            self.lr_decay_epochs
        ):
            raise ConfigError(
                f"lr_decay_epochs must be increasing epoch numbers >= 1, got {self.lr_decay_epochs}"
            )
        if self.max_batch_size < self.batch_size:
            raise ConfigError(
                f"max_batch_size ({self.max_batch_size}) must be at least batch_size "
                f"({self.batch_size})"
            )
        if self.max_batch_size % self.batch_size:
            raise ConfigError(
                f"max_batch_size ({self.max_batch_size}) must be a multiple of batch_size "
                f"({self.batch_size})"
            )
        return self

    @property
    def epoch_limit(self) -> int:
        """The most epochs the run may take: ``max_epochs`` when it trains to a target
        loss and that is set, else ``epochs``."""
        return self.max_epochs if self.max_epochs is not None else self.epochs


def _choice(key: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"unknown {key} {value!r}; choose one of: {', '.join(choices)}")


def check_seed(seed: int, key: str = "seed") -> None:
    """A seed is an integer in [0, MAX_SEED]."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{key} must be an integer in [0, {MAX_SEED}], got {seed!r}")


def check_finite(key: str, value: float) -> None:
    """NaN and infinity are bad input everywhere: no range check can catch them later."""
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")


def check_number(
    key: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    integer: bool = False,
) -> None:
    """``value`` is a finite number (an integer if ``integer``) within [low, high], or
    (low, high] with ``open_low``; otherwise a one-line ConfigError naming ``key``."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ConfigError(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    check_finite(key, value)
    too_low = low is not None and (value <= low if open_low else value < low)
    if too_low or (high is not None and value > high):
        if high is None:
            wanted = f"{'>' if open_low else '>='} {low:g}"
        elif low is None:
            wanted = f"<= {high:g}"
        else:
            wanted = f"in {'(' if open_low else '['}{low:g}, {high:g}]"
        raise ConfigError(f"{key} must be {wanted}, got {value!r}")


def _check_types(config: TrainConfig) -> None:
    """Every field holds a value of its declared type (a config built in Python skips
    :func:`apply_overrides`), and every number is finite."""
    for name in _FIELDS:
        value = getattr(config, name)
        coerced = _coerce(name, value)
        if coerced != value or type(coerced) is not type(value):
            setattr(config, name, coerced)


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value: Any) -> Any:
    """Check ``value`` against the declared type of field ``key``; ints widen to floats."""
    hint = typing.get_type_hints(TrainConfig)[key]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} may not be empty")
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    origin = typing.get_origin(base)
    if origin is list:
        (item,) = typing.get_args(base)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {item.__name__}, got {value!r}")
        return [_scalar(key, v, item) for v in value]
    return _scalar(key, value, base)


def _scalar(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            check_finite(key, float(value))
            return float(value)
    elif kind is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key} must be {kind.__name__}, got {value!r}")


def apply_overrides(config: TrainConfig, values: Mapping[str, Any]) -> TrainConfig:
    """Return a copy of ``config`` with ``values`` set; unknown keys are errors."""
    changes = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            raise ConfigError(
                f"unknown config key {key!r}; valid keys: {', '.join(sorted(_FIELDS))}"
            )
        changes[name] = _coerce(name, value)
    return dataclasses.replace(config, **changes)


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` from ``--set``; the value is YAML (``3``, ``0.1``, ``[30, 60]``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The YAML document in ``path``; a missing or unreadable file is a ConfigError."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{what} {path} is not readable YAML: {reason}") from None


def load_config(path: str | Path | None, base: TrainConfig | None = None) -> TrainConfig:
    """Read a YAML mapping of config keys on top of ``base`` (default: the dataclass defaults)."""
    config = base or TrainConfig()
    if path is None:
        return config
    values = read_yaml(path)
    if values is None:
        return config
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value")
    return apply_overrides(config, values)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


#: the first line of every ``config.yaml`` a run writes: how a later run knows it is ours
CONFIG_HEADER = "# largebatch run configuration: rewritten by each run in this folder"


def save_config(config: TrainConfig | Mapping[str, Any], path: str | Path) -> None:
    """Write the resolved configuration (or its record as a dict) as YAML, atomically,
    under the header that marks a run's own ``config.yaml``."""
    from largebatch.io import atomic_write_text

    record = config_to_dict(config) if isinstance(config, TrainConfig) else dict(config)
    text = yaml.safe_dump(record, sort_keys=False)
    atomic_write_text(path, f"{CONFIG_HEADER}\n{text}")
