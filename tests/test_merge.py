"""Model merging: side by side with mergekit on the same YAML, closed-form checks per method,
layer stacking, merged folders loading in transformers, errors."""

import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from conftest import build_hf_model
from safetensors.numpy import load_file, save_file

import jft
from jft import merge
from jft.cli import main as cli


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 4-layer base and three 'fine-tuned' variants (base + noise), as HF folders."""
    root = tmp_path_factory.mktemp("merge_models")
    build_hf_model("llama", root / "base", num_hidden_layers=4)
    base = load_file(root / "base" / "model.safetensors")
    rs = np.random.RandomState(1)
    for k in range(3):
        shutil.copytree(root / "base", root / f"m{k}")
        tuned = {n: (x + 0.05 * rs.randn(*x.shape)).astype(x.dtype) for n, x in base.items()}
        save_file(tuned, str(root / f"m{k}" / "model.safetensors"), metadata={"format": "pt"})
    return {name: str(root / name) for name in ("base", "m0", "m1", "m2")}


def cases(m):
    def each(params, n=3):
        return [dict(model=m[f"m{k}"], parameters=params(k)) for k in range(n)]

    gradient = [dict(filter="self_attn", value=0.3), dict(value=[0.1, 1.0])]  # filtered, then per-layer
    return {
        "linear": dict(models=each(lambda k: dict(weight=[0.3, [0.2, 0.9], 1.0][k]))),
        "task_arithmetic": dict(
            base_model=m["base"], models=each(lambda k: dict(weight=0.5 + 0.2 * k)), parameters={"lambda": 0.8}
        ),
        "ties": dict(base_model=m["base"], models=each(lambda k: dict(weight=[0.2, 1.0, 0.6][k], density=0.5))),
        "ties_gradients_filters": dict(
            base_model=m["base"],
            models=each(lambda k: dict(weight=gradient, density=0.4)),
            parameters=dict(normalize=False),
        ),
        # density 1 drops nothing (deterministic); weights summing to 2.6 and 1.8 test the normalize default (off)
        "dare_linear": dict(base_model=m["base"], models=each(lambda k: dict(weight=[0.3, 0.9, 1.4][k], density=1.0))),
        "dare_ties": dict(base_model=m["base"], models=each(lambda k: dict(weight=[0.2, 1.0, 0.6][k]))),
        "breadcrumbs": dict(base_model=m["base"], models=each(lambda k: dict(weight=0.5, density=0.6, gamma=0.05), 2)),
        "breadcrumbs_ties": dict(
            base_model=m["base"], models=each(lambda k: dict(weight=0.5, density=0.6, gamma=0.05))
        ),
        "slerp": dict(
            base_model=m["base"],
            models=[dict(model=m["base"]), dict(model=m["m0"])],
            parameters=dict(t=[dict(filter="mlp", value=[0, 0.5, 1]), dict(value=0.3)]),
        ),
        "model_stock": dict(base_model=m["base"], models=each(lambda k: {})),
        # density 1 prunes nothing, so della is deterministic: TIES consensus and normalising on full task vectors
        "della_dense": dict(base_model=m["base"], models=each(lambda k: dict(weight=[0.2, 1.0, 0.6][k], density=1.0))),
        "nuslerp": dict(base_model=m["base"], models=each(lambda k: dict(weight=[0.3, 0.8][k]), 2)),
        "nuslerp_rows": dict(
            models=each(lambda k: dict(weight=[1.0, [0.2, 0.9]][k]), 2),
            parameters=dict(nuslerp_flatten=False, nuslerp_row_wise=True),
        ),
        "karcher": dict(base_model=m["base"], models=each(lambda k: {}, 2)),  # the base is one of the means
        "sce_topk": dict(base_model=m["base"], models=each(lambda k: {}), parameters=dict(select_topk=0.5)),
        "passthrough": dict(
            slices=[
                dict(sources=[dict(model=m["base"], layer_range=[0, 3])]),
                dict(sources=[dict(model=m["m0"], layer_range=[1, 4])]),
            ]
        ),
        "ties_slices": dict(
            base_model=m["base"],
            slices=[
                dict(
                    sources=[
                        dict(model=m["base"], layer_range=[0, 4]),
                        dict(model=m["m0"], layer_range=[0, 4], parameters=dict(weight=1.0, density=0.5)),
                        dict(model=m["m1"], layer_range=[0, 4], parameters=dict(weight=[1.0, 0.0], density=0.7)),
                    ]
                )
            ],
        ),
    }


CASES = list(cases({k: k for k in ("base", "m0", "m1", "m2")}))


@pytest.mark.parametrize("name", CASES)
def test_every_deterministic_method_matches_mergekit(models, tmp_path, name):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    method = re.sub(r"_(gradients_filters|slices|dense|rows|topk)$", "", name)
    config = dict(merge_method=method, dtype="float32", **cases(models)[name])
    merge.merge_folders(config, tmp_path / "jft")
    options = MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False)
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"), options)
    ours, theirs = (
        load_file(tmp_path / "jft" / "model.safetensors"),
        load_file(tmp_path / "mergekit" / "model.safetensors"),
    )
    assert set(ours) == set(theirs)
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], atol=1e-5, rtol=0, err_msg=key)
    layers = 6 if method == "passthrough" else 4
    assert jft.hf.read_config(tmp_path / "jft").num_hidden_layers == layers


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della_linear"])
def test_dare_and_della_defaults_rescale_to_the_l1_norm_and_do_not_normalize_as_in_mergekit(models, tmp_path, method):
    """Below density 1 the random drops differ between the tools, so both outputs are checked for
    mergekit's law with the defaults (rescale on, to the task vector's L1 norm rather than by
    1 / density; normalize off): out - base = w * (d * mask) * |d|_1 / |d * mask|_1. DELLA keeps an
    entry with probability density -+ epsilon by its magnitude rank in its row: both tools keep the
    smallest and the largest entries at the rates jft's probabilities give."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    weight, density = 0.7, 0.5
    config = dict(
        merge_method=method,
        base_model=models["base"],
        models=[dict(model=models["m0"], parameters=dict(weight=weight, density=density))],
        dtype="float32",
    )
    merge.merge_folders(config, tmp_path / "jft")
    options = MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False, random_seed=0)
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"), options)
    base, tuned = load_file(f"{models['base']}/model.safetensors"), load_file(f"{models['m0']}/model.safetensors")
    for tool in ("jft", "mergekit"):
        out = load_file(tmp_path / tool / "model.safetensors")
        kept, bands = 0, np.zeros((2, 3))  # [smallest, largest] x [kept, entries, summed probability]
        for key, b in base.items():
            d, mixed = tuned[key].astype(np.float64) - b, out[key].astype(np.float64) - b
            mask = mixed != 0
            kept += mask.sum()
            scale = np.abs(d).sum() / np.abs(d[mask]).sum()
            np.testing.assert_allclose(mixed[mask], weight * scale * d[mask], rtol=1e-4, atol=1e-6, err_msg=tool + key)
            if method.startswith("della"):
                p = np.asarray(merge.magprune_probabilities(d.astype(np.float32), density, 0.15))
                for band, sel in enumerate((p < density - 0.1, p > density + 0.1)):
                    bands[band] += mask[sel].sum(), sel.sum(), p[sel].sum()
        assert abs(kept / sum(b.size for b in base.values()) - density) < 0.01, tool
        if method.startswith("della"):
            rate, expected = bands[:, 0] / bands[:, 1], bands[:, 2] / bands[:, 1]  # ~0.39 and ~0.61
            np.testing.assert_allclose(rate, expected, atol=0.02, err_msg=tool)


