import pytest
import torch

from largebatch.controllers import FixedBatch, step_decay
from largebatch.errors import InvalidValueError
from largebatch.sampler import EpochSampler, GrowingBatchSampler


def test_epoch_order_is_a_seeded_permutation_independent_of_batch_size():
    sampler = EpochSampler(103, seed=5)
    order = sampler.order(2)
    assert sorted(order.tolist()) == list(range(103))
    assert torch.equal(order, EpochSampler(103, seed=5).order(2))
    assert not torch.equal(order, sampler.order(3))
    for batch_size in (1, 10, 64, 200):
        assert torch.equal(torch.cat(list(sampler.batches(2, batch_size))), order)


def test_batches_keep_the_short_last_batch_and_resume_from_a_sample_position():
    sampler = EpochSampler(10, seed=0)
    sizes = [len(b) for b in sampler.batches(0, 4)]
    assert sizes == [4, 4, 2] and sampler.num_batches(4) == 3
    tail = torch.cat(list(sampler.batches(0, 3, start=4)))
    assert torch.equal(tail, sampler.order(0)[4:])
    assert sampler.num_batches(3, start=4) == 2


def test_step_decay_counts_milestones_reached():
    assert [step_decay(e, [2, 4], 0.1) for e in range(6)] == [1, 1, 0.1, 0.1, 0.1**2, 0.1**2]


def test_fixed_batch_decays_at_milestones_and_resumes_from_its_state():
    controller = FixedBatch(128, milestones=[1, 2], decay=0.5)
    decisions = [controller.decision()]
    for _ in range(3):
        decisions.append(controller.step({"eigenvalue": None}))
    assert [d.batch_size for d in decisions] == [128] * 4
    assert [d.lr_factor for d in decisions] == [1.0, 0.5, 0.25, 0.25]
    clone = FixedBatch(128, milestones=[1, 2], decay=0.5)
    clone.load_state_dict(controller.state_dict())
    assert clone.decision() == controller.decision()


def test_a_growing_sampler_never_yields_empty_batches():
    """A batch of 0 or a damaged state used to give empty batches forever; now each is
    refused where it enters, and the sampler goes on as it was."""
    sampler = GrowingBatchSampler(10, batch_size=4, seed=0)
    with pytest.raises(InvalidValueError, match="GrowingBatchSampler: batch_size"):
        sampler.batch_size = 0
    for bad in ({"position": -50}, {"batch_size": 0}, {"position": 11}):
        with pytest.raises(InvalidValueError, match="GrowingBatchSampler.load_state_dict"):
            sampler.load_state_dict({**sampler.state_dict(), **bad})
    assert [len(b) for b in sampler] == [4, 4, 2] and sampler.epoch == 1


def test_a_growing_sampler_state_is_tagged_and_old_states_load():
    sampler = GrowingBatchSampler(10, batch_size=4, seed=0)
    next(iter(sampler))
    state = sampler.state_dict()
    assert state == {
        "class": "GrowingBatchSampler",
        "version": 1,
        "epoch": 0,
        "position": 4,
        "batch_size": 4,
    }
    old = GrowingBatchSampler(10, batch_size=1, seed=0)
    old.load_state_dict({"epoch": 0, "position": 4, "batch_size": 4})
    assert old.state_dict() == state
    assert [b for b in old] == [b for b in GrowingBatchSampler(10, 4, seed=0)][1:]


def test_the_run_seeds_keep_their_numbers():
    from largebatch.sampler import (
        PROBE_SEED_OFFSET,
        augment_rng_seed,
        augment_seed,
        order_seed,
        probe_seed,
    )

    for seed in (0, 1, 7, 12345):
        assert probe_seed(seed) == seed + 104_729 == seed + PROBE_SEED_OFFSET
        for epoch in (0, 1, 59):
            assert order_seed(seed, epoch) == seed * 1_000_003 + epoch
            assert augment_seed(seed, epoch) == seed * 1_000_003 + epoch
            assert augment_rng_seed(seed, epoch) == seed * 7919 + epoch
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            expected = torch.randperm(50, generator=generator)
            assert torch.equal(EpochSampler(50, seed).order(epoch), expected)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_the_lazy_shuffle_is_a_permutation(n):
    from largebatch.sampler import Shuffle

    for seed in (0, 1, 12345):
        order = Shuffle(n, seed)(torch.arange(n))
        assert torch.equal(order.sort().values, torch.arange(n))


def test_a_large_epoch_order_is_computed_batch_by_batch_and_resumes(monkeypatch):
    import largebatch.sampler as sampler

    monkeypatch.setattr(sampler, "LAZY_ORDER_ABOVE", 100)  # 1000 samples count as large
    order = EpochSampler(1000, seed=5)
    first = torch.cat(list(order.batches(0, 64)))
    assert torch.equal(first.sort().values, torch.arange(1000))  # each sample once
    assert torch.equal(first, order.order(0))
    resumed = torch.cat(list(order.batches(0, 100, start=320)))  # another batch size
    assert torch.equal(resumed, first[320:])
    second = order.order(1)
    assert not torch.equal(first, second)
    # shuffled: the positions of the first half spread over the whole range
    assert 350 < float(first[:500].float().mean()) < 650
    assert abs(float(torch.corrcoef(torch.stack([first.float(), second.float()]))[0, 1])) < 0.1
    probe = sampler.probe_batches(torch.arange(1000), torch.arange(1000), 40, 16, seed=3)
    rows = torch.cat([x for x, _ in probe])
    assert len(rows) == 40 and len(set(rows.tolist())) == 40
