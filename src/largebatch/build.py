"""Config to engine objects: the controller, meters, optimizer, tracker, attack,
rollback and the loop's settings.

:func:`build_parts` is what :func:`largebatch.train.train` and :func:`largebatch.fit`
call: names and config keys in, :class:`~largebatch.engine.Parts` and
:class:`~largebatch.engine.Settings` out. The guard's cap is computed from the
optimizer that goes into the parts, so a user's optimizer is the one it guards.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from largebatch import inputs
from largebatch.accumulate import to_device, token_count
from largebatch.adversarial import AdversarialShare
from largebatch.checks import number
from largebatch.config import TrainConfig
from largebatch.controllers import (
    AdaptiveBatch,
    BatchController,
    CurvatureGuard,
    FixedBatch,
    IncreaseBatchInsteadOfDecay,
    LinearScalingWarmup,
    NoiseScaleBatch,
    ScheduledBatch,
    Seesaw,
    checked_decision,
    parse_schedule,
)
from largebatch.distributed import World, shard
from largebatch.divergence import Rollback
from largebatch.engine import Parts, Settings, tokens_per_sample
from largebatch.errors import ConfigError, UsageError
from largebatch.feed import loaded
from largebatch.hessian import EigenTracker
from largebatch.lr import momentum_of, rule_for
from largebatch.meters import (
    EIGENVALUE,
    NOISE_SCALE,
    CurvatureMeter,
    GradientNoiseMeter,
    Meter,
    SharpnessMeter,
    reads_micro_batches,
)
from largebatch.models import TRANSFORMER_SIZES
from largebatch.parallel import make_parallel, unwrapped
from largebatch.sampler import probe_batches, probe_seed
from largebatch.scoring import LossFn, check_parameters
from largebatch.source import DataSource

__all__ = [
    "build_parts",
    "settings",
    "make_controller",
    "make_optimizer",
    "make_tracker",
    "make_meters",
    "make_attack",
    "make_rollback",
    "model_spec",
    "GROWING_METHODS",
    "check_shardable",
    "needs_whole_model",
]


#: the built-in methods whose batch grows (the stability safeguard reads at their growths)
GROWING_METHODS = ("gg", "abs", "absa", "gns", "seesaw", "schedule")


def model_spec(config: TrainConfig, data: DataSource) -> dict[str, Any]:
    """What :func:`largebatch.models.build_model` needs to rebuild the model from a checkpoint."""
    spec: dict[str, Any] = {
        "name": config.model,
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "mean": list(data.mean),
        "std": list(data.std),
    }
    if config.model == "transformer":
        spec["sizes"] = {key: getattr(config, key) for key in TRANSFORMER_SIZES}
    return spec


def settings(config: TrainConfig) -> Settings:
    """The loop's knobs from the config (micro-batches default to the base batch)."""
    return Settings(
        epochs=config.epoch_limit,
        target_train_loss=config.target_train_loss,
        micro_batch_size=config.micro_batch_size or config.batch_size,
        eval_batch_size=config.eval_batch_size,
        precision=config.precision,
        channels_last=config.channels_last,
        augment=config.augment,
        seed=config.seed,
        loader_workers=config.loader_workers,
        max_accumulation=config.max_accumulation,
        on_outgrown=config.on_outgrown,
        recovery=config.recovery_tolerance,
    )


def build_parts(
    config: TrainConfig,
    model: nn.Module,
    data: DataSource,
    world: World,
    device: torch.device,
    *,
    loss_fn: LossFn = F.cross_entropy,
    optimizer: Any = None,
    controller: BatchController | None = None,
    meters: Mapping[str, Meter] | None = None,
    shard_policy: Any = None,
) -> Parts:
    """The objects of a run of ``config``: ``model`` and ``data`` as given; the optimizer,
    controller and meters as given or built from the config; the attack and the rollback
    from the config."""
    # a model the user wrapped in DDP trains through that wrapper (see make_parallel)
    parallel = make_parallel(
        config.parallel,
        world,
        model,
        sync_each=config.fsdp_sync_each_micro_batch,
        checkpoint=config.fsdp_checkpoint,
        precision=config.precision,
    )
    model = unwrapped(model)
    check_parameters(model)
    if parallel.equal_passes:  # sharded: the optimizer is made over the shards
        users = getattr(parallel, "users", False)  # sharded by the user: as it is
        check_shardable(config, None if users else optimizer, controller, meters, users)
        if not users:
            if needs_whole_model(config, controller):  # a whole copy, before the sharding
                parallel.keep_whole(model, device)
            parallel.shard(model, shard_policy)
    optimizer = make_optimizer(optimizer, model, config)
    group = optimizer.param_groups[0]
    controller = controller or make_controller(
        config, len(data.train_y), float(group["lr"]), momentum_of(optimizer),
        lr_rule=rule_for(config.lr_scaling, optimizer),
        tokens_per_sample=tokens_per_sample(data),
    )  # fmt: skip
    checked_decision(controller, controller.decision())
    return Parts(
        model=model,
        data=data,
        optimizer=optimizer,
        controller=controller,
        loss_fn=loss_fn,
        meters=make_meters(controller, meters, config, data, loss_fn, device, world, optimizer),
        attack=make_attack(config, data),
        rollback=make_rollback(config),
        count=token_count if config.loss_weights == "tokens" else None,
        parallel=parallel,
        gauge=make_gauge(
            config, data, loss_fn, optimizer, device, world, growing=controller is not None
        ),
    )


