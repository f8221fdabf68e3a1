"""Recommendation as language processing, P5-style (Geng et al. 2022, "Recommendation as Language Processing (RLP):
A Unified Pretrain, Personalized Prompt & Predict Paradigm (P5)"), on interactions drawn from a known structure.

P5 writes every recommendation task as text in, text out, and trains one language model on all of them. Here the
"text" is tokens: prompt tokens name the task, then user and item ids, and one causal LM objective covers both
tasks, with the loss on the answer tokens only (targets -100 elsewhere):

    sequential recommendation   [SEQ] user h1 h2 ... hn-1     each item predicts the next one; eval: the next of hn-1
    rating prediction           [RATE] user item [IS] stars   the stars (1-5) after [IS]

No recommendation data set ships with numpy or Python, so the interactions come from a seeded generator whose
structure is known (`Interactions`):

- items fall into `n_categories` equal categories; within one, item popularity follows a Zipf law (exponent 0.8);
- each user has a taste, a Dirichlet(0.3) distribution over categories (a few favourite categories);
- sequential dependence: every item has one fixed successor in its category; with probability `p_follow` the next
  interaction is the last item's successor (if not seen yet), else an unseen item of a category drawn from the
  taste, by popularity;
- stars: 1 + 4 * (taste of the item's category / the user's top taste), plus N(0, 0.5) noise, rounded, in 1..5.

Leave-one-out split (as P5's sequential task): each user's last interaction is validation, the rest train.
Baselines for the ranking: popularity (train counts) and item-to-item transitions (the train successor counts of the
user's last item, popularity breaking ties). Metrics: HR@k and NDCG@k of the held-out item in a full ranking of all
items.
"""
from __future__ import annotations

import numpy as np

from .data_base import Batch, DataError, _check_batch_args, _check_int, _rng

PAD, SEQ, RATE, IS = 0, 1, 2, 3
STARS = 4                      # tokens 4..8: 1..5 stars
_DOMAIN_GEN, _DOMAIN_BATCH = 4, 5   # refimpl.data's stream numbering


class Interactions:
    """The generated users, items and histories (see the module docstring). ``history[u]``: item ids in order;
    ``stars[u]``: the stars of each; ``category[i]``, ``successor[i]``, ``taste[u]`` (n_categories,)."""

    def __init__(self, n_users=600, n_items=240, n_categories=8, min_history=8, max_history=20, p_follow=0.5,
                 seed=0):
        self.n_users = _check_int("n_users", n_users, 2)
        self.n_items = _check_int("n_items", n_items, 2)
        self.n_categories = _check_int("n_categories", n_categories, 1)
        self.min_history = _check_int("min_history", min_history, 3)    # >= 2 to train on, 1 held out
        self.max_history = _check_int("max_history", max_history, self.min_history)
        if self.n_items % self.n_categories or self.n_items // self.n_categories < self.max_history:
            raise DataError(f"n_items={n_items} must be a multiple of n_categories={n_categories} with at least "
                            f"max_history={max_history} items per category")
        if not 0.0 <= p_follow <= 1.0:
            raise DataError(f"p_follow must be in [0, 1], got {p_follow!r}")
        rng = _rng(_check_int("seed", seed, 0), _DOMAIN_GEN, "train", 0)
        per = self.n_items // self.n_categories
        self.category = np.repeat(np.arange(self.n_categories), per)
        order = np.concatenate([rng.permutation(per) for _ in range(self.n_categories)])
        self.popularity = 1.0 / (order + 1.0) ** 0.8                  # Zipf within each category
        self.successor = np.array([c * per + rng.choice([j for j in range(per) if j != i % per])
                                   for i, c in enumerate(self.category)])
        self.taste = rng.dirichlet(np.full(self.n_categories, 0.3), size=self.n_users)
        self.history, self.stars = [], []
        for u in range(self.n_users):
            n = int(rng.integers(self.min_history, self.max_history + 1))
            items, seen = [], set()
            for _ in range(n):
                nxt = self.successor[items[-1]] if items and rng.random() < p_follow else -1
                if nxt < 0 or nxt in seen:
                    c = rng.choice(self.n_categories, p=self.taste[u])
                    pool = [i for i in range(c * per, (c + 1) * per) if i not in seen]
                    w = self.popularity[pool]
                    nxt = pool[rng.choice(len(pool), p=w / w.sum())]
                items.append(int(nxt))
                seen.add(int(nxt))
            like = self.taste[u][self.category[items]] / self.taste[u].max()
            self.history.append(np.array(items))
            self.stars.append(np.clip(np.rint(1 + 4 * like + rng.normal(0, 0.5, n)), 1, 5).astype(np.int64))


