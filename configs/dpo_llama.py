"""Direct preference optimization (DPO, beta 0.1) with LoRA (r=16) on every linear layer.

    jft train --config configs/dpo_llama.py --workdir runs/dpo \
        --config.model.path=/path/to/sft-model --config.data.train=/path/to/pairs.jsonl

Records as for reward models ({"prompt", "chosen", "rejected"} or chat message lists). The
reference policy is the base with the adapters off: no second copy of the model. Reports trl's
metrics (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected) on training and validation pairs. Variants by one field:

    --config.dpo.loss=ipo | hinge | robust | sigmoid_norm
    --config.dpo.loss=simpo --config.dpo.beta=2.0 --config.dpo.gamma=0.5   (reference-free)
    --config.dpo.loss=orpo --config.dpo.orpo_lambda=0.1                     (reference-free; trains
        from a base model, the chosen NLL is part of the loss)

Offline demo on the quickstart model (after `jft train --config configs/quickstart.py
--workdir runs/quickstart`):

    jft train --config configs/dpo_llama.py --workdir runs/dpo \
        --config.model.path=runs/quickstart/hf --config.data.train=jft/assets/en_fr_preferences.jsonl \
        --config.data.seq_len=64
"""

from jft.config import default_config


def get_config():
    c = default_config()
    c.task = "dpo"
    c.model.path = ""  # required: a Hugging Face model folder (usually the SFT model)
    c.data.train = ""  # required: preference records
    c.data.seq_len = 1024  # tokens per side (prompt + response); longer pairs are dropped (data.overlong)
    c.data.overlong = "drop"
    c.train.batch_size = 16  # pairs per step
    c.train.epochs = 1
    c.train.eval_every = 100
    c.peft.methods = ("lora",)
    c.peft.lora.r = 16  # rank
    c.peft.lora.alpha = 32.0  # scale alpha / r = 2
    c.optim.learning_rate = 5e-5
    c.dpo.loss = "sigmoid"
    c.dpo.beta = 0.1
    c.eval.num_examples = 0  # generation metrics off (set > 0 to generate on records with an output)
    return c