def test_linear_normalizes_by_the_sum_of_weights():
    x, y = np.array([1.0, 2.0], np.float32), np.array([3.0, -2.0], np.float32)
    np.testing.assert_allclose(merge.linear([x, y], [1.0, 3.0]), [2.5, -1.0])
    np.testing.assert_allclose(merge.linear([x, y], [1.0, 3.0], normalize=False), [10.0, -4.0])


def test_ties_trims_elects_signs_and_averages_the_agreeing_entries():
    base = np.zeros(4, np.float32)
    models = [np.array([3.0, -1.0, 0.5, 2.0], np.float32), np.array([-1.0, -2.0, 4.0, -3.0], np.float32)]
    # density 0.75 keeps the three largest |d| of each: [3, -1, 0, 2] and [0, -2, 4, -3]. Signs
    # elected from the sum [3, -3, 4, -1]: [+, -, +, -]. Agreeing entries, averaged over the
    # weights of the models that agree: [3 / 1, (-1 - 2) / 2, 4 / 1, -3 / 1].
    out = merge.task_arithmetic(
        base, models, [1.0, 1.0], [0.75, 0.75], sparsification="magnitude", consensus="sum", normalize=True
    )
    np.testing.assert_allclose(out, [3.0, -1.5, 4.0, -3.0])
    both = merge.task_arithmetic(
        base, [np.ones(4, np.float32), 3 * np.ones(4, np.float32)], [1.0, 1.0], consensus="sum", normalize=True
    )
    np.testing.assert_allclose(both, [2.0] * 4)  # disjoint mean of agreeing entries


