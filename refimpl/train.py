"""The training loop behind `refimpl train`: config -> ranks -> backend, data, model, engine -> run directory.

Every rank runs `_train_rank` (SPMD): N simulated ranks are threads of this process (LocalComm), or real
processes under `mpiexec` (MPIComm). Each rank builds the same model from the same seed, trains on its own
slice of every global batch, and takes part in the collectives of its ZeRO stage; rank 0 writes the run
directory: config.json (the resolved config), metrics.jsonl (one JSON object per step, plus evaluation
lines), checkpoint/ (refimpl/checkpoint.py) and loss.png. The batch of every step is a pure function of
(seed, step) and the LR a pure function of the step, so `--resume` continues a run exactly.
"""
from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import blas_threads, host_malloc
from . import checkpoint as ckpt
from .autodiff import no_grad
from .backend import get_backend, use_backend
from .comm.local import LocalWorld, run_ranks
from .config import ConfigError, dumps
from .data import Batch, make_dataset
from .engine import Engine, param_dtype
from .lock import DirLock, LockError
from .model import ModelConfig, Transformer
from .zero.init import Init


class RunDirError(ValueError):
    """The output directory cannot be used without overwriting an earlier run."""


def default_out_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S-%f")


def prepare_out_dir(out) -> Path:
    """The run directory, new or empty, created; anything else is one RunDirError naming it."""
    out = Path(out)
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise RunDirError(f"output directory {str(out)!r} already exists and is not empty; "
                              f"choose another --out (nothing of an earlier run is overwritten)")
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".refimpl-write-probe"      # /proc, /sys and read-only mounts refuse files, not always dirs
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"cannot use output directory {str(out)!r}: {exc.strerror or exc}") from None
    return out


def build(config: dict):
    """(backend, dataset, model) for a resolved config."""
    be = get_backend(config["backend"])
    data_cfg = {k: v for k, v in config["data"].items() if k != "seq_len"}  # seq_len is per batch
    dataset = make_dataset(data_cfg)
    mcfg = dict(config["model"])
    mcfg["vocab_size"] = mcfg["vocab_size"] or dataset.vocab_size
    if mcfg["task"] == "classify":
        mcfg["n_classes"] = mcfg["n_classes"] or dataset.n_classes
    mcfg["cpu_checkpointing"] = config["activation_checkpointing"]["cpu_checkpointing"]
    if mcfg["vocab_size"] < dataset.vocab_size:
        raise ConfigError("model.vocab_size", f"must be >= the dataset's vocabulary ({dataset.vocab_size}), "
                                              f"got {mcfg['vocab_size']}")
    # stage 3 builds the model deferred (zero.Init): the engine draws and partitions it one parameter at a time
    with use_backend(be), Init(enabled=config["zero_optimization"]["stage"] == 3):
        model = Transformer(ModelConfig.from_dict(mcfg), seed=config["run"]["seed"], dtype=param_dtype(config))
    return be, dataset, model


