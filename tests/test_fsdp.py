"""``parallel: fsdp``: FSDP2's ``fully_shard`` under real gloo processes gives one
process's run for every method (those that need the model whole on a copy per rank),
checkpoints (sharded through DCP, or whole) resume at another world size, and what it
does not run is refused before the run."""

import json
import os
import signal
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

import largebatch
from helpers import assert_runs_close, free_port, threads_like_a_rank
from largebatch.build import check_shardable, needs_whole_model
from largebatch.checkpoint import SHARDS, load_checkpoint
from largebatch.config import TrainConfig
from largebatch.controllers import BatchController
from largebatch.distributed import teardown
from largebatch.errors import ConfigError, UsageError
from largebatch.io import read_jsonl
from largebatch.meters import Meter
from largebatch.parallel import _shard_targets, equal_cuts, resharded

pytestmark = pytest.mark.slow


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _data(n=56):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


# a batch of 7 grows to 14: slices of 4 and 3 are cut into 2 micro-batches each (the
# longest slice's count), 7 and 7 into 3; one process cuts 7 into 3 and 14 into 5
FIT = dict(
    method="schedule", batch_schedule="0:7 56:14", batch_size=7, max_batch_size=14,
    micro_batch_size=3, epochs=3, safeguard=False, device="cpu", verbose=False,
)  # fmt: skip


# gns from a batch of 4 (slices of 2: one part each) on 56 samples: it grows to 8 in
# epoch 3 (every update measured: each asks for no sync but in its last micro-batch,
# fsdp_sync_each_micro_batch or not); bl keeps 7
GNS = dict(
    FIT, method="gns", batch_schedule=None, batch_size=4, max_batch_size=32, gns_every=0.25,
    micro_batch_size=2,
)  # fmt: skip
BL = dict(FIT, method="bl", batch_schedule=None)


def _by_block(model):
    return [model.body, model.head]


def _worker(
    rank, world_size, port, out, stop_after, resume, users=False, policy=False, kill=0, each=False,
    fit=FIT, die_save=0,
):  # fmt: skip
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    model = Net()
    if kill and rank == 0:  # SIGKILL at that training forward pass of rank 0
        calls = [0]

        def die(module, inputs, output):
            calls[0] += module.training
            if calls[0] == kill:
                os.kill(os.getpid(), signal.SIGKILL)

        model.register_forward_hook(die)
    dtypes = set()  # of the first layer's weight as its forward pass sees it
    model.body[0].register_forward_pre_hook(lambda m, _: dtypes.add(m.weight.dtype))
    if die_save and rank == 0:  # SIGKILL as rank 0 is about to write that checkpoint file
        import largebatch.checkpoint as checkpoint

        write, saves = checkpoint.save_checkpoint, [0]

        def dying(path, state):
            saves[0] += 1
            if saves[0] == die_save:
                os.kill(os.getpid(), signal.SIGKILL)
            write(path, state)

        checkpoint.save_checkpoint = dying
    settings = dict(optimizer=_adamw, parallel="fsdp")
    if policy:
        settings["shard_policy"] = _by_block
    if each:  # a reduce-scatter after every micro-batch
        settings["fsdp_sync_each_micro_batch"] = True
    asked = []  # what each micro-batch asked of FSDP's gradient sync
    plain = FSDPModule.set_requires_gradient_sync

    def recorded(self, requires, *more, **named):
        asked.append(requires)
        return plain(self, requires, *more, **named)

    FSDPModule.set_requires_gradient_sync = recorded
    if users:  # sharded by the user, with an optimizer over the shards; parallel left out
        for block in (model.body[0], model.body[2], model.head, model):
            fully_shard(block)
        settings = dict(optimizer=_adamw(model.parameters()))
    try:
        largebatch.fit(
            model, _data(), eval_data=_data(9), out=out, stop_after=stop_after,
            resume=resume, **{**settings, **fit},
        )  # fmt: skip
        if fit.get("parallel", "fsdp") == "fsdp":
            assert type(model.head.weight).__name__ == "DTensor"  # it was sharded in place
            assert hasattr(model.body, "unshard") == policy  # an FSDPModule by the policy
            # accumulation without a reduce-scatter but in the last micro-batch, or every
            # time (but in gns's measured updates: all here, each read in one reduce-scatter)
            bf16 = fit.get("precision") == "bf16"  # FSDP's policy gathers in bf16
            assert dtypes == ({torch.bfloat16} if bf16 else {torch.float32})
            if fit["method"] in ("schedule", "gns"):  # these accumulate (the batch grows)
                assert (False in asked) == (not each or fit["method"] == "gns")
            assert True in asked
        if fit.get("parallel", "fsdp") == "fsdp" and not users and not policy:
            # a forward pass without a backward one leaves the root's own parameters (the
            # head's here) gathered, FSDP's choice: the update and the checkpoints take
            # the shards again first
            with torch.no_grad():
                model(_data(4)[0])
            assert type(model.head.weight).__name__ == "Parameter"
            assert type(resharded(model).head.weight).__name__ == "DTensor"
    finally:
        del model
        teardown()  # as the command line ends: collected first (the sharded state holds it)


