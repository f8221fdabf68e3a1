"""The training loop behind `refimpl train`: config -> backend, data, model, engine -> run directory.

A run directory holds config.json (the resolved config), metrics.jsonl (one JSON object per step, plus
evaluation lines), checkpoint/ (refimpl/checkpoint.py) and loss.png. The batch of every step is a pure
function of (seed, step) and the LR a pure function of the step, so `--resume` continues a run exactly.
"""
from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import checkpoint as ckpt
from .autodiff import no_grad
from .backend import get_backend, use_backend
from .config import ConfigError, dumps
from .data import make_dataset
from .engine import Engine, param_dtype
from .model import ModelConfig, Transformer


class RunDirError(ValueError):
    """The output directory cannot be used without overwriting an earlier run."""


def default_out_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S-%f")


def prepare_out_dir(out) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"output directory {str(out)!r} already exists and is not empty; "
                          f"choose another --out (nothing of an earlier run is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
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
    if mcfg["vocab_size"] < dataset.vocab_size:
        raise ConfigError("model.vocab_size", f"must be >= the dataset's vocabulary ({dataset.vocab_size}), "
                                              f"got {mcfg['vocab_size']}")
    with use_backend(be):
        model = Transformer(ModelConfig.from_dict(mcfg), seed=config["run"]["seed"], dtype=param_dtype(config))
    return be, dataset, model


def evaluate(model, dataset, config) -> dict:
    """Mean loss (and accuracy for classification) over run.eval_batches validation batches."""
    bs, T = config["train_micro_batch_size_per_gpu"], config["data"]["seq_len"]
    losses, correct, total = [], 0, 0
    with no_grad():
        for i in range(config["run"]["eval_batches"]):
            batch = dataset.get_batch("val", i, bs, T)
            loss, logits = model.loss(batch)
            losses.append(loss.item())
            if batch.labels is not None:
                pred = np.argmax(logits.numpy().astype(np.float32), axis=-1)
                correct += int((pred == batch.labels).sum())
                total += len(batch.labels)
    out = {"eval_loss": float(np.mean(losses))}
    if total:
        out["eval_accuracy"] = correct / total
    return out


def train(config: dict, out_dir=None, *, resume=None, progress: bool = True) -> dict:
    """Train as `config` says; returns the run summary. `resume`: a checkpoint path to continue from."""
    be, dataset, model = build(config)  # bad config, data or checkpoint fails before anything is written
    with use_backend(be):
        engine = Engine(model, config, be)
        if resume is not None:
            expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
            state, _ = ckpt.load_checkpoint(resume, expected)
            try:
                engine.load_state_dict(state)
            except (ValueError, KeyError) as exc:
                raise ckpt.CheckpointError(f"checkpoint {str(resume)!r} does not fit this run: {exc}") from None
        out = prepare_out_dir(out_dir or config["run"]["out"] or default_out_dir())
        (out / "config.json").write_text(dumps(config))
        return _loop(config, out, be, dataset, model, engine, progress)


def _loop(config, out, be, dataset, model, engine, progress) -> dict:
    run = config["run"]
    bs, gas, T = config["train_micro_batch_size_per_gpu"], engine.gas, config["data"]["seq_len"]
    start, steps = engine.global_steps, run["steps"]
    history, evals = [], []
    t_start = time.perf_counter()
    bar = tqdm(range(start, steps), desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    with open(out / "metrics.jsonl", "a") as metrics:
        for step in bar:
            t0 = time.perf_counter()
            losses = []
            for micro in range(gas):
                batch = dataset.get_batch("train", step * gas + micro, bs, T)
                loss, _ = model.loss(batch)
                engine.backward(loss)
                losses.append(loss.item())
            engine.step()
            dt = time.perf_counter() - t0
            rec = {"step": step + 1, "loss": float(np.mean(losses)), "lr": engine.last["lr"],
                   "loss_scale": engine.last["loss_scale"], "grad_norm": engine.last["grad_norm"],
                   "overflow": engine.last["overflow"], "tokens_per_s": bs * gas * T / dt}
            history.append(rec)
            metrics.write(json.dumps(rec) + "\n")
            if (step + 1) % run["eval_interval"] == 0 or step + 1 == steps:
                ev = {"step": step + 1, **evaluate(model, dataset, config)}
                evals.append(ev)
                metrics.write(json.dumps(ev) + "\n")
            metrics.flush()
            if (step + 1) % run["log_interval"] == 0:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}")
            if run["checkpoint_interval"] and (step + 1) % run["checkpoint_interval"] == 0:
                ckpt.save_checkpoint(out / "checkpoint", engine.state_dict(), config)
    if not (out / "checkpoint" / f"global_step{engine.global_steps}").exists():
        ckpt.save_checkpoint(out / "checkpoint", engine.state_dict(), config)
    from .report import plot_losses, summarize
    plot_losses(history, evals, out / "loss.png", title=f"{config['model']['task']} on {config['data']['dataset']}",
                uniform_loss=float(np.log(model.cfg.vocab_size if model.cfg.task == "lm" else model.cfg.n_classes)))
    return summarize(config, out, model, dataset, history, evals, engine, time.perf_counter() - t_start)
