"""jft: fine-tuning decoder language models in JAX/Flax.

import jft
model, params = jft.load_hf("path/to/model", dtype="float32")
logits = model.apply({"params": params}, input_ids)          # [batch, length, vocab]
tokens = jft.generate(model, params, prompt_ids, max_new_tokens=32)
jft.save_hf(model, params, "out/")
model, params = jft.peft.inject(model, params, jft.peft.Peft(lora=jft.peft.Lora(r=8)), rng)
"""

import logging

from jft import peft
from jft.generate import generate
from jft.hf import CheckpointError, load_hf, load_tokenizer, save_hf
from jft.models.llama import LlamaConfig, LlamaForCausalLM

__version__ = "0.1.0"


class _TorchNotice(logging.Filter):
    """Drops transformers' import-time notice that PyTorch is missing: jft needs only its tokenizers and configs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found")


# jft imports transformers lazily, so this filter is in place before transformers' first import.
logging.getLogger("transformers").addFilter(_TorchNotice())

__all__ = [
    "CheckpointError",
    "LlamaConfig",
    "LlamaForCausalLM",
    "generate",
    "load_hf",
    "load_tokenizer",
    "peft",
    "save_hf",
]
