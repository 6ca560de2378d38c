"""The Llama family: Llama 2 / 3 / 3.1 / 3.2, Mistral, Qwen2 and Qwen3, one decoder with flags.

Parameter names mirror Hugging Face (``model/layers/self_attn/q_proj/kernel``); the decoder
layers are stacked along a leading ``layers`` axis and run with ``nn.scan`` + ``nn.remat``,
so compile time does not grow with depth.

    model = LlamaForCausalLM(LlamaConfig.tiny())
    params = model.init_params(jax.random.key(0))
    logits = model.apply({"params": params}, input_ids)        # [batch, length, vocab] f32
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jft.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from jft.models.attention import Visibility, attention
from jft.models.layers import (
    Bottleneck,
    KVCache,
    Linear,
    RMSNorm,
    apply_rope,
    default_init,
    lora_a_init,
    rope_angles,
    rope_inv_freq,
    segment_positions,
    swiglu,
)
from jft.models.peft_spec import LinearPeft, Peft
from jft.sharding import constrain

Array = jax.Array

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of one decoder. Hashable, so it can live on a Flax module."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Qwen3 sets it)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the HF dict
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v/o biases (Llama's attention_bias)
    qkv_bias: bool = False  # q/k/v biases only (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3)
    mlp_bias: bool = False
    num_local_experts: int = 0  # > 0: a Mixtral sparse mixture-of-experts block instead of the MLP
    num_experts_per_tok: int = 2  # experts each token is routed to (top-k)
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss in training
    sliding_window: int | None = None  # attend to at most this many previous tokens
    layer_types: tuple[str, ...] | None = None  # "full_attention" / "sliding_attention" per layer
    model_type: str = "llama"  # written back to config.json
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters
    remat: str = "nothing_saveable"  # activation checkpointing policy of each layer
    loss_chunk: int = 0  # sequence positions per chunk of the loss head; 0: sized from the vocab
    num_labels: int = 0  # > 0: sequence classification, a "score" head [embed, num_labels] instead of lm_head
    attention: str = "auto"  # auto|xla|chunked|splash|cudnn (jft.models.attention)
    attention_chunk: int = 512  # tokens per block of the chunked attention
    mlp_chunk: int = 0  # > 0: the MLP runs over this many sequence positions at a time, recomputed (memory)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{field}={getattr(self, field)!r} is not supported; use one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
        if self.num_labels < 0:
            raise ValueError(f"num_labels={self.num_labels} must be >= 0 (0: a causal LM head)")
        if self.attention_chunk < 1:
            raise ValueError(f"attention_chunk={self.attention_chunk} must be >= 1")
        if self.mlp_chunk < 0:
            raise ValueError(f"mlp_chunk={self.mlp_chunk} must be >= 0 (0: the whole sequence at once)")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk={self.loss_chunk} must be >= 0 (0: sized from the vocabulary)")
        if self.num_local_experts and not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..{self.num_local_experts} (the experts)"
            )
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def layer_windows(self) -> np.ndarray:
        """Per-layer attention window ``[layers]`` int32; a huge value means full attention."""
        full = np.iinfo(np.int32).max
        types = self.layer_types or ("sliding_attention",) * self.num_hidden_layers
        return np.array(
            [self.sliding_window if t == "sliding_attention" and self.sliding_window else full for t in types],
            np.int32,
        )

    @classmethod
    def tiny(cls, **overrides) -> LlamaConfig:
        """A few-hundred-thousand-parameter model for tests and examples."""
        kw = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        return cls(**{**kw, **overrides})


class Attention(nn.Module):
    config: LlamaConfig
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, x, cos, sin, visibility, window, kv_cache, prefix_kv):
        cfg = self.config
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        bias = cfg.attention_bias or cfg.qkv_bias

        def proj(n, f, ax, b):
            return Linear(f, ax, b, dt, pdt, peft=self.peft.linear(f"self_attn.{n}"), name=n)

        b, t, _ = x.shape
        q = proj("q_proj", h * d, ("embed", "heads"), bias)(x).reshape(b, t, h, d)
        k = proj("k_proj", kv * d, ("embed", "kv_heads"), bias)(x).reshape(b, t, kv, d)
        v = proj("v_proj", kv * d, ("embed", "kv_heads"), bias)(x).reshape(b, t, kv, d)
        if cfg.qk_norm:
            norm = lambda n: RMSNorm(cfg.rms_norm_eps, "head_dim", dt, pdt, name=n)
            q, k = norm("q_norm")(q), norm("k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv_heads, t, head_dim]
        blocks = [(k, v, visibility[0])]
        if kv_cache is not None:  # earlier tokens; the caller writes the new k, v into the cache
            blocks.insert(0, (kv_cache[0].astype(dt), kv_cache[1].astype(dt), visibility[1]))
        if prefix_kv is not None:  # prefix tuning: [n, kv_heads, head_dim] keys and values, seen by all
            pk, pv = (
                jnp.broadcast_to(p.transpose(1, 0, 2)[None].astype(dt), (b, kv) + p.shape[:1] + (d,)) for p in prefix_kv
            )
            blocks.insert(0, (pk, pv, Visibility(always=True)))
        windows = tuple(int(w) for w in sorted(set(cfg.layer_windows.tolist())))
        out = attention(q, blocks, window, windows=windows, impl=cfg.attention, chunk=cfg.attention_chunk)
        return proj("o_proj", cfg.hidden_size, ("heads", "embed"), cfg.attention_bias)(out), (k, v)


class MLP(nn.Module):
    config: LlamaConfig
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

        def proj(n, f, ax):
            return Linear(f, ax, cfg.mlp_bias, dt, pdt, peft=self.peft.linear(f"mlp.{n}"), name=n)

        gate = proj("gate_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
        hidden = swiglu(gate, proj("up_proj", cfg.intermediate_size, ("embed", "mlp"))(x))
        hidden = constrain(hidden, ("batch", None, "mlp"))
        return proj("down_proj", cfg.hidden_size, ("mlp", "embed"))(hidden)


class _MLPStep(MLP):
    """The MLP as a scan body: ``(carry, chunk) -> (carry, MLP(chunk))``, same parameter names."""

    def __call__(self, carry, x):
        return carry, super().__call__(x)


def tiled_mlp(cfg: LlamaConfig, peft: Peft, x: Array, name: str) -> Array:
    """The MLP over ``cfg.mlp_chunk`` sequence positions at a time, each chunk recomputed in the
    backward pass: the ``[b, t, intermediate]`` activations (about ``6 x intermediate`` floats per
    token with their gradients, most of a layer's memory) exist for one chunk only. The MLP is
    token-wise, so the result equals the untiled one; parameters are shared by all chunks and keep
    the MLP's names. Rows shorter than two chunks run untiled."""
    b, t, d = x.shape
    c = cfg.mlp_chunk
    if not c or t <= c:
        return MLP(cfg, peft, name=name)(x)
    n = -(-t // c)
    xs = jnp.pad(x, ((0, 0), (0, n * c - t), (0, 0))).reshape(b, n, c, d)
    body = nn.remat(_MLPStep, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    scan = nn.scan(
        body, variable_broadcast="params", split_rngs={"params": False, "dropout": True}, in_axes=1, out_axes=1
    )
    _, y = scan(cfg, peft, name=name)(None, xs)
    return y.reshape(b, n * c, d)[:, :t]


class _ExpertLinear(nn.Module):
    """One stacked expert linear, ``kernel [experts, in, out]``, on rows sorted by expert (one
    grouped matmul, ``jax.lax.ragged_dot``; ``sizes [experts]`` rows each). With LoRA (``peft``
    with a rank) every expert adds its own ``s (x lora_a) lora_b``, ``lora_a [experts, in, r]``
    and ``lora_b [experts, r, out]`` (zero at the start)."""

    shape: tuple[int, int, int]
    axes: tuple[str, str, str]
    dtype: Any
    param_dtype: Any
    peft: LinearPeft | None = None

    @nn.compact
    def __call__(self, rows: Array, sizes: Array) -> Array:
        param = lambda name, init, shape, axes: self.param(
            name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype
        )
        dt, (n, n_in, n_out) = self.dtype, self.shape
        y = jax.lax.ragged_dot(rows, param("kernel", default_init, self.shape, self.axes).astype(dt), sizes)
        p = self.peft
        if p is None or not p.r:
            return y
        a = param("lora_a", lora_a_init(p.init, p.r), (n, n_in, p.r), (*self.axes[:2], None)).astype(dt)
        b = param("lora_b", nn.initializers.zeros_init(), (n, p.r, n_out), (self.axes[0], None, self.axes[2]))
        x = rows
        if p.dropout and self.has_rng("dropout"):
            x = nn.Dropout(p.dropout, deterministic=False)(rows)
        return y + p.scale * jax.lax.ragged_dot(jax.lax.ragged_dot(x, a, sizes), b.astype(dt), sizes)


class _Experts(nn.Module):
    """The stacked expert SwiGLU MLPs ``w2(silu(w1 x) * w3 x)`` on rows sorted by expert: kernels
    ``w1``, ``w3`` ``[experts, embed, mlp]`` and ``w2`` ``[experts, mlp, embed]`` (HF-like paths,
    ``experts/w1/kernel``), each with LoRA when the spec targets ``block_sparse_moe.experts.w1``, ..."""

    num: int
    embed: int
    mlp: int
    dtype: Any
    param_dtype: Any
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, rows: Array, sizes: Array) -> Array:
        up = ((self.num, self.embed, self.mlp), ("experts", "embed", "mlp"))
        down = ((self.num, self.mlp, self.embed), ("experts", "mlp", "embed"))

        def linear(name, spec):
            lora = self.peft.linear(f"block_sparse_moe.experts.{name}")
            return _ExpertLinear(*spec, self.dtype, self.param_dtype, lora, name=name)

        w1, w3, w2 = linear("w1", up), linear("w3", up), linear("w2", down)
        return w2(swiglu(w1(rows, sizes), w3(rows, sizes)), sizes)


class MoE(nn.Module):
    """Mixtral's sparse MLP: a softmax router picks the top ``num_experts_per_tok`` experts per
    token, whose SwiGLU MLPs (``w1`` gate, ``w3`` up, ``w2`` down) are weighted by the router
    probabilities renormalised over the chosen ones.

    Tokens are sorted by expert and each expert's rows run as one grouped matmul
    (``jax.lax.ragged_dot``), so the cost is ``k`` MLPs per token, not one per expert. The
    router's statistics for the load-balancing loss are sown into the ``router`` collection
    (see :func:`moe_aux_loss`). LoRA reaches the experts when ``peft`` targets them (``w1``, ...).
    """

    config: LlamaConfig
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        n_exp, k = cfg.num_local_experts, cfg.num_experts_per_tok
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        b, t, d = x.shape
        logits = Linear(n_exp, ("embed", None), False, dt, pdt, out_dtype=jnp.float32, name="gate")(x)
        probs = jax.nn.softmax(logits, axis=-1)
        top_p, top_i = jax.lax.top_k(probs, k)
        top_p = top_p / top_p.sum(-1, keepdims=True)
        chosen = jax.nn.one_hot(top_i, n_exp, dtype=jnp.float32).sum((0, 1, 2))
        self.sow("router", "stats", (chosen, probs.sum((0, 1)), jnp.asarray(b * t, jnp.float32)))
        expert = top_i.reshape(-1)  # [tokens * k]
        order = jnp.argsort(expert, stable=True)
        token = (jnp.arange(b * t * k) // k)[order]
        sizes = jnp.bincount(expert, length=n_exp).astype(jnp.int32)
        rows = x.reshape(-1, d)[token]
        y = _Experts(n_exp, d, cfg.intermediate_size, dt, pdt, self.peft, name="experts")(rows, sizes)
        y = y.astype(jnp.float32) * top_p.reshape(-1)[order][:, None]
        return jnp.zeros((b * t, d), jnp.float32).at[token].add(y).reshape(b, t, d).astype(dt)


def moe_aux_loss(router: dict, num_experts: int) -> jax.Array:
    """Mixtral's load-balancing loss from the router statistics a forward pass sowed
    (``_, state = model.apply(..., mutable=["router"])``, ``router = state["router"]``): over all
    layers and tokens,
    ``num_experts * sum_e f_e * P_e`` with ``f_e`` the share of top-k slots routed to expert ``e``
    and ``P_e`` its mean router probability (transformers' ``load_balancing_loss_func``)."""
    chosen, probs, rows = router["model"]["layers"]["block_sparse_moe"]["stats"][0]
    total = rows.sum()
    return num_experts * jnp.sum((chosen.sum(0) / total) * (probs.sum(0) / total))


class DecoderLayer(nn.Module):
    """One pre-norm block, scanned: ``(x, broadcast..., per-layer xs) -> (x, per-layer ys)``.

    xs: this layer's attention window, cached keys/values (or None) and prefix-tuning keys/
    values (or None); ys: the keys and values of the new tokens, which the decoder writes into
    the cache. ``phm_rule`` is the Compacter rule shared by all layers (or None).
    """

    config: LlamaConfig
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, x, cos, sin, visibility, phm_rule, xs):
        cfg, adapter = self.config, self.peft.adapter
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        window, kv_cache, prefix_kv = xs
        self.sow("intermediates", "hidden", x)  # this layer's input (HF's hidden_states[layer]); kept only if asked
        norm = lambda n: RMSNorm(cfg.rms_norm_eps, "embed", dt, pdt, name=n)
        attn = Attention(cfg, self.peft, name="self_attn")
        h, new_kv = attn(norm("input_layernorm")(x), cos, sin, visibility, window, kv_cache, prefix_kv)
        if adapter is not None and adapter.kind == "houlsby":
            h = Bottleneck(adapter, dt, pdt, name="attn_adapter")(h, phm_rule)
        x = x + h
        h = norm("post_attention_layernorm")(x)
        h = (
            MoE(cfg, self.peft, name="block_sparse_moe")(h)
            if cfg.num_local_experts
            else tiled_mlp(cfg, self.peft, h, "mlp")
        )
        if adapter is not None:
            h = Bottleneck(adapter, dt, pdt, name="mlp_adapter")(h, phm_rule)
        return constrain(x + h, ("batch", None, None)), new_kv


class Decoder(nn.Module):
    """Embeddings, the scanned layer stack and the final norm: hidden states ``[b, t, embed]``.

    Prompt tuning puts its virtual tokens before the sequence on the first call (the cache
    then holds them); prefix tuning adds its keys and values to every layer on every call.
    Either way, real tokens' positions start after the virtual tokens, as in peft.
    """

    config: LlamaConfig
    peft: Peft = Peft()

    def setup(self):
        cfg, peft = self.config, self.peft
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.with_logical_partitioning(default_init, ("vocab", "embed")),
            dtype=dt,
            param_dtype=pdt,
        )
        layer = DecoderLayer
        if cfg.remat != "none":
            layer = nn.remat(layer, policy=getattr(jax.checkpoint_policies, cfg.remat), prevent_cse=False)
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0, "intermediates": 0, "router": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * 4 + (0,),
            length=cfg.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, peft)
        self.norm = RMSNorm(cfg.rms_norm_eps, "embed", dt, pdt)
        if peft.adapter is not None and peft.adapter.phm_dim:
            n = peft.adapter.phm_dim
            self.phm_rule = self.param("phm_rule", nn.initializers.normal(stddev=n**-0.5), (n, n, n), pdt)
        if peft.prompt is not None:
            init = nn.with_logical_partitioning(default_init, (None, "embed"))
            self.prompt = self.param("prompt", init, (peft.prompt_tokens, cfg.hidden_size), pdt)
        if peft.prefix is not None:
            self.prefix = PrefixTable(cfg, peft.prefix)

    def __call__(self, input_ids, positions, attention_mask, segment_ids, cache):
        cfg, peft = self.config, self.peft
        b, t = input_ids.shape
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache")
        first_call = cache is None or cache.empty
        n_prompt = peft.prompt_tokens if first_call else 0  # later calls find them in the cache
        if positions is None:
            if segment_ids is not None:
                positions = segment_positions(segment_ids)
            else:  # count of real tokens before each one, so left padding does not shift positions
                seen = 0 if first_call else cache.mask.sum(-1, keepdims=True) - peft.prompt_tokens
                positions = jnp.maximum(seen + jnp.cumsum(valid, axis=-1) - 1, 0)
        positions = positions + peft.prompt_tokens + peft.prefix_tokens
        x = constrain(self.embed_tokens(input_ids), ("batch", None, None))
        if n_prompt:  # virtual tokens: positions 0..n-1, seen by every token of every segment
            x = jnp.concatenate([jnp.broadcast_to(self.prompt.astype(x.dtype), (b,) + self.prompt.shape), x], 1)
            positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n_prompt), (b, n_prompt)), positions], 1)
            valid = jnp.concatenate([jnp.ones((b, n_prompt), bool), valid], 1)
            if segment_ids is not None:
                segment_ids = jnp.concatenate([jnp.full((b, n_prompt), -1, segment_ids.dtype), segment_ids], 1)
        # Which keys each new token sees (causal in stream index, segments, padding), then the cache.
        padded = attention_mask is not None
        visibility = [
            Visibility(
                q_seg=segment_ids,
                k_seg=segment_ids,
                k_valid=valid if padded else None,
                shared=bool(n_prompt) and segment_ids is not None,  # virtual tokens: segment -1, seen by all
            )
        ]
        kv_cache = None
        if not first_call:  # cached slots all precede the new tokens; positions in the cache's stream
            stream = cache.index + jnp.arange(t)
            visibility[0] = visibility[0].replace(q_pos=stream, k_pos=stream)
            visibility.append(Visibility(q_pos=stream, k_valid=cache.mask))
            kv_cache = (cache.k, cache.v)
        cos, sin = rope_angles(positions, rope_inv_freq(cfg.head_size, cfg.rope_theta, _dict(cfg.rope_scaling)))
        prefix_kv = self.prefix() if peft.prefix is not None else None
        phm_rule = self.phm_rule if peft.adapter is not None and peft.adapter.phm_dim else None
        xs = (jnp.asarray(cfg.layer_windows), kv_cache, prefix_kv)
        x, (k, v) = self.layers(x, cos, sin, visibility, phm_rule, xs)
        if cache is not None:
            cache = cache.write(k, v, valid)
        return self.norm(x[:, n_prompt:]), cache


