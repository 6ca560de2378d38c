"""Decoder families. Each file holds one family: its config dataclass and modules."""

from jft.models.layers import KVCache
from jft.models.llama import LlamaConfig, LlamaForCausalLM

__all__ = ["KVCache", "LlamaConfig", "LlamaForCausalLM"]