def test_dare_is_unbiased_in_expectation_and_reproducible():
    base = np.zeros(64, np.float32)
    delta = np.random.RandomState(0).randn(64).astype(np.float32)
    draws = [
        merge.task_arithmetic(base, [delta], [1.0], [0.3], sparsification="random", rescale=True, rng=jax.random.key(s))
        for s in range(400)
    ]
    kept = np.mean([np.mean(np.asarray(d) != 0) for d in draws])
    assert abs(kept - 0.3) < 0.02
    np.testing.assert_allclose(np.mean(draws, axis=0), delta, atol=0.35)  # E[rescaled mask * d] ~ d
    assert abs(np.mean(draws) - np.mean(delta)) < 0.02
    np.testing.assert_allclose(np.abs(draws[0]).sum(), np.abs(delta).sum(), rtol=1e-5)  # L1 rescale
    again = merge.task_arithmetic(
        base, [delta], [1.0], [0.3], sparsification="random", rescale=True, rng=jax.random.key(0)
    )
    np.testing.assert_array_equal(again, draws[0])


def test_della_keeps_by_magnitude_rank_in_expectation_rescales_and_is_reproducible():
    delta = np.random.RandomState(0).randn(2, 50).astype(np.float32)
    p = np.asarray(merge.magprune_probabilities(delta, 0.5, 0.2))
    for row, probs in zip(np.abs(delta), p, strict=True):  # 0.3 for the smallest |d| of a row, 0.7 for the largest
        np.testing.assert_allclose(probs[np.argsort(row)], np.linspace(0.3, 0.7, 50), rtol=1e-6)
    draws = [np.asarray(merge.sparsify(delta, 0.5, "magprune", rng=jax.random.key(s), epsilon=0.2)) for s in range(400)]
    np.testing.assert_allclose(np.mean([d != 0 for d in draws], axis=0), p, atol=0.1)  # 4 standard errors
    rescaled = merge.sparsify(delta, 0.5, "magprune", rescale=True, rng=jax.random.key(0), epsilon=0.2)
    np.testing.assert_allclose(np.abs(rescaled).sum(), np.abs(delta).sum(), rtol=1e-5)  # L1 rescale
    np.testing.assert_array_equal(merge.sparsify(delta, 0.5, "magprune", rng=jax.random.key(0), epsilon=0.2), draws[0])
    np.testing.assert_array_equal(merge.sparsify(delta, 1.0, "magprune"), delta)  # density 1: nothing pruned
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        merge.sparsify(delta, 0.9, "magprune", rng=jax.random.key(0), epsilon=0.15)


def test_karcher_mean_of_directions_times_the_mean_norm_and_nuslerp_as_slerp():
    a, b = np.array([1.0, 0.0], np.float32), np.array([0.0, 3.0], np.float32)
    np.testing.assert_allclose(merge.karcher([a, b]), [np.sqrt(2), np.sqrt(2)], rtol=1e-5)  # 45 degrees, norm 2
    np.testing.assert_allclose(merge.karcher([a, 3 * a]), [2.0, 0.0], rtol=1e-6)  # one direction
    np.testing.assert_allclose(merge.karcher([np.zeros(2, np.float32)] * 2), [0.0, 0.0])
    x, y = np.random.RandomState(0).randn(2, 3, 4).astype(np.float32)
    np.testing.assert_allclose(merge.nuslerp(0.3, x, y), merge.slerp(0.3, x, y), rtol=1e-5, atol=1e-6)
    rows = np.asarray(merge.nuslerp(0.3, x, y, flatten=False))
    for i in range(3):  # per row, each row its own angle
        np.testing.assert_allclose(rows[i], merge.slerp(0.3, x[i], y[i]), rtol=1e-5, atol=1e-6)


def test_breadcrumbs_drops_the_largest_and_the_smallest():
    delta = np.arange(1, 11, dtype=np.float32)  # |d| = 1 .. 10
    kept = merge.sparsify(delta, density=0.5, method="magnitude_outliers", gamma=0.2)
    np.testing.assert_array_equal(kept, [0, 0, 0, 4, 5, 6, 7, 8, 0, 0])  # 2 largest and 3 smallest dropped