def needs_whole_model(config: TrainConfig, controller: BatchController | None = None) -> bool:
    """Whether a run takes Hessian-vector products, adversarial examples or the stability
    gauge's readings on the model during training (``abs``, ``absa``, the curvature
    guard, a controller of the user's that measures the eigenvalue, ``adversarial``, the
    safeguard of a growing run): under ``parallel: fsdp`` these run on a whole copy of the
    model on each rank (:meth:`largebatch.parallel.FSDP.keep_whole`)."""
    adversarial = config.adversarial if config.adversarial is not None else config.method == "absa"
    curvature = (
        EIGENVALUE in controller.measures
        if controller is not None
        else config.method in ("abs", "absa")
    )
    gauged = config.safeguard and (controller is not None or config.method in GROWING_METHODS)
    return bool(curvature or config.curvature_guard or adversarial or gauged)


def check_shardable(
    config: TrainConfig,
    optimizer: Any = None,
    controller: BatchController | None = None,
    meters: Mapping[str, Meter] | None = None,
    users: bool = False,
) -> None:
    """What ``parallel: fsdp`` does not run, refused before the run starts: an optimizer
    made before the model was sharded, a meter that reads each micro-batch's own gradient
    (``gns_micro_batch`` included), and on a model the user sharded (``users``) anything
    that needs the model whole. The noise meter (``gns``) runs: it reads each rank's whole
    slice, in the reduce-scatter; Hessian-vector products, adversarial examples and the
    stability gauge run on a whole copy (:func:`needs_whole_model`)."""
    where = "under parallel: fsdp"
    if isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(
            f"{where} the optimizer must be made over the sharded parameters: pass a factory "
            "(params -> Optimizer) instead of an optimizer, or none"
        )
    if users and needs_whole_model(config, controller):
        raise ConfigError(
            f"{where}, a model you sharded yourself cannot be copied whole for Hessian-vector "
            "products, adversarial examples or the stability gauge (method abs or absa, "
            "curvature_guard, adversarial, the safeguard of a growing method); pass the model "
            "unsharded (largebatch shards it and keeps a whole copy), or set safeguard: false "
            "and use method gns"
        )
    wanted = set(controller.measures) if controller is not None else set()
    if wanted - {NOISE_SCALE, EIGENVALUE}:
        raise ConfigError(
            f"a controller that measures "
            f"{', '.join(sorted(wanted - {NOISE_SCALE, EIGENVALUE}))} does not run {where}; "
            "use parallel: ddp"
        )
    uses_gns = NOISE_SCALE in wanted or (controller is None and config.method == "gns")
    if uses_gns and config.gns_micro_batch is not None:
        raise ConfigError(
            f"gns_micro_batch does not run {where} (the noise meter reads each rank's whole "
            "slice there, in the reduce-scatter); leave it unset, or use parallel: ddp"
        )
    if any(reads_micro_batches(meter, config.batch_size) for meter in (meters or {}).values()):
        raise ConfigError(
            f"a meter of yours that reads each micro-batch's gradient (after_backward) does "
            f"not run {where}: the gradients meet in the backward passes; use parallel: ddp"
        )


def make_gauge(
    config: TrainConfig,
    data: DataSource,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    world: World,
    growing: bool = False,
) -> SharpnessMeter | None:
    """The stability safeguard's gauge (``safeguard: true``) on a probe of
    ``safeguard_samples`` training samples drawn once, the same on every rank (the gauge
    runs its share of them); None without the safeguard, and for a method whose batch
    never grows (``bl``, ``fb``) unless ``growing`` (a controller of the user's)."""
    if not config.safeguard or not (growing or config.method in GROWING_METHODS):
        return None
    probe = probe_batches(
        data.train_x,
        data.train_y,
        min(config.safeguard_samples, len(data.train_y)),
        config.micro_batch_size or config.batch_size,
        seed=probe_seed(config.seed) + 1,  # not the Hessian's probe
    )
    probe = [tuple(to_device(part, device) for part in loaded(x, y)) for x, y in probe]
    return SharpnessMeter(loss_fn, probe, optimizer, world)


