"""Training: parameter partition, optimizer, train state and the pure train / eval steps."""

from jft.train import partition
from jft.train.optim import make_optimizer, make_schedule
from jft.train.state import TrainState
from jft.train.step import make_eval_step, make_train_step
from jft.train.trainer import TrainingError, evaluate, fit

__all__ = [
    "TrainState",
    "TrainingError",
    "evaluate",
    "fit",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "partition",
]
