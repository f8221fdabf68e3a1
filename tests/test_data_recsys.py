"""refimpl/data_recsys.py: the P5-style interactions, their token sequences, the ranking metrics and baselines."""
import numpy as np
import pytest

from refimpl.data import DataError, make_dataset
from refimpl.data_recsys import (IS, PAD, RATE, SEQ, STARS, Interactions, P5Sequences, hit_rate_ndcg,
                                 popularity_scores, rank_of, transition_scores)


@pytest.fixture(scope="module")
def ds():
    return P5Sequences(seed=0, n_users=120, n_items=64, n_categories=4, min_history=5, max_history=12)


def test_the_generator_has_the_structure_it_documents(ds):
    d = ds.data
    assert len(d.history) == 120 and all(5 <= len(h) <= 12 and len(set(h)) == len(h) for h in d.history)
    assert np.all(d.category[d.successor] == d.category) and np.all(d.successor != np.arange(64))
    follows = np.mean([np.mean(d.successor[h[:-1]] == h[1:]) for h in d.history])
    assert 0.3 < follows < 0.7                               # p_follow 0.5, less when the successor was seen
    favourite = np.mean([np.mean(d.category[h] == d.taste[u].argmax()) for u, h in enumerate(d.history)])
    assert favourite > 0.4                                   # tastes are concentrated (Dirichlet 0.3, 4 categories)
    assert all(s.min() >= 1 and s.max() <= 5 for s in d.stars)
    again = Interactions(seed=0, n_users=120, n_items=64, n_categories=4, min_history=5, max_history=12)
    assert all(np.array_equal(a, b) for a, b in zip(again.history, d.history))


def test_train_batches_never_show_the_held_out_item_and_target_only_answers(ds):
    d = ds.data
    for step in range(10):
        b = ds.get_batch("train", step, 16, ds.seq_len)
        for ids, tgt in zip(b.ids, b.targets):
            u = ids[1] - ds.user0
            held_out = ds.item0 + d.history[u][-1]
            if ids[0] == SEQ:
                n = len(d.history[u])
                assert np.array_equal(ids[2:n + 1], ds.item_tokens(d.history[u][:-1])) and np.all(ids[n + 1:] == PAD)
                assert np.array_equal(tgt[1:n], ids[2:n + 1]) and np.all(tgt[n:] == -100) and tgt[0] == -100
                assert held_out not in tgt
            else:
                assert ids[0] == RATE and ids[3] == IS and np.all(tgt[[0, 1, 2]] == -100)
                k = list(ds.item_tokens(d.history[u])).index(ids[2])
                assert k < len(d.history[u]) - 1 and tgt[3] == STARS + d.stars[u][k] - 1


def test_val_batches_ask_for_the_held_out_item_then_its_stars(ds):
    d = ds.data
    seq, rate = ds.get_batch("val", 0, 8, 20), ds.get_batch("val", 1, 8, 20)
    for r in range(8):
        u, n = r, len(ds.data.history[r])
        assert seq.targets[r, n] == ds.item0 + d.history[u][-1] and (seq.targets[r] != -100).sum() == 1
    users = 8 + np.arange(8)
    assert np.array_equal(rate.ids[:, 1] - ds.user0, users)
    assert np.array_equal(rate.targets[:, 3], STARS + np.array([d.stars[u][-1] for u in users]) - 1)


def test_ranks_hit_rate_and_ndcg_by_hand():
    scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.3, 0.2], [1.0, 0.0, 0.0]])
    ranks = rank_of(scores, np.array([2, 0, 0]))
    assert ranks.tolist() == [1, 1, 0]                       # a tie counts against the target
    assert hit_rate_ndcg(ranks, 1) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    hr, ndcg = hit_rate_ndcg(ranks, 2)
    assert hr == 1.0 and ndcg == pytest.approx((2 / np.log2(3) + 1) / 3)


def test_the_transition_baseline_learns_the_successors_and_beats_popularity(ds):
    d = ds.data
    target = np.array([h[-1] for h in d.history])
    pop = hit_rate_ndcg(rank_of(popularity_scores(d), target), 10)[0]
    trans = hit_rate_ndcg(rank_of(transition_scores(d), target), 10)[0]
    follows = np.mean([d.successor[h[-2]] == h[-1] for h in d.history])
    assert trans >= follows - 0.05 and trans > pop + 0.1


def test_config_and_errors():
    ds = make_dataset({"dataset": "p5_synthetic", "seed": 3})
    assert ds.vocab_size == ds.item0 + 240 and ds.seq_len == 21
    with pytest.raises(DataError, match="seq_len=10 is shorter than the longest example"):
        ds.get_batch("train", 0, 2, 10)
    with pytest.raises(DataError, match="n_items=50 must be a multiple of n_categories=8"):
        Interactions(n_items=50)
    with pytest.raises(DataError, match=r"p_follow must be in \[0, 1\], got 2"):
        Interactions(p_follow=2)
