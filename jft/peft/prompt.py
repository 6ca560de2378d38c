"""Prefix tuning and prompt tuning: learned virtual tokens (peft's prompt learning).

The decoder (:class:`jft.models.llama.Decoder`) puts prompt tuning's embeddings
``model/prompt [n, hidden]`` before the sequence and prefix tuning's keys and values
(:class:`jft.models.llama.PrefixTable`, ``model/prefix/...``) before every layer's attention.
peft stores either as one table, ``prompt_embeddings``: ``[n, hidden]`` for prompt tuning,
``[n, layers * 2 * kv_heads * head_dim]`` for prefix tuning (a projection MLP evaluated first).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jft.hf import CheckpointError
from jft.models.peft_spec import Method, Peft
from jft.peft.table import tensor, unsupported

_COMMON = {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"}


class _Virtual(Method):
    """What prefix and prompt tuning share: ``num_virtual_tokens`` and peft's one-table format."""

    seq_cls: ClassVar[bool] = False  # peft's prompt learning on a classifier is not held to jft's scores
    table: ClassVar[tuple[str, ...]]  # the param path of the table peft stores
    handled: ClassVar[set[str]]  # adapter_config.json fields read

    def check(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"{self.name}.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")

    def peft_tensors(self, model: Any, shapes: Any) -> dict:
        leaf = shapes
        for key in self.table:
            leaf = leaf[key]
        return {"prompt_embeddings": tensor(self.table, None, leaf.shape)}

    @classmethod
    def from_peft_config(cls, conf: dict, cfg: Any, file: str) -> Peft:
        unsupported(conf, _COMMON | cls.handled, file)
        n = conf.get("num_virtual_tokens")
        if not isinstance(n, int) or n < 1:
            raise CheckpointError(f"{file}: num_virtual_tokens must be a positive integer, got {n!r}")
        if conf.get("num_transformer_submodules", 1) not in (1, None):
            raise CheckpointError(
                f"{file}: num_transformer_submodules={conf['num_transformer_submodules']} (an encoder-decoder "
                "adapter); jft's decoders need 1"
            )
        for key, value in cls.expected(cfg).items():
            if conf.get(key) is not None and conf[key] != value:
                raise CheckpointError(
                    f"{file}: {key}={conf[key]} does not match the base model ({value}); "
                    "the adapter was made for another model"
                )
        # peft saves prefix tuning's computed table even with prefix_projection: the MLP is not kept.
        return Peft(**{cls.name: cls(num_virtual_tokens=n)})


@dataclasses.dataclass(frozen=True)
class Prefix(_Virtual):
    """Prefix tuning: ``num_virtual_tokens`` learned keys and values in every layer, which every
    token attends to. ``projection_dim > 0`` reparametrises them through an MLP
    (``[n, kv_dim] -> Linear -> tanh -> Linear -> [n, layers * 2 * kv_dim]``), as peft's
    ``prefix_projection`` does; :func:`jft.peft.fold` folds it into the plain table."""

    name: ClassVar[str] = "prefix"
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    table: ClassVar[tuple[str, ...]] = ("model", "prefix", "embedding")
    handled: ClassVar[set[str]] = {"encoder_hidden_size", "prefix_projection", "init_weights"}

    num_virtual_tokens: int = 20
    projection_dim: int = 0

    def rules(self) -> tuple[tuple[str, str], ...]:
        return (("model/prefix/.*", "trainable"),)

    def fold(self, model: Any, params: dict, out: dict) -> Prefix:
        """The projection MLP evaluated into the plain table ``[n, layers * 2 * kv_dim]``."""
        if not self.projection_dim:
            return self
        out["model"]["prefix"] = {"embedding": _table(model, params)}
        return dataclasses.replace(self, projection_dim=0)

    def peft_export(self, model: Any, params: dict) -> tuple[Any, dict]:
        """``(model, params)`` holding the table peft stores: the projection evaluated."""
        if not self.projection_dim:
            return model, params
        only = type(model)(model.config, Peft(prefix=self))
        folded = dict(params, model=dict(params["model"], prefix={"embedding": _table(only, params)}))
        return type(model)(model.config, Peft(prefix=dataclasses.replace(self, projection_dim=0))), folded

    def peft_config(self, model: Any, params: Any) -> dict:
        cfg = model.config
        kv_dim = cfg.num_key_value_heads * cfg.head_size
        return {
            "encoder_hidden_size": self.projection_dim or kv_dim,
            "num_attention_heads": cfg.num_key_value_heads,
            "num_layers": cfg.num_hidden_layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "prefix_projection": bool(self.projection_dim),
            "token_dim": kv_dim,
        }

    @staticmethod
    def expected(cfg: Any) -> dict:
        kv = cfg.num_key_value_heads
        return {"token_dim": kv * cfg.head_size, "num_attention_heads": kv, "num_layers": cfg.num_hidden_layers}


