"""Your own PyTorch loop with a batch that grows, from largebatch's pieces.

Run: python examples/own_loop.py  (scikit-learn's digits, an MLP, a few seconds on a CPU)
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from largebatch.accumulate import accumulate
from largebatch.controllers import AdaptiveBatch
from largebatch.hessian import EigenTracker
from largebatch.lr import LRScaler
from largebatch.sampler import GrowingBatchSampler

torch.manual_seed(0)
digits = load_digits()
x, y = torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target)
model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)

# ABS: the batch doubles when the top Hessian eigenvalue halves, or after `duration` epochs
controller = AdaptiveBatch(base_batch=32, max_batch=512, milestones=[], decay=1.0, duration=2)
sampler = GrowingBatchSampler(len(y), batch_size=32, seed=0)  # sample-indexed, resumable
lr = LRScaler(optimizer)  # multiplies each param group's own LR by the controller's factor
tracker = EigenTracker(F.cross_entropy, (x[:512], y[:512]), tol=1e-2, max_matvecs=20)

for epoch in range(8):
    decision = controller.decision()
    sampler.batch_size = decision.batch_size
    lr.apply(decision.lr_factor)
    for indices in sampler:
        optimizer.zero_grad()
        # micro-batches of at most 64 samples, each weighted by its share of the batch
        accumulate(model, F.cross_entropy, x[indices], y[indices], micro_batch_size=64)
        optimizer.step()
    eigenvalue = tracker.estimate(model).eigenvalue
    controller.step({"eigenvalue": eigenvalue})
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"epoch {epoch + 1}  batch {decision.batch_size:4d}  lr {lr.factor * 0.02:.3g}  "
          f"top eigenvalue {eigenvalue:6.2f}  train accuracy {accuracy:.3f}")  # fmt: skip

# Everything resumes exactly from one checkpoint of your own:
checkpoint = {name: part.state_dict() for name, part in [("model", model), ("optimizer", optimizer),
              ("controller", controller), ("sampler", sampler), ("tracker", tracker)]}  # fmt: skip
