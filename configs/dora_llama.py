"""DoRA: LoRA plus a learned magnitude per output column, on every decoder linear.

    jft train --config configs/dora_llama.py --workdir runs/dora \
        --config.model.path=/path/to/Llama-3.2-1B --config.data.train=/path/to/train.jsonl

Writes the adapter in Hugging Face PEFT format (use_dora) and the merged model.
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
    c.peft.lora.dora = True  # weight-decomposed LoRA
    c.peft.lora.r = 16  # rank
    c.peft.lora.alpha = 32.0  # scale alpha / r
    c.optim.learning_rate = 2e-4
    return c
