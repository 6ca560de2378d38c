"""Houlsby bottleneck adapters after the attention and MLP blocks of every layer.

    jft train --config configs/adapter_llama.py --workdir runs/adapter \
        --config.model.path=/path/to/Llama-3.2-1B --config.data.train=/path/to/train.jsonl

Adapters have no PEFT format: runs/adapter/adapter holds jft's (jft_adapter.json +
adapter.safetensors); load it with jft.peft.load_adapter. For Pfeiffer adapters set
--config.peft.adapter.kind=pfeiffer.
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
    c.peft.methods = ("adapter",)
    c.peft.adapter.kind = "houlsby"  # after attention and after the MLP
    c.peft.adapter.reduction_factor = 16  # bottleneck width hidden / 16
    c.optim.learning_rate = 1e-3
    return c
