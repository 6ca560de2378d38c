"""Training: optimizer, train state, the pure train / eval steps around an objective's loss, and the loop."""

from jft.train.optim import make_optimizer, make_schedule, optimizer_from_config
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
    "optimizer_from_config",
]