def _one(out, fit=FIT, **more):
    """The reference: one process, one thread (as each rank), the same run."""
    with threads_like_a_rank():
        largebatch.fit(Net(), _data(), eval_data=_data(9), out=out,
                       **{"optimizer": _adamw, **more, **fit})  # fmt: skip


def _assert_moments_close(one, two, rtol=1e-4):
    """Adam's second moments of two checkpoints agree (a mean over the ranks instead of
    the sum shows here: Adam's step itself hardly depends on the gradient's scale)."""
    first, second = (load_checkpoint(path)["optimizer"]["state"] for path in (one, two))
    assert first.keys() == second.keys()
    for index, state in first.items():
        torch.testing.assert_close(second[index]["exp_avg_sq"], state["exp_avg_sq"],
                                   rtol=rtol, atol=1e-9)  # fmt: skip


def _two(
    out, stop_after=None, resume=False, users=False, policy=False, kill=0, each=False, fit=FIT,
    die_save=0,
):  # fmt: skip
    args = (2, free_port(), str(out), stop_after, resume, users, policy, kill, each, fit, die_save)
    mp.spawn(_worker, args=args, nprocs=2, join=True)


def test_two_sharded_ranks_equal_one_process_as_the_batch_grows(tmp_path):
    _two(tmp_path / "two")
    _one(tmp_path / "one")
    assert_runs_close(tmp_path / "one", tmp_path / "two")
    one, two = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("one", "two"))
    # written sharded (fsdp_checkpoint: sharded, the default): the file names the one
    # folder of shards; read whole in one process's layout: the names, the optimizer by index
    (folder,) = (tmp_path / "two" / SHARDS).iterdir()
    assert two["shards"] == f"{SHARDS}/{folder.name}" and "shards" not in one
    assert load_checkpoint(tmp_path / "two" / "checkpoint.pt", shards=False)["model"] is None
    assert one["model"].keys() == two["model"].keys()
    assert one["optimizer"]["state"].keys() == set(range(6))
    _assert_moments_close(tmp_path / "one" / "checkpoint.pt", tmp_path / "two" / "checkpoint.pt")


@pytest.mark.parametrize("method", ["gns", "bl"])
def test_two_sharded_ranks_equal_one_process_with_gns_and_bl(tmp_path, method):
    # gns: each rank's gradient read in the reduce-scatter (a slice of the batch, as
    # one process reads half of it); the full gradient's norm from the shards
    fit = GNS if method == "gns" else BL
    _two(tmp_path / "two", fit=fit, each=method == "gns")
    _one(tmp_path / "one", fit=fit)
    # Adam's preconditioned estimate is taken inside a slice, not from whole slices
    assert_runs_close(tmp_path / "one", tmp_path / "two", skip=("gns_preconditioned",))
    _assert_moments_close(tmp_path / "one" / "checkpoint.pt", tmp_path / "two" / "checkpoint.pt")
    records = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    if method == "gns":  # measured, and the batch grew on that
        assert records[-1]["gns"] > 0 and records[-1]["batch_size"] > 4
    else:
        assert {r["batch_size"] for r in records} == {7}


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_a_diverging_run_of_two_ranks_rolls_back_as_one_process_does(tmp_path, parallel):
    # SGD at an LR of 1e37 diverges in its first updates; the rollback restores the last
    # checkpoint (under fsdp every rank cuts its shards from the full state) at 1e-38 of
    # the LR. Here one rank's loss overflows while the gradients stay finite (saturated
    # tanh): the ranks still roll back at the same update, as one process does
    fit = dict(BL, optimizer=None, lr=1e37, momentum=0.0, on_divergence="rollback",
               divergence_lr_factor=1e-38, max_rollbacks=2)  # fmt: skip
    _two(tmp_path / "two", fit={**fit, "parallel": parallel})
    _one(tmp_path / "one", fit=fit)
    assert_runs_close(tmp_path / "one", tmp_path / "two")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["rollbacks"] == 1


