"""Run configuration: one schema, Python config files, ``--config.a.b=value`` overrides.

A config file defines ``get_config()`` returning the :func:`default_config` with some fields
changed. The schema is locked: an unknown key, in a file or an override, is an error that names the likeliest key and
lists the valid keys, and ml_collections refuses a value of the wrong type.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import ml_collections

from jft.sharding import DEFAULT_RULES
from jft.vocab import TRAIN_ROWS

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def default_config() -> ConfigDict:
    """Every field jft reads, with its default. Config files start from this."""
    c = ConfigDict()
    # the objective (jft.objectives.TASKS): sft = next-token cross entropy on instruction, chat or
    # raw-text records (continued pretraining included); reward = a Bradley-Terry reward model on
    # {"prompt", "chosen", "rejected"} pairs (data.seq_len bounds each side); dpo = direct
    # preference optimization (or a variant, dpo.loss) on the same pairs; grpo = group relative
    # policy optimization on prompt records with reward functions and/or a reward model (rl.*,
    # grpo.*); ppo = proximal policy optimization with a value head on the same prompts (rl.*, ppo.*);
    # distill = logit distillation from distill.teacher on SFT records (distill.*)
    c.task = "sft"

    c.model = ConfigDict()
    c.model.path = ""  # Hugging Face model folder or hub id; "" = a new model from model.new
    c.model.dtype = "float32"  # parameter dtype: float32 | bfloat16 | float16
    # activation/matmul dtype: auto = bfloat16 on GPU/TPU, float32 on CPU (no fast bf16 matmuls
    # there); "" = model.dtype; or float32 | bfloat16 | float16 (resolve_compute_dtype)
    c.model.compute_dtype = "auto"
    c.model.remat = "nothing_saveable"  # activation checkpointing per layer (see LlamaConfig.remat)
    c.model.loss_chunk = 0  # positions per chunk of the lm_head + cross entropy; 0 = ~64 MiB of logits a chunk
    # attention implementation: auto = Pallas splash on TPU, cuDNN flash on GPU, chunked XLA
    # elsewhere; or xla (whole scores, quadratic memory) | chunked | splash | cudnn (jft.models.attention)
    c.model.attention = "auto"
    c.model.attention_chunk = 512  # tokens per block of the chunked attention (memory ~ block x length)
    # > 0: run each layer's MLP over this many positions at a time, recomputed in the backward pass
    # (long context: the [batch, t, intermediate] activations exist for one chunk); 0 = whole rows
    c.model.mlp_chunk = 0
    c.model.quantize = ""  # "" | nf4 | int4: 4-bit frozen linear kernels (QLoRA; needs model.path and PEFT)
    c.model.quantize_skip = ("lm_head",)  # linear modules kept unquantized (embeddings, norms never are)
    c.model.quant_block_size = 64  # values per quantization block
    c.model.double_quant = True  # quantize the block scales to 8 bits too (QLoRA's double quantization)
    c.model.new = ConfigDict()  # architecture of a new, randomly initialised model (model.path = "")
    c.model.new.hidden_size = 256  # embedding width
    c.model.new.intermediate_size = 704  # MLP width
    c.model.new.num_hidden_layers = 4  # decoder layers
    c.model.new.num_attention_heads = 4  # query heads
    c.model.new.num_key_value_heads = 2  # key/value heads (grouped-query attention)
    c.model.new.tie_word_embeddings = True  # share the input embedding and the lm_head

    c.mesh = ConfigDict()
    c.mesh.data = -1  # data-parallel size (-1 = the devices left over)
    c.mesh.fsdp = 1  # FSDP size: params and optimizer state sharded over it, the batch too
    c.mesh.tensor = 1  # tensor-parallel size: heads, MLP width and vocab split over it
    # (logical axis, mesh axis or axes or None) for every logical axis of the params; the
    # default shards FSDP over embed and tensor-parallel over heads/mlp/vocab (jft.sharding).
    c.mesh.rules = DEFAULT_RULES

    c.tokenizer = ConfigDict()
    c.tokenizer.path = ""  # tokenizer folder; "" = model.path's tokenizer
    c.tokenizer.train_on_data = False  # build a small BPE tokenizer from the training data (new models)
    # Domain vocabulary (jft.vocab; needs model.path): tokens added whole to the tokenizer, e.g.
    # ("mRNA", "CRISPR"), with new embedding / lm_head rows at the mean of the old ones
    c.tokenizer.add_tokens = ()
    # also add up to this many tokens learned from the training data: the most frequent words (seen
    # twice or more, ties by the word) of its first 10,000 records that the tokenizer splits into
    # two or more tokens; learned once, kept in workdir/vocabulary.json for resumes
    c.tokenizer.learn_tokens = 0
    # which rows of embed_tokens (and an untied lm_head) train once tokens are added: new = the new
    # rows always, the old ones only where train.rules / peft.train train the tables (full
    # fine-tuning trains them all; under PEFT or frozen tables they stay bit-identical); all = every
    # row, whatever the rules say; rules = as the rules say (under PEFT the new rows then stay at the mean)
    c.tokenizer.train_rows = "new"

    c.data = ConfigDict()
    # training data: a .jsonl/.json/.parquet/.csv/.txt/.jsonl.gz/.txt.gz file or a folder of them, a hub
    # name, or tfds:NAME
    c.data.train = ""
    # task=sft: several training sources with weights, in place of data.train, e.g.
    # (("domain/", 0.9), ("instructions.jsonl", 0.1)); each batch holds about these shares of rows, and an
    # epoch is the fewest rows that visit every row of every source at them (jft.data.mixture)
    c.data.mixture = ()
    c.data.text_unit = "line"  # a .txt file's records: one per line | one per file (document)
    c.data.validation = ""  # validation data (same forms); "" = split off data.validation_fraction
    c.data.validation_fraction = 0.05  # share of the training records held out when data.validation = ""
    c.data.split = "train"  # split name for hub and TFDS datasets
    c.data.data_dir = ""  # TFDS data_dir
    c.data.format = "auto"  # auto | instruction | chat | prompt_completion | text
    c.data.template = "alpaca"  # instruction template: alpaca | simple | compact
    c.data.seq_len = 512  # tokens per training row
    c.data.overlong = "truncate"  # records longer than seq_len: truncate | drop (both counted)
    c.data.pack = True  # pack several records into one row (segment ids keep them apart)
    # tokenize the training records once into this folder (jft.data.cache: memory-mapped shards keyed by
    # the data, tokenizer, template and these settings), reused by later runs and resumes; "" = in memory.
    # With data.validation set too, local training files are read by the tokenizing processes only, in
    # pieces: the corpus is never held in memory
    c.data.cache_dir = ""
    c.data.num_proc = 1  # processes that tokenize into data.cache_dir
    c.data.prompt_loss_weight = 0.1  # loss weight of prompt tokens (0 = completion-only)
    c.data.response_loss_weight = 1.0  # loss weight of response tokens

    c.train = ConfigDict()
    c.train.seed = 0  # parameter init, data order and dropout
    c.train.batch_size = 8  # rows per optimizer step (all micro-batches together)
    c.train.grad_accum = 1  # micro-batches per step; batch_size must be a multiple
    c.train.epochs = 3  # passes over the training rows (when train.max_steps = 0)
    c.train.max_steps = 0  # optimizer steps; 0 = epochs x steps per epoch
    c.train.eval_every = 100  # steps between validation runs (0 = only at the end)
    c.train.log_every = 10  # steps between metric lines in the logs
    c.train.checkpoint_every = 100  # steps between checkpoints (0 = only at the end)
    c.train.keep_checkpoints = 2  # last checkpoints kept (the best one is kept apart)
    c.train.checkpoint_dir = ""  # where ckpt/ and best/ go: "" = the workdir; a gs:// path on a pod (every host writes)
    c.train.patience = 0  # evaluations without improvement before stopping early (0 = never)
    c.train.min_delta = 0.0  # improvement in validation loss that resets the patience
    # Ordered (regex, "trainable" | "frozen") rules over param paths, first match wins;
    # scanned layers match per layer as model/layers/{i}/... . Default: full fine-tuning.
    c.train.rules = ((".*", "trainable"),)

    c.peft = ConfigDict()
    # PEFT methods to combine (jft.peft): lora | ia3 | bitfit | adapter | prefix | prompt.
    # () = none: train.rules decide what trains (full or partial fine-tuning).
    c.peft.methods = ()
    # Extra (regex, label) rules tried before the methods' own, e.g. (("lm_head/.*", "trainable"),)
    c.peft.train = ()
    c.peft.lora = ConfigDict()
    c.peft.lora.r = 8  # rank
    c.peft.lora.alpha = 16.0  # scale = alpha / r (alpha / sqrt(r) with rslora)
    c.peft.lora.targets = ("all-linear",)  # module names (q_proj, mlp.up_proj, lm_head, experts w1/w2/w3) or all-linear
    c.peft.lora.target_regex = ""  # instead of targets: a regex over full names (model.layers.0.self_attn.q_proj)
    c.peft.lora.dropout = 0.0  # dropout on the LoRA input while training
    c.peft.lora.rslora = False  # rank-stabilised scale alpha / sqrt(r)
    c.peft.lora.dora = False  # DoRA: learned magnitude per output column
    c.peft.lora.init = "uniform"  # init of A: uniform (peft default) | gaussian
    c.peft.lora.rank_pattern = ()  # ((regex, r), ...) per-module ranks
    c.peft.lora.alpha_pattern = ()  # ((regex, alpha), ...) per-module alphas
    c.peft.ia3 = ConfigDict()
    c.peft.ia3.targets = ("k_proj", "v_proj", "down_proj")  # modules whose output (or input) is scaled
    c.peft.ia3.feedforward = ("down_proj",)  # targets whose input, not output, is scaled
    c.peft.bitfit = ConfigDict()
    c.peft.bitfit.biases = ("attention", "mlp")  # projection groups that get (zero-initialised) biases
    c.peft.adapter = ConfigDict()
    c.peft.adapter.kind = "houlsby"  # houlsby (after attention and MLP) | pfeiffer (after MLP)
    c.peft.adapter.reduction_factor = 16  # bottleneck width = hidden_size / reduction_factor
    c.peft.adapter.nonlinearity = "relu"  # relu | gelu | silu | tanh
    c.peft.adapter.phm_dim = 0  # > 0: Compacter (PHM layers with this many shared rules)
    c.peft.adapter.phm_rank = 1  # rank of the per-layer PHM factors (Compacter)
    c.peft.prefix = ConfigDict()
    c.peft.prefix.num_virtual_tokens = 20  # learned key/value prefix length per layer
    c.peft.prefix.projection_dim = 0  # > 0: MLP reparametrisation with this hidden width
    c.peft.prompt = ConfigDict()
    c.peft.prompt.num_virtual_tokens = 20  # learned virtual tokens before every sequence
    c.peft.prompt.init = "random"  # random | vocab | text
    c.peft.prompt.init_text = ""  # text whose token embeddings initialise the prompt (init = text)

    c.optim = ConfigDict()
    c.optim.name = "adamw"  # adamw | sgd | adafactor
    c.optim.learning_rate = 2e-5  # peak learning rate
    c.optim.schedule = "cosine"  # cosine | linear | constant, after the warmup
    c.optim.warmup_fraction = 0.05  # linear warmup as a share of all steps
    c.optim.min_lr_ratio = 0.0  # final learning rate / peak (cosine, linear)
    c.optim.weight_decay = 0.0  # decoupled weight decay, applied to matrices only
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.momentum = 0.9  # SGD momentum
    c.optim.clip_norm = 1.0  # global gradient norm clip (0 = off)
    # Adam first moment / SGD momentum: float32 | bfloat16 | "" (= param dtype; = nu_dtype if that is set)
    c.optim.mu_dtype = "float32"
    c.optim.nu_dtype = "float32"  # Adam second moment: float32 | bfloat16 (can stall at b2=0.999) | ""
    # bf16/f16 params only: none (round to nearest: updates under half a bf16 step are lost) |
    # kahan (+2 bytes/param compensation buffer) | stochastic (bf16; seeded by train.seed)
    c.optim.bf16_update = "none"

    c.eval = ConfigDict()
    c.eval.metrics = ("bleu", "chrf", "rouge", "exact_match")  # generation metrics on validation records
    c.eval.num_examples = 64  # validation records scored by generation (0 = none)
    c.eval.max_new_tokens = 64  # tokens generated per example
    c.eval.batch_size = 16  # prompts per generation batch
    # per-slice report (jft.objectives.sft.slice_report; SFT and distill): every validation record
    # scored on its own, loss/perplexity/generation metrics per prompt-length, training-frequency
    # and record-field slice with 95% intervals, into workdir/slices.json. Off by default: it adds
    # an unpacked forward pass over the validation records and the bootstrap
    c.eval.slices = False
    c.eval.slice_by = ()  # record fields whose values are slices too, e.g. ("topic",)
    c.eval.length_edges = ()  # prompt-length bucket edges in tokens, e.g. (16, 32); () = the quartiles
    c.eval.bootstrap_resamples = 1000  # resamples of the percentile bootstrap and the paired comparison
    c.eval.seed = 0  # seed of the bootstrap resamples

    c.reward = ConfigDict()  # task = "reward"
    # weight of (r_chosen + r_rejected)^2, which centres the rewards on 0 (trl's center_rewards_coefficient)
    c.reward.center_coef = 0.0

    c.dpo = ConfigDict()  # task = "dpo" (jft.objectives.preference_losses)
    # sigmoid (DPO) | ipo | hinge | robust | sigmoid_norm (length-normalised DPO) | simpo | orpo
    c.dpo.loss = "sigmoid"
    c.dpo.beta = 0.1  # strength of the pull towards the reference (simpo: the reward scale)
    c.dpo.label_smoothing = 0.0  # assumed share of flipped labels (sigmoid: conservative DPO; robust)
    c.dpo.gamma = 0.5  # simpo's target reward margin (gamma / beta ratio, as trl's simpo_gamma)
    c.dpo.orpo_lambda = 0.1  # orpo: weight of the odds-ratio term beside the chosen NLL
    # compute the reference's log-probs once before training (workdir/reference_logps.npz) and keep no reference
    c.dpo.precompute_reference = False

    c.rl = ConfigDict()  # sampling and rewards of the RL objectives (task = "grpo" | "ppo"); names as trl's
    c.rl.max_completion_length = 64  # new tokens per completion (data.seq_len bounds the prompt)
    c.rl.temperature = 1.0  # sampling temperature, also applied to the log-probs the loss reads
    c.rl.top_k = 0  # sample from the k most likely tokens (0 = all)
    c.rl.top_p = 1.0  # nucleus sampling mass (1 = all)
    c.rl.reward_funcs = ()  # "module:function" names, fn(prompts, completions, **columns) -> list[float]
    c.rl.reward_weights = ()  # one weight per reward (functions, then the model); () = all 1
    c.rl.reward_model = ""  # a sequence-classification model folder whose score is a reward ("" = none)
    c.rl.missing_eos_penalty = 0.0  # subtracted from the reward of a completion that never ends
    c.rl.mask_truncated_completions = False  # completions that never end do not train
    c.rl.log_completions = 2  # sampled completions printed with their rewards at each validation

    c.grpo = ConfigDict()  # task = "grpo" (jft.objectives.grpo); names as trl's GRPOConfig
    c.grpo.num_generations = 4  # completions sampled per prompt (a group); train.batch_size counts prompts
    c.grpo.beta = 0.0  # weight of the k3 KL to the reference in the loss; 0 = no reference at all
    c.grpo.epsilon = 0.2  # clip range below 1 of the importance ratio
    c.grpo.epsilon_high = 0.0  # clip range above 1 (DAPO's clip-higher); 0 = epsilon
    # loss aggregation over tokens (jft.objectives.policy_gradient.aggregate): grpo | bnpo | dr_grpo | dapo
    c.grpo.loss_type = "dapo"
    c.grpo.scale_rewards = "group"  # advantages divided by the std of: group | batch | none (Dr. GRPO)
    c.grpo.importance_sampling_level = "token"  # token | sequence (GSPO)
    c.grpo.num_iterations = 1  # updates per batch of completions (trl's mu); > 1 reuses them off-policy

    c.ppo = ConfigDict()  # task = "ppo" (jft.objectives.ppo); names as trl's PPOConfig
    c.ppo.num_ppo_epochs = 4  # passes over each rollout
    c.ppo.num_mini_batches = 1  # minibatches per pass (each one optimizer update)
    c.ppo.cliprange = 0.2  # clip range of the policy's importance ratio
    c.ppo.cliprange_value = 0.2  # clip range of the value update around the rollout's values
    c.ppo.dual_clip = 0.0  # > 1: dual-clip PPO's bound on the loss of negative advantages (0 = off)
    c.ppo.vf_coef = 0.1  # weight of the value loss
    c.ppo.gamma = 1.0  # discount of GAE
    c.ppo.lam = 0.95  # lambda of GAE
    c.ppo.kl_coef = 0.05  # weight of the per-token KL penalty in the reward (the start, if adaptive); 0 = no reference
    c.ppo.kl_estimator = "k1"  # k1 | k2 | k3 (jft.objectives.policy_gradient.kl_penalty)
    c.ppo.kl_target = 0.0  # > 0: adapt kl_coef towards this KL per completion (Ziegler et al.); 0 = fixed
    c.ppo.kl_horizon = 10000.0  # the adaptive controller's horizon, in completions
    c.ppo.whiten_rewards = False  # whiten the per-token rewards (scale only) before GAE
    # the values: "" = a value head on the policy trunk; "reward_model" = a separate critic started
    # from rl.reward_model (trl's default); or any sequence-classification folder (num_labels = 1)
    c.ppo.value_model = ""

    c.distill = ConfigDict()  # a teacher's outputs train the student: jft distill and task = "distill"
    c.distill.teacher = ""  # the teacher: a model folder or hub id jft loads (same vocabulary for task = "distill")
    c.distill.teacher_adapter = ""  # an adapter folder (jft's or peft's) applied to the teacher; "" = none
    c.distill.teacher_quant = ""  # "" | nf4 | int4: hold the teacher's base weights in 4 bits
    # jft distill (sequence level): the teacher answers prompts, the answers become SFT data
    c.distill.prompts = ""  # prompt records (instruction, chat or {"prompt"}); "" = data.train
    c.distill.num_samples = 1  # responses generated per prompt
    c.distill.max_new_tokens = 128  # tokens per response at most
    c.distill.sample_temperature = 0.0  # sampling temperature of the teacher (and GKD's student); 0 = greedy
    c.distill.sample_top_k = 0  # sample from the k most likely tokens (0 = all)
    c.distill.sample_top_p = 1.0  # nucleus sampling mass (1 = all)
    c.distill.generate_batch_size = 8  # prompts per generation batch
    c.distill.drop_empty = True  # drop responses with no text
    c.distill.drop_truncated = True  # drop responses that never reached EOS (cut at max_new_tokens)
    c.distill.drop_duplicates = True  # drop a response identical to an earlier one for the same prompt
    # task = "distill" (logit level, shared vocabulary): the loss per trained token is
    # alpha * JSD_beta(teacher || student at temperature) + (1 - alpha) * cross entropy on the data
    c.distill.alpha = 0.5  # weight of the divergence; 1 = divergence only (trl's GKD), 0 = plain SFT
    c.distill.beta = 0.5  # generalised JSD: 0 = forward KL(teacher || student), 1 = reverse KL, 0.5 = JSD
    c.distill.temperature = 1.0  # both distributions are softened by this temperature in the divergence
    c.distill.teacher_top_k = 0  # > 0: the teacher's distribution renormalised over its k most likely tokens
    c.distill.lmbda = 0.0  # share of batches replaced by the student's own samples scored by the teacher (GKD)

    c.export = ConfigDict()
    c.export.hf = True  # write the fine-tuned model as a Hugging Face folder into workdir/hf
    c.export.dtype = ""  # dtype of the exported weights; "" = the params' dtype
    # With PEFT, the adapter is always written to workdir/adapter (peft's format where one
    # exists); export.hf then writes the merged model when every method folds into the weights.
    return c


def load_callable(name: str, what: str) -> Callable:
    """The function a ``"module:function"`` name points at; ``what`` names it in errors
    (e.g. "reward function")."""
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"{what} {name!r} is not 'module:function' (e.g. 'jft.rewards:chrf')")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{what} {name!r} cannot be loaded: {e}") from e
    if not callable(fn):
        raise ConfigError(f"{what} {name!r} is a {type(fn).__name__}, not a function")
    return fn


def load_config(path: str | Path, overrides: list[str] = ()) -> ConfigDict:
    """Import ``get_config()`` from a Python file, check it against the schema, apply overrides."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: no such config file")
    spec = importlib.util.spec_from_file_location(f"jft_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{file}: defines no get_config()")
    cfg = module.get_config()
    check(cfg, str(file), values=False)
    for item in overrides:
        override(cfg, item)
    _check_precision(cfg, str(file))  # after the overrides: they may fix what the file sets
    _check_vocabulary(cfg, str(file))
    return cfg


