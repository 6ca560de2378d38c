"""A reward model (Bradley-Terry) with LoRA (r=16) on every linear layer and a trained score head.

    jft train --config configs/reward_llama.py --workdir runs/reward \
        --config.model.path=/path/to/sft-model --config.data.train=/path/to/pairs.jsonl

Records: {"prompt", "chosen", "rejected"} strings (optionally "margin"), or chosen / rejected as
chat message lists (an optional shared "prompt" list). The score head reads each sequence's last
token; on a causal-LM folder it is new. Reports validation loss, accuracy (chosen scored higher)
and margin; writes the adapter to runs/reward/adapter and a transformers
*ForSequenceClassification folder (num_labels=1) to runs/reward/hf.

Offline demo on the quickstart model (after `jft train --config configs/quickstart.py
--workdir runs/quickstart`):

    jft train --config configs/reward_llama.py --workdir runs/reward \
        --config.model.path=runs/quickstart/hf --config.data.train=jft/assets/en_fr_preferences.jsonl \
        --config.data.seq_len=64
"""

from jft.config import default_config


def get_config():
    c = default_config()
    c.task = "reward"
    c.model.path = ""  # required: a Hugging Face model folder (causal LM or sequence classifier)
    c.data.train = ""  # required: preference records
    c.data.seq_len = 1024  # tokens per side (prompt + response); longer pairs are dropped (data.overlong)
    c.data.overlong = "drop"
    c.train.batch_size = 16  # pairs per step
    c.train.epochs = 1
    c.train.eval_every = 100
    c.peft.methods = ("lora",)
    c.peft.lora.r = 16  # rank
    c.peft.lora.alpha = 32.0  # scale alpha / r = 2
    c.optim.learning_rate = 1e-4
    c.eval.num_examples = 0  # no generation metrics: a reward model does not generate
    return c
