"""Tiny random Hugging Face models, built locally with transformers + torch (no network).

Every test process (xdist workers and the subprocesses tests start inherit the environment)
shares one persistent JAX compilation cache: tests compile the same tiny train steps again and
again, and on CPU compiling is most of their time. Set JAX_COMPILATION_CACHE_DIR to choose it.
"""

import os
import tempfile

import pytest

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jft-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # small programs too: there are many

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (model_type, config overrides): one entry per feature the decoder must reproduce.
VARIANTS = {
    "llama_gqa": ("llama", {}),
    "llama_mha_bias": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "llama3_rope": (
        "llama",
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "llama_linear_rope": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=24)),
    "mistral_window": ("mistral", dict(sliding_window=5, head_dim=16)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def build_hf_model(model_type: str, path, **overrides):
    """Save a random model of ``model_type`` to ``path``; norms and biases randomised too."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**BASE, **overrides})
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """``hf_model_dir(variant) -> folder`` of a saved tiny model, built once per session."""
    built = {}

    def make(variant: str):
        if variant not in built:
            model_type, overrides = VARIANTS[variant]
            built[variant] = tmp_path_factory.mktemp(variant)
            build_hf_model(model_type, built[variant], **overrides)
        return built[variant]

    return make


@pytest.fixture(scope="session")
def hf_base(hf_model_dir, tmp_path_factory):
    """A tiny HF Llama folder with a tokenizer, and a small text data file."""
    import json
    import shutil

    from test_hf import tiny_tokenizer

    import jft

    folder = tmp_path_factory.mktemp("peft_base")
    shutil.copytree(hf_model_dir("llama_gqa"), folder, dirs_exist_ok=True)
    model, params = jft.load_hf(folder)
    jft.save_hf(model, params, folder, tokenizer=tiny_tokenizer())
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"text": "hello world " * (i % 5 + 1)}) + "\n" for i in range(40)))
    return folder, data


@pytest.fixture
def preempt_and_resume(monkeypatch):
    """``run(make_config, workdir, step) -> (first, resumed)``: ``fit`` on ``make_config()`` gets a
    SIGTERM during step ``step`` (it checkpoints and stops, as on a pod's preemption), then the
    same config runs again in the same workdir; the two reports."""
    import os
    import signal

    import jft.train.trainer as trainer
    from jft.train import fit

    def run(make_config, workdir, step):
        flush = trainer._flush

        def preempt(pending, *args):
            if pending[-1][0] == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return flush(pending, *args)

        monkeypatch.setattr(trainer, "_flush", preempt)
        first = fit(make_config(), workdir)
        monkeypatch.setattr(trainer, "_flush", flush)
        return first, fit(make_config(), workdir)

    return run
