"""BitFit: train only bias terms (zero biases are added to every projection).

    jft train --config configs/bitfit_llama.py --workdir runs/bitfit \
        --config.model.path=/path/to/Llama-3.2-1B --config.data.train=/path/to/train.jsonl

The merged model is a Llama with attention_bias and mlp_bias set, which transformers loads.
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
    c.peft.methods = ("bitfit",)
    c.peft.bitfit.biases = ("attention", "mlp")  # projection groups given biases
    c.optim.learning_rate = 1e-3
    return c
