"""LoRA (r=16) on every linear layer of the decoder (not lm_head).

    jft train --config configs/lora_llama.py --workdir runs/lora \
        --config.model.path=/path/to/Llama-3.2-1B --config.data.train=/path/to/train.jsonl

Writes the adapter in Hugging Face PEFT format to runs/lora/adapter and the merged model
to runs/lora/hf. rsLoRA: --config.peft.lora.rslora=True; DoRA: configs/dora_llama.py.
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
    c.peft.methods = ("lora",)
    c.peft.lora.r = 16  # rank
    c.peft.lora.alpha = 32.0  # scale alpha / r = 2
    c.peft.lora.dropout = 0.05  # on the LoRA input while training
    c.optim.learning_rate = 2e-4
    return c
