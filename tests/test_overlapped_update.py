"""memory/overlapped_update.py: the host update on a worker thread, settled piece by piece on the main thread."""
import threading

import pytest

from refimpl.memory.overlapped_update import OverlappedUpdate


def gated(n):
    """An update whose sub-group i finishes only once gates[i] is set; records what it updated."""
    gates, updated = [threading.Event() for _ in range(n)], []

    def update(i):
        assert gates[i].wait(timeout=10)
        updated.append(i)
    return gates, updated, update


def test_settle_publishes_in_order_exactly_what_is_needed():
    gates, updated, update = gated(3)
    published, finished = [], []
    u = OverlappedUpdate([0, 1, 2], [0, 10, 20], update, published.append, lambda: finished.append(True))
    assert not u.ready(5)                      # sub-group 0 is not updated yet
    gates[0].set()
    u.settle(5)                                # elements below 5 need sub-group 0 only
    assert published == [0] and not finished and u.ready(10) and not u.ready(11)
    gates[1].set()
    u.settle(10)                               # still only sub-group 0: sub-group 1 starts at 10
    assert published == [0]
    u.settle(11)
    assert published == [0, 1] and updated == [0, 1]
    gates[2].set()
    u.settle()                                 # everything, then finish() once
    assert published == [0, 1, 2] and finished == [True] and u.done
    u.settle()
    assert finished == [True]


def test_an_empty_update_still_finishes():
    finished = []
    u = OverlappedUpdate([], [], lambda i: None, lambda i: None, lambda: finished.append(True))
    assert not u.done
    u.settle()
    assert finished == [True] and u.done


def test_a_failed_update_raises_its_error_at_every_settle():
    def update(i):
        if i == 1:
            raise MemoryError("host tier full")
    published = []
    u = OverlappedUpdate([0, 1], [0, 10], update, published.append, lambda: None)
    for _ in range(2):
        with pytest.raises(MemoryError, match="host tier full"):
            u.settle()
    assert not u.ready(5)
    assert 1 not in published                  # a sub-group that failed is never published


def test_the_gil_switch_interval_is_short_while_updates_are_in_flight_then_restored():
    """Two updates in flight at once (two ranks of one process): the short interval holds until the last settles,
    then the interval found before the first is back, also after an update that failed."""
    import sys
    from refimpl.memory import overlapped_update as ou
    before = sys.getswitchinterval()
    gates, _, update = gated(1)

    def fails(i):
        raise RuntimeError("disk full")
    a = OverlappedUpdate([0], [0], update, lambda i: None, lambda: None)
    b = OverlappedUpdate([0], [0], fails, lambda i: None, lambda: None)
    assert sys.getswitchinterval() == pytest.approx(ou.SWITCH_INTERVAL) != before
    with pytest.raises(RuntimeError, match="disk full"):
        b.settle()
    with pytest.raises(RuntimeError, match="disk full"):
        b.settle()                             # (counted once)
    assert sys.getswitchinterval() == pytest.approx(ou.SWITCH_INTERVAL)   # a is still in flight
    gates[0].set()
    a.settle()
    assert sys.getswitchinterval() == pytest.approx(before)


def laned(gates, work, sizes):
    """Runs for LanedUpdate: sub-group j has sizes[j] pieces of one block each; a lane finishes piece k once
    gates[k] is set (a stand-in for the numba kernel: claim a block, finish it, count it)."""
    firsts = [sum(sizes[:j]) for j in range(len(sizes))]
    work[0] = 1
    lock = threading.Lock()

    def run_of(first, n):
        def run():
            for k in range(first, first + n):
                with lock:
                    mine, work[1, k] = work[1, k] < work[0, k], work[1, k] + 1
                if mine:
                    assert gates[k].wait(timeout=10)
                    work[2, k] += 1
        return run
    return [(j, run_of(f, n)) for j, (f, n) in enumerate(zip(firsts, sizes))]


def pieces_done(work):
    k = 0
    while k < work.shape[1] and work[2, k] >= work[0, k]:
        k += 1
    return k


def test_lanes_publish_a_piece_once_it_is_final_then_log_each_sub_group():
    import numpy as np
    from refimpl.memory.ledger import Ledger
    from refimpl.memory.overlapped_update import LanedUpdate
    starts = [0, 10, 20]                                 # sub-group 0: pieces 0 and 1; sub-group 1: piece 2
    gates = [threading.Event() for _ in starts]
    work, published, finished, ledger = np.zeros((3, 3), np.int64), [], [], Ledger()
    u = LanedUpdate(laned(gates, work, [2, 1]), 2, starts, work, pieces_done, published.append,
                    lambda: finished.append(True), ledger)
    assert not u.ready(5)                                # piece 0 is not done yet
    gates[0].set()
    u.settle(5)
    assert published == [0] and not u.ready(11)
    gates[2].set()
    assert not u.ready(21)                               # piece 2 is done, piece 1 before it is not
    gates[1].set()
    u.settle()
    assert published == [0, 1, 2] and finished == [True] and u.done
    adam = [e for e in ledger.events if e["kind"] == "compute"]
    assert [e["label"] for e in adam] == ["adam sub-group 0", "adam sub-group 1"]
    assert adam[0]["start"] <= adam[0]["end"] == adam[1]["start"] <= adam[1]["end"]


def test_a_failed_lane_raises_its_error_at_every_settle_and_publishes_nothing_after():
    import numpy as np
    from refimpl.memory.ledger import Ledger
    from refimpl.memory.overlapped_update import LanedUpdate
    work, published = np.array([[1, 1], [0, 0], [0, 0]], np.int64), []
    calls = []

    def run():
        calls.append(1)
        if len(calls) == 1:
            work[2, 0] = 1                               # the first lane finishes piece 0, then fails
            raise MemoryError("lane failed")
    u = LanedUpdate([(0, run)], 2, [0, 10], work, pieces_done, published.append, lambda: None, Ledger())
    for _ in range(2):
        with pytest.raises(MemoryError, match="lane failed"):
            u.settle()
    assert published == [0]                              # piece 0 was final; piece 1 never


def test_lanes_that_return_with_a_piece_unfinished_raise_instead_of_waiting_forever():
    import numpy as np
    from refimpl.memory.ledger import Ledger
    from refimpl.memory.overlapped_update import LanedUpdate
    work = np.array([[1, 1], [0, 0], [0, 0]], np.int64)

    def run():                                           # finishes piece 0, never touches piece 1
        work[2, 0] = 1
    u = LanedUpdate([(0, run)], 2, [0, 10], work, pieces_done, lambda i: None, lambda: None, Ledger())
    with pytest.raises(RuntimeError, match="lanes all returned with piece 1 of 2 unfinished"):
        u.settle()