class PrefixTable(nn.Module):
    """Prefix tuning's keys and values: two ``[layers, n, kv_heads, head_dim]`` arrays.

    ``embedding [n, layers * 2 * kv_heads * head_dim]`` is peft's table (per virtual token:
    layer 0 keys, layer 0 values, layer 1 keys, ...). With ``projection_dim`` it is computed
    from ``embedding [n, kv_heads * head_dim]`` by ``mlp_out(tanh(mlp_in(embedding)))``.
    """

    config: LlamaConfig
    spec: Any

    @nn.compact
    def __call__(self):
        cfg, spec = self.config, self.spec
        pdt = jnp.dtype(cfg.param_dtype)
        kv_dim = cfg.num_key_value_heads * cfg.head_size
        full = cfg.num_hidden_layers * 2 * kv_dim
        width = kv_dim if spec.projection_dim else full
        init = nn.with_logical_partitioning(default_init, (None, None))
        table = self.param("embedding", init, (spec.num_virtual_tokens, width), pdt)
        if spec.projection_dim:
            kw = dict(use_bias=True, dtype=jnp.float32, param_dtype=pdt)
            hidden = jnp.tanh(Linear(spec.projection_dim, (None, None), name="mlp_in", **kw)(table))
            table = Linear(full, (None, None), name="mlp_out", **kw)(hidden)
        n = spec.num_virtual_tokens
        table = table.reshape(n, cfg.num_hidden_layers, 2, cfg.num_key_value_heads, cfg.head_size)
        table = table.transpose(1, 2, 0, 3, 4)  # [layers, 2, n, kv_heads, head_dim]
        return table[:, 0], table[:, 1]


