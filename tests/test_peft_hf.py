"""jft adapters <-> Hugging Face peft folders: same logits both ways, same trainable counts, clear errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft as hf_peft
import pytest
import torch

import jft
from jft import partition, tree
from jft import peft as jpeft

VARIANT = "llama_gqa"  # 4 query heads, 2 key/value heads: prefix tuning's GQA layout
N_VIRTUAL = 3
CAUSAL = "CAUSAL_LM"
IDS = np.random.RandomState(0).randint(3, 128, (2, 7))

# name -> (jft spec, peft config factory)
CASES = {
    "lora": (
        jpeft.Peft(lora=jpeft.Lora(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj", "lm_head"))),
        lambda: hf_peft.LoraConfig(
            task_type=CAUSAL, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]
        ),
    ),
    "rslora": (
        jpeft.Peft(
            lora=jpeft.Lora(
                r=4, alpha=8, rslora=True, rank_pattern=(("q_proj", 2),), alpha_pattern=(("down_proj", 3.0),)
            )
        ),
        lambda: hf_peft.LoraConfig(
            task_type=CAUSAL,
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules="all-linear",
            rank_pattern={"q_proj": 2},
            alpha_pattern={"down_proj": 3},
        ),
    ),
    "dora": (
        jpeft.Peft(lora=jpeft.Lora(r=4, alpha=8, dora=True, targets=("q_proj", "k_proj", "o_proj", "up_proj"))),
        lambda: hf_peft.LoraConfig(
            task_type=CAUSAL, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]
        ),
    ),
    "ia3": (
        jpeft.Peft(ia3=jpeft.IA3()),
        lambda: hf_peft.IA3Config(
            task_type=CAUSAL, target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
    ),
    "prefix": (
        jpeft.Peft(prefix=jpeft.Prefix(N_VIRTUAL)),
        lambda: hf_peft.PrefixTuningConfig(task_type=CAUSAL, num_virtual_tokens=N_VIRTUAL),
    ),
    "prefix_projection": (
        jpeft.Peft(prefix=jpeft.Prefix(N_VIRTUAL, projection_dim=16)),
        lambda: hf_peft.PrefixTuningConfig(
            task_type=CAUSAL, num_virtual_tokens=N_VIRTUAL, prefix_projection=True, encoder_hidden_size=16
        ),
    ),
    "prompt": (
        jpeft.Peft(prompt=jpeft.Prompt(N_VIRTUAL)),
        lambda: hf_peft.PromptTuningConfig(task_type=CAUSAL, num_virtual_tokens=N_VIRTUAL),
    ),
}


@pytest.fixture(scope="module")
def base(hf_model_dir):
    folder = hf_model_dir(VARIANT)
    model, params = jft.load_hf(folder, dtype="float32", remat="none")
    return folder, model, params


def hf_base(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def jft_logits(model, params):
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(IDS)))


def peft_logits(peft_model, spec):
    with torch.no_grad():
        logits = peft_model(input_ids=torch.tensor(IDS)).logits.float().numpy()
    return logits[:, spec.prompt_tokens :]  # prompt tuning returns the virtual positions too


def perturbed(params, spec, seed=1):
    """The adapter leaves moved off their (often no-op) initial values."""
    adapter = jpeft.adapter_of(params, spec)
    rng = np.random.RandomState(seed)
    out = partition.join(params, {})
    for path, leaf in tree.walk(adapter):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        scale = 0.3 if path[-1] in ("ia3", "lora_magnitude") else 0.1
        value = leaf * (1 + scale * noise) if path[-1] in ("ia3", "lora_magnitude") else leaf + scale * noise
        tree.set_path(out, path, jnp.asarray(value, leaf.dtype))
    return out


def n_params(params):
    return sum(int(np.prod(np.shape(x))) for _, x in tree.walk(params))


def check_jft_to_peft(folder, model, params, spec, out, label):
    """inject + perturb in jft, save_adapter, peft.PeftModel.from_pretrained: same logits."""
    pmodel, pparams = jpeft.inject(model, params, spec, jax.random.key(0))
    pparams = perturbed(pparams, pmodel.peft)
    ours = jft_logits(pmodel, pparams)
    plain = peft_logits(hf_base(folder), jpeft.Peft())
    assert np.abs(ours - plain).max() > 1e-2, "the perturbed adapter should change the logits"

    jpeft.save_adapter(pmodel, pparams, out)
    theirs = peft_logits(hf_peft.PeftModel.from_pretrained(hf_base(folder), out).eval(), spec)
    diff = np.abs(ours - theirs).max()
    print(f"{label}: jft -> peft max |logit diff| = {diff:.2e}")
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    return ours


@pytest.mark.parametrize("case", list(CASES))
def test_jft_to_peft(base, case, tmp_path):
    folder, model, params = base
    spec = CASES[case][0]
    ours = check_jft_to_peft(folder, model, params, spec, tmp_path / "adapter", case)

    # And back: our own folder loads into the same leaves (a projection MLP comes back folded).
    lmodel, lparams = jpeft.load_adapter(model, params, tmp_path / "adapter")
    np.testing.assert_allclose(jft_logits(lmodel, lparams), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["dora", "ia3"])
def test_jft_to_peft_with_biases(hf_model_dir, case, tmp_path):
    """DoRA leaves the bias out of the column norm and IA3 scales it, as peft does."""
    folder = hf_model_dir("llama_mha_bias")
    model, params = jft.load_hf(folder, dtype="float32", remat="none")
    spec = jpeft.Peft(lora=jpeft.Lora(r=4, dora=True, targets="all-linear")) if case == "dora" else CASES["ia3"][0]
    check_jft_to_peft(folder, model, params, spec, tmp_path / "adapter", f"{case} (biases)")


@pytest.mark.parametrize("case", list(CASES))
def test_peft_to_jft(base, case, tmp_path):
    folder, model, params = base
    _, make_config = CASES[case]
    torch.manual_seed(0)
    pm = hf_peft.get_peft_model(hf_base(folder), make_config())
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                scale = 0.3 if "magnitude" in name or "ia3" in name else 0.1
                p.mul_(1 + scale * torch.randn_like(p)) if scale == 0.3 else p.add_(scale * torch.randn_like(p))
    pm.eval()
    pm.save_pretrained(tmp_path / "adapter")
    lmodel, lparams = jpeft.load_adapter(model, params, tmp_path / "adapter")
    theirs = peft_logits(pm, lmodel.peft)
    ours = jft_logits(lmodel, lparams)
    assert np.abs(ours - jft_logits(model, params)).max() > 1e-2, "the perturbed adapter should change the logits"
    diff = np.abs(ours - theirs).max()
    print(f"{case}: peft -> jft max |logit diff| = {diff:.2e}")
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["lora", "rslora", "dora", "ia3", "prefix", "prefix_projection", "prompt"])
def test_trainable_counts_match_peft(base, case):
    folder, model, params = base
    spec, make_config = CASES[case]
    pmodel = jpeft.build(model, spec)
    shapes = pmodel.param_shapes()
    ours = n_params(jpeft.adapter_of(shapes, pmodel.peft))
    theirs, _ = hf_peft.get_peft_model(hf_base(folder), make_config()).get_nb_trainable_parameters()
    assert ours == theirs


# ---------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def lora_dir(base, tmp_path_factory):
    """A LoRA adapter on q_proj and v_proj saved by save_adapter (no peft involved)."""
    _, model, params = base
    spec = jpeft.Peft(lora=jpeft.Lora(r=2, targets=("q_proj", "v_proj")))
    pmodel, pparams = jpeft.inject(model, params, spec, jax.random.key(0))
    return jpeft.save_adapter(pmodel, pparams, tmp_path_factory.mktemp("lora") / "adapter")


def edited(src, tmp_path, config=None, tensors=None):
    from safetensors.numpy import load_file, save_file

    out = tmp_path / "edited"
    shutil.copytree(src, out)
    if config is not None:
        conf = json.loads((out / "adapter_config.json").read_text())
        config(conf)
        (out / "adapter_config.json").write_text(json.dumps(conf))
    if tensors is not None:
        stored = load_file(out / "adapter_model.safetensors")
        tensors(stored)
        save_file(stored, out / "adapter_model.safetensors")
    return out


KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"


def test_saved_config_and_keys(lora_dir):
    from safetensors import safe_open

    conf = json.loads((lora_dir / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM"
    assert conf["target_modules"] == ["q_proj", "v_proj"] and conf["r"] == 2 and conf["lora_alpha"] == 16
    with safe_open(lora_dir / "adapter_model.safetensors", "numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor(KEY).shape == (2, 64)
        assert f.get_tensor(KEY.replace("lora_A", "lora_B")).shape == (32, 2)
        assert len(list(f.keys())) == 2 * 2 * 2


def test_wrong_shape(base, lora_dir, tmp_path):
    _, model, params = base
    bad = edited(lora_dir, tmp_path, tensors=lambda t: t.update({KEY: np.zeros((3, 64), np.float32)}))
    with pytest.raises(jft.CheckpointError, match=r"v_proj\.lora_A\.weight.*\(3, 64\).*\(2, 64\)"):
        jpeft.load_adapter(model, params, bad)


def test_rank_pattern_disagreeing_with_tensors(base, lora_dir, tmp_path):
    _, model, params = base
    bad = edited(lora_dir, tmp_path, config=lambda c: c.update(rank_pattern={"v_proj": 4}))
    with pytest.raises(jft.CheckpointError, match=r"v_proj\.lora_A\.weight.*\(2, 64\).*\(4, 64\)"):
        jpeft.load_adapter(model, params, bad)


def test_target_module_that_does_not_exist(base, lora_dir, tmp_path):
    _, model, params = base
    bad = edited(lora_dir, tmp_path, config=lambda c: c.update(target_modules=["q_proj", "c_attn"]))
    with pytest.raises(jft.CheckpointError, match=r"no module named \['c_attn'\]"):
        jpeft.load_adapter(model, params, bad)


def test_key_for_no_module_and_missing_key(base, lora_dir, tmp_path):
    _, model, params = base
    extra = KEY.replace("v_proj", "k_proj")
    bad = edited(lora_dir, tmp_path, tensors=lambda t: t.update({extra: np.zeros((2, 64), np.float32)}))
    with pytest.raises(jft.CheckpointError, match=r"k_proj\.lora_A\.weight.*maps to no adapted module"):
        jpeft.load_adapter(model, params, bad)
    shutil.rmtree(bad)
    bad = edited(lora_dir, tmp_path, tensors=lambda t: t.pop(KEY))
    with pytest.raises(jft.CheckpointError, match=r"missing.*layers\.1\.self_attn\.v_proj\.lora_A"):
        jpeft.load_adapter(model, params, bad)


@pytest.mark.parametrize(
    "option, match",
    [
        ({"lora_bias": True}, "lora_bias"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"target_modules": "model\\.layers\\.0\\.self_attn\\.q_proj"}, r"layers \[0\] only"),
        ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not supported"),
        ({"task_type": "SEQ_CLS"}, "task_type"),
    ],
)
def test_unsupported_options(base, lora_dir, tmp_path, option, match):
    _, model, params = base
    bad = edited(lora_dir, tmp_path, config=lambda c: c.update(option))
    with pytest.raises(jft.CheckpointError, match=match):
        jpeft.load_adapter(model, params, bad)


def test_base_weight_copies(base, lora_dir, tmp_path):
    """peft adds lm_head.base_layer.weight when lm_head is targeted: equal to the base, it is skipped."""
    _, model, params = base
    kernel = np.asarray(params["lm_head"]["kernel"]).T
    copy = "base_model.model.lm_head.base_layer.weight"
    ok = edited(lora_dir, tmp_path, tensors=lambda t: t.update({copy: kernel.copy()}))
    jpeft.load_adapter(model, params, ok)
    shutil.rmtree(ok)
    bad = edited(lora_dir, tmp_path, tensors=lambda t: t.update({copy: kernel + 1.0}))
    with pytest.raises(jft.CheckpointError, match="lm_head.base_layer.weight.*differs from this base model"):
        jpeft.load_adapter(model, params, bad)


def test_pickle_only_and_missing_files(base, lora_dir, tmp_path):
    _, model, params = base
    bad = edited(lora_dir, tmp_path)
    (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    with pytest.raises(jft.CheckpointError, match="adapter_model.bin.*never unpickles"):
        jpeft.load_adapter(model, params, bad)
    (bad / "adapter_model.bin").unlink()
    with pytest.raises(jft.CheckpointError, match="adapter_model.safetensors: missing"):
        jpeft.load_adapter(model, params, bad)
    (bad / "adapter_config.json").unlink()
    with pytest.raises(jft.CheckpointError, match="adapter_config.json: missing"):
        jpeft.load_adapter(model, params, bad)


@pytest.mark.parametrize(
    "spec",
    [
        jpeft.Peft(bitfit=jpeft.BitFit()),
        jpeft.Peft(adapter=jpeft.Adapter(phm_dim=4)),
        jpeft.Peft(lora=jpeft.Lora(r=2), prompt=jpeft.Prompt(2)),
        jpeft.Peft(lora=jpeft.Lora(r=2, targets=("q_proj",)), train=(("lm_head/.*", "trainable"),)),
    ],
    ids=["bitfit", "compacter", "lora+prompt", "lora+lm_head"],
)
def test_adapters_without_a_peft_format_round_trip_in_jfts_format(base, tmp_path, spec):
    _, model, params = base
    pmodel, pparams = jpeft.inject(model, params, spec, jax.random.key(0))
    pparams = jax.tree.map(lambda x: x + 0.01, pparams)  # every leaf moves; the adapter's must come back
    out = jpeft.save_adapter(pmodel, pparams, tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "jft_adapter.json"]
    loaded_model, loaded = jpeft.load_adapter(model, params, out)
    assert loaded_model.peft == pmodel.peft
    ids = jnp.arange(12).reshape(2, 6) % model.config.vocab_size
    expect = pmodel.apply(
        {"params": jpeft.attach(model, params, pmodel.peft, jpeft.adapter_of(pparams, pmodel.peft))[1]}, ids
    )
    np.testing.assert_allclose(loaded_model.apply({"params": loaded}, ids), expect, atol=1e-6)


# ---------------------------------------------------------------------------- Mixtral experts

EXPERTS = {  # jft specs on a Mixtral: experts w1 (gate), w3 (up), w2 (down)
    "experts": jpeft.Peft(
        lora=jpeft.Lora(r=2, alpha=4, rslora=True, targets=("q_proj", "w1", "w2", "w3"), rank_pattern=(("w3", 3),))
    ),
    "experts_down": jpeft.Peft(lora=jpeft.Lora(r=2, alpha=4, targets=("w2",))),
}


@pytest.fixture(scope="module")
def mixtral(hf_model_dir):
    folder = hf_model_dir("mixtral")
    model, params = jft.load_hf(folder, dtype="float32", remat="none")
    return folder, model, params


@pytest.mark.parametrize("case", list(EXPERTS))
def test_expert_lora_jft_to_peft_and_back(mixtral, case, tmp_path):
    """LoRA on the stacked experts is peft's LoRA on the fused expert tensors (target_parameters):
    peft computes jft's logits, and jft reads the folder back to the same logits."""
    folder, model, params = mixtral
    ours = check_jft_to_peft(folder, model, params, EXPERTS[case], tmp_path / "adapter", case)
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(conf["target_parameters"]) <= {"gate_up_proj", "down_proj"}
    lmodel, lparams = jpeft.load_adapter(model, params, tmp_path / "adapter")
    np.testing.assert_allclose(jft_logits(lmodel, lparams), ours, atol=1e-4, rtol=0)
    # saved again, the shared A of gate_up is written as peft wrote it (no growing rank)
    jpeft.save_adapter(lmodel, lparams, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["rank_pattern"].get("gate_up_proj") == conf["rank_pattern"].get("gate_up_proj")


def test_expert_lora_peft_to_jft(mixtral, tmp_path):
    folder, model, params = mixtral
    config = hf_peft.LoraConfig(
        task_type=CAUSAL,
        r=2,
        lora_alpha=4,
        target_modules=["k_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        rank_pattern={"down_proj": 3},
    )
    torch.manual_seed(0)
    pm = hf_peft.get_peft_model(hf_base(folder), config)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    pm.eval()
    pm.save_pretrained(tmp_path / "adapter")
    lmodel, lparams = jpeft.load_adapter(model, params, tmp_path / "adapter")
    assert lmodel.peft.linear("block_sparse_moe.experts.w2").r == 3
    ours = jft_logits(lmodel, lparams)
    assert np.abs(ours - jft_logits(model, params)).max() > 1e-2, "the perturbed adapter should change the logits"
    np.testing.assert_allclose(ours, peft_logits(pm, lmodel.peft), atol=1e-4, rtol=0)