@pytest.mark.parametrize("method", ["abs", "absa"])
def test_abs_and_absa_run_on_a_whole_copy_and_equal_one_process(tmp_path, method):
    # the eigenvalue's Hessian-vector products and absa's adversarial examples run on a
    # copy of the model kept whole on each rank, brought to the shards' weights first;
    # abs_duration 1: a growth at every epoch's end from the second, whatever the eigenvalue
    fit = dict(FIT, method=method, batch_schedule=None, batch_size=4, max_batch_size=16,
               hessian_samples=16, micro_batch_size=2, abs_duration=1)  # fmt: skip
    _two(tmp_path / "two", fit=fit)
    _one(tmp_path / "one", fit=fit)
    assert_runs_close(tmp_path / "one", tmp_path / "two")
    records = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert all(r["eigenvalue"] > 0 for r in records)
    assert [r["batch_size"] for r in records] == [4, 4, 8]  # (grown at the end: next epoch)
    if method == "absa":
        assert records[0]["adv_ratio"] > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_bf16_shards_with_fsdps_mixed_precision_policy_and_fp16_autocasts(tmp_path, precision):
    # (fp16: autocast and the loss scaler over fp32 shards, as in one process)
    # parameters gathered and used in bf16 (the worker checks what the forward pass sees),
    # gradients reduced in fp32; one process runs bf16 autocast over fp32 weights: the
    # same roundings up to summation order: losses within 1e-3 (1e-4 apart in practice),
    # weights within 2e-3 (bf16's resolution flips some of Adam's smallest steps; they
    # move up to 0.13 over the run), Adam's second moments within 5% (2.4% apart; a mean
    # over the ranks instead of the sum: 4x); accuracies not compared (a near tie among 9)
    fit = dict(FIT, precision=precision)
    _two(tmp_path / "two", fit=fit)
    _one(tmp_path / "one", fit=fit)
    skip = ("test_acc", "train_acc")
    assert_runs_close(tmp_path / "one", tmp_path / "two", skip, rel=1e-3, atol=2e-3)
    _assert_moments_close(
        tmp_path / "one" / "checkpoint.pt", tmp_path / "two" / "checkpoint.pt", rtol=5e-2
    )


def test_the_stability_safeguard_gauges_on_the_whole_copy_with_adams_state_whole(tmp_path):
    # the growth 7 -> 14 raises the LR factor: the gauge reads the sharpness along Adam's
    # step on the whole copy, preconditioned by Adam's second moment gathered whole
    fit = dict(FIT, safeguard=True, lr_scaling="linear")
    _two(tmp_path / "two", fit=fit)
    _one(tmp_path / "one", fit=fit)
    assert_runs_close(tmp_path / "one", tmp_path / "two")
    one, two = (
        [c for r in read_jsonl(tmp_path / name / "metrics.jsonl") for c in r["batch_changes"]]
        for name in ("one", "two")
    )
    assert two and all(c.get("proposed_lr_factor") is not None for c in two), two
    # the reading itself (assert_runs_close leaves it out: near zero it is rounding), here
    # 13.7: without Adam's preconditioner gathered whole it reads otherwise
    for a, b in zip(one, two, strict=True):
        assert b["gauge_sharpness"] == pytest.approx(a["gauge_sharpness"], rel=1e-4)


def test_a_reduce_scatter_after_every_micro_batch_gives_the_same_run(tmp_path):
    # with full checkpoints too: rank 0 gathers the state into the file, no shards
    _two(tmp_path / "two", each=True, fit=dict(FIT, fsdp_checkpoint="full"))
    assert "shards" not in load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    assert not (tmp_path / "two" / SHARDS).exists()
    _one(tmp_path / "one")
    assert_runs_close(tmp_path / "one", tmp_path / "two")
    _assert_moments_close(tmp_path / "one" / "checkpoint.pt", tmp_path / "two" / "checkpoint.pt")


