"""Partial fine-tuning: train only the last two decoder layers, the final norm and lm_head.

    jft train --config configs/partial_ft_llama.py --workdir runs/partial \
        --config.model.path=/path/to/Llama-3.2-1B --config.data.train=/path/to/train.jsonl

Frozen parameters get no gradients and no optimizer state. The rules below assume a
16-layer model (Llama 3.2 1B); for another depth change the layer numbers.
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
    c.train.rules = (
        ("model/layers/(14|15)/.*", "trainable"),  # the last two of 16 decoder layers
        ("model/norm/.*", "trainable"),
        ("lm_head/.*", "trainable"),
        (".*", "frozen"),  # embeddings and every other layer
    )
    c.optim.learning_rate = 5e-5
    return c
