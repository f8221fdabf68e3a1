"""Where a rank's time goes (refimpl/memory/ledger.py `breakdown`), and the waits at collectives it counts.

- each moment of the rank's span is counted once: at a collective, else waiting for a transfer, else computing,
  else "other" (checked on a hand-made ledger and against a brute force on random ones);
- a compute interval records the thread's time on a core, which a sleep inside it does not add to;
- a rank that reaches a collective before the others has the wait recorded in its ledger (LocalComm, 2 ranks),
  and the Engine connects its ledger to its communicator.
"""
import json
import random
import time

import numpy as np
import pytest

from refimpl.comm.local import run_ranks
from refimpl.config import load_config
from refimpl.memory.ledger import Ledger
from refimpl.train import train


def ledger_with(events):
    ledger = Ledger(0)
    for kind, start, end in events:
        fields = {"src": "nvme", "dst": "host"} if kind == "wait" else {}
        ledger.add(kind, start, end, label="x", **fields)
    return ledger


def test_each_moment_counts_once_in_the_first_part_that_covers_it():
    # compute 0-10 holds a collective wait 2-4 and a transfer wait 3-6; a lone compute 11-12 after a gap
    parts = ledger_with([("compute", 0, 10), ("collective", 2, 4), ("wait", 3, 6), ("compute", 11, 12)]).breakdown()
    assert parts["span_s"] == 12
    assert parts["collective_wait_s"] == 2          # 2-4
    assert parts["transfer_wait_s"] == 2            # 4-6: 3-4 was already the collective's
    assert parts["compute_s"] == 7                  # 0-2, 6-10, 11-12
    assert parts["other_s"] == 1                    # 10-11
    assert Ledger(0).breakdown() == {}
    assert parts["compute_cpu_s"] is None              # intervals not timed on a core (as on a GPU)


def test_compute_records_its_time_on_a_core():
    ledger = Ledger(0)
    with ledger.compute("busy"):
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass
    with ledger.compute("asleep"):
        time.sleep(0.1)                                 # off the core: wall time, no CPU time
    busy, asleep = ledger.events
    assert busy["cpu"] >= 0.05 and asleep["cpu"] < 0.02 <= 0.09 < asleep["end"] - asleep["start"]
    assert ledger.breakdown()["compute_cpu_s"] == pytest.approx(busy["cpu"] + asleep["cpu"])


def test_the_parts_match_a_brute_force_on_random_ledgers():
    rng = random.Random(0)
    for _ in range(300):
        events = [(rng.choice(["compute", "collective", "wait", "transfer"]), s, s + rng.randint(0, 6))
                  for s in (rng.randint(0, 30) for _ in range(rng.randint(1, 8)))]
        parts = ledger_with(events).breakdown()
        lo, hi = min(s for _, s, _ in events), max(e for _, _, e in events)
        expected = dict.fromkeys(["collective", "wait", "compute", "other"], 0.0)
        for x in np.arange(lo, hi, 0.5) + 0.25:        # the midpoints of half-unit steps: one kind each
            kind = next((k for k in ("collective", "wait", "compute")
                         if any(a <= x < b for kk, a, b in events if kk == k)), "other")
            expected[kind] += 0.5
        assert parts["span_s"] == hi - lo
        assert parts["collective_wait_s"] == pytest.approx(expected["collective"])
        assert parts["transfer_wait_s"] == pytest.approx(expected["wait"])
        assert parts["compute_s"] == pytest.approx(expected["compute"])
        assert parts["other_s"] == pytest.approx(expected["other"])


def test_the_rank_that_arrives_first_records_its_wait_at_the_collective():
    def rank(comm):
        comm.ledger = Ledger(comm.rank)
        if comm.rank == 1:
            time.sleep(0.3)                             # rank 0 waits for it at the all-reduce
        comm.all_reduce(np.ones(4))
        return [(e["kind"], e["label"], e["end"] - e["start"]) for e in comm.ledger.events]

    waits = run_ranks(2, rank)
    (kind, label, seconds), = waits[0]
    assert (kind, label) == ("collective", "all_reduce") and seconds >= 0.25
    assert waits[1][0][2] < 0.2                          # rank 1 came last: hardly any wait


def test_the_engine_records_its_collectives_in_its_ledger(tmp_path):
    config = load_config(None, ["world_size=2", "run.steps=2", "zero_optimization.stage=3",
                                "train_micro_batch_size_per_gpu=2", "model.n_layers=1", "model.d_model=32",
                                "model.n_heads=2", "model.max_seq_len=16", "data.seq_len=16"])
    train(config, tmp_path / "run", progress=False)
    events = [json.loads(line) for line in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()]
    seen = {e["label"] for e in events if e["kind"] == "collective"}
    assert {"all_gather", "reduce_scatter"} <= seen     # stage 3: gathered parameters, scattered gradients