def test_a_sharded_run_resumes_in_one_process_and_one_process_run_on_two(tmp_path):
    _one(tmp_path / "one")
    _two(tmp_path / "two-then-one", stop_after=1)  # 2 -> 1
    _one(tmp_path / "two-then-one", resume=True)
    assert_runs_close(tmp_path / "one", tmp_path / "two-then-one")
    _one(tmp_path / "one-then-two", stop_after=2)  # 1 -> 2
    _two(tmp_path / "one-then-two", resume=True)
    assert_runs_close(tmp_path / "one", tmp_path / "one-then-two")


def test_a_model_the_user_sharded_is_used_as_it_is(tmp_path):
    # its own fully_shard (a reduce-scatter that averages, scaled back to the sum) and an
    # optimizer made over its shards: no second synchronisation, one process's run; gns
    # reads each rank's gradient in the user's reduce-scatter, which divides after it
    _two(tmp_path / "two", users=True, fit=GNS)
    _one(tmp_path / "one", fit=GNS)
    assert_runs_close(tmp_path / "one", tmp_path / "two", skip=("gns_preconditioned",))
    _assert_moments_close(tmp_path / "one" / "checkpoint.pt", tmp_path / "two" / "checkpoint.pt")


def test_a_shard_policy_picks_the_blocks_and_bad_ones_are_refused(tmp_path):
    from largebatch.errors import InvalidTypeError
    from largebatch.parallel import _policy

    _two(tmp_path / "two", policy=True)
    _one(tmp_path / "one")
    assert_runs_close(tmp_path / "one", tmp_path / "two")
    net = Net()
    assert _policy(net, _by_block) == [net.body, net.head]
    for bad, message in (
        (lambda m: [m], "not a submodule"),
        (lambda m: [nn.Linear(1, 1)], "not a submodule"),
        (lambda m: [m.head, m.head], "twice"),
        (lambda m: 3, "list of submodules"),
    ):
        with pytest.raises(UsageError, match=message):
            _policy(net, bad)
    with pytest.raises(InvalidTypeError, match="shard_policy"):
        largebatch.fit(Net(), _data(), shard_policy="body", **FIT)
    with pytest.raises(ConfigError, match="shard_policy is for parallel='fsdp'"):
        largebatch.fit(Net(), _data(), shard_policy=_by_block, **FIT)


def test_a_sharded_run_killed_mid_epoch_resumes_in_one_process_as_if_uninterrupted(tmp_path):
    # epoch 1: 8 updates of 2 micro-batches per rank; the kill comes in epoch 2's third
    # update (batch 14, 3 micro-batches per rank), after epoch 1's checkpoint
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        _two(tmp_path / "killed", kill=22)
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["run"]["epoch"] == 1
    _one(tmp_path / "killed", resume=True)
    _one(tmp_path / "one")
    assert_runs_close(tmp_path / "one", tmp_path / "killed")


def test_a_crash_between_the_shards_and_the_file_leaves_the_last_checkpoint(tmp_path):
    # saves: the start, then each epoch's end; rank 0 dies as it is about to write the
    # third file (epoch 2's): that save's shards are on disk, the file names epoch 1's
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        _two(tmp_path / "two", die_save=3)
    path = tmp_path / "two" / "checkpoint.pt"
    saved = load_checkpoint(path)
    assert saved["run"]["epoch"] == 1 and len(list((tmp_path / "two" / SHARDS).iterdir())) == 2
    _two(tmp_path / "two", resume=True)  # resumes from epoch 1; the next save prunes
    (folder,) = (tmp_path / "two" / SHARDS).iterdir()
    assert load_checkpoint(path, shards=False)["shards"] == f"{SHARDS}/{folder.name}"
    _one(tmp_path / "one")
    assert_runs_close(tmp_path / "one", tmp_path / "two")


def test_a_sharded_checkpoint_names_only_its_own_folder(tmp_path):
    from largebatch.checkpoint import save_checkpoint
    from largebatch.errors import CheckpointError

    path = tmp_path / "checkpoint.pt"
    for name, message in (
        ("../elsewhere", "not a folder of"),
        (f"{SHARDS}/..", "not a folder of"),
        (f"{SHARDS}/a/b", "not a folder of"),
        (f"{SHARDS}/gone", "missing or incomplete"),
    ):
        save_checkpoint(path, {"model": None, "optimizer": None, "shards": name})
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
    (tmp_path / SHARDS / "half").mkdir(parents=True)  # no metadata: a save that died
    save_checkpoint(path, {"model": None, "optimizer": None, "shards": f"{SHARDS}/half"})
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        load_checkpoint(path)


