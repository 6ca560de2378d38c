"""``fit(config, workdir)``: the one loop, from a config to a fine-tuned model, for every objective.

``config.task`` picks the objective (:data:`jft.objectives.TASKS`), which supplies its rows, its
loss, its evaluation and its export (:class:`jft.objectives.Objective`); everything else is here.
``fit`` reads top to bottom: objective, records, tokenizer, mesh, model, vocabulary, checkpoints,
optimizer, the jitted step (:mod:`jft.train.step`), the loop, final evaluation and export; the
records, tokenizer and vocabulary come from :mod:`jft.train.inputs`, the other pieces it calls
follow it. From ``jft train`` to the step: jft/cli.py -> this file -> jft/train/step.py.
Everything a run writes goes to ``workdir``: config.json, tokenizer/, ckpt/ and best/ (Orbax;
or under ``train.checkpoint_dir``, e.g. a gs:// bucket on a pod, with a copy of config.json),
metrics.jsonl, tb/ (TensorBoard), loss.png, report.json, slices.json + slices.png (eval.slices),
vocabulary.json (tokenizer.add_tokens / learn_tokens) and hf/ (the model).
Running ``fit`` again resumes from the latest checkpoint in the checkpoint root (the workdir or
``train.checkpoint_dir``), after checking the config against the one saved there. On a pod every
host runs ``fit`` with the same config (after :func:`jft.sharding.initialize_distributed`);
process 0 writes the logs and exports.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
from etils import epath

from jft import data as jdata
from jft import metrics as jmetrics
from jft import partition, peft, sharding
from jft import vocab as jvocab
from jft.config import ConfigDict, ConfigError, check, default_config, resolve_compute_dtype, to_json
from jft.hf import load_hf, load_tokenizer
from jft.models import attention as attention_lib
from jft.models.llama import LlamaConfig, LlamaForCausalLM
from jft.objectives import TASKS, Objective
from jft.safetensors_io import atomic_write
from jft.train import inputs
from jft.train.checkpoint import Checkpoints
from jft.train.optim import optimizer_from_config
from jft.train.state import TrainingError, TrainState
from jft.train.step import make_eval_step, make_train_step
from jft.tree import flat

# Changing these between a run and its resumption would change what the run trains on.
_FIXED_ON_RESUME = ("model.", "tokenizer.", "data.", "peft.", "train.seed", "train.batch_size", "train.rules")
_FIXED_ON_RESUME += ("optim.mu_dtype", "optim.nu_dtype", "optim.bf16_update")  # the optimizer state's layout
_FREE_ON_RESUME = ("data.cache_dir", "data.num_proc")  # where and how fast the same rows are tokenized


def fit(config: ConfigDict, workdir: str | os.PathLike) -> dict:
    """Fine-tune as ``config`` says, writing into ``workdir``; resume if the checkpoint root holds
    a checkpoint.

    Returns the final report: validation loss and perplexity before and after, generation
    metrics before and after, the final step (``steps``), the checkpoint step this call resumed
    from (``resumed_from``, 0 for a fresh start), the train steps this call ran (``steps_run``),
    with ``tokenizer.add_tokens`` / ``learn_tokens`` the tokens added and the tokens per word of
    the training texts before and after (``vocabulary``), and where the outputs are.
    """
    # ------------------------------------------------------------------ Config
    check(config)
    cfg = config
    workdir = Path(workdir)
    main = jax.process_index() == 0
    if cfg.model.quantize and not (cfg.model.path and cfg.peft.methods):
        raise ConfigError("model.quantize (QLoRA) needs a model.path to quantize and peft.methods to train")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not a multiple of grad_accum={cfg.train.grad_accum}"
        )

    objective = _objective(cfg)

    # ------------------------------------------------------------------ Data records + tokenizer
    train_pairs, val_pairs = inputs.records(cfg, objective)
    tokenizer = inputs.run_tokenizer(cfg, workdir, train_pairs)

    # ------------------------------------------------------------------ Mesh (one device = a 1x1x1 mesh)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    rows_split = mesh.shape["data"] * mesh.shape["fsdp"]
    if (cfg.train.batch_size // cfg.train.grad_accum) % rows_split:
        raise ConfigError(
            f"micro-batch of {cfg.train.batch_size // cfg.train.grad_accum} rows does not split over "
            f"data x fsdp = {rows_split} devices; make train.batch_size / grad_accum a multiple of it"
        )

    # ------------------------------------------------------------------ Model (created or read onto its shards)
    model, params = _model(cfg, tokenizer, mesh, rules, objective.model_overrides)
    records = inputs.training_records(cfg, train_pairs)
    model, params, tokenizer, added = inputs.vocabulary(cfg, workdir, model, params, tokenizer, records)
    rows = inputs.row_rules(cfg, objective, params, added)  # tokenizer.train_rows: the tables the new rows train in
    vocab = model.config.vocab_size
    if cfg.peft.methods:
        spec = _peft_spec(cfg, tokenizer, rows + objective.train_rules)
        model, params = peft.inject(model, params, spec, jax.random.key(cfg.train.seed + 1))
    params = jax.device_put(params, sharding.param_shardings(model, mesh, rules, params))  # new PEFT leaves and rows

    # ------------------------------------------------------------------ Tokens, rows, batches
    data = objective.rows((train_pairs, val_pairs), tokenizer, vocab)
    train_rows, val_rows = data["train"], data["validation"]
    train_stats, val_stats = data["train_stats"], data["validation_stats"]
    # Each host reads only the rows of a batch that its devices hold (objective.host_local); the
    # batches' order follows from the seed alone, so any host count sees the same global batches.
    batch_sharding = sharding.batch_sharding(mesh, rules)
    local = sharding.host_rows(batch_sharding, cfg.train.batch_size, cfg.train.grad_accum)
    local = local if objective.host_local else None
    batches = jdata.Batches(train_rows, cfg.train.batch_size, cfg.train.seed, positions=local)
    total_steps = cfg.train.max_steps or cfg.train.epochs * batches.steps_per_epoch
    updates = objective.updates_per_step  # optimizer updates per step of the loop (the schedule counts them)
    _log(main, f"{objective.name} data: {train_stats} -> {len(train_rows)} rows; validation: {val_stats}")
    # Only now, with config, data, tokenizer and model checked, does the run write anything.
    ckpts = Checkpoints(cfg.train.checkpoint_dir or workdir, cfg.train.keep_checkpoints)
    try:
        _check_resume(cfg, workdir, ckpts)
    except Exception:  # refused: release Orbax's managers before the error leaves fit
        ckpts.close()
        raise
    if main and added:
        atomic_write(workdir / "vocabulary.json", lambda tmp: tmp.write_text(json.dumps(added, indent=2)))
    if main and not (workdir / "tokenizer").is_dir():  # renamed into place: never seen half-written
        atomic_write(workdir / "tokenizer", tokenizer.save_pretrained)
    prepared = objective.prepare_rows(model, params, data, workdir)  # after the checks: it may write there
    if prepared is not data:
        train_rows, val_rows = prepared["train"], prepared["validation"]
        batches = jdata.Batches(train_rows, cfg.train.batch_size, cfg.train.seed, positions=local)

    # ------------------------------------------------------------------ Partition + optimizer
    num_layers = model.config.num_hidden_layers
    if cfg.peft.methods:
        labels = peft.labels(params, model.peft)
    else:
        labels = partition.labels(params, rows + objective.train_rules + tuple(map(tuple, cfg.train.rules)), num_layers)
    if rows and cfg.tokenizer.train_rows == "new":  # of those tables, the new rows only
        labels = jvocab.new_row_labels(labels, params, added["ids"], rows)
    _log(main, partition.summary(params, labels))
    _log(main, f"attention: {attention_lib.describe(cfg.model.attention, cfg.model.attention_chunk)}")
    params, labels = objective.add_frozen(model, params, labels, mesh, rules)  # e.g. a reference policy's copy
    masks = partition.layer_masks(partition.split(params, labels)[0], labels)  # partly frozen layer stacks
    tx, schedule = optimizer_from_config(cfg.optim, total_steps * updates, masks, seed=cfg.train.seed)
    eval_sharding = sharding.batch_sharding(mesh, rules, accum=False)
    state = sharding.on_mesh(TrainState.create(params, labels, tx, jax.random.key(cfg.train.seed)), mesh)
    del params  # the first step donates (and so deletes) these buffers

    # ------------------------------------------------------------------ Step
    loss_fn = objective.loss(model, mesh, rules)
    train_step = jax.jit(make_train_step(loss_fn, tx, schedule, masks), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(loss_fn))
    accum = cfg.train.grad_accum

    def put(batch: dict) -> dict:  # host rows [batch, ...] -> [grad_accum, micro-batch, ...] on the mesh
        shaped = {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}
        rows = None if local is None else cfg.train.batch_size // accum  # the batch is this host's share
        return sharding.put_batch(shaped, batch_sharding, rows=rows)

    step_fn = objective.make_step(model, train_step, put, tokenizer)

    def validate(state) -> dict:
        params = partition.join(state.trainable, state.frozen)
        return objective.validate(model, params, eval_step, val_rows, eval_sharding)

    slices_file = workdir / "slices.json"

    def generation_metrics(state, when: str) -> dict:
        params = partition.join(state.trainable, state.frozen)
        out = objective.extra_eval(model, params, tokenizer, val_pairs)
        slices = out.pop("slices", None)  # eval.slices: written apart, too big for the report
        if slices and main:
            _write_slices(slices_file, when, slices, cfg.eval)
        return out

    # ------------------------------------------------------------------ Checkpoint
    meta = {"best_loss": None, "bad_evals": 0, "before": None}
    resumed_from = 0
    if ckpts.latest_step is not None:
        state, meta = ckpts.restore(state)  # frozen params come from the model source, not the checkpoint
        batches.restore(meta["data"])
        objective.load_state(meta.get("objective", {}))
        resumed_from = ckpts.latest_step
        _log(main, f"resumed from step {resumed_from} ({ckpts.directory})")
    else:
        before = validate(state)
        meta["before"] = {**before, **generation_metrics(state, "before")}
        _log(main, f"before fine-tuning: {_fmt(meta['before'])}")

    def save(step, state, best=False):  # checkpoints are numbered by the loop's steps
        meta.update(data=batches.state(), objective=objective.state())
        ckpts.save(step, state, meta, best=best)

    # ------------------------------------------------------------------ Loop
    writer = _Writer(workdir, main)
    preempted = []
    previous = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
    pending, last_saved = [], ckpts.latest_step
    step = resumed_from  # a host counter: the loop never waits on the device to know the step
    progress = _progress(main, step, total_steps)
    start, tokens, steps_run = time.perf_counter(), 0, 0
    stop_reason = "done"
    try:
        while step < total_steps:
            state, metrics = step_fn(state, next(batches), step)
            steps_run += 1
            step += 1
            pending.append((step, metrics))
            flush = step % cfg.train.log_every == 0 or step == total_steps
            evaluate_now = cfg.train.eval_every and step % cfg.train.eval_every == 0
            checkpoint_now = (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or preempted
            if flush or evaluate_now or checkpoint_now:
                logged = _flush(pending, ckpts.directory, last_saved)
                tokens += logged["tokens"]
                rate = tokens / (time.perf_counter() - start)
                writer.scalars(step, {**logged, "tokens_per_s": rate})
                progress.update(step, logged, rate)
            if evaluate_now and step < total_steps:
                val = validate(state)
                writer.scalars(step, {f"val_{k}": v for k, v in val.items()})
                improved = meta["best_loss"] is None or val["loss"] < meta["best_loss"] - cfg.train.min_delta
                meta["bad_evals"] = 0 if improved else meta["bad_evals"] + 1
                if improved:
                    meta["best_loss"] = val["loss"]
                    save(step, state, best=True)
                if cfg.train.patience and meta["bad_evals"] >= cfg.train.patience:
                    stop_reason = f"early stop: no improvement in {cfg.train.patience} evaluations"
                    save(step, state)
                    break
            if checkpoint_now or preempted:  # a SIGTERM that came after checkpoint_now was decided too
                save(step, state)
                last_saved = step
            if preempted:
                stop_reason = "preempted (SIGTERM): checkpoint saved"
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
    ran = {"resumed_from": resumed_from, "steps_run": steps_run}  # proof of what this call did
    _log(main, f"step {step}: {steps_run} steps run here, resumed from step {resumed_from} (0: a fresh start)")
    if preempted:
        ckpts.close()
        writer.close()
        _log(main, f"{stop_reason} at step {step}; run the same command to resume")
        return {"status": "preempted", "step": step, **ran}
    save(step, state)

    # ------------------------------------------------------------------ Final evaluation + export
    val = validate(state)
    if meta["best_loss"] is None or val["loss"] < meta["best_loss"] - cfg.train.min_delta:
        meta["best_loss"] = val["loss"]
        save(step, state, best=True)
    writer.scalars(step, {f"val_{k}": v for k, v in val.items()})
    after = {**val, **generation_metrics(state, "after")}
    ckpts.close()
    writer.close()
    report = {
        "status": stop_reason,
        "task": objective.name,
        "steps": step,
        **ran,
        "before": meta["before"],
        "after": after,
        "train_data": str(train_stats),
        "validation_data": str(val_stats),
        "workdir": str(workdir),
    }
    if cfg.eval.slices and slices_file.exists():
        report["slices"] = str(slices_file)
    if added:  # tokenizer.add_tokens / learn_tokens: the tokens and the fit to the training texts
        fit = {k: added[k] for k in ("records", "tokens_per_word_before", "tokens_per_word_after")}
        report["vocabulary"] = {"added": len(added["ids"]), "learned": len(added["learned"]), **fit}
    params = sharding.to_host(partition.join(state.trainable, state.frozen))  # all processes take part
    if main:  # merging and writing run on the host CPU: an accelerator may not hold the whole model
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            objective.export(model, params, tokenizer, workdir, report)
            jmetrics.write_report(workdir / "report.json", report)
            _plot(workdir)
    _log(main, f"after fine-tuning: {_fmt(after)}")
    if main and slices_file.exists() and cfg.eval.slices:
        slices = json.loads(slices_file.read_text())
        jmetrics.slice_plot(slices, workdir / "slices.png")
        _log(main, jmetrics.slice_table(slices))
    return report


def evaluate(
    config: ConfigDict,
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    adapter: str | None = None,
    reference: str | os.PathLike | None = None,
    baseline: str | os.PathLike | None = None,
) -> dict:
    """Score a Hugging Face model folder (with a PEFT ``adapter`` folder on top, if given) on
    ``config``'s validation data; write a JSON report.

    The validation records are ``data.validation``, or the same held-out share of
    ``data.train`` that training used. Reports the objective's validation metrics (SFT: loss,
    perplexity and generation metrics; DPO: trl's ``rewards/*`` and ``logps/*``). ``reference``:
    a model folder the objective compares against (DPO's reference policy; with an ``adapter``
    and no reference, the base without the adapter is the reference). ``baseline``: a second
    model folder scored on the same records (``eval.slices`` on for both); the report's
    ``comparison`` is the paired bootstrap of the loss change from the baseline to the model,
    and ``out.slices.json`` holds both slice reports (``before`` = the baseline, ``after``).
    """
    check(config)
    cfg = config
    if baseline and not cfg.eval.slices:
        cfg = copy.deepcopy(config)
        cfg.eval.slices = True  # the paired comparison needs each record's own loss
    objective = _objective(cfg)
    load = lambda path: load_hf(
        path, dtype=cfg.model.dtype, compute_dtype=resolve_compute_dtype(cfg), **objective.model_overrides
    )
    ref_params = load(reference)[1] if reference else None
    train_pairs, pairs = inputs.records(cfg, objective)
    # the training records only count tokens for the frequency slices (eval.slices)
    counted = train_pairs if cfg.eval.slices else []

    def scored(path, adapter_path) -> tuple[dict, str]:
        model, params = load(path)
        if adapter_path:
            model, params = peft.load_adapter(model, params, adapter_path)
        params = objective.add_reference(model, params, ref_params)
        tokenizer = load_tokenizer(path)
        if tokenizer is None:
            raise ConfigError(f"{path} has no tokenizer; save one beside the model (save_hf(..., tokenizer=))")
        return score(objective, model, params, tokenizer, pairs, counted)

    report, stats = scored(model_path, adapter)
    slices = report.pop("slices", None)
    if baseline:
        before, _ = scored(baseline, None)
        if not slices or not before.get("slices"):
            raise ConfigError(f"jft eval --baseline compares per-record losses, which task={cfg.task} does not report")
        slices = {"before": before.pop("slices"), "after": slices}
        slices["comparison"] = report["comparison"] = jmetrics.compare_losses(
            slices["before"], slices["after"], cfg.eval.bootstrap_resamples, cfg.eval.seed
        )
        report["baseline"] = {"model": str(baseline), **before}
    if slices:  # beside the report: out.json -> out.slices.json (and out.slices.png with a baseline)
        report["slices"] = str(jmetrics.write_report(Path(out).with_suffix(".slices.json"), slices))
        if baseline:
            jmetrics.slice_plot(slices, Path(out).with_suffix(".slices.png"))
        print(jmetrics.slice_table(slices), flush=True)
    given = {"adapter": adapter, "reference": reference}
    report.update(model=str(model_path), data=stats, **{k: str(v) for k, v in given.items() if v})
    jmetrics.write_report(Path(out), report)
    return report


def score(objective: Objective, model, params, tokenizer, pairs, train_pairs=()) -> tuple[dict, str]:
    """``(report, data stats)``: ``objective``'s validation report of ``params`` on the ``(where,
    record)`` ``pairs`` (its rows, eval step, :meth:`~Objective.validate` and
    :meth:`~Objective.extra_eval`), as ``jft eval`` computes it; ``train_pairs`` only feed the
    statistics an objective takes from training data (SFT's token frequencies for the slices)."""
    data = objective.rows((list(train_pairs), pairs), tokenizer, model.config.vocab_size)
    eval_step = jax.jit(make_eval_step(objective.loss(model)))
    report = objective.validate(model, params, eval_step, data["validation"])
    report.update(objective.extra_eval(model, params, tokenizer, pairs))
    return report, data["validation_stats"]


# ---------------------------------------------------------------------------- pieces


def _objective(cfg) -> Objective:
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is not one of {sorted(TASKS)}")
    return TASKS[cfg.task](cfg)


def _model(cfg, tokenizer, mesh, rules, objective_overrides):
    overrides = dict(
        **objective_overrides,
        remat=cfg.model.remat,
        loss_chunk=cfg.model.loss_chunk,
        attention=cfg.model.attention,
        attention_chunk=cfg.model.attention_chunk,
        mlp_chunk=cfg.model.mlp_chunk,
    )
    if cfg.model.path:
        return load_hf(
            cfg.model.path,
            dtype=cfg.model.dtype,
            compute_dtype=resolve_compute_dtype(cfg),
            quantize=cfg.model.quantize or None,
            quantize_skip=tuple(cfg.model.quantize_skip),
            block_size=cfg.model.quant_block_size,
            double_quant=cfg.model.double_quant,
            mesh=mesh,
            rules=rules,
            **overrides,
        )
    config = LlamaConfig(
        **cfg.model.new.to_dict(),  # the architecture fields are LlamaConfig's own names
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
        param_dtype=cfg.model.dtype,
        dtype=resolve_compute_dtype(cfg),
        **overrides,
    )
    model = LlamaForCausalLM(config)
    return model, model.init_params(jax.random.key(cfg.train.seed), sharding.param_shardings(model, mesh, rules))


def _peft_spec(cfg, tokenizer, train_rules=()) -> peft.Peft:
    """The :class:`jft.peft.Peft` that ``cfg.peft`` describes (ConfigError when it is bad)."""
    if tuple(cfg.train.rules) != tuple(tuple(r) for r in default_config().train.rules):
        raise ConfigError("train.rules and peft.methods both set: with PEFT, add extra rules in peft.train instead")
    try:
        return peft.from_config(cfg.peft, tokenizer, train_rules)
    except ValueError as e:
        raise ConfigError(f"peft: {e}") from None


def _check_resume(cfg, workdir: Path, ckpts: Checkpoints) -> None:
    """Save the config in the workdir and beside the checkpoints; when the checkpoint root holds a
    checkpoint, refuse changes that would change what is trained on.

    The saved config checked against is the one beside the checkpoints, so the check also runs
    when they live under ``train.checkpoint_dir`` (a gs:// bucket) and the workdir is new (a pod
    host recreated after preemption), and every host of a pod reads the same file.
    """
    root = ckpts.directory.parent
    saved = root / "config.json"
    new = json.loads(to_json(cfg))
    step = ckpts.latest_step
    if step is not None:
        if not saved.exists():
            raise TrainingError(
                f"{ckpts.directory} holds a checkpoint (step {step}) but {saved}, the config of the run that "
                "saved it, is missing, so a resume cannot be checked against it. Put that run's config.json "
                "back there, or point train.checkpoint_dir (or the workdir) elsewhere for a new run."
            )
        # A key the saved config lacks (added to the schema since) counts as its default.
        old = {**flat(json.loads(to_json(default_config())), "."), **flat(json.loads(saved.read_text()), ".")}
        now = flat(new, ".")
        # The compute dtype is compared as resolved ("auto" on a CPU is the "" = float32 of older runs).
        for keys in (old, now):
            keys["model.compute_dtype"] = _resolved_compute_dtype(keys)
        changed = sorted(k for k in now if now.get(k) != old.get(k))
        fixed = [k for k in changed if k.startswith(_FIXED_ON_RESUME) and k not in _FREE_ON_RESUME]
        if fixed:
            raise TrainingError(
                f"{root} holds a run (checkpoint at step {step}) whose config differs in {fixed}; resuming would "
                "train on different data or model. Use a new workdir (and train.checkpoint_dir), or restore "
                "those values."
            )
        if changed:
            _log(jax.process_index() == 0, f"resuming with changed settings: {changed}")
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        root.mkdir(parents=True, exist_ok=True)
        for file in {epath.Path(workdir).absolute() / "config.json", saved}:  # one file when root is the workdir
            atomic_write(file, lambda tmp: tmp.write_text(json.dumps(new, indent=2)))  # never seen half-written


def _resolved_compute_dtype(flat: dict) -> str:
    model = ConfigDict({"compute_dtype": flat["model.compute_dtype"], "dtype": flat["model.dtype"]})
    return resolve_compute_dtype(ConfigDict({"model": model}))


def _write_slices(path: Path, when: str, slices: dict, eval_cfg) -> None:
    """workdir/slices.json: the slice reports ``before`` and ``after`` fine-tuning and, once both
    are there, ``comparison``: the paired bootstrap of the loss change (a resumed run reads the
    ``before`` written by the first call)."""
    report = json.loads(path.read_text()) if when == "after" and path.exists() else {}
    report[when] = slices
    if report.get("before") and report.get("after"):
        report["comparison"] = jmetrics.compare_losses(
            report["before"], report["after"], eval_cfg.bootstrap_resamples, eval_cfg.seed
        )
    jmetrics.write_report(path, report)


def _flush(pending: list, ckpt_dir, last_saved) -> dict:
    """Fetch the metrics of the steps since the last flush; stop on a non-finite loss."""
    fetched = jax.device_get([m for _, m in pending])
    for (step, _), m in zip(pending, fetched, strict=True):
        if not math.isfinite(float(m["loss"])):
            where = f"the checkpoint at step {last_saved} in {ckpt_dir}" if last_saved else "the start"
            raise TrainingError(
                f"loss is {float(m['loss'])} at step {step}; resume from {where} with a lower learning rate"
            )
    pending.clear()
    last = fetched[-1]
    logged = {
        "loss": float(np.mean([float(m["loss"]) for m in fetched])),
        "grad_norm": float(last["grad_norm"]),
        "lr": float(last["lr"]),
        "tokens": int(sum(int(m["tokens"]) for m in fetched)),
    }
    for k in last.keys() - logged.keys() - {"weight"}:  # the objective's own metrics, averaged over the steps
        logged[k] = float(np.mean([float(m[k]) for m in fetched]))
    return logged


class _Writer:
    """metrics.jsonl and TensorBoard event files, from process 0 only."""

    def __init__(self, workdir: Path, main: bool):
        self.main = main
        if main:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tb"))
            self.jsonl = open(workdir / "metrics.jsonl", "a")

    def scalars(self, step: int, values: dict) -> None:
        if not self.main:
            return
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.main:
            self.tb.close()
            self.jsonl.close()


class _progress:
    """A tqdm bar with loss, lr and tokens/s."""

    def __init__(self, main: bool, start: int, total: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, disable=not main, desc="train", dynamic_ncols=True)

    def update(self, step: int, logged: dict, rate: float) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{logged['loss']:.4f}", lr=f"{logged['lr']:.2e}", tok_s=f"{rate:.0f}")

    def close(self) -> None:
        self.bar.close()


def _plot(workdir: Path) -> None:
    """loss.png: training loss per logged step and validation loss per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "loss.png", dpi=100)
    plt.close(fig)


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))


def _log(main: bool, message: str) -> None:
    if main:
        print(message, flush=True)


__all__ = ["TrainingError", "evaluate", "fit"]