def rank_slice(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank r's rows of a global batch: data parallelism sees the same data as one rank with N times the batch."""
    def cut(a):
        return None if a is None else a[rank * len(a) // world_size:(rank + 1) * len(a) // world_size]
    return Batch(ids=cut(batch.ids), targets=cut(batch.targets), labels=cut(batch.labels),
                 key_padding_mask=cut(batch.key_padding_mask))


def evaluate(model, dataset, config, comm) -> dict:
    """Mean loss (and accuracy for classification) over run.eval_batches validation batches, all ranks."""
    micro, T = config["train_micro_batch_size_per_gpu"], config["data"]["seq_len"]
    loss_sum, correct, total = 0.0, 0, 0
    with no_grad():
        for i in range(config["run"]["eval_batches"]):
            batch = rank_slice(dataset.get_batch("val", i, micro * comm.world_size, T), comm.rank, comm.world_size)
            loss, logits = model.loss(batch)
            loss_sum += loss.item()
            if batch.labels is not None:
                pred = np.argmax(logits.numpy().astype(np.float32), axis=-1)
                correct += int((pred == batch.labels).sum())
                total += len(batch.labels)
    sums = comm.all_reduce(np.array([loss_sum, correct, total], dtype=np.float64))
    out = {"eval_loss": float(sums[0] / (config["run"]["eval_batches"] * comm.world_size))}
    if sums[2]:
        out["eval_accuracy"] = float(sums[1] / sums[2])
    return out


def _swap_paths_in(config: dict, out: Path) -> dict:
    """A relative offload nvme_path means a folder inside the run directory (the default run's "swap")."""
    zero = config["zero_optimization"]
    if not any(zero[k] and zero[k]["nvme_path"] and not Path(zero[k]["nvme_path"]).is_absolute()
               for k in ("offload_param", "offload_optimizer")):
        return config
    config = json.loads(json.dumps(config))  # a copy; the caller's config is not changed
    for k in ("offload_param", "offload_optimizer"):
        sec = config["zero_optimization"][k]
        if sec and sec["nvme_path"] and not Path(sec["nvme_path"]).is_absolute():
            sec["nvme_path"] = str((out / sec["nvme_path"]).resolve())
    return config


def train(config: dict, out_dir=None, *, resume=None, progress: bool = True, comm=None) -> dict:
    """Train as `config` says on config["world_size"] ranks (or the ranks of `comm`); returns rank 0's summary.

    resume: a checkpoint path to continue from (any world size: it is resharded)."""
    if out_dir is not None and not str(out_dir).strip():
        raise RunDirError("the output directory is the empty string; give --out DIR (or leave --out out for "
                          "runs/<timestamp>/)")
    out = Path(out_dir if out_dir is not None else config["run"]["out"] or default_out_dir())
    if resume is not None:
        tag_dir, _ = ckpt.read_manifest(resume)  # a bad path fails before anything is written
        if comm is None or comm.rank == 0:
            _clean_crashed_saves(tag_dir.parent)
    host_malloc.keep_freed()   # each step's temporaries reuse the last step's memory (host_malloc.py)
    lock = None
    try:
        if comm is not None:  # real processes (MPI): this process is one rank
            if comm.rank == 0:
                lock = DirLock(prepare_out_dir(out), "a refimpl run")
            comm.barrier()
            return _train_rank(comm, config, out, resume, progress)
        lock = DirLock(prepare_out_dir(out), "a refimpl run")   # one run per run directory
        ws, timeout = config["world_size"], config["run"]["comm_timeout"]
        if ws == 1:
            return _train_rank(LocalWorld(1, timeout).comm(0), config, out, resume, progress)
        # the ranks are threads of this process: each gets an equal share of the cores for NumPy's BLAS
        with blas_threads.limited(max(1, blas_threads.cores() // ws)):
            return run_ranks(ws, _train_rank, config, out, resume, progress, timeout=timeout)[0]
    finally:
        if lock is not None:
            lock.release()


def _clean_crashed_saves(root: Path) -> None:
    """A resumed run's checkpoint folder may hold the leftovers of a save that crashed: remove them, unless the
    run that wrote the folder is still running (it holds its run directory)."""
    run_dir = root.parent if root.name == "checkpoint" else root
    try:
        lock = DirLock(run_dir, "a refimpl run")
    except (LockError, OSError):
        return                      # in use (or not ours to lock): leave everything as it is
    try:
        ckpt.clean_leftovers(root)
    except OSError:
        pass                        # a read-only checkpoint: its leftovers are harmless
    finally:
        lock.release()


def _write_ledger(out, engine) -> None:
    """Every rank writes its ledger part; rank 0 joins them into ledger.jsonl and draws timeline.png."""
    from .report import plot_timeline
    part = out / f".ledger.rank{engine.rank}.jsonl"
    engine.ledger.write_jsonl(part)
    engine.comm.barrier()
    if engine.rank == 0:
        events = []
        for r in range(engine.world_size):
            p = out / f".ledger.rank{r}.jsonl"
            events += [json.loads(line) for line in p.read_text().splitlines()]
            p.unlink()
        with open(out / "ledger.jsonl", "w") as f:
            for e in sorted(events, key=lambda e: (e["start"], e["rank"])):
                f.write(json.dumps(e) + "\n")
        plot_timeline(events, out / "timeline.png", title=f"{engine.world_size} rank(s), ZeRO stage {engine.zero.stage}")
    engine.comm.barrier()


def _train_rank(comm, config, out, resume, progress) -> dict:
    """One rank's run. config.json and the checkpoints keep relative swap paths relative (a resumed run puts
    its swap files inside its own run directory); only the engine sees them resolved."""
    be, dataset, model = build(config)
    with use_backend(be):
        engine = Engine(model, _swap_paths_in(config, out), be, comm)
        try:
            if resume is not None:
                try:
                    ckpt.load_checkpoint(resume, engine)
                except (ValueError, KeyError, TypeError) as exc:
                    if isinstance(exc, ckpt.CheckpointError):
                        raise
                    raise ckpt.CheckpointError(f"checkpoint {str(resume)!r} does not fit this run: {exc}") from None
            if comm.rank == 0:
                (out / "config.json").write_text(dumps(config))
            return _loop(config, out, dataset, model, engine, progress and comm.rank == 0)
        finally:
            engine.close()     # the swap folders' locks go with it


def train_step(config, dataset, model, engine, step: int, force_skip: bool = False) -> float:
    """One optimizer step (0-based `step`) on this rank's slices of the step's global micro-batches; returns the
    loss averaged over micro-batches and ranks. ``force_skip``: see Engine.step."""
    comm, gas, N = engine.comm, engine.gas, engine.comm.world_size
    micro, T = config["train_micro_batch_size_per_gpu"], config["data"]["seq_len"]
    loss_sum = 0.0
    for m in range(gas):
        batch = rank_slice(dataset.get_batch("train", step * gas + m, micro * N, T), comm.rank, N)
        with engine.ledger.compute("forward+backward", on_device=True):
            loss, _ = model.loss(batch)
            engine.backward(loss)
        loss_sum += loss.item()
    engine.step(force_skip=force_skip)
    engine.ledger.next_step()
    return float(comm.all_reduce(np.array([loss_sum], np.float64))[0]) / (gas * N)


def _loop(config, out, dataset, model, engine, progress) -> dict:
    run, comm = config["run"], engine.comm
    micro, gas, T, N = config["train_micro_batch_size_per_gpu"], engine.gas, config["data"]["seq_len"], comm.world_size
    start, steps = engine.global_steps, run["steps"]
    history, evals, last_saved = [], [], None
    t_start = time.perf_counter()
    lead = comm.rank == 0
    bar = tqdm(range(start, steps), desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    metrics = open(out / "metrics.jsonl", "a") if lead else None
    try:
        for step in bar:
            t0 = time.perf_counter()
            loss_mean = train_step(config, dataset, model, engine, step)
            dt = time.perf_counter() - t0
            rec = {"step": step + 1, "loss": loss_mean, "lr": engine.last["lr"],
                   "loss_scale": engine.last["loss_scale"], "grad_norm": engine.last["grad_norm"],
                   "overflow": engine.last["overflow"], "tokens_per_s": micro * gas * N * T / dt}
            history.append(rec)
            if (step + 1) % run["eval_interval"] == 0 or step + 1 == steps:
                evals.append({"step": step + 1, **evaluate(model, dataset, config, comm)})
            if lead:
                metrics.write(json.dumps(rec) + "\n")
                if evals and evals[-1]["step"] == step + 1:
                    metrics.write(json.dumps(evals[-1]) + "\n")
                metrics.flush()
                if (step + 1) % run["log_interval"] == 0:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}")
            if run["checkpoint_interval"] and (step + 1) % run["checkpoint_interval"] == 0:
                ckpt.save_checkpoint(out / "checkpoint", engine, config)
                last_saved = engine.global_steps
    finally:
        if metrics is not None:
            metrics.close()
    if last_saved != engine.global_steps:
        ckpt.save_checkpoint(out / "checkpoint", engine, config)
    from .report import plot_losses, summarize
    summary = summarize(config, out, model, dataset, history, evals, engine, time.perf_counter() - t_start)
    _write_ledger(out, engine)
    if lead:
        plot_losses(history, evals, out / "loss.png", title=f"{config['model']['task']} on {config['data']['dataset']}",
                    uniform_loss=float(np.log(model.cfg.vocab_size if model.cfg.task == "lm" else model.cfg.n_classes)))
    return summary