def test_every_rank_gets_as_many_micro_batches():
    assert equal_cuts(4, 4, 3) == [slice(0, 2), slice(2, 4)]
    assert equal_cuts(3, 4, 3) == [slice(0, 1), slice(1, 3)]
    assert equal_cuts(7, 7, 3) == [slice(0, 2), slice(2, 4), slice(4, 7)]
    assert equal_cuts(1, 2, 1) == [slice(0, 0), slice(0, 1)]  # an empty one: refused
    for length in range(1, 40):  # never above the size, always the longest's count
        for size in range(1, 9):
            pieces = equal_cuts(length, length + 1, size)
            assert len(pieces) == -(-(length + 1) // size)
            assert all(p.stop - p.start <= size for p in pieces)
            assert sum(p.stop - p.start for p in pieces) == length


def test_the_blocks_that_are_sharded():
    net = Net()  # body holds 1,280 of 1,379 parameters: its two Linears are sharded
    assert _shard_targets(net, 0.1) == [net.body[0], net.body[2]]
    assert _shard_targets(net, 0.5) == [net.body[2]]


def test_what_fsdp_runs_on_a_whole_copy_and_what_it_refuses_before_the_run():
    for changes, message in (
        ({"method": "gns", "safeguard": False, "gns_micro_batch": 2}, "gns_micro_batch"),
    ):
        with pytest.raises(ConfigError, match=message):
            check_shardable(TrainConfig(**changes))
    with pytest.raises(UsageError, match="factory"):  # made before the sharding
        check_shardable(TrainConfig(method="bl"), _adamw(Net().parameters()))
    check_shardable(TrainConfig(method="bl"), _adamw)  # bl, fb: nothing to refuse
    check_shardable(TrainConfig(method="seesaw", safeguard=False))
    check_shardable(TrainConfig(method="gns", safeguard=False))  # it reads slices
    # on a whole copy: the eigenvalue, the curvature guard, adversarial examples ...
    whole = (
        TrainConfig(method="abs", safeguard=False),
        TrainConfig(method="absa", safeguard=False),
        TrainConfig(method="bl", curvature_guard=True),
        TrainConfig(method="bl", adversarial=True),
        TrainConfig(method="gns"),  # the safeguard's gauge, on by default for growing ones
        TrainConfig(method="schedule", batch_schedule="0:8"),
    )
    for config in whole:
        assert needs_whole_model(config)
        check_shardable(config)
        with pytest.raises(ConfigError, match="sharded yourself"):  # ... not of the user's
            check_shardable(config, users=True)
    assert not needs_whole_model(TrainConfig(method="gns", safeguard=False))
    assert not needs_whole_model(TrainConfig(method="bl"))  # no growth, no gauge

    class Sharpness(BatchController):  # a user's controller that asks for curvature
        measures = frozenset({"eigenvalue"})

    assert needs_whole_model(TrainConfig(method="gns", safeguard=False), Sharpness())
    check_shardable(TrainConfig(method="bl", safeguard=False), None, Sharpness())

    class Odd(BatchController):  # one that asks for a measurement fsdp has no meter for
        measures = frozenset({"sharpness"})

    with pytest.raises(ConfigError, match="measures sharpness"):
        check_shardable(TrainConfig(method="bl", safeguard=False), None, Odd())

    class PerMicroBatch(Meter):  # a user's meter that reads each micro-batch's gradient
        def after_backward(self, model, samples, batch_samples):
            pass

    with pytest.raises(ConfigError, match="after_backward"):
        check_shardable(TrainConfig(method="bl"), None, None, {"mine": PerMicroBatch()})
    check_shardable(TrainConfig(method="bl"), None, None, {"mine": Meter()})  # at_update: fine


def test_a_whole_copy_that_does_not_fit_is_refused(monkeypatch):
    import largebatch.parallel as parallel

    fsdp = parallel.FSDP()
    monkeypatch.setattr(parallel, "_available_memory", lambda: 1000)  # bytes
    with pytest.raises(UsageError, match="does not fit; use method gns"):
        fsdp.keep_whole(Net(), torch.device("cpu"))
    monkeypatch.setattr(parallel, "_available_memory", lambda: 1 << 30)
    net = Net()
    fsdp.keep_whole(net, torch.device("cpu"))
    assert fsdp.copy is not net and torch.equal(fsdp.copy.head.weight, net.head.weight)