def check(cfg: ConfigDict, where: str = "config", values: bool = True) -> None:
    """Raise :class:`ConfigError` when ``cfg`` has keys the schema lacks (or lacks some), or, with
    ``values``, dtype settings that are unknown or impossible (warnings for wasteful ones) and bad
    vocabulary settings (``tokenizer.add_tokens``, ``learn_tokens``, ``train_rows``)."""
    ours, schema = _keys(cfg), _keys(default_config())
    unknown, missing = sorted(ours - schema), sorted(schema - ours)
    if unknown:
        raise ConfigError(f"{where}: {_unknown(unknown, schema)}")
    if missing:
        raise ConfigError(f"{where}: missing config keys {missing}; start from jft.config.default_config()")
    if values:
        _check_precision(cfg, where)
        _check_vocabulary(cfg, where)
    cfg.lock()


FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def _check_precision(cfg: ConfigDict, where: str) -> None:
    """Refuse unknown or impossible dtype settings; warn about ones that lose updates or do nothing."""
    m, o = cfg.model, cfg.optim
    choices = {
        "model.dtype": (m.dtype, FLOAT_DTYPES),
        "model.compute_dtype": (m.compute_dtype, ("auto", "", *FLOAT_DTYPES)),
        "optim.mu_dtype": (o.mu_dtype, ("", "float32", "bfloat16")),
        "optim.nu_dtype": (o.nu_dtype, ("", "float32", "bfloat16")),
        "optim.bf16_update": (o.bf16_update, ("none", "kahan", "stochastic")),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{where}: {key}={value!r}; choose one of {valid}")
    if o.bf16_update != "none" and m.dtype == "float32":  # a warning: overriding model.dtype alone stays easy
        warnings.warn(
            f"{where}: optim.bf16_update={o.bf16_update!r} has no effect with model.dtype='float32' (float32 "
            "params lose no updates); set model.dtype='bfloat16' to save memory, or bf16_update='none'",
            stacklevel=3,
        )
    if o.bf16_update == "stochastic" and m.dtype != "bfloat16":
        raise ConfigError(f"{where}: optim.bf16_update='stochastic' needs model.dtype='bfloat16'; use 'kahan'")
    if o.bf16_update == "none" and m.dtype != "float32":
        warnings.warn(
            f"{where}: model.dtype={m.dtype!r} with optim.bf16_update='none': updates smaller than half the "
            "params' spacing (bf16: ~1e-4 at 0.02) are lost; use model.dtype='float32' (with "
            "compute_dtype='bfloat16') or optim.bf16_update='kahan'",
            stacklevel=3,
        )


def _check_vocabulary(cfg: ConfigDict, where: str) -> None:
    """Refuse tokens that are no non-empty strings, a negative learn_tokens, an unknown train_rows,
    and a vocabulary to extend with no pretrained model to extend."""
    t = cfg.tokenizer
    if t.train_rows not in TRAIN_ROWS:
        raise ConfigError(f"{where}: tokenizer.train_rows={t.train_rows!r}; choose one of {TRAIN_ROWS}")
    for i, token in enumerate(t.add_tokens):
        if not isinstance(token, str) or not token.strip():
            raise ConfigError(
                f"{where}: tokenizer.add_tokens[{i}] is {token!r}; each token is a non-empty string, "
                "e.g. tokenizer.add_tokens=('mRNA', 'CRISPR')"
            )
        if token in t.add_tokens[:i]:
            raise ConfigError(f"{where}: tokenizer.add_tokens lists {token!r} twice; list each token once")
    if t.learn_tokens < 0:
        raise ConfigError(f"{where}: tokenizer.learn_tokens={t.learn_tokens}; use 0 (none) or a positive count")
    if (t.add_tokens or t.learn_tokens) and (not cfg.model.path or t.train_on_data):
        raise ConfigError(
            f"{where}: tokenizer.add_tokens / learn_tokens extend the vocabulary of a pretrained model and its "
            "tokenizer, so they need model.path and tokenizer.train_on_data=False; a new model takes its whole "
            "vocabulary from its tokenizer (tokenizer.path, or train_on_data)"
        )


def resolve_compute_dtype(cfg: ConfigDict) -> str:
    """``model.compute_dtype`` as a dtype name: "auto" = bfloat16 when the default backend is a
    GPU or TPU and float32 on CPU; "" = ``model.dtype``."""
    dtype = cfg.model.compute_dtype
    if dtype == "auto":
        import jax

        return "bfloat16" if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else "float32"
    return dtype or cfg.model.dtype


def _unknown(keys: list[str], valid: set[str]) -> str:
    """The error text for unknown keys: each with the likeliest valid key, then all of them."""
    hints = []
    for key in keys:
        section, _, leaf = key.rpartition(".")
        same_leaf = [k for k in valid if k.rpartition(".")[2] == leaf]  # right name, wrong section
        initials = [  # an abbreviation: optim.lr -> optim.learning_rate
            k
            for k in valid
            if k.rpartition(".")[0] == section and "".join(w[0] for w in k.rpartition(".")[2].split("_")) == leaf
        ]
        close = sorted(same_leaf) or sorted(initials) or difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.8)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    label = "unknown config key" if len(keys) == 1 else "unknown config keys"
    return f"{label} {', '.join(hints)}; valid keys: {sorted(valid)}"