@dataclasses.dataclass(frozen=True)
class Prompt(_Virtual):
    """Prompt tuning: ``num_virtual_tokens`` learned embeddings put before every sequence.

    ``init``: ``"random"`` (normal, with the standard deviation of the model's embedding
    table), ``"vocab"`` (embeddings of tokens sampled from the vocabulary) or ``"text"`` (the
    embeddings of ``init_token_ids``, repeated to fill ``num_virtual_tokens``, as peft does).
    """

    name: ClassVar[str] = "prompt"
    peft_type: ClassVar[str] = "PROMPT_TUNING"
    table: ClassVar[tuple[str, ...]] = ("model", "prompt")
    handled: ClassVar[set[str]] = {
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "tokenizer_name_or_path",
        "tokenizer_kwargs",
    }

    num_virtual_tokens: int = 20
    init: str = "random"
    init_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, section: Any, tokenizer: Any = None) -> Prompt:
        """``init="text"`` tokenizes ``init_text`` (without special tokens) with ``tokenizer``."""
        ids = ()
        if section.init == "text":
            ids = tuple(tokenizer(section.init_text, add_special_tokens=False)["input_ids"])
        return cls(section.num_virtual_tokens, section.init, ids)

    def check(self) -> None:
        super().check()
        if self.init not in ("random", "vocab", "text"):
            raise ValueError(f"prompt.init {self.init!r} is not supported; use 'random', 'vocab' or 'text'")
        if self.init == "text" and not self.init_token_ids:
            raise ValueError("prompt.init='text' needs init_token_ids (the tokenized init text)")

    def rules(self) -> tuple[tuple[str, str], ...]:
        return (("model/prompt", "trainable"),)

    def init_leaves(self, model: Any, params: dict, rng: jax.Array) -> None:
        """The prompt starts from the embedding table ``[vocab, hidden]`` (see ``init``)."""
        params["model"]["prompt"] = self._start(params["model"]["embed_tokens"]["embedding"], rng)

    def _start(self, embedding: jax.Array, rng: jax.Array) -> jax.Array:
        n, vocab = self.num_virtual_tokens, embedding.shape[0]
        if self.init == "text":
            ids = np.resize(np.asarray(self.init_token_ids), n)
            if ids.max() >= vocab or ids.min() < 0:
                raise ValueError(f"prompt.init_token_ids must be in [0, {vocab}); got {list(self.init_token_ids)}")
            return embedding[ids]
        if self.init == "vocab":
            return embedding[jax.random.randint(jax.random.fold_in(rng, 1), (n,), 0, vocab)]
        std = jnp.std(embedding.astype(jnp.float32))
        return (std * jax.random.normal(jax.random.fold_in(rng, 1), (n, embedding.shape[1]))).astype(embedding.dtype)

    def peft_config(self, model: Any, params: Any) -> dict:
        cfg = model.config
        return {
            "num_attention_heads": cfg.num_attention_heads,
            "num_layers": cfg.num_hidden_layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "prompt_tuning_init": "SAMPLE_VOCAB" if self.init == "vocab" else "RANDOM",
            "prompt_tuning_init_text": None,
            "token_dim": cfg.hidden_size,
            "tokenizer_name_or_path": None,
        }

    @staticmethod
    def expected(cfg: Any) -> dict:
        return {"token_dim": cfg.hidden_size}


def _table(model: Any, params: dict) -> jax.Array:
    """Prefix tuning's ``[n, layers * 2 * kv_dim]`` table from its projection MLP, in the params' dtype."""
    keys, values = model.apply({"params": params}, method=lambda m: m.model.prefix())
    table = jnp.stack([keys, values], 1).transpose(2, 0, 1, 3, 4)  # [n, layers, 2, kv, d]
    dtype = params["model"]["prefix"]["embedding"].dtype
    return table.reshape(table.shape[0], -1).astype(dtype)