def test_slerp_endpoints_midpoint_norm_and_colinear_fallback():
    a, b = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    np.testing.assert_allclose(merge.slerp(0.0, a, b), a, atol=1e-6)
    np.testing.assert_allclose(merge.slerp(1.0, a, b), b, atol=1e-6)
    mid = np.asarray(merge.slerp(0.5, a, b))
    np.testing.assert_allclose(np.linalg.norm(mid), 1.0, rtol=1e-6)  # on the arc, not the chord (0.707)
    np.testing.assert_allclose(merge.slerp(0.25, a, 2 * a), 1.25 * a, rtol=1e-6)  # colinear: linear


def test_model_stock_interpolates_by_the_angle_between_task_vectors():
    base = np.zeros(2, np.float32)
    same = merge.model_stock(base, [np.array([1.0, 1.0], np.float32), np.array([1.0, 1.0], np.float32)])
    np.testing.assert_allclose(same, [1.0, 1.0], rtol=1e-6)  # cos 1: the average
    ortho = merge.model_stock(base, [np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)])
    np.testing.assert_allclose(ortho, [0.0, 0.0], atol=1e-7)  # cos 0: the base


def test_merged_folders_load_in_transformers_and_jft(models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    config = dict(merge_method="passthrough", slices=[dict(sources=[dict(model=models["m0"], layer_range=[0, 4])])])
    config["slices"].append(dict(sources=[dict(model=models["m1"], layer_range=[2, 4])]))  # depth up-scaling
    merge.merge_folders(config, tmp_path / "stack")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "stack").float().eval()
    assert hf.config.num_hidden_layers == 6
    model, params = jft.load_hf(tmp_path / "stack")
    ids = np.array([[1, 5, 9, 17, 33, 2]])
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(model.apply({"params": params}, ids), expected, atol=1e-4)


def test_identity_slices_reproduce_the_model(models, tmp_path):
    halves = [dict(sources=[dict(model=models["m2"], layer_range=r)]) for r in ([0, 2], [2, 4])]
    merge.merge_folders(dict(merge_method="passthrough", slices=halves), tmp_path / "same")
    original, stacked = (
        load_file(f"{models['m2']}/model.safetensors"),
        load_file(tmp_path / "same" / "model.safetensors"),
    )
    assert set(original) == set(stacked)
    for key in original:
        np.testing.assert_array_equal(original[key], stacked[key])