def make_attack(config: TrainConfig, data: DataSource) -> AdversarialShare:
    """The adversarial share's attack: the config's, clamped to the data's valid range
    (or, with ``adv_clamp: batch``, to each micro-batch's min and max)."""
    clamp = "batch" if config.adv_clamp == "batch" else data.input_range
    return AdversarialShare(config.adv_attack, config.adv_eps, config.adv_pgd_steps, clamp)


def make_rollback(config: TrainConfig) -> Rollback | None:
    """``on_divergence: rollback``: restore and lower the LR; ``stop``: None."""
    if config.on_divergence != "rollback":
        return None
    return Rollback(config.divergence_lr_factor, config.max_rollbacks)


def _schedule_in_samples(config: TrainConfig, tokens_per_sample: int) -> Any:
    """``batch_schedule`` with its points in samples: ``schedule_unit: tokens`` points are
    divided by the target tokens per sample (rounded up), so that a change comes at the
    first update past its token point."""
    text = config.batch_schedule or ""
    if config.schedule_unit == "samples":
        return text
    return [(-(-at // tokens_per_sample), batch) for at, batch in parse_schedule(text)]


def make_controller(
    config: TrainConfig,
    num_samples: int | None = None,
    lr: float | None = None,
    momentum: float | None = None,
    lr_rule: str | None = None,
    tokens_per_sample: int = 1,
) -> BatchController:
    """The controller for ``config.method``.

    ``lr`` and ``momentum``: the optimizer's (its first param group's), from which the
    curvature guard computes its cap; default the config's ``lr`` and ``momentum``.
    ``lr_rule``: the LR scaling rule of ``abs``, ``absa`` and ``gns``, resolved for the
    optimizer (:func:`~largebatch.lr.rule_for`); default ``config.lr_scaling`` resolved
    for SGD.
    Adversarial training is on for ``absa`` and, with ``adversarial: true``, for any
    method; ``adversarial: false`` turns it off for ``absa`` too.
    """
    milestones, decay = config.lr_decay_epochs, config.lr_decay
    lr_rule = lr_rule or rule_for(config.lr_scaling, None)
    adversarial = config.adversarial if config.adversarial is not None else config.method == "absa"
    adv = {
        "adv_ratio": config.adv_ratio if adversarial else 0.0,
        "adv_stop_epoch": int(config.epochs * config.adv_stop_fraction),
    }
    controller: BatchController
    if config.method == "bl":
        controller = FixedBatch(config.batch_size, milestones, decay, **adv)
    elif config.method == "fb":
        controller = LinearScalingWarmup(
            config.batch_size,
            config.max_batch_size,
            milestones,
            decay,
            config.warmup_epochs,
            **adv,
        )
    elif config.method == "gg":
        controller = IncreaseBatchInsteadOfDecay(
            config.batch_size, config.max_batch_size, milestones, decay, **adv
        )
    elif config.method in ("abs", "absa"):
        controller = AdaptiveBatch(
            config.batch_size,
            config.max_batch_size,
            milestones,
            decay,
            decrease_ratio=config.abs_decrease_ratio,
            growth_factor=config.abs_growth_factor,
            duration=config.abs_duration,
            lr_rule=lr_rule,
            **adv,
        )
    elif config.method == "seesaw":
        controller = Seesaw(config.batch_size, config.max_batch_size, milestones, decay, **adv)
    elif config.method == "schedule":
        if num_samples is None:
            raise ConfigError("method schedule needs the number of training samples")
        controller = ScheduledBatch(
            _schedule_in_samples(config, tokens_per_sample),
            config.batch_size,
            config.max_batch_size,
            milestones,
            decay,
            num_samples,
            lr_rule=lr_rule,
            **adv,
        )
    elif config.method == "gns":
        if num_samples is None:
            raise ConfigError("method gns needs the number of training samples")
        controller = NoiseScaleBatch(
            config.batch_size,
            config.max_batch_size,
            milestones,
            decay,
            num_samples,
            every_fraction=config.gns_every,
            kappa=config.gns_kappa,
            confirmations=config.gns_confirmations,
            lr_rule=lr_rule,
            milestones_by=config.gns_milestones,
            rule=config.gns_rule,
            tolerance=config.gns_tolerance,
            total_samples=num_samples * config.epochs,
            **adv,
        )
    else:
        raise ConfigError(f"unknown method {config.method!r}")
    controller.name = config.method
    if config.curvature_guard:
        every = None if num_samples is None else max(1, round(num_samples * config.guard_every))
        inner_every = controller.decide_every
        points = max(1, round(every / inner_every)) if every and inner_every else 1
        controller = CurvatureGuard(
            controller,
            config.lr if lr is None else lr,
            config.momentum if momentum is None else momentum,
            config.guard_fraction,
            every_points=points,
            every_samples=None if inner_every else every,
        )
    return controller


def make_optimizer(given: Any, model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer: ``given`` (an optimizer over the model's parameters, or a
    factory ``params -> Optimizer``), or SGD with the config's ``lr``, ``momentum`` and
    ``weight_decay``. Refused: parameters that are not the model's, a ``step()`` that needs
    a closure (LBFGS), an LR that is not finite and >= 0."""
    if given is None and config.optimizer == "adamw":
        betas = (float(config.betas[0]), float(config.betas[1]))
        return torch.optim.AdamW(
            model.parameters(), lr=config.lr, betas=betas, weight_decay=config.weight_decay
        )
    if given is None:
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    optimizer = given
    if not isinstance(given, torch.optim.Optimizer):
        if not callable(given):
            raise UsageError(
                f"optimizer is a {type(given).__name__}; pass a torch.optim.Optimizer or a "
                "factory params -> Optimizer"
            )
        try:
            optimizer = given(model.parameters())
        except Exception as exc:
            raise UsageError(f"the optimizer factory failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(
                f"the optimizer factory returned a {type(optimizer).__name__}, not an Optimizer"
            )
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for g in optimizer.param_groups for p in g["params"]):
        raise UsageError("the optimizer holds parameters that are not the model's")
    step = inspect.signature(optimizer.step).parameters.get("closure")
    if step is not None and step.default is inspect.Parameter.empty:
        raise UsageError(
            f"{type(optimizer).__name__} needs a closure in step() (it evaluates the loss "
            "several times per update), which a batch-size controller's loop cannot give; "
            "use a first-order optimizer such as SGD, Adam or AdamW"
        )
    for i, group in enumerate(optimizer.param_groups):
        number(group["lr"], type(optimizer).__name__, f"param_groups[{i}]['lr']", low=0.0)
    return optimizer


def make_tracker(
    config: TrainConfig,
    data: DataSource,
    device: torch.device,
    world: World,
    loss_fn: LossFn,
    samples: int | None = None,
) -> EigenTracker:
    """The top-eigenvalue tracker on a probe set drawn once from the training data.

    Under torchrun each rank holds a slice of every probe batch and the Hessian-vector
    products are all-reduced, so every rank gets the single-process eigenvalue.
    """
    if world.enabled and config.hessian_samples < world.size:
        raise UsageError(
            f"hessian_samples ({config.hessian_samples}) must be at least the number of "
            f"processes ({world.size})"
        )
    probe = probe_batches(
        data.train_x,
        data.train_y,
        samples or config.hessian_samples,
        config.micro_batch_size or config.batch_size,
        seed=probe_seed(config.seed),
    )
    probe = [
        tuple(inputs.each(part, lambda t: shard(t, world).to(device)) for part in loaded(x, y))
        for x, y in probe
    ]
    probe = [(x, y) for x, y in probe if len(y)]
    if config.hessian_mode == "reference":
        return EigenTracker(loss_fn, probe, method="reference", seed=config.seed)
    return EigenTracker(
        loss_fn,
        probe,
        tol=config.hessian_tol,
        max_matvecs=config.hessian_max_matvecs,
        method="lanczos",
        seed=config.seed,
    )


def make_meters(
    controller: BatchController,
    given: Mapping[str, Meter] | None,
    config: TrainConfig,
    data: DataSource,
    loss_fn: LossFn,
    device: torch.device,
    world: World,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Meter]:
    """One meter per measurement the controller may ask for (``given`` ones first); the
    noise meter also measures on ``optimizer``'s preconditioned gradients (Adam)."""
    given = dict(given or {})
    meters: dict[str, Meter] = {}
    for name in sorted(controller.measures):
        if name in given:
            meters[name] = given.pop(name)
        elif name == EIGENVALUE:
            # the guard's ceiling needs a stable estimate: a larger probe (>= 1024 samples)
            samples = config.guard_samples if config.curvature_guard else config.hessian_samples
            tracker = make_tracker(config, data, device, world, loss_fn, samples)
            meters[name] = CurvatureMeter(
                tracker,
                config.hessian_every,
                strict=config.hessian_mode != "reference",
                every_samples=config.hessian_every_samples,
            )
        elif name == NOISE_SCALE:
            meters[name] = GradientNoiseMeter(
                config.gns_micro_batch, config.gns_decay, world, optimizer=optimizer
            )
        else:
            raise UsageError(
                f"controller {controller.name!r} wants measurement {name!r}, which no meter "
                "provides; pass meters={name: meter}"
            )
    return {**meters, **given}
