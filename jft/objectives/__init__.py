"""Training objectives: each is a loss ``loss_fn(trainable, frozen, batch, rng) -> (loss_sum,
weight_sum, metrics)`` that :func:`jft.train.make_train_step` turns into a train step.

Every loss returns *sums* (of the loss, of the weight it is averaged over, and of each metric), so
gradient accumulation is exact for every objective: the step adds the micro-batches' sums and
divides by the batch's total weight once. ``rng`` is None for an evaluation pass (no dropout, no
training-only terms), so the same function scores validation data
(:func:`jft.train.make_eval_step`).
"""

from jft.objectives.base import Objective, eval_sums
from jft.objectives.distill import Distill, distill_loss
from jft.objectives.dpo import DPO, dpo_loss, response_log_probs
from jft.objectives.grpo import GRPO, grpo_loss
from jft.objectives.ppo import PPO, make_ppo_step, ppo_loss
from jft.objectives.reward import Reward, bradley_terry_loss, pair_scores
from jft.objectives.sft import SFT, token_loss

TASKS: dict[str, type[Objective]] = {
    "sft": SFT,
    "reward": Reward,
    "dpo": DPO,
    "grpo": GRPO,
    "ppo": PPO,
    "distill": Distill,
}  # config.task -> objective

__all__ = [
    "DPO",
    "Distill",
    "GRPO",
    "SFT",
    "TASKS",
    "Objective",
    "PPO",
    "Reward",
    "bradley_terry_loss",
    "distill_loss",
    "dpo_loss",
    "eval_sums",
    "grpo_loss",
    "make_ppo_step",
    "pair_scores",
    "ppo_loss",
    "response_log_probs",
    "token_loss",
]
