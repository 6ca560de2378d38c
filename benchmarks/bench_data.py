"""Tokenizing and training on a raw-text corpus: the data cache (jft.data.cache) vs the in-memory pipeline.

    python benchmarks/bench_data.py                          # 20k text records of ~200 words, all cores
    python benchmarks/bench_data.py --records 760000 --train # ~200M tokens, + a training run and its resume
    python benchmarks/bench_data.py --format instruction --compare-datasets   # + datasets.map(num_proc)

Writes (once per size, reused from --workdir) a seeded synthetic corpus of pseudo-words as a
.jsonl of ``{"text"}`` records (or instruction records) and a byte-level BPE tokenizer trained on
its first 1000 records (``jft.tokenizer.train_bpe_tokenizer``, 4096 tokens). Each way of
tokenizing runs as its own fresh process, reading the .jsonl and tokenizing every record:

    pipeline   load_records + tokenize_records (one process, every example in a Python list)
    cache      build_cache(num_proc=N) into an empty cache root (shards written to disk)
    datasets   Dataset.from_list + map(num_proc=N) with the same encode_example rule (--compare-datasets)

It prints wall seconds, tokens/s, tokens/s per core used and the peak RSS of the main process
and of its largest worker (``resource.getrusage``: SELF and CHILDREN), then the ratios to
``pipeline``. Imports and worker start-up are inside the timing: they are what a run pays.

``--train`` also runs ``jft.train.fit`` (a tiny model: the data path is what is measured) as a
fresh process for one step, then again in the same workdir to resume and take one more, for

    pipeline-fit   today's path: every record read, tokenized and packed in memory on every run
    cache-fit      data.cache_dir + data.validation: the workers read the file in pieces into a
                   cache the resume reuses; each batch's rows are read from disk

and prints, per run, the seconds from the process start to its first batch in host memory (imports,
model init and the data) and to the end of its first step (that and compiling the step), and the
peak RSS of the main process and its workers by then.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_LENGTH = 2048


def corpus(workdir: Path, records: int, words: int, fmt: str) -> Path:
    """``workdir/<size>/train.jsonl`` and ``tokenizer/``, written once."""
    import numpy as np

    folder = workdir / f"{fmt}-{records}x{words}"
    data = folder / "train.jsonl"
    if data.exists() and (folder / "tokenizer").exists() and (folder / "validation.jsonl").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    p = 1.0 / np.arange(1, 27)
    lexicon = ["".join(rng.choice(letters, rng.integers(1, 9), p=p / p.sum())) for _ in range(20_000)]
    zipf = 1.0 / np.arange(1, len(lexicon) + 1)
    zipf /= zipf.sum()
    texts = []
    with open(data.with_suffix(".tmp"), "w") as f:
        for i in range(records):
            n = max(1, int(rng.normal(words, words / 4)))
            text = " ".join(lexicon[j] for j in rng.choice(len(lexicon), n, p=zipf)) + "."
            if i < 1000:
                texts.append(text)
            if fmt == "text":
                record = {"text": text}
            else:
                cut = len(text) // 3
                record = {"instruction": "Continue the text.", "input": text[:cut], "output": text[cut:]}
            f.write(json.dumps(record) + "\n")
    data.with_suffix(".tmp").replace(data)
    with open(folder / "validation.jsonl", "w") as f:  # held-out records for --train
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[-16:])
    from jft.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(texts, folder / "tokenizer", vocab_size=4096)
    return folder


def work(mode: str, folder: Path, num_proc: int) -> dict:
    """One measured run, in this (fresh) process: tokens, seconds, peak RSS (MiB)."""
    start = time.perf_counter()
    from transformers import AutoTokenizer

    from jft.data import load_records, tokenize_records

    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    settings = dict(vocab_size=len(tokenizer), max_length=MAX_LENGTH)
    if mode == "pipeline":
        examples, stats = tokenize_records(load_records(folder / "train.jsonl"), tokenizer, **settings)
        tokens, cores = stats.tokens, 1
    elif mode == "cache":
        from jft.data.cache import build_cache

        with tempfile.TemporaryDirectory() as root:
            cache = build_cache(folder / "train.jsonl", tokenizer, cache_root=root, num_proc=num_proc, **settings)
            tokens, cores = cache.stats.tokens, num_proc
    else:
        import datasets

        from jft.data.formats import ALPACA
        from jft.data.pipeline import encode_example

        def encode(record, i):
            kw = dict(overlong="truncate", template=ALPACA, weights=(0.0, 1.0), fmt="auto", **settings)
            ids, kinds, _, _, drop = encode_example(f"row {i}", dict(record), tokenizer, **kw)
            return {"ids": ids, "kinds": kinds.astype("uint8"), "keep": drop is None}

        with tempfile.TemporaryDirectory() as cache_dir:
            records = [r for _, r in load_records(folder / "train.jsonl")]
            ds = datasets.Dataset.from_list(records)
            columns, arrow = ds.column_names, f"{cache_dir}/map.arrow"
            ds = ds.map(encode, with_indices=True, num_proc=num_proc, remove_columns=columns, cache_file_name=arrow)
            tokens, cores = sum(len(x) for x, keep in zip(ds["ids"], ds["keep"], strict=True) if keep), num_proc
    seconds = time.perf_counter() - start
    mib = 1 / 1024  # ru_maxrss is KiB on Linux
    return {
        "mode": mode,
        "tokens": tokens,
        "seconds": seconds,
        "cores": cores,
        "rss_main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * mib,
        "rss_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * mib,
    }


def train(mode: str, folder: Path, num_proc: int, workdir: Path, steps: int) -> dict:
    """One ``fit`` in this (fresh) process: seconds to the end of the first step, peak RSS then."""
    start = time.perf_counter()
    import jft.train.trainer as trainer
    from jft.config import default_config

    first = {}
    flush = trainer._flush

    def timed(*args, **kwargs):  # the first step's metrics are fetched here (log_every = 1)
        out = flush(*args, **kwargs)
        if "seconds" not in first:
            first.update(
                seconds=time.perf_counter() - start,
                rss_main=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                rss_worker=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            )
        return out

    trainer._flush = timed
    batch = trainer.jdata.Batches.batch

    def first_batch(self, *args):  # the data is ready: what a resume waits for before compiling the step
        first.setdefault("data_seconds", time.perf_counter() - start)
        return batch(self, *args)

    trainer.jdata.Batches.batch = first_batch
    c = default_config()
    c.model.new.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    c.model.new.num_key_value_heads = 1
    c.model.remat = "none"
    c.tokenizer.path = str(folder / "tokenizer")
    c.data.train, c.data.validation = str(folder / "train.jsonl"), str(folder / "validation.jsonl")
    c.data.seq_len, c.data.format = MAX_LENGTH, "text"
    if mode == "cache-fit":
        c.data.cache_dir, c.data.num_proc = str(workdir / "cache"), num_proc
    c.train.update(batch_size=8, max_steps=steps, log_every=1, eval_every=0, checkpoint_every=1)
    c.eval.num_examples = 0
    report = trainer.fit(c, workdir / mode)
    return {"mode": mode, "resumed_from": report["resumed_from"], "data": report["train_data"], **first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--words", type=int, default=200, help="mean words per record")
    parser.add_argument("--format", choices=("text", "instruction"), default="text")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count())
    parser.add_argument("--compare-datasets", action="store_true")
    parser.add_argument("--train", action="store_true", help="also time a training run and its resume")
    parser.add_argument("--skip-tokenize", action="store_true", help="only the --train runs")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "jft_bench_data")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = corpus(args.workdir, args.records, args.words, args.format)
    if args.worker in ("pipeline-fit", "cache-fit"):
        steps = int(os.environ["BENCH_STEPS"])
        print(json.dumps(train(args.worker, folder, args.num_proc, args.workdir / f"runs-{folder.name}", steps)))
        return
    if args.worker:
        print(json.dumps(work(args.worker, folder, args.num_proc)))
        return
    size = (folder / "train.jsonl").stat().st_size / 2**20
    print(f"corpus: {args.records} {args.format} records, {size:.1f} MiB; num_proc {args.num_proc}")

    def run(mode: str, **env) -> dict:
        cmd = [sys.executable, __file__, "--worker", mode, "--records", str(args.records), "--words", str(args.words)]
        cmd += ["--format", args.format, "--num-proc", str(args.num_proc), "--workdir", str(args.workdir)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **env}).stdout
        return json.loads(out.strip().splitlines()[-1])

    if args.train:
        import shutil

        shutil.rmtree(args.workdir / f"runs-{folder.name}", ignore_errors=True)  # fresh runs, an empty cache
        print(f"{'':14} {'run':7} {'s to batch 1':>12} {'s to step 1':>11} {'RSS main':>9} {'RSS worker':>10}")
        for mode in ("pipeline-fit", "cache-fit"):
            for steps, run_name in ((1, "fresh"), (2, "resume")):
                r = run(mode, BENCH_STEPS=str(steps))
                assert r["resumed_from"] == steps - 1, r
                times = f"{r['data_seconds']:>12.1f} {r['seconds']:>11.1f}"
                print(f"{mode:14} {run_name:7} {times} {r['rss_main']:>7.0f}Mi {r['rss_worker']:>8.0f}Mi")
        print(f"data: {r['data']}")
    if args.skip_tokenize:
        return
    modes = ["pipeline", "cache"] + (["datasets"] if args.compare_datasets else [])
    results = {mode: run(mode) for mode in modes}
    base = results["pipeline"]
    print(f"{'':10} {'tokens':>11} {'s':>7} {'tok/s':>10} {'tok/s/core':>11} {'RSS main':>9} {'RSS worker':>10}")
    for mode, r in results.items():
        rate = r["tokens"] / r["seconds"]
        print(
            f"{mode:10} {r['tokens']:>11} {r['seconds']:>7.2f} {rate:>10.0f} {rate / r['cores']:>11.0f} "
            f"{r['rss_main']:>7.0f}Mi {r['rss_worker']:>8.0f}Mi"
        )
    for mode, r in results.items():
        if mode != "pipeline":
            speed = base["seconds"] / r["seconds"]
            per_core = speed / r["cores"]
            rss = r["rss_main"] / base["rss_main"]
            print(f"{mode}/pipeline: {speed:.2f}x tokens/s, {per_core:.2f}x tokens/s per core, {rss:.2f}x main RSS")


if __name__ == "__main__":
    main()