def override(cfg: ConfigDict, item: str) -> None:
    """Apply one ``a.b=value`` override (value parsed as a Python literal unless the field is a string)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.learning_rate=3e-4")
    key, raw = item.split("=", 1)
    key = key.removeprefix("--").removeprefix("config.")
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        if part not in node or not isinstance(node[part], ConfigDict):
            raise ConfigError(_unknown([key], _keys(cfg)))
        node = node[part]
    if leaf not in node or isinstance(node[leaf], ConfigDict):
        raise ConfigError(_unknown([key], _keys(cfg)))
    old = node[leaf]
    if isinstance(old, str):
        value = raw
    else:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"{key}={raw!r}: not a Python literal of type {type(old).__name__}") from e
    if isinstance(old, bool) != isinstance(value, bool) or (
        isinstance(old, (tuple, list)) and not isinstance(value, (tuple, list))
    ):
        raise ConfigError(f"{key}={raw!r}: expected {type(old).__name__}")
    try:
        node[leaf] = value
    except TypeError as e:
        raise ConfigError(f"{key}={raw!r}: expected {type(old).__name__} ({e})") from e


def to_json(cfg: ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, default=list)


def _keys(cfg: ConfigDict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        out |= _keys(value, f"{name}.") if isinstance(value, ConfigDict) else {name}
    return out
