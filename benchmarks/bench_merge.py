"""TIES merge of three ~125M-parameter models: jft vs mergekit (CPU), wall time and peak RSS.

    python benchmarks/bench_merge.py                     # float32 inputs; --repeats 3 --workdir /tmp/jft_bench_merge
    python benchmarks/bench_merge.py --dtype bfloat16    # bfloat16 inputs
    python benchmarks/bench_merge.py --layers 2 --hidden 96 --intermediate 256 --vocab 1000 --repeats 1  # smoke

Builds once (reused from --workdir, one folder per dtype and shape) a random Llama (default:
vocab 32000, hidden 768, MLP 2048, 12 layers, 12 heads, 4 KV heads; ~125M parameters) as a
Hugging Face safetensors folder, plus three variants (base + gaussian noise). Both tools merge
them with the same ties YAML (weights 1.0/0.5/0.7, density 0.5, dtype float32): `jft merge` and
`mergekit-yaml`, each run as its own fresh process (imports included) under `/usr/bin/time -v`
(else a Python wrapper that reads `RUSAGE_CHILDREN`), so peak RSS is that process's alone.
After one untimed read of the inputs (page cache warm), each of --repeats rounds runs both
tools, the order alternating (mergekit, jft; then jft, mergekit; ...), so that neither always
runs first. Every run is printed with the 1-minute load average before and after it (a quiet
machine reads ~0 before; the run's own threads raise it after); the summary gives each tool's
median wall time and peak RSS, their ratios jft/mergekit, and the max abs difference between
the two merged models (mergekit breaks ties in |delta| at the top-k threshold in
torch.argsort's unspecified order, jft by index, so a few elements may differ by one delta).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

BIN = Path(sys.executable).parent
SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12)
SHAPE.update(num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048)
SIZE_FLAGS = {"vocab": "vocab_size", "hidden": "hidden_size", "intermediate": "intermediate_size"}
SIZE_FLAGS["layers"] = "num_hidden_layers"
VARIANTS = {"ft1": (1.0, 0.5), "ft2": (0.5, 0.5), "ft3": (0.7, 0.5)}  # name -> (weight, density)
WRAPPER = "import resource,subprocess,sys;r=subprocess.run(sys.argv[1:]).returncode;"
WRAPPER += "print('maxrss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr);sys.exit(r)"


def make_models(root: Path, dtype: str, noise: float, shape: dict) -> None:
    """The base folder and the noisy variants, unless they are there already."""
    if all((root / n / "model.safetensors").exists() for n in ["base", *VARIANTS]):
        return
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=getattr(torch, dtype))
    model.save_pretrained(root / "base", max_shard_size="50GB")
    del model
    base = load_file(root / "base" / "model.safetensors")
    for i, name in enumerate(VARIANTS):
        gen = torch.Generator().manual_seed(i + 1)
        (root / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "base" / "config.json", root / name / "config.json")
        noisy = {k: (v.float() + noise * torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in base.items()}
        save_file(noisy, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        del noisy


def write_config(root: Path) -> Path:
    models = "".join(
        f"  - model: {root / n}\n    parameters: {{weight: {w}, density: {d}}}\n" for n, (w, d) in VARIANTS.items()
    )
    path = root / "ties.yaml"
    path.write_text(f"merge_method: ties\nbase_model: {root / 'base'}\nmodels:\n{models}dtype: float32\n")
    return path


def command(tool: str, config: Path, out: Path) -> list[str]:
    if tool == "jft":
        return [str(BIN / "jft"), "merge", str(config), "--out", str(out)]
    flags = ["--quiet", "--no-copy-tokenizer", "--no-write-model-card"]
    return [str(BIN / "mergekit-yaml"), str(config), str(out), *flags]


def measure(cmd: list[str], gnu_time: bool) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``cmd`` run in a fresh process."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as log:
        wrap = ["/usr/bin/time", "-v", "-o", log.name] if gnu_time else [sys.executable, "-c", WRAPPER]
        start = time.perf_counter()
        proc = subprocess.run(wrap + cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        report = log.read() if gnu_time else proc.stderr
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    kb = re.search(r"(?:Maximum resident set size \(kbytes\):|maxrss_kb)\s+(\d+)", report)
    return wall, int(kb.group(1)) / 1024


def compare(a: Path, b: Path) -> str:
    """Max |a - b| over two single-file safetensors folders, and how many elements differ."""
    from safetensors import safe_open

    with safe_open(a / "model.safetensors", "pt") as fa, safe_open(b / "model.safetensors", "pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return f"tensor names differ: {sorted(set(fa.keys()) ^ set(fb.keys()))[:5]}"
        stats = {}
        for k in fa.keys():
            d = (fa.get_tensor(k).double() - fb.get_tensor(k).double()).abs()
            stats[k] = (d.max().item(), int((d > 0).sum()), d.numel())
    worst = max(stats, key=lambda k: stats[k][0])
    n, total = sum(s[1] for s in stats.values()), sum(s[2] for s in stats.values())
    return f"{stats[worst][0]:.3g} ({worst}); {n} of {total} elements differ"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/jft_bench_merge"))
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the input models")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs both tools once")
    p.add_argument("--noise", type=float, default=0.002, help="std of the noise of each variant")
    p.add_argument("--timer", choices=["auto", "python"], default="auto", help="python: skip /usr/bin/time")
    for flag, key in SIZE_FLAGS.items():
        p.add_argument(f"--{flag}", type=int, default=SHAPE[key], help=f"{key} (default {SHAPE[key]})")
    args = p.parse_args()
    shape = {**SHAPE, **{key: getattr(args, flag) for flag, key in SIZE_FLAGS.items()}}
    if shape["hidden_size"] % shape["num_attention_heads"]:
        p.error(f"--hidden must be a multiple of the {shape['num_attention_heads']} heads")
    tag = "-".join(f"{flag}{shape[key]}" for flag, key in SIZE_FLAGS.items())
    root = args.workdir / f"{args.dtype}-{tag}"
    make_models(root, args.dtype, args.noise, shape)
    config = write_config(root)
    gnu_time = args.timer == "auto" and os.access("/usr/bin/time", os.X_OK)
    size = sum((root / n / "model.safetensors").stat().st_size for n in ["base", *VARIANTS]) / 2**20
    for n in ["base", *VARIANTS]:  # untimed warm-up read: every run then starts from a warm page cache
        with open(root / n / "model.safetensors", "rb") as f:
            while f.read(1 << 24):
                pass
    versions = ", ".join(f"{m} {metadata.version(m)}" for m in ("jax", "mergekit", "torch", "safetensors"))
    print(f"inputs: 4 x {args.dtype} folders ({tag}), {size:.0f} MiB in all, in {root}; {versions}")
    timer = "GNU time" if gnu_time else "rusage"
    print(f"{os.cpu_count()} CPUs; load average (1, 5, 15 min) {fmt_load(os.getloadavg())}; timer: {timer}")
    tools, results = ["mergekit", "jft"], {"mergekit": [], "jft": []}
    for r in range(args.repeats):
        for tool in tools if r % 2 == 0 else tools[::-1]:
            out = args.workdir / "out" / tool
            shutil.rmtree(out, ignore_errors=True)
            before = os.getloadavg()[0]
            wall, rss = measure(command(tool, config, out), gnu_time)
            after = os.getloadavg()[0]
            results[tool].append((wall, rss))
            run = f"  round {r + 1}/{args.repeats} {tool:9s} {wall:7.2f} s {rss:7.0f} MiB"
            print(f"{run}   load {before:.2f} -> {after:.2f}", flush=True)
    print(f"load average (1, 5, 15 min) after: {fmt_load(os.getloadavg())}")
    print(f"max |jft - mergekit|: {compare(args.workdir / 'out' / 'jft', args.workdir / 'out' / 'mergekit')}")
    med = {t: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v)) for t, v in results.items()}
    print(f"\n{'tool':9s} {'wall s: median':>15s} {'(min-max)':>16s} {'peak RSS MiB: median':>21s} {'(min-max)':>12s}")
    for tool, runs in results.items():
        walls, rsss = [w for w, _ in runs], [m for _, m in runs]
        print(
            f"{tool:9s} {med[tool][0]:15.2f} {f'({min(walls):.2f}-{max(walls):.2f})':>16s}"
            f" {med[tool][1]:21.0f} {f'({min(rsss):.0f}-{max(rsss):.0f})':>12s}"
        )
    for i, what in enumerate(["time", "peak RSS"]):
        ratio = med["jft"][i] / med["mergekit"][i]
        print(
            f"jft/mergekit {what} (ratio of medians): {ratio:.2f}x  goal <= 1.0: {'met' if ratio <= 1.0 else 'not met'}"
        )


def fmt_load(load: tuple) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


if __name__ == "__main__":
    main()
