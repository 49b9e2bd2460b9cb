"""Your own loop whose batch follows the measured gradient noise scale (``gns``).

Run: python examples/own_loop_gns.py  (scikit-learn's digits, an MLP, seconds on a CPU)
``GlobalBatch`` is the update ``largebatch.fit`` runs: micro-batches weighted by their
share, the meter's hooks, the all-reduce under torchrun, the finite check and the step.
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from largebatch.accumulate import GlobalBatch, micro_batches
from largebatch.controllers import NoiseScaleBatch
from largebatch.distributed import World
from largebatch.lr import LRScaler
from largebatch.meters import GradientNoiseMeter, Point
from largebatch.sampler import GrowingBatchSampler

torch.manual_seed(0)
digits = load_digits()
x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
world = World()  # one process; under torchrun: largebatch.distributed.setup("cpu")[0]

# gns: the batch doubles while the noise scale says the growth costs little training
# progress over the run's 6 epochs (tolerance 0.2), decided every quarter epoch
controller = NoiseScaleBatch(
    32, 512, milestones=[], decay=1.0, num_samples=len(y), total_samples=6 * len(y)
)
meter = GradientNoiseMeter(world=world)  # measures in the micro-batches the update runs
sampler = GrowingBatchSampler(len(y), batch_size=32, seed=0)
lr = LRScaler(optimizer)
update = GlobalBatch(model, optimizer, F.cross_entropy, world, torch.device("cpu"))
samples = updates = 0

for epoch in range(6):
    for indices in sampler:
        decision = controller.decision()
        lr.apply(decision.lr_factor)
        # the meter says which updates it measures, and in how small micro-batches
        micro, stride = meter.plan(decision.batch_size, 64, controller.decide_every)
        measured = updates % stride == 0
        pieces = list(micro_batches(x[indices], y[indices], micro if measured else 64))
        samples, updates = samples + len(indices), updates + 1
        point = Point(epoch, samples, epoch_end=False)
        update.step(pieces, len(indices), meters=[meter] if measured else [], point=point)
        if samples % controller.decide_every < len(indices):  # a decision point passed
            told = meter.told(meter.at_decision(model, point))
            controller.step({**told, "samples": samples, "epoch_end": False})
            sampler.batch_size = controller.decision().batch_size
    controller.step({"samples": samples})  # the epoch's end
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"epoch {epoch + 1}  batch {sampler.batch_size:4d}  noise scale "
          f"{controller.noise_scale or 0:7.1f}  updates {updates:4d}  accuracy {accuracy:.3f}")  # fmt: skip
