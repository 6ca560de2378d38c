"""Sequence-level distillation (``jft distill``): a teacher answers prompts, its answers become SFT
records, and the student (``model.*``, any method) fine-tunes on them through :func:`jft.train.fit`.

    teacher, params, tokenizer = load_teacher(cfg)                  # distill.teacher (+ adapter, 4-bit)
    prompts, stats = read_prompts(load_records(path), tokenizer, max_length=1536)
    generate_responses(teacher, params, tokenizer, prompts, "out/generations.jsonl", num_samples=2)
    counts = filter_generations("out/generations.jsonl", "out/data.jsonl")   # empty, truncated, duplicates
    report = distill(cfg, workdir)                                  # all of it, then fit and a report

Each generated record keeps its prompt's form (instruction -> ``{"instruction", "input", "output"}``,
chat -> ``{"messages"}`` ending in the teacher's assistant turn, ``{"prompt": str}`` ->
``{"prompt", "completion"}``) plus a ``provenance`` field the SFT pipeline ignores. Generation is
resumable: ``generations.jsonl`` grows one fsync'ed batch at a time, prompt ``i``'s sample ``k`` is
drawn with its own key ``fold_in(fold_in(key(seed), i), k)``, and a restart continues after the last
complete batch, so an interrupted run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jft import data as jdata
from jft import metrics as jmetrics
from jft import partition, peft, sharding
from jft.config import ConfigDict, ConfigError, check, resolve_compute_dtype
from jft.data.formats import DataError
from jft.data.prompts import PromptStats, prompt_tokens
from jft.generate import generate, left_pad
from jft.hf import CheckpointError, load_hf, load_tokenizer, resolve
from jft.safetensors_io import atomic_write
from jft.train.trainer import TrainingError

# what WORKDIR/distill holds
GENERATIONS, SETTINGS, DATA = "generations.jsonl", "settings.json", "data.jsonl"
STATS, REPORT = "stats.json", "report.json"
QUANT = ("", "nf4", "int4")
REASONS = ("empty", "truncated", "duplicate")  # why a generated response is dropped, in this order


# ---------------------------------------------------------------------------- teacher


def load_teacher(cfg: ConfigDict, mesh=None, rules=sharding.DEFAULT_RULES):
    """``(model, params, tokenizer)`` of ``distill.teacher`` for generation or logit distillation.

    Parameters are stored in ``model.dtype`` and computed in the resolved ``model.compute_dtype``
    (the student's settings); ``distill.teacher_quant`` (nf4 | int4) keeps the base's linear kernels
    in 4 bits as ``model.quantize`` does (``model.quantize_skip``, ``quant_block_size``,
    ``double_quant``); ``distill.teacher_adapter`` is put on top (peft's or jft's format). With a
    ``mesh`` the params are read straight onto their shards. Raises :class:`ConfigError` for an
    empty or missing teacher or adapter, an unknown quantization, or a teacher without a tokenizer.
    """
    d, m = cfg.distill, cfg.model
    if not d.teacher:
        raise ConfigError("distill.teacher is empty; set it to the teacher's model folder or hub id")
    if d.teacher_quant not in QUANT:
        raise ConfigError(f"distill.teacher_quant={d.teacher_quant!r}; choose one of {QUANT}")
    try:
        folder = resolve(d.teacher)
    except CheckpointError as e:
        raise ConfigError(f"distill.teacher={d.teacher!r}: {e}") from None
    if d.teacher_adapter and not Path(d.teacher_adapter).expanduser().is_dir():
        raise ConfigError(f"distill.teacher_adapter={d.teacher_adapter!r}: no such adapter folder")
    model, params = load_hf(
        folder,
        dtype=m.dtype,
        compute_dtype=resolve_compute_dtype(cfg),
        quantize=d.teacher_quant or None,
        quantize_skip=tuple(m.quantize_skip),
        block_size=m.quant_block_size,
        double_quant=m.double_quant,
        mesh=mesh,
        rules=rules,
        remat="none",  # no backward pass through the teacher
        loss_chunk=m.loss_chunk,
        attention=m.attention,
        attention_chunk=m.attention_chunk,
        mlp_chunk=m.mlp_chunk,
    )
    if d.teacher_adapter:
        model, params = peft.load_adapter(model, params, Path(d.teacher_adapter).expanduser())
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise ConfigError(
            f"distill.teacher={d.teacher!r} has no tokenizer (tokenizer.json or tokenizer_config.json); "
            "save one beside the model (jft.save_hf(..., tokenizer=))"
        )
    return model, params, tokenizer


def parameter_count(params) -> int:
    """Parameters of a tree; a 4-bit kernel counts the values of the kernel it stands for."""
    return sum(int(np.prod(getattr(leaf, "full_shape", np.shape(leaf)))) for _, leaf in partition.walk(params))


# ---------------------------------------------------------------------------- prompts


class PromptItem:
    """One prompt to generate for: ``index`` (the record's position in its source), ``where``
    (``file:line``), ``part`` (the record's prompt in its form: ``{"instruction", "input"}``,
    ``{"messages"}`` or ``{"prompt"}``) and ``ids`` ``[n]`` int32 (BOS once, then the rendered prompt)."""

    __slots__ = ("index", "where", "part", "ids")

    def __init__(self, index: int, where: str, part: dict, ids: np.ndarray):
        self.index, self.where, self.part, self.ids = index, where, part, ids


def read_prompts(
    pairs: Sequence[tuple[str, dict]],
    tokenizer,
    *,
    max_length: int,
    template: jdata.Template = jdata.ALPACA,
    vocab_size: int | None = None,
) -> tuple[list[PromptItem], PromptStats]:
    """``(prompts, stats)`` of ``(where, record)`` pairs (:func:`jft.data.load_records`).

    Records are read by :func:`jft.data.prompts.split_prompt`: instruction records (their ``output``
    ignored) rendered by ``template``, ``{"prompt": str | messages}``, or chat records
    ``{"messages"}`` up to their last assistant turn, rendered with the generation prompt; tokens as
    training sees them (:func:`jft.data.prompt_ids`). A prompt over ``max_length`` tokens is left out
    (its answer would not fit a training row) and counted in ``stats.dropped``. Raises
    :class:`DataError` naming the record for any other form, an empty prompt, or a token id at or
    above ``vocab_size``.
    """
    items, stats = [], PromptStats()
    for index, (where, record) in enumerate(pairs):
        stats.records += 1
        ids, prompt = prompt_tokens(record, tokenizer, template, where, vocab_size)
        if len(ids) > max_length:
            stats.dropped += 1
            continue
        if prompt.conversational:
            part = {"messages": prompt.prompt}
        elif "prompt" in record:
            part = {"prompt": prompt.prompt}
        else:
            part = {"instruction": record["instruction"], "input": record.get("input") or ""}
        items.append(PromptItem(index, where, part, np.asarray(ids, np.int32)))
        stats.kept += 1
        stats.tokens += len(ids)
    return items, stats


def make_record(part: dict, response: str, provenance: dict | None = None) -> dict:
    """An SFT record of the prompt's form answered by ``response`` (+ ``provenance`` when given)."""
    if "messages" in part:
        record = {"messages": [*part["messages"], {"role": "assistant", "content": response}]}
    elif "prompt" in part:
        record = {"prompt": part["prompt"], "completion": response}
    else:
        record = {"instruction": part["instruction"], "input": part["input"], "output": response}
    return record if provenance is None else {**record, "provenance": provenance}


def response_of(record: dict) -> str:
    """The answer of a record :func:`make_record` wrote."""
    if "messages" in record:
        return record["messages"][-1]["content"]
    return record["completion"] if "completion" in record else record["output"]


# ---------------------------------------------------------------------------- generation


def _digest(prompts: Sequence[PromptItem]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(f"{p.index}:{p.where}:{json.dumps(p.part, sort_keys=True)}:".encode())
        h.update(p.ids.tobytes())
    return h.hexdigest()


def check_settings(directory: Path, settings: dict, generations: Path) -> None:
    """Refuse to add to ``generations`` when the settings recorded beside it (``settings.json``)
    differ from ``settings``; record them for a new file."""
    file = directory / SETTINGS
    if generations.exists() and generations.stat().st_size:
        old = json.loads(file.read_text()) if file.is_file() else None
        if old is None:
            raise TrainingError(
                f"{generations} exists but {file}, the settings it was generated with, is missing; "
                "use a new workdir (or delete the file to generate again)"
            )
        changed = sorted(k for k in settings.keys() | old.keys() if settings.get(k) != old.get(k))
        if changed:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise TrainingError(
                f"{generations} was generated with other settings ({diff}); continuing would mix the "
                "answers of two setups. Use a new workdir, or restore those settings."
            )
        return
    directory.mkdir(parents=True, exist_ok=True)
    jmetrics.write_report(file, settings)


def _resume(path: Path, prompts: Sequence[PromptItem], num_samples: int, unit: int) -> int:
    """Complete lines of ``path`` to keep: whole batches of ``unit`` lines (or all of them); a torn
    last line and a partly written batch are cut off the file. Lines are checked against the prompts."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1]  # what follows the last newline is a torn line (or nothing)
    total = len(prompts) * num_samples
    keep = total if len(lines) >= total else len(lines) - len(lines) % unit
    for n, line in enumerate(lines[:keep]):
        try:
            row = json.loads(line)
            got = (row["index"], row["sample"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise TrainingError(f"{path}:{n + 1}: not a generation line ({e}); use a new workdir") from None
        want = (prompts[n // num_samples].index, n % num_samples)
        if got != want:
            raise TrainingError(
                f"{path}:{n + 1} holds prompt {got[0]} sample {got[1]}, expected prompt {want[0]} sample {want[1]}: "
                "the file was written for other prompts; use a new workdir"
            )
    size = sum(len(line) + 1 for line in lines[:keep])
    if size != len(data):
        with open(path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
    return keep


def _eos_and_pad(model, tokenizer) -> tuple[tuple[int, ...], int]:
    eos = set(model.config.eos_token_id or ())
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return tuple(sorted(eos)), pad


def _batch(prompts: Sequence[PromptItem], size: int, num_samples: int, pad: int):
    """Left-padded ``ids``, ``mask`` ``[size * num_samples, width]`` (prompt ``j``'s samples in rows
    ``j * num_samples ...``); a short last batch is filled with copies of its last prompt, so every
    batch has one shape per prompt-length bucket (:func:`jft.generate` rounds the width up)."""
    full = list(prompts) + [prompts[-1]] * (size - len(prompts))
    return left_pad([p.ids for p in full for _ in range(num_samples)], pad)


def _row_keys(seed: int, prompts: Sequence[PromptItem], size: int, num_samples: int) -> jax.Array:
    """``[size * num_samples]`` keys: ``fold_in(fold_in(key(seed), prompt index), sample)``."""
    index = [p.index for p in prompts] + [prompts[-1].index] * (size - len(prompts))
    index = np.repeat(np.asarray(index, np.uint32), num_samples)
    sample = np.tile(np.arange(num_samples, dtype=np.uint32), size)
    base = jax.random.key(seed)
    return jax.vmap(lambda i, k: jax.random.fold_in(jax.random.fold_in(base, i), k))(index, sample)


def generate_responses(
    model,
    params,
    tokenizer,
    prompts: Sequence[PromptItem],
    path: str | os.PathLike,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    settings: dict | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Append the teacher's answers to ``prompts`` to the JSONL file ``path``, resuming where it stops.

    One line per (prompt, sample): ``{"index", "sample", "eos", "tokens", "record"}``, ``record``
    the SFT record (:func:`make_record`) with its ``provenance``: the teacher and adapter of
    ``settings``, the sampling settings, the prompt's ``source`` (``file:line``) and ``sample``.
    Prompts go ``batch_size`` at a time (``num_samples`` rows each) through :func:`jft.generate`
    with the KV cache, greedy when ``temperature == 0``, else sampled (``top_k`` 0 = all,
    ``top_p`` 1 = all), each row with its own key, stopping at EOS; a response that is still going
    after ``max_new_tokens`` has ``eos`` false. Each batch is written in one piece, flushed and
    fsync'ed; on a restart the complete batches are kept (a torn tail is cut) and generation goes
    on from the next, after checking that ``settings`` and the sampling settings (with a digest of
    the prompts) equal the ones recorded in ``settings.json`` beside ``path`` (else
    :class:`jft.train.TrainingError`). ``stop_after``: stop after that many batches (a time slice).

    Returns ``{"prompts", "lines", "resumed_lines", "new_lines", "new_tokens", "seconds", "tokens_per_s"}``.
    """
    from tqdm.auto import tqdm

    from jft.objectives.rl import completion_mask

    if num_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ConfigError(
            f"num_samples={num_samples}, batch_size={batch_size} and max_new_tokens={max_new_tokens} must be >= 1"
        )
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0, top_p={top_p} in (0, 1], top_k={top_k} >= 0")
    if not prompts:
        raise DataError("no prompts to generate for")
    path = Path(path)
    sampling = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed
    )  # what each record's provenance names
    recorded = {
        **(settings or {}),
        **sampling,
        "num_samples": num_samples,
        "prompts": len(prompts),
        "prompts_sha256": _digest(prompts),
    }
    check_settings(path.parent, recorded, path)
    provenance = {k: (settings or {}).get(k) for k in ("teacher", "adapter")} | sampling
    eos, pad = _eos_and_pad(model, tokenizer)
    unit = batch_size * num_samples
    done = _resume(path, prompts, num_samples, unit)
    first = -(-done // num_samples // batch_size)  # done is whole batches, or every line
    batches = range(first, -(-len(prompts) // batch_size))
    if stop_after is not None:
        batches = batches[:stop_after]
    bar = tqdm(total=len(prompts), initial=min(first * batch_size, len(prompts)), disable=not progress)
    bar.set_description("distill: teacher generates")
    start, new_tokens, new_lines = time.perf_counter(), 0, 0
    try:
        with open(path, "ab") as f:
            for b in batches:
                chunk = prompts[b * batch_size : (b + 1) * batch_size]
                ids, mask = _batch(chunk, batch_size, num_samples, pad)
                rng = _row_keys(seed, chunk, batch_size, num_samples) if temperature > 0 else None
                out = generate(
                    model,
                    params,
                    ids,
                    max_new_tokens,
                    attention_mask=mask,
                    rng=rng,
                    temperature=temperature,
                    top_k=top_k or None,
                    top_p=top_p if top_p < 1 else None,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )
                keep, ended = (np.asarray(x) for x in completion_mask(out, eos))
                out = np.asarray(out)
                lines = []
                for r in range(len(chunk) * num_samples):
                    p, k, n = chunk[r // num_samples], r % num_samples, int(keep[r].sum())
                    text = tokenizer.decode(out[r, : n - bool(ended[r])].tolist(), skip_special_tokens=True)
                    record = make_record(p.part, text, {**provenance, "source": p.where, "sample": k})
                    row = {"index": p.index, "sample": k, "eos": bool(ended[r]), "tokens": n, "record": record}
                    lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                    new_tokens += n
                f.write("".join(lines).encode("utf-8"))  # one write per batch: a kill tears at most the tail
                f.flush()
                os.fsync(f.fileno())
                new_lines += len(lines)
                bar.update(len(chunk))
                bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - start):.0f}")
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    return {
        "prompts": len(prompts),
        "lines": done + new_lines,
        "resumed_lines": done,
        "new_lines": new_lines,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_s": new_tokens / seconds if new_lines else None,
    }


# ---------------------------------------------------------------------------- filter


def filter_generations(
    generations: str | os.PathLike,
    out: str | os.PathLike,
    *,
    drop_empty: bool = True,
    drop_truncated: bool = True,
    drop_duplicates: bool = True,
) -> dict:
    """Write the kept records of a :func:`generate_responses` file to the JSONL file ``out``.

    Dropped, each for the first reason that applies: ``empty`` (the answer is only whitespace),
    ``truncated`` (no EOS within max_new_tokens), ``duplicate`` (the same text as an answer to the
    same prompt kept earlier). Returns ``{"generated", "kept", "dropped": {reason: count}}``.
    """
    generations, out = Path(generations), Path(out)
    counts = dict.fromkeys(REASONS, 0)
    seen: dict[int, set[str]] = {}
    kept = []
    with open(generations, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.endswith("\n")]
    for row in rows:
        text = response_of(row["record"])
        if drop_empty and not text.strip():
            reason = "empty"
        elif drop_truncated and not row["eos"]:
            reason = "truncated"
        elif drop_duplicates and text in seen.get(row["index"], ()):
            reason = "duplicate"
        else:
            seen.setdefault(row["index"], set()).add(text)
            kept.append(json.dumps(row["record"], ensure_ascii=False) + "\n")
            continue
        counts[reason] += 1
    atomic_write(out, lambda tmp: tmp.write_text("".join(kept), encoding="utf-8"))
    return {"generated": len(rows), "kept": len(kept), "dropped": counts}


# ---------------------------------------------------------------------------- evaluation


def generation_speed(
    model, params, tokenizer, pairs, *, template, max_length: int, max_new_tokens: int, batch_size: int
) -> float | None:
    """Greedy tokens per second on one batch of the prompts of ``pairs`` (timed after a first,
    compiling run): the tokens generated up to each EOS over the wall time; None without a prompt."""
    from jft.objectives.rl import completion_mask

    items, _ = read_prompts(pairs, tokenizer, max_length=max_length, template=template)
    items = items[:batch_size]
    if not items:
        return None
    eos, pad = _eos_and_pad(model, tokenizer)
    ids, mask = _batch(items, batch_size, 1, pad)

    def run():
        out = generate(model, params, ids, max_new_tokens, attention_mask=mask, eos_token_id=eos, pad_token_id=pad)
        return int(np.asarray(completion_mask(out, eos)[0])[: len(items)].sum())

    run()
    start = time.perf_counter()
    tokens = run()
    return tokens / (time.perf_counter() - start)


# ---------------------------------------------------------------------------- the command


def distill(config: ConfigDict, workdir: str | os.PathLike) -> dict:
    """``jft distill``: the teacher answers ``distill.prompts`` (default ``data.train``), the answers
    are filtered into ``WORKDIR/distill/data.jsonl`` and the student trains on them with
    :func:`jft.train.fit` (data.train = that file; validation: ``data.validation``, else the usual
    held-out share of it). Running it again resumes generation, then training.

    Writes into ``WORKDIR/distill``: ``generations.jsonl`` (raw, resumable), ``settings.json``,
    ``data.jsonl``, ``stats.json`` (prompts, generated, kept, dropped per reason) and
    ``report.json``: the teacher's, the untrained and the trained student's validation metrics
    (the objective's, e.g. loss and perplexity), their parameter counts and greedy tokens/s; the
    rest of ``WORKDIR`` is what ``fit`` writes. Returns the report.
    """
    from jft.train import fit
    from jft.train.inputs import records
    from jft.train.trainer import _model, _objective, score

    check(config)
    cfg, d = config, config.distill
    workdir = Path(workdir)
    out = workdir / "distill"
    main = jax.process_index() == 0
    source = d.prompts or cfg.data.train
    if not source:
        raise ConfigError("no prompts: set distill.prompts (or data.train) to prompt records")
    max_prompt = cfg.data.seq_len - d.max_new_tokens
    if max_prompt < 1:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} leaves no room for a prompt before distill.max_new_tokens="
            f"{d.max_new_tokens} tokens of answer; raise data.seq_len or lower max_new_tokens"
        )
    template = jdata.TEMPLATES[cfg.data.template]
    pairs = jdata.load_records(source, split=cfg.data.split, data_dir=cfg.data.data_dir or None)

    # ------------------------------------------------------------------ Teacher generates (resumable)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    teacher, teacher_params, teacher_tok = load_teacher(cfg, mesh, rules)
    prompts, prompt_stats = read_prompts(
        pairs, teacher_tok, max_length=max_prompt, template=template, vocab_size=teacher.config.vocab_size
    )
    _log(main, f"distill prompts ({source}): {prompt_stats} (dropped: over {max_prompt} tokens)")
    teacher_path = str(Path(d.teacher).expanduser().absolute()) if Path(d.teacher).expanduser().is_dir() else d.teacher
    adapter = str(Path(d.teacher_adapter).expanduser().absolute()) if d.teacher_adapter else None
    settings = {
        "teacher": teacher_path,
        "adapter": adapter,
        "teacher_quant": d.teacher_quant,
        "dtype": cfg.model.dtype,
        "compute_dtype": resolve_compute_dtype(cfg),
        "prompts_source": str(source),
    }
    out.mkdir(parents=True, exist_ok=True)
    generation = generate_responses(
        teacher,
        teacher_params,
        teacher_tok,
        prompts,
        out / GENERATIONS,
        num_samples=d.num_samples,
        max_new_tokens=d.max_new_tokens,
        temperature=d.sample_temperature,
        top_k=d.sample_top_k,
        top_p=d.sample_top_p,
        seed=cfg.train.seed,  # the schema has no distill.seed: the run's seed
        batch_size=d.generate_batch_size,
        settings=settings,
        progress=main,
    )

    # ------------------------------------------------------------------ Filter -> SFT data
    counts = filter_generations(
        out / GENERATIONS,
        out / DATA,
        drop_empty=d.drop_empty,
        drop_truncated=d.drop_truncated,
        drop_duplicates=d.drop_duplicates,
    )
    stats = {
        "prompts": prompt_stats.records,
        "prompts_kept": prompt_stats.kept,
        "prompts_too_long": prompt_stats.dropped,
        **counts,
        "generation": generation,
    }
    jmetrics.write_report(out / STATS, stats)
    dropped = ", ".join(f"{v} {k}" for k, v in counts["dropped"].items())
    _log(main, f"distill data: {counts['generated']} generated, {counts['kept']} kept, dropped: {dropped}")
    if not counts["kept"]:
        raise DataError(f"every generated response was dropped ({dropped}); see {out / GENERATIONS}")

    student_cfg = ConfigDict(cfg.to_dict())  # a copy: the caller's config stays as it was
    student_cfg.data.train, student_cfg.data.mixture = str(out / DATA), ()
    val_pairs = records(student_cfg, _objective(student_cfg))[1]  # the held-out records fit scores too

    # ------------------------------------------------------------------ Teacher scores, speed; then freed
    teacher_report = {
        "path": teacher_path,
        "adapter": adapter,
        "quant": d.teacher_quant or None,
        "parameters": parameter_count(teacher_params),
        "validation": score(_objective(student_cfg), teacher, teacher_params, teacher_tok, val_pairs)[0],
    }
    speed = dict(
        template=template, max_length=max_prompt, max_new_tokens=d.max_new_tokens, batch_size=d.generate_batch_size
    )
    speed_pairs = [pairs[p.index] for p in prompts[: d.generate_batch_size]]
    teacher_report["tokens_per_s"] = generation_speed(teacher, teacher_params, teacher_tok, speed_pairs, **speed)
    teacher_vocab = teacher_tok.get_vocab()
    del teacher, teacher_params, teacher_tok  # the student loads next: let the teacher's memory go
    gc.collect()

    # ------------------------------------------------------------------ Student trains
    fitted = fit(student_cfg, workdir)
    if fitted.get("status") == "preempted":
        return {"status": "preempted", "fit": fitted, "data": stats}

    # ------------------------------------------------------------------ Report
    tokenizer = load_tokenizer(workdir / "tokenizer")
    student_report = {
        "before": fitted["before"],
        "after": fitted["after"],
        "parameters": None,
        "tokens_per_s": None,
    }
    student = None
    if "adapter" in fitted:  # the base (model.path, or model.new from train.seed as fit made it) + the adapter
        base = _model(student_cfg, tokenizer, mesh, rules, _objective(student_cfg).model_overrides)
        student = peft.load_adapter(*base, fitted["adapter"])
    elif "hf" in fitted:
        student = load_hf(fitted["hf"], dtype=cfg.model.dtype, compute_dtype=resolve_compute_dtype(cfg))
    if student is not None:
        student_report["parameters"] = parameter_count(student[1])
        student_report["tokens_per_s"] = generation_speed(*student, tokenizer, speed_pairs, **speed)
    report = {
        "status": fitted["status"],
        "teacher": teacher_report,
        "student": student_report,
        "same_tokenizer": tokenizer.get_vocab() == teacher_vocab,  # else losses count different tokens
        "data": stats,
        "validation_data": fitted["validation_data"],
        "fit": {k: fitted[k] for k in ("steps", "resumed_from", "steps_run", "hf", "adapter") if k in fitted},
        "workdir": str(workdir),
    }
    if main:
        jmetrics.write_report(out / REPORT, report)
        _log(main, table(report))
    return report


def table(report: dict) -> str:
    """A few lines comparing teacher and student: validation loss and perplexity, size, tokens/s."""

    def cell(v, width, spec):
        return format(v, f"{width}{spec}") if isinstance(v, (int, float)) else format("-", f">{width}")

    t, s = report["teacher"], report["student"]
    lines = [f"{'':16}{'loss':>10}{'perplexity':>12}{'parameters':>14}{'tokens/s':>10}"]
    for name, metrics, params, speed in (
        ("teacher", t["validation"], t["parameters"], t["tokens_per_s"]),
        ("student before", s["before"], s["parameters"], None),
        ("student after", s["after"], s["parameters"], s["tokens_per_s"]),
    ):
        loss, ppl = metrics.get("loss"), metrics.get("perplexity")
        row = cell(loss, 10, ".4f") + cell(ppl, 12, ".3f") + cell(params, 14, ",") + cell(speed, 10, ".1f")
        lines.append(f"{name:16}{row}")
    return "\n".join(lines)


def _log(main: bool, message: str) -> None:
    if main:
        print(message, flush=True)


__all__ = [
    "PromptItem",
    "distill",
    "filter_generations",
    "generate_responses",
    "generation_speed",
    "load_teacher",
    "make_record",
    "parameter_count",
    "read_prompts",
    "response_of",
    "table",
]