def last_token_index(mask: Array) -> Array:
    """``[b]`` index of each row's last real token (``mask [b, t]``, 1 = real): the position whose
    score a sequence classifier reports; right or left padding, and a pad id equal to EOS, alike."""
    t = mask.shape[-1]
    return jnp.argmax(jnp.where(mask.astype(bool), jnp.arange(t), -1), axis=-1)


def last_token_scores(model: Any, params: dict, hidden: Array, mask: Array) -> Array:
    """``[b, num_labels]`` float32 scores of a sequence-classification model from its final hidden
    states ``[b, t, embed]`` (``model.apply(..., hidden_only=True)``) at each row's last real token
    (as transformers' ``*ForSequenceClassification`` pools them, with the mask instead of the pad id)."""
    last = last_token_index(mask)
    pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [b, 1, embed]
    return model.apply({"params": params}, pooled, method="head")[:, 0]


class LlamaForCausalLM(nn.Module):
    """Decoder + lm_head. Returns float32 logits ``[b, t, vocab]`` (and the cache when given one).

    Args to ``__call__``: ``input_ids [b, t]`` int; ``positions [b, t]`` (default: from the
    mask, segments or cache); ``attention_mask [b, t]`` (1 = real token, 0 = padding);
    ``segment_ids [b, t]`` (packed rows: tokens attend only inside their segment);
    ``cache`` a :class:`KVCache` for incremental decoding; ``last_only`` computes the logits
    of the last position alone (``[b, 1, vocab]``), as the prefill of generation needs;
    ``hidden_only`` returns the final hidden states ``[b, t, embed]`` instead of logits (see :meth:`head`).
    """

    config: LlamaConfig
    peft: Peft = Peft()

    def __post_init__(self):
        # Targets as module names, so every module can ask the spec what it computes.
        object.__setattr__(
            self, "peft", self.peft.resolve(self.config.num_hidden_layers, self.config.num_local_experts)
        )
        super().__post_init__()

    def setup(self):
        cfg = self.config
        self.model = Decoder(cfg, self.peft)
        if cfg.num_labels:  # sequence classification (a reward model): no lm_head
            self.score = Linear(
                cfg.num_labels,
                ("embed", None),
                dtype=jnp.dtype(cfg.dtype),
                param_dtype=jnp.dtype(cfg.param_dtype),
                out_dtype=jnp.float32,
                peft=self.peft.linear("score"),
            )
        elif not cfg.tie_word_embeddings:
            self.lm_head = Linear(
                cfg.vocab_size,
                ("embed", "vocab"),
                dtype=jnp.dtype(cfg.dtype),
                param_dtype=jnp.dtype(cfg.param_dtype),
                out_dtype=jnp.float32,
                peft=self.peft.linear("lm_head"),
            )

    def __call__(
        self,
        input_ids,
        positions=None,
        attention_mask=None,
        segment_ids=None,
        cache=None,
        last_only=False,
        hidden_only=False,
    ):
        x, new_cache = self.model(input_ids, positions, attention_mask, segment_ids, cache)
        if hidden_only:  # the final (normed) hidden states [b, t, embed]; losses apply head() chunk by chunk
            return x if cache is None else (x, new_cache)
        if last_only:
            x = x[:, -1:]
        logits = self.head(x)
        return logits if cache is None else (logits, new_cache)

    def head(self, x):
        """Float32 logits ``[b, t, vocab]`` of final hidden states ``x [b, t, embed]``: the lm_head
        (with its PEFT and 4-bit kernel, if any) or the transposed input embeddings when tied.
        ``model.apply(variables, x, method="head")``; :mod:`jft.losses` calls it a chunk at a time.
        A sequence-classification model (``num_labels > 0``) gives its per-token scores
        ``[b, t, num_labels]`` (:func:`last_token_scores` reads them at each row's last token)."""
        if self.config.num_labels:
            return self.score(x)
        if self.config.tie_word_embeddings:
            emb = self.model.embed_tokens.embedding
            logits = jnp.matmul(x, emb.T.astype(x.dtype), preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x)
        return constrain(logits, ("batch", None, "vocab"))

    @property
    def loss_collections(self) -> tuple[str, ...]:
        """Collections a training forward makes mutable for :meth:`training_loss` (``()``: none)."""
        return ("router",) if self.config.num_local_experts else ()

    def training_loss(self, collections: dict) -> Array:
        """The model's own training term per unit of loss weight, from the collections a forward
        with ``mutable=self.loss_collections`` returned: Mixtral's ``router_aux_loss_coef`` x
        load-balancing loss (:func:`moe_aux_loss`), as transformers adds it; 0 for other models.
        Every objective adds it, weighted like its own loss."""
        if not self.config.num_local_experts:
            return jnp.zeros((), jnp.float32)
        aux = moe_aux_loss(collections["router"], self.config.num_local_experts)
        return self.config.router_aux_loss_coef * aux

    def init_params(self, rng: Array, shardings: Any = None) -> dict:
        """Random parameters (plain arrays, no logical-axis boxes), normal(0.02) like HF.

        With ``shardings`` (:func:`jft.sharding.param_shardings`) each device creates only its
        own shards: the whole model is never on one device. The values do not depend on them.
        """
        init = lambda rng: nn.unbox(self.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])
        return jax.jit(init, out_shardings=shardings)(rng)

    def param_shapes(self) -> dict:
        """``jax.ShapeDtypeStruct`` of every parameter, computed without allocating any."""
        return jax.eval_shape(self.init_params, jax.random.key(0))

    def logical_axes(self) -> dict:
        """The logical axis names of every parameter, as ``PartitionSpec`` leaves."""
        boxed = jax.eval_shape(lambda: self.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
        return nn.get_partition_spec(boxed)

    def init_cache(self, batch: int, length: int, dtype: Any = None) -> KVCache:
        """An empty cache for ``batch`` rows of at most ``length`` tokens (prompt + new; room for
        prompt tuning's virtual tokens is added)."""
        cfg = self.config
        return KVCache.create(
            cfg.num_hidden_layers,
            batch,
            length + self.peft.prompt_tokens,
            cfg.num_key_value_heads,
            cfg.head_size,
            jnp.dtype(dtype or cfg.dtype),
        )


def _dict(items):
    return dict(items) if items else None
