"""Quickstart: fine-tune a tiny new Llama on a shipped English -> French phrase task.

    jft train --config configs/quickstart.py --workdir runs/quickstart

Needs no network and no model download: it trains its own small BPE tokenizer on the data,
builds a ~3M-parameter Llama-family model and fine-tunes it on 2 CPU cores in a few
minutes, printing validation loss and BLEU / exact match before and after.
"""

from pathlib import Path

import jft
from jft.config import default_config


def get_config():
    c = default_config()
    c.model.path = ""  # no checkpoint: a new model from model.new
    c.model.remat = "none"  # small activations: recomputing them would only cost time
    c.model.new.hidden_size = 256  # ~3M parameters with the ~1k-token vocabulary
    c.model.new.intermediate_size = 704
    c.model.new.num_hidden_layers = 4
    c.model.new.num_attention_heads = 4
    c.model.new.num_key_value_heads = 2
    c.tokenizer.train_on_data = True  # a BPE tokenizer built from the training records
    c.data.train = str(Path(jft.__file__).parent / "assets" / "en_fr.jsonl")  # shipped with jft
    c.data.validation_fraction = 0.1  # held-out phrases for loss, BLEU and exact match
    c.data.template = "compact"  # "{instruction}\nInput: {input}\nOutput: ": few tokens per phrase
    c.data.seq_len = 128  # about five phrases packed per row
    c.data.prompt_loss_weight = 0.1  # mostly learn the answers, a little the prompts
    c.train.batch_size = 16
    c.train.epochs = 20
    c.train.eval_every = 100
    c.train.log_every = 10
    c.train.checkpoint_every = 200
    c.optim.learning_rate = 3e-3  # a new model learns from scratch: a high peak rate
    c.optim.weight_decay = 0.01
    c.eval.num_examples = 64  # held-out phrases translated greedily before and after
    c.eval.max_new_tokens = 32
    c.eval.metrics = ("bleu", "chrf", "exact_match")
    return c