class P5Sequences:
    """The two tasks as LM batches over `Interactions` (dataset "p5_synthetic"). Tokens: PAD, [SEQ], [RATE], [IS],
    5 star tokens, then the users, then the items. Train batch ``s``: B examples from an rng seeded by (seed, s),
    each a user's train history (probability 1/2) or one of its train ratings; val batch ``i``: the users i*B ..
    (i+1)*B-1 (wrapping), each its held-out next item (even i) or the held-out item's stars (odd i)."""

    def __init__(self, seed: int = 0, **generator):
        self.seed = _check_int("seed", seed, 0)
        self.data = Interactions(seed=self.seed, **generator)
        self.user0 = STARS + 5
        self.item0 = self.user0 + self.data.n_users
        self.vocab_size = self.item0 + self.data.n_items
        self.seq_len = self.data.max_history + 1        # [SEQ] user h1 .. h(n-1): the longest example

    def user_token(self, u):
        return self.user0 + u

    def item_tokens(self, items):
        return self.item0 + np.asarray(items)

    def sequence(self, u):
        """[SEQ] user h1 .. h(n-1): the prompt of the held-out item (the last position predicts it)."""
        return np.concatenate([[SEQ, self.user_token(u)], self.item_tokens(self.data.history[u][:-1])])

    def _seq_example(self, u):
        ids = self.sequence(u)
        targets = np.concatenate([ids[1:], [-100]])      # the user predicts h1, each item the next
        targets[0] = -100                                # ([SEQ] -> user: not a recommendation)
        return ids, targets

    def _rate_example(self, u, k):
        ids = np.array([RATE, self.user_token(u), self.item0 + self.data.history[u][k], IS])
        targets = np.array([-100, -100, -100, STARS + self.data.stars[u][k] - 1])
        return ids, targets

    def get_batch(self, split: str, step: int, batch_size: int, seq_len: int) -> Batch:
        step, B, T = _check_batch_args(split, step, batch_size, seq_len)
        if T < self.seq_len:
            raise DataError(f"seq_len={T} is shorter than the longest example ({self.seq_len} tokens: [SEQ], the "
                            f"user and max_history - 1 items)")
        ids, targets = np.full((B, T), PAD, np.int64), np.full((B, T), -100, np.int64)
        if split == "val":
            users = (step * B + np.arange(B)) % self.data.n_users
            rows = []
            for u in users:
                if step % 2 == 0:
                    x = self.sequence(u)
                    rows.append((x, np.concatenate([np.full(len(x) - 1, -100), [self.item0 + self.data.history[u][-1]]])))
                else:
                    rows.append(self._rate_example(u, len(self.data.history[u]) - 1))
        else:
            rng = _rng(self.seed, _DOMAIN_BATCH, "train", step)
            rows = []
            for u, rate in zip(rng.integers(0, self.data.n_users, B), rng.random(B) < 0.5):
                n = len(self.data.history[u])
                rows.append(self._rate_example(u, int(rng.integers(0, n - 1))) if rate else self._seq_example(u))
        for r, (x, t) in enumerate(rows):
            ids[r, :len(x)], targets[r, :len(t)] = x, t
        return Batch(ids=ids, targets=targets, labels=None, key_padding_mask=None)


# ------------------------------------------------------------------------------------------- ranking metrics
def rank_of(scores, target) -> np.ndarray:
    """The 0-based rank of each row's target among its scores (ties counted against it): (N, I), (N,) -> (N,)."""
    scores = np.asarray(scores, dtype=np.float64)
    own = scores[np.arange(len(target)), target]
    return (scores > own[:, None]).sum(1) + (scores == own[:, None]).sum(1) - 1


def hit_rate_ndcg(ranks, k: int) -> tuple[float, float]:
    """HR@k (the target is in the top k) and NDCG@k (1/log2(rank + 2) when it is), averaged."""
    ranks = np.asarray(ranks)
    hit = ranks < k
    return float(hit.mean()), float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())


def popularity_scores(data: Interactions) -> np.ndarray:
    """(users, items): every user gets the train interaction counts."""
    counts = np.bincount(np.concatenate([h[:-1] for h in data.history]), minlength=data.n_items).astype(float)
    return np.broadcast_to(counts, (data.n_users, data.n_items))


def transition_scores(data: Interactions) -> np.ndarray:
    """(users, items): how often each item followed the user's last train item in the train histories, popularity
    (scaled below one transition) breaking ties."""
    follow = np.zeros((data.n_items, data.n_items))
    for h in data.history:
        np.add.at(follow, (h[:-2], h[1:-1]), 1.0)
    pop = popularity_scores(data)[0]
    last = np.array([h[-2] for h in data.history])
    return follow[last] + pop / (pop.max() + 1.0)
