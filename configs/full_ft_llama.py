"""Full fine-tuning of a Hugging Face Llama-family model folder on instruction data.

    jft train --config configs/full_ft_llama.py --workdir runs/full \
        --config.model.path=/path/to/Llama-3.2-1B --config.data.train=/path/to/train.jsonl

Every parameter trains (train.rules default). bfloat16 compute with float32 parameters and
optimizer state; activations are recomputed per layer to fit long sequences.
"""

from jft.config import default_config


def get_config():
    c = default_config()
    c.model.path = ""  # required: a Hugging Face model folder (config.json, safetensors, tokenizer)
    c.model.dtype = "float32"  # master weights and Adam moments in float32
    c.model.compute_dtype = "bfloat16"  # matmuls and activations in bfloat16
    c.model.remat = "nothing_saveable"  # recompute each layer in the backward pass
    c.data.train = ""  # required: instruction/chat/prompt-completion/text records
    c.data.seq_len = 1024
    c.data.prompt_loss_weight = 0.1
    c.train.batch_size = 16
    c.train.grad_accum = 4  # 4 micro-batches of 4 rows
    c.train.epochs = 2
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.train.patience = 3  # stop when validation loss has not improved in 3 evaluations
    c.optim.learning_rate = 1e-5
    c.optim.weight_decay = 0.01
    return c
