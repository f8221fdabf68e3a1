"""Recommendation as language processing (P5, Geng et al. 2022), small: one causal LM trained through refimpl's
engine on two tasks written as token sequences, then judged as a recommender.

The data and the tasks are refimpl/data_recsys.py's (dataset "p5_synthetic"): seeded users with tastes over item
categories, items with popularity and a fixed successor each; sequential recommendation ([SEQ] user h1 .. hn-1 ->
hn) and rating prediction ([RATE] user item [IS] -> stars), one LM objective with the loss on the answers. Each
user's last interaction is held out.

Measured on the held-out items, over --seeds model seeds (the data is the same, data.seed 0):
- sequential: HR@5, NDCG@5, HR@10, NDCG@10 of the held-out item in a full ranking of all items by the LM's logits
  after the prompt, against popularity and item-to-item transitions (baselines that need no training);
- rating: accuracy of the most likely star token and the RMSE of the expected stars, against the user's mean train
  stars.
The engine switch: the first seed is trained again at ZeRO stage 3 with parameters and optimizer offloaded to the
host (--stage3), and its metrics must be those of stage 0: refimpl's partitioning and offload change no bits.

    python examples/p5_recommend.py [--quick] [--seeds 3] [--steps 600] [--out runs/p5] [--set KEY=VALUE ...]

Writes results.md (the table), results.json and p5.png (HR@10 and NDCG@10 per method) under --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PLAIN = ["world_size=1", "zero_optimization.stage=0", "zero_optimization.offload_param=null",
         "zero_optimization.offload_optimizer=null", "memory.device_bytes=null", "data.dataset=p5_synthetic",
         "data.seed=0", "data.seq_len=21", "model.max_seq_len=21", "model.d_model=128", "model.n_layers=2",
         "model.n_heads=4", "train_micro_batch_size_per_gpu=64", "optimizer.params.lr=3e-3",
         "scheduler.params.warmup_num_steps=50"]
STAGE3 = ["zero_optimization.stage=3", 'zero_optimization.offload_param={"device": "cpu"}',
          'zero_optimization.offload_optimizer={"device": "cpu"}']


def config(args, seed, stage3=False):
    from refimpl.config import load_config
    steps = 20 if args.quick else args.steps
    return load_config(None, [*PLAIN, *(STAGE3 if stage3 else []), f"run.seed={seed}", f"run.steps={steps}",
                              f"run.eval_interval={steps}", "run.eval_batches=4", f"run.log_interval={steps}",
                              *args.set])


def trained_model(cfg, out):
    """Train, then the final weights (zero_to_fp32, whatever the stage) in a plain stage-0 model."""
    from refimpl.checkpoint import zero_to_fp32
    from refimpl.train import build, train
    train(cfg, out, progress=False)
    plain = json.loads(json.dumps(cfg))
    plain["zero_optimization"].update(stage=0, offload_param=None, offload_optimizer=None)
    be, dataset, model = build(plain)
    model.load_state_dict(zero_to_fp32(out / "checkpoint"))
    return be, dataset, model


def model_scores(be, ds, model):
    """(item scores after each user's sequential prompt (users, items), star probabilities (users, 5))."""
    from refimpl.autodiff import no_grad
    from refimpl.backend import use_backend
    from refimpl.data_recsys import IS, RATE, STARS
    d, users = ds.data, np.arange(ds.data.n_users)
    seq = np.zeros((len(users), ds.seq_len), np.int64)
    last = np.array([len(h) for h in d.history])           # the position of h(n-1), which predicts hn
    for u in users:
        x = ds.sequence(u)
        seq[u, :len(x)] = x
    rate = np.stack([[RATE, ds.user_token(u), ds.item0 + d.history[u][-1], IS] for u in users])
    with use_backend(be), no_grad():
        logits = be.to_numpy(model(be.asarray(seq)).data)
        items = logits[users, last, ds.item0:ds.item0 + d.n_items]
        stars = be.to_numpy(model(be.asarray(rate)).data)[:, 3, STARS:STARS + 5]
    p = np.exp(stars - stars.max(1, keepdims=True))
    return items, p / p.sum(1, keepdims=True)


def metrics(scores, ds):
    from refimpl.data_recsys import hit_rate_ndcg, rank_of
    ranks = rank_of(scores, np.array([h[-1] for h in ds.data.history]))
    out = {}
    for k in (5, 10):
        out[f"HR@{k}"], out[f"NDCG@{k}"] = hit_rate_ndcg(ranks, k)
    return out


def rating_metrics(expected, best, ds):
    truth = np.array([s[-1] for s in ds.data.stars], dtype=float)
    return {"star accuracy": float(np.mean(best == truth)), "star RMSE": float(np.sqrt(np.mean((expected - truth) ** 2)))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--quick", action="store_true", help="a few steps: checks that it all runs")
    ap.add_argument("--no-stage3", dest="stage3", action="store_false", help="skip the stage-3 + offload run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    ap.add_argument("--out", default="runs/p5")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        ap.error(f"--seeds and --steps must be at least 1, got {args.seeds} and {args.steps}")
    from tqdm import tqdm
    from refimpl.data_recsys import popularity_scores, transition_scores
    out = Path(args.out)
    runs = [(s, False) for s in range(args.seeds)] + ([(0, True)] if args.stage3 else [])
    model_rows, stage3_row = [], None
    for seed, stage3 in tqdm(runs, desc="training", unit="run"):
        be, ds, model = trained_model(config(args, seed, stage3), out / (f"stage3_seed{seed}" if stage3 else f"seed{seed}"))
        items, stars = model_scores(be, ds, model)
        row = {**metrics(items, ds), **rating_metrics(stars @ np.arange(1, 6), stars.argmax(1) + 1, ds)}
        if stage3:
            stage3_row = row
        else:
            model_rows.append(row)
    data = ds.data
    mean_stars = np.array([s[:-1].mean() for s in data.stars])
    rows = {"popularity": metrics(popularity_scores(data), ds),
            "transitions (item-to-item)": metrics(transition_scores(data), ds),
            "the user's mean train stars (rounded for the accuracy)": rating_metrics(mean_stars, np.rint(mean_stars),
                                                                                     ds)}
    keys = ["HR@5", "NDCG@5", "HR@10", "NDCG@10", "star accuracy", "star RMSE"]
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    vals = {k: np.array([r[k] for r in model_rows]) for k in keys}
    lines.append(f"| P5-style LM ({args.seeds} seeds, mean ± std) | " +
                 " | ".join(f"{v.mean():.3f} ± {v.std():.3f}" for v in vals.values()) + " |")
    notes = []
    if stage3_row is not None:
        same = all(stage3_row[k] == model_rows[0][k] for k in keys)
        lines.append("| the same, seed 0, ZeRO-3 + cpu offload | " + " | ".join(f"{stage3_row[k]:.3f}" for k in keys)
                     + " |")
        notes.insert(0, f"ZeRO-3 with offload gives seed 0's stage-0 metrics exactly: **{same}**")
    for name, r in rows.items():
        lines.append("| " + name + " | " + " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in keys) + " |")
    text = "\n".join(lines + [""] + notes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"model": model_rows, "stage3": stage3_row, "baselines": rows},
                                                 indent=2))
    plot(vals, rows, out / "p5.png")
    print(text)
    return model_rows, stage3_row, rows


def plot(vals, rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ranked = {n: r for n, r in rows.items() if "HR@10" in r}
    names = ["P5-style LM", *ranked]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    x = np.arange(len(names))
    for j, k in enumerate(("HR@10", "NDCG@10")):
        means = [vals[k].mean(), *[r[k] for r in ranked.values()]]
        errs = [vals[k].std(), *[0.0] * len(ranked)]
        ax.bar(x + (j - 0.5) * 0.38, means, 0.38, yerr=errs, capsize=3, label=k)
    ax.set_xticks(x, names)
    ax.set_ylabel("held-out next item")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
