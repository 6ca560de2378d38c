"""Prompt tuning: 20 learned virtual-token embeddings before every sequence.

    jft train --config configs/prompt_llama.py --workdir runs/prompt \
        --config.model.path=/path/to/Llama-3.2-1B --config.data.train=/path/to/train.jsonl

Initialised from the embeddings of a text describing the task; saved in PEFT format.
"""

from jft.config import default_config


def get_config():
    c = default_config()
    c.model.path = ""  # required: a Hugging Face model folder
    c.model.compute_dtype = "bfloat16"
    c.data.train = ""  # required: training records
    c.data.seq_len = 1024
    c.train.batch_size = 16
    c.train.epochs = 2
    c.peft.methods = ("prompt",)
    c.peft.prompt.num_virtual_tokens = 20  # virtual tokens
    c.peft.prompt.init = "text"  # from the tokens of init_text
    c.peft.prompt.init_text = "Follow the instruction and answer concisely."  # task description
    c.optim.learning_rate = 3e-2
    return c