def test_merge_params_on_pytrees_equals_the_folder_merge(models, tmp_path):
    weights = [dict(weight=0.7, density=0.5), dict(weight=0.4, density=0.6)]
    config = dict(
        merge_method="ties",
        base_model=models["base"],
        models=[dict(model=models[f"m{k}"], parameters=weights[k]) for k in range(2)],
    )
    merge.merge_folders(config, tmp_path / "ties")
    model, base = jft.load_hf(models["base"])
    trees = [jft.load_hf(models[f"m{k}"])[1] for k in range(2)]
    merged = merge.merge_params("ties", base, trees, per_model=weights)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(jft.load_hf(tmp_path / "ties")[1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_dare_merges_are_seeded(models, tmp_path):
    config = dict(
        merge_method="dare_ties",
        base_model=models["base"],
        models=[dict(model=models[f"m{k}"], parameters=dict(weight=0.5, density=0.5)) for k in range(3)],
    )
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        merge.merge_folders(config, tmp_path / name, seed=seed)
        outs[name] = load_file(tmp_path / name / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    np.testing.assert_array_equal(outs["a"][key], outs["b"][key])
    assert not np.array_equal(outs["a"][key], outs["c"][key])


def test_jft_merge_command_writes_a_sharded_folder_with_the_tokenizer(models, tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    shutil.copytree(models["base"], tmp_path / "base_tok")
    shutil.copy(tmp_path / "tok" / "tokenizer_config.json", tmp_path / "base_tok")
    config = dict(
        merge_method="linear",
        models=[
            dict(model=str(tmp_path / "base_tok"), parameters=dict(weight=1.0)),
            dict(model=models["m0"], parameters=dict(weight=1.0)),
        ],
        dtype="float32",
        out_dtype="bfloat16",
    )
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    assert cli(["merge", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "out"), "--max-shard-size", "40KB"]) == 0
    out = tmp_path / "out"
    assert (out / "tokenizer_config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    model, params = jft.load_hf(out)
    assert model.config.param_dtype == "bfloat16"
    assert cli(["merge", str(tmp_path / "merge.yaml"), "--out", str(out)]) == 2  # never overwrites
    assert "is not empty" in capsys.readouterr().err


def test_bad_configs_fail_with_clear_errors(models, tmp_path):
    good = dict(
        merge_method="ties", base_model=models["base"], models=[dict(model=models["m0"], parameters=dict(weight=1.0))]
    )
    bad = {
        "unknown key(s) ['weights']": {**good, "weights": 1},
        "merge_method 'magic' is not supported": {**good, "merge_method": "magic"},
        "parameter 'weight' is missing for model": {**good, "models": [dict(model=models["m0"])]},
        "give either models or slices": {"merge_method": "linear"},
        "has 4 layers": dict(
            merge_method="passthrough", slices=[dict(sources=[dict(model=models["m0"], layer_range=[2, 6])])]
        ),
        "is not among the sources": dict(
            merge_method="ties",
            base_model=models["base"],
            slices=[dict(sources=[dict(model=models["m0"], layer_range=[0, 4], parameters=dict(weight=1.0))])],
        ),
        "unknown key(s) ['layers']": {**good, "models": [dict(model=models["m0"], layers=2)]},
        "tokenizer_source: union is not supported": {**good, "tokenizer_source": "union"},
        "merge_method della, tensor 'model.embed_tokens.weight': magprune: density 0.9 +- epsilon 0.15": {
            **good,
            "merge_method": "della",
            "models": [dict(model=models["m0"], parameters=dict(weight=1.0, density=0.9))],
        },
        "nuslerp merges exactly two models": {**good, "merge_method": "nuslerp"},
    }
    for expected, config in bad.items():
        with pytest.raises(merge.MergeError, match=re.escape(expected)):
            merge.merge_folders(config, tmp_path / "never")
    shutil.copytree(models["m0"], tmp_path / "holed")  # a tensor missing: found before anything is written
    tensors = load_file(tmp_path / "holed" / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "holed" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(merge.MergeError, match=re.escape("model.layers.2.mlp.up_proj.weight' is missing")):
        merge.merge_folders(
            {**good, "models": [dict(model=str(tmp_path / "holed"), parameters=dict(weight=1.0))]}, tmp_path / "x"
        )
    assert not (tmp_path / "x").exists()
    with open(tmp_path / "holed" / "model.safetensors", "r+b") as f:  # a truncated file: refused up front
        f.truncate(f.seek(0, 2) - 1000)
    with pytest.raises(jft.hf.CheckpointError, match="not a readable safetensors file"):
        merge.merge_folders(
            {**good, "models": [dict(model=str(tmp_path / "holed"), parameters=dict(weight=1.0))]}, tmp_path / "x"
        )
    shutil.copytree(models["m0"], tmp_path / "odd")  # a misshapen tensor in the last layer: found halfway through
    tensors = load_file(tmp_path / "odd" / "model.safetensors")
    tensors["model.layers.3.mlp.up_proj.weight"] = np.ascontiguousarray(tensors["model.layers.3.mlp.up_proj.weight"].T)
    save_file(tensors, str(tmp_path / "odd" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(merge.MergeError, match=re.escape("'model.layers.3.mlp.up_proj.weight': shapes differ")):
        merge.merge_folders(
            {**good, "models": [dict(model=str(tmp_path / "odd"), parameters=dict(weight=1.0))]}, tmp_path / "half"
        )
    assert list((tmp_path / "half").iterdir()) == []  # nothing half-written is left behind
    build_hf_model("llama", tmp_path / "wide", num_hidden_layers=4, hidden_size=32)
    with pytest.raises(merge.MergeError, match="differs from .* in \\['hidden_size'\\]"):
        merge.merge_folders(
            {**good, "models": [dict(model=str(tmp_path / "wide"), parameters=dict(weight=1.0))]}, tmp_path / "x"
        )


def test_input_without_a_readable_config_json_is_a_checkpoint_error(models, tmp_path):
    good = dict(merge_method="linear", models=[dict(model=models["m0"], parameters=dict(weight=1.0))])
    shutil.copytree(models["m1"], tmp_path / "m")
    config = {**good, "models": [*good["models"], dict(model=str(tmp_path / "m"), parameters=dict(weight=1.0))]}
    for text, expected in ((None, "missing"), ("{not json", "unreadable"), ("[1, 2]", "expected a JSON object")):
        file = tmp_path / "m" / "config.json"
        file.unlink(missing_ok=True)
        if text is not None:
            file.write_text(text)
        with pytest.raises(jft.hf.CheckpointError, match=re.escape(f"{file}: {expected}")):
            merge.merge_folders(config, tmp_path / "never")
        with pytest.raises(jft.hf.CheckpointError, match=re.escape(f"{file}: {expected}")):
            merge.merge_moe(
                dict(base_model=str(tmp_path / "m"), experts=[dict(source_model=models["m0"])] * 2, gate_mode="random"),
                tmp_path / "never",
            )
    assert not (tmp_path / "never").exists()


def test_merge_config_from_a_file_or_yaml_text(tmp_path):
    text = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1.0}\n"
    (tmp_path / "merge.yaml").write_text(text)
    expected = dict(merge_method="linear", models=[dict(model="a", parameters=dict(weight=1.0))])
    assert merge.load_merge_config(tmp_path / "merge.yaml") == expected
    assert merge.load_merge_config(str(tmp_path / "merge.yaml")) == expected
    assert merge.load_merge_config(text) == expected
    assert merge.load_merge_config("{merge_method: linear}") == dict(merge_method="linear")  # one line, not a file
    with pytest.raises(merge.MergeError, match="no such file, and not YAML text"):
        merge.load_merge_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(merge.MergeError, match="not valid YAML"):
        merge.load_merge_config("merge_method: [linear\n")


@pytest.mark.parametrize(
    "method,kw",
    [("linear", {}), ("cat", {}), ("svd", {"rank": 3}), ("ties", {"density": 0.5}), ("ties_svd", {"density": 0.5})],
)
def test_combined_lora_adapters_match_peft_add_weighted_adapter(hf_model_dir, tmp_path, method, kw):
    import peft as hf_peft
    import torch
    from transformers import AutoModelForCausalLM

    folder = hf_model_dir("llama_gqa")
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "down_proj", "lm_head"]
    hf = hf_peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder).float(),
        hf_peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets),
    )
    hf.add_adapter("b", hf_peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules=targets))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "adapters")
    combo = {"svd_rank": kw["rank"]} if "rank" in kw else {"density": kw["density"]} if "density" in kw else {}
    hf.add_weighted_adapter(["default", "b"], [0.7, -0.4], "both", combination_type=method, **combo)
    hf.set_adapter("both")
    ids = np.random.RandomState(0).randint(3, 128, (2, 7))
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()

    model, params = jft.load_hf(folder, dtype="float32", remat="none")
    adapters = [jft.peft.load_adapter(model, params, tmp_path / "adapters" / sub) for sub in ("", "b")]
    combined, merged = jft.peft.combine_lora(adapters, [0.7, -0.4], method, **kw)
    assert combined.peft.lora.r == {"cat": 8, "svd": 3}.get(method, 4)
    np.testing.assert_allclose(combined.apply({"params": merged}, ids), expected, atol=2e-4)


