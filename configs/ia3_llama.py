"""IA3: learned scales on keys, values and the MLP down projection's input.

    jft train --config configs/ia3_llama.py --workdir runs/ia3 \
        --config.model.path=/path/to/Llama-3.2-1B --config.data.train=/path/to/train.jsonl

About 0.01% of the parameters train. Writes the adapter in PEFT format and the merged model.
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
    c.peft.methods = ("ia3",)
    c.optim.learning_rate = 3e-3
    return c