WORDS = ["add", "the", "numbers", "write", "python", "code", "translate", "to", "french", "story", "poem", "sum"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A base with a tokenizer and three experts that differ from it in their MLPs only."""
    from jft.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("moe_models")
    tok = train_bpe_tokenizer([" ".join(WORDS)] * 4, vocab_size=300)
    build_hf_model("llama", root / "base", num_hidden_layers=3, vocab_size=len(tok), bos_token_id=tok.bos_token_id)
    tok.save_pretrained(root / "base")
    base = load_file(root / "base" / "model.safetensors")
    rs = np.random.RandomState(2)
    for k in range(3):
        shutil.copytree(root / "base", root / f"e{k}")
        tuned = {n: (x + 0.1 * rs.randn(*x.shape) * (".mlp." in n)).astype(x.dtype) for n, x in base.items()}
        save_file(tuned, str(root / f"e{k}" / "model.safetensors"), metadata={"format": "pt"})
    return {name: str(root / name) for name in ("base", "e0", "e1", "e2")}


def moe_config(m, mode, experts=("e0", "e1", "e2")):
    prompts = [["add the numbers", "sum the numbers"], ["write python code"], ["translate to french"]]
    return dict(
        base_model=m["base"],
        gate_mode=mode,
        dtype="float32",
        experts=[
            dict(
                source_model=m[e],
                positive_prompts=prompts[j],
                **({"negative_prompts": ["write a poem"]} if j == 1 else {}),
            )
            for j, e in enumerate(experts)
        ],
    )


def test_moe_of_identical_experts_reproduces_the_dense_model(dense, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    config = {**moe_config(dense, "random", ("e1", "e1", "e1")), "base_model": dense["e1"]}
    merge.merge_moe(config, tmp_path / "moe")
    model, params = jft.load_hf(tmp_path / "moe")
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2
    dense_model, dense_params = jft.load_hf(dense["e1"])
    ids = np.random.RandomState(0).randint(3, 200, (2, 9))
    expected = dense_model.apply({"params": dense_params}, ids)
    np.testing.assert_allclose(model.apply({"params": params}, ids), expected, atol=1e-4)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").float().eval()  # loads as Mixtral
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.tensor(ids)).logits.numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("mode", ["cheap_embed", "hidden", "hidden_avg"])
def test_moe_router_rows_match_mergekit_moe(dense, tmp_path, monkeypatch, mode):
    """Router rows from the prompts (and expert MLPs) as mergekit-moe builds them. mergekit-moe
    always runs the base in bfloat16 for the hidden modes (rows move by up to ~5e-3 here); it is
    made to load it in float32, so that everything but that rounding is compared."""
    import mergekit.moe.router as router
    import torch
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    load = router.AutoModelForCausalLM.from_pretrained
    float32 = type(
        "Float32", (), {"from_pretrained": lambda *a, **kw: load(*a, **{**kw, "torch_dtype": torch.float32})}
    )
    monkeypatch.setattr(router, "AutoModelForCausalLM", float32)
    config = moe_config(dense, mode)
    merge.merge_moe(config, tmp_path / "jft")
    build(MoEMergeConfig.model_validate(config), str(tmp_path / "mk"), MergeOptions(quiet=True), device="cpu")
    ours, theirs = load_file(tmp_path / "jft" / "model.safetensors"), {}
    for f in (tmp_path / "mk").glob("*.safetensors"):
        theirs.update(load_file(f))
    for i in range(3):
        gate = ours[f"model.layers.{i}.block_sparse_moe.gate.weight"]
        np.testing.assert_allclose(gate, theirs[f"model.layers.{i}.mlp.gate.weight"], atol=1e-6, err_msg=str(i))
        w1 = np.stack([ours[f"model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight"] for j in range(3)])
        np.testing.assert_array_equal(w1, theirs[f"model.layers.{i}.mlp.experts.gate_up_proj"][:, : w1.shape[1]])
    if mode == "cheap_embed":  # mergekit-moe keeps experts stacked (transformers 5's layout): jft reads that too
        from transformers import AutoModelForCausalLM

        model, params = jft.load_hf(tmp_path / "mk", dtype="float32")
        ids = np.random.RandomState(0).randint(3, 200, (2, 9))
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "mk", dtype=torch.float32).eval()
        with torch.no_grad():
            np.testing.assert_allclose(
                model.apply({"params": params}, ids), hf(torch.tensor(ids)).logits.numpy(), atol=1e-4
            )
    # Layer 0's input is the embedding: its "hidden" row is the normalised mean of the prompts' last tokens.
    if mode == "hidden":
        tok = jft.load_tokenizer(dense["base"])
        embed = load_file(f"{dense['base']}/model.safetensors")["model.embed_tokens.weight"]
        last = [tok(p, add_special_tokens=False)["input_ids"][-1] for p in ("add the numbers", "sum the numbers")]
        v = embed[last].mean(0)
        np.testing.assert_allclose(
            ours["model.layers.0.block_sparse_moe.gate.weight"][0], v / np.linalg.norm(v), atol=1e-6
        )


def test_moe_hidden_rows_ignore_padding_as_mergekit_moe_on_each_prompt_alone(dense, tmp_path):
    """mergekit-moe pads an expert's prompts to one length and then reads the last position (a pad
    for the shorter prompts) or averages over the pads too; jft takes each prompt's own last token
    or mean: mergekit-moe's formula applied to each prompt alone (float32)."""
    import torch
    from mergekit.moe.router import get_hidden_states, tokenize_prompts
    from transformers import AutoModelForCausalLM

    tok = jft.load_tokenizer(dense["base"])
    hf = AutoModelForCausalLM.from_pretrained(dense["base"], dtype=torch.float32).eval()
    pos, neg = ["add the numbers", "add numbers to the sum"], ["write a poem", "story"]
    assert len({len(tok(p)["input_ids"]) for p in pos}) == len({len(tok(p)["input_ids"]) for p in neg}) == 2
    for mode in ("hidden", "hidden_avg"):
        config = {**moe_config(dense, mode, ("e0",)), "experts_per_token": 1}
        config["experts"][0].update(positive_prompts=pos, negative_prompts=neg)
        merge.merge_moe(config, tmp_path / mode)
        rows = load_file(tmp_path / mode / "model.safetensors")

        def mean(prompts, mode=mode):
            alone = [get_hidden_states(hf, tokenize_prompts([p], tok), average=mode == "hidden_avg") for p in prompts]
            return sum(alone).numpy() / len(prompts)  # [layers, hidden]

        v = mean(pos) - mean(neg)
        v /= np.linalg.norm(v, axis=-1, keepdims=True)
        for i in range(3):
            gate = rows[f"model.layers.{i}.block_sparse_moe.gate.weight"][0]
            np.testing.assert_allclose(gate, v[i], atol=1e-6, err_msg=f"{mode} layer {i}")


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_moe_random_gates_follow_mergekit_moe_laws_and_the_moe_loads_in_transformers(dense, tmp_path, mode):
    """mergekit-moe draws ``random`` routers from N(0, 1) and ``uniform_random`` ones from
    U(-1/sqrt(hidden), 1/sqrt(hidden)) (torch.nn.Linear's init), [layers, experts, hidden]; jft
    draws from the same laws, seeded. Experts are the sources' MLPs, the rest is the base."""
    import torch
    from scipy import stats
    from transformers import AutoModelForCausalLM

    config = moe_config(dense, mode)
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        merge.merge_moe(config, tmp_path / name, seed=seed)
        outs[name] = load_file(tmp_path / name / "model.safetensors")
    gates = {
        n: np.stack([o[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(3)]) for n, o in outs.items()
    }
    hidden = jft.hf.read_config(Path(dense["base"])).hidden_size
    assert gates["a"].shape == (3, 3, hidden) and gates["a"].dtype == np.float32
    np.testing.assert_array_equal(gates["a"], gates["b"])
    assert not np.allclose(gates["a"], gates["c"])
    for g in (gates["a"], gates["c"]):
        x = g.reshape(-1)
        if mode == "random":
            assert stats.kstest(x, "norm").pvalue > 1e-3
            assert abs(x.std() - 1.0) < 0.1
        else:
            bound = 1 / np.sqrt(hidden)
            assert np.abs(x).max() <= bound and np.abs(x).max() > 0.95 * bound
            assert stats.kstest(x, "uniform", args=(-bound, 2 * bound)).pvalue > 1e-3
    assert not np.allclose(gates["a"][0], gates["a"][1])  # a fresh draw per layer

    base = load_file(f"{dense['base']}/model.safetensors")
    experts = [load_file(f"{dense[e]}/model.safetensors") for e in ("e0", "e1", "e2")]
    for name, x in outs["a"].items():
        if ".block_sparse_moe.experts." in name:
            i, j, w = re.match(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w\d)", name).groups()
            proj = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}[w]
            np.testing.assert_array_equal(x, experts[int(j)][f"model.layers.{i}.mlp.{proj}.weight"], err_msg=name)
        elif ".gate." not in name:
            np.testing.assert_array_equal(x, base[name], err_msg=name)
    assert sum(".experts." in n for n in outs["a"]) == 3 * 3 * 3

    model, params = jft.load_hf(tmp_path / "a")
    ids = np.random.RandomState(0).randint(3, 200, (2, 9))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "a").float().eval()
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(model.apply({"params": params}, ids), expected, atol=1e-4)


def test_jft_merge_builds_a_moe_from_yaml_and_refuses_bad_ones(dense, tmp_path, capsys):
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(moe_config(dense, "cheap_embed")))
    assert cli(["merge", str(tmp_path / "moe.yaml"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert jft.load_hf(tmp_path / "out")[0].config.num_local_experts == 3
    bad = {
        "gate_mode 'magic' is not supported": {**moe_config(dense, "magic")},
        "needs positive_prompts": {**moe_config(dense, "hidden"), "experts": [dict(source_model=dense["e0"])] * 2},
        "experts_per_token=4 must be between 1 and the 3 experts": {
            **moe_config(dense, "random"),
            "experts_per_token": 4,
        },
        "unknown key(s) ['shared_experts']": {**moe_config(dense, "random"), "shared_experts": []},
    }
    for expected, config in bad.items():
        with pytest.raises(merge.MergeError, match=re.escape(expected)):
            merge.merge_moe(config, tmp_path / "never")
