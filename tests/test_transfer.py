"""Stream-ordered host <-> device copies (refimpl/memory/transfer.py) on a CPU stand-in for a GPU.

`LazyBackend` is the NumPy backend with a copy stream that really is asynchronous in the way that matters: a copy
queued on it does nothing until an event after it is waited on (by the host, or by the compute stream), and
fresh buffers are full of NaN. So a copy's bytes are visible only where the code orders the streams correctly,
and a missing wait shows up as NaN or stale numbers in the losses. Training with it must give bitwise the
numbers of the synchronous NumPy backend, and the ledger must hold each copy with its device-side interval.
"""
import json
import time

import numpy as np
import pytest

from refimpl import backend as backend_mod
from refimpl.backend import NumpyBackend
from refimpl.config import load_config
from refimpl.memory.ledger import Ledger
from refimpl.memory.transfer import CopyStream
from refimpl.train import train
from tests.conftest import TINY_MODEL


class _Event:
    def __init__(self):
        self.stream, self.time, self._ran = None, None, False

    def record(self, stream=None):
        self.stream, self._ran = stream, False
        stream.queue.append(self)
        if not stream.lazy:
            stream.run_to(self)

    @property
    def done(self):
        return self._ran

    def synchronize(self):
        self.stream.run_to(self)


class _Stream:
    def __init__(self, lazy):
        self.lazy, self.queue = lazy, []

    def run_to(self, event):
        """Run queued work up to and including `event` (everything when None and the stream is not lazy)."""
        while self.queue and (event is None or not event._ran):
            item = self.queue.pop(0)
            if isinstance(item, _Event):
                item.time, item._ran = len(_CLOCK), True
                _CLOCK.append(None)
            else:
                item()

    def wait_event(self, event):
        event.synchronize()          # the compute stream runs now, so it can only wait by running the copies

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_CLOCK = []   # a tick per event: device times that differ between events


class LazyBackend(NumpyBackend):
    name = "lazy"
    async_copies = True

    def __init__(self):
        self.compute = _Stream(lazy=False)

    def stream(self):
        return _Stream(lazy=True)

    def current_stream(self):
        return self.compute

    def event(self):
        return _Event()

    def elapsed_ms(self, start, end):
        assert start.done and end.done, "a device time was read before its event completed"
        return float(end.time - start.time)

    def empty(self, shape, dtype=np.float32):
        return np.full(shape, np.nan, dtype) if np.dtype(dtype).kind == "f" else np.empty(shape, dtype)

    def pinned_empty(self, shape, dtype=np.float32):
        out = np.empty(shape, dtype)
        out.view(np.uint8)[...] = 0xFF   # NaN in every float format
        return out

    def copy_async(self, dst, src, stream=None):
        if stream is not None and stream.lazy:
            stream.queue.append(lambda: dst.__setitem__(Ellipsis, src))
        else:
            dst[...] = src


@pytest.fixture
def lazy(monkeypatch):
    be = LazyBackend()
    monkeypatch.setitem(backend_mod._instances, "lazy", be)
    return be


TINY = (*TINY_MODEL, "run.eval_batches=1", "run.eval_interval=1000", "run.steps=3",
        "scheduler.params.warmup_num_steps=1", "zero_optimization.stage3_param_persistence_threshold=0",
        "zero_optimization.sub_group_size=3000", "zero_optimization.reduce_bucket_size=2000",
        "train_micro_batch_size_per_gpu=4", "gradient_accumulation_steps=2")


def _run(tmp_path, backend, *extra):
    out = tmp_path / backend / "run"
    train(load_config(None, [*TINY, f"backend={backend}", *extra]), out, progress=False)
    losses = [(r["loss"], r["grad_norm"], r["overflow"]) for r in map(json.loads, (out / "metrics.jsonl").read_text()
              .splitlines()) if "overflow" in r]
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    return losses, ledger


@pytest.mark.parametrize("extra", [
    ("zero_optimization.stage=2", 'zero_optimization.offload_optimizer={"device": "cpu"}'),
    ("zero_optimization.stage=3", 'zero_optimization.offload_optimizer={"device": "cpu"}',
     'zero_optimization.offload_param={"device": "cpu"}'),
    ("zero_optimization.stage=3", "world_size=2", 'zero_optimization.offload_optimizer={"device": "cpu"}',
     'zero_optimization.offload_param={"device": "nvme", "nvme_path": "{swap}"}', "bf16.enabled=true"),
], ids=["stage2-grads-to-host", "stage3-params-from-host", "stage3-nvme-bf16-ws2"])
def test_stream_ordered_copies_change_nothing(tmp_path, lazy, extra):
    extra = [x.replace("{swap}", str(tmp_path / "swap")) for x in extra]
    ref, _ = _run(tmp_path, "numpy", *extra)
    got, ledger = _run(tmp_path, "lazy", *extra)
    assert not any(r[2] for r in ref) and got == ref    # bitwise; NaN from an unordered copy would skip steps
    copies = [e for e in ledger if e["kind"] == "transfer" and "device" in (e["src"], e["dst"])]
    assert {(e["src"], e["dst"]) for e in copies} >= {("device", "host")}
    assert all(e["end"] > e["start"] for e in copies)            # device intervals, from the events around each copy
    assert {e["step"] for e in copies} >= {0, 1, 2}             # recorded under the step they belong to


@pytest.mark.parametrize("params,piece,most,lanes", [
    ("none", None, None, 0), ("cpu", None, None, 0), ("none", 777, 0, 0), ("cpu", 777, 0, 0), ("cpu", 777, 5, 0),
    ("none", 777, 0, 3), ("cpu", 777, 0, 2), ("cpu", None, None, 3)])
def test_host_update_beside_the_next_forward_changes_nothing(tmp_path, lazy, monkeypatch, params, piece, most, lanes):
    """memory/overlapped_update.py: with host tiers behind a copy stream, the host AdamW of step n runs on a worker
    thread, in pieces, while step n+1's forward gathers each parameter after the pieces holding it; persistent
    parameters (the small ones, threshold 500) are gathered again on first use; a checkpoint
    (run.checkpoint_interval) settles it all. With pieces of 777 elements, sub-groups and parameters are cut
    anywhere; with at most 5 pieces (OVERLAP_PIECES), into 5 larger ones. `lanes`: numba's AdamW on the host, in
    that many lanes (LanedUpdate) instead of one worker. The run is bitwise the NumPy run without overlap."""
    from refimpl.memory import optimizer_offload, overlapped_update
    if piece is not None:
        monkeypatch.setattr(optimizer_offload.OffloadedAdamW, "OVERLAP_PIECE", piece)
        monkeypatch.setattr(optimizer_offload.OffloadedAdamW, "OVERLAP_PIECES", most)
    started = []
    if lanes:                                            # numba behind the stand-in GPU, as behind cupy
        numba = backend_mod.get_backend("numba")
        monkeypatch.setattr(optimizer_offload, "host_backend", lambda be: numba if be is lazy else be)
        monkeypatch.setattr(numba, "lane_count", lambda: lanes)
        real = overlapped_update.LanedUpdate.__init__

        def spy(self, runs, n, starts, *rest):
            started.append(len(starts))
            assert n == lanes

            def slow(run):                               # the forward gets ahead of the lanes: waits must hold
                return lambda: (time.sleep(0.01), run())
            real(self, [(i, slow(run)) for i, run in runs], n, starts, *rest)
        monkeypatch.setattr(overlapped_update.LanedUpdate, "__init__", spy)
    else:
        real = overlapped_update.OverlappedUpdate.__init__

        def spy(self, indices, starts, update, *rest):
            started.append(len(list(indices)))

            def slow(i):                                 # the forward gets ahead of the worker: waits must hold
                time.sleep(0.01)
                update(i)
            real(self, indices, starts, slow, *rest)
        monkeypatch.setattr(overlapped_update.OverlappedUpdate, "__init__", spy)
    extra = ["zero_optimization.stage=3", "zero_optimization.stage3_param_persistence_threshold=500",
             "run.checkpoint_interval=2", 'zero_optimization.offload_optimizer={"device": "cpu"}',
             f'zero_optimization.offload_param={{"device": "{params}"}}', "scheduler=null"]
    if most:
        extra.append("zero_optimization.sub_group_size=1e9")       # one sub-group: pieces never span two
    ref, _ = _run(tmp_path, "numpy", *extra)
    assert not started                                   # a CPU backend has no copy stream: no overlap
    got, ledger = _run(tmp_path, "lazy", *extra)
    assert got == ref                                    # bitwise
    assert len(started) == 3 and min(started) > 1       # every step overlapped, several pieces each
    if most == 0:                                        # the partition in pieces of 777: more than its sub-groups
        assert min(started) > 20
    elif most:                                           # the one sub-group in 5 pieces
        assert started == [5, 5, 5]
    adam = [e for e in ledger if e["kind"] == "compute" and e["label"].startswith("adam sub-group")]
    assert adam and all(e["end"] >= e["start"] for e in adam)   # the host update is in the ledger either way


def test_twin_flow_with_the_host_part_in_lanes_changes_nothing(tmp_path, lazy, monkeypatch):
    """offload_optimizer.ratio 0.5 (Twin-Flow) with small sub-groups: the first half of the sub-groups is updated on
    the (stand-in) device, the rest in 2 lanes beside the next forward, several sub-groups per LanedUpdate, their
    pieces numbered across them. Bitwise the NumPy run without overlap."""
    from refimpl.memory import optimizer_offload, overlapped_update
    numba = backend_mod.get_backend("numba")
    monkeypatch.setattr(optimizer_offload, "host_backend", lambda be: numba if be is lazy else be)
    monkeypatch.setattr(numba, "lane_count", lambda: 2)
    groups = []
    real = overlapped_update.LanedUpdate.__init__

    def spy(self, runs, *rest):
        groups.append([i for i, _ in runs])
        real(self, runs, *rest)
    monkeypatch.setattr(overlapped_update.LanedUpdate, "__init__", spy)
    extra = ["zero_optimization.stage=3", 'zero_optimization.offload_optimizer={"device": "cpu", "ratio": 0.5}',
             'zero_optimization.offload_param={"device": "cpu"}', "scheduler=null"]
    ref, _ = _run(tmp_path, "numpy", *extra)
    got, _ = _run(tmp_path, "lazy", *extra)
    assert got == ref                                    # bitwise
    assert len(groups) == 3 and all(len(g) > 1 and g[0] > 0 for g in groups)   # host sub-groups only, several


def test_host_copy_lands_only_when_waited_on(lazy):
    ledger = Ledger()
    copies = CopyStream(lazy, ledger)
    dev = np.arange(6, dtype=np.float32)
    out = copies.host_empty(dev.nbytes).view(np.float32)
    pending = copies.to_host(dev, out, "g")
    assert not pending.done() and np.isnan(out).all()           # queued, not run: the host must not read it yet
    assert pending.wait() is out and np.array_equal(out, dev) and pending.done()
    waits = [e for e in ledger.events if e["kind"] == "wait"]
    assert [(e["src"], e["dst"]) for e in waits] == [("device", "host")]
    ledger.flush()
    (t,) = [e for e in ledger.events if e["kind"] == "transfer"]
    assert (t["src"], t["dst"], t["nbytes"]) == ("device", "host", dev.nbytes) and t["end"] > t["start"]


def test_device_copy_is_waited_for_by_compute(lazy):
    ledger = Ledger()
    copies = CopyStream(lazy, ledger)
    host = copies.host_empty(16).view(np.float32)
    host[...] = [1, 2, 3, 4]
    dev = copies.to_device(host, "p")
    assert np.array_equal(dev, host)                  # the compute stream's wait ran the copy
    ledger.flush()
    kinds = sorted((e["kind"], e["src"], e["dst"]) for e in ledger.events)
    assert kinds == [("transfer", "host", "device"), ("wait", "host", "device")]


def test_pinned_host_buffers_are_aligned_for_o_direct(lazy):
    buf = CopyStream(lazy, Ledger()).host_empty(10_000)
    assert buf.ctypes.data % 4096 == 0 and buf.nbytes == 10_000


def test_host_adam_behind_a_gpu_is_the_fastest_cpu_backend_installed(lazy):
    from refimpl.backend import available_backends, get_backend, host_backend
    from refimpl.memory.optimizer_offload import OffloadedAdamW
    from refimpl.memory.store import HostStore

    class GPUish(LazyBackend):
        is_gpu = True
    cpu = NumpyBackend()
    assert host_backend(cpu) is cpu                               # a CPU backend runs its own host work
    want = "numba" if available_backends().get("numba", "absent") is None else "numpy"
    assert host_backend(GPUish()) is get_backend(want)
    gpu, ledger = GPUish(), Ledger()
    opt = OffloadedAdamW(iter([np.ones(4, np.float32)]), numel=4, groups=[(0, 4)], backend=gpu, store=HostStore(),
                         ledger=ledger, copies=CopyStream(gpu, ledger), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                         weight_decay=0.0, adamw_mode=True)
    assert opt.host_adam_step == get_backend(want).adam_step


def test_device_compute_is_recorded_on_the_device_timeline(lazy):
    ledger = Ledger()
    with ledger.compute("host work", on_device=True):        # no GPU copy stream: host clock, recorded at once
        pass
    assert [e["label"] for e in ledger.events] == ["host work"]
    copies = CopyStream(lazy, ledger)
    assert ledger.device_timer is copies
    with ledger.compute("kernels", on_device=True):
        copies.to_device(np.ones(4, np.float32), "p")
    with ledger.compute("adam on the host"):                 # host work stays on the host clock
        pass
    assert [e["label"] for e in ledger.events if e["kind"] == "compute"] == ["host work", "adam on the host"]
    ledger.flush()
    (k,) = [e for e in ledger.events if e.get("label") == "kernels"]
    (t,) = [e for e in ledger.events if e["kind"] == "transfer"]
    assert k["kind"] == "compute" and k["start"] <= t["start"] <= t["end"] <= k["end"]


def test_reduced_buckets_land_in_the_host_partition_in_place(lazy):
    """ZeRO-Offload's reduced buckets are summed on the device and copied straight into the pinned host partition:
    no host buffer beyond the partition, and after two micro-batches (the second one's old values copied up,
    added, copied back) the partition is bitwise the one kept on the device."""
    from refimpl.backend import use_backend
    from refimpl.engine import Engine
    from refimpl.train import build
    parts = {}
    for name, extra in (("device", []), ("host", ['zero_optimization.offload_optimizer={"device": "cpu"}'])):
        cfg = load_config(None, [*TINY, "backend=lazy", "zero_optimization.stage=2", *extra])
        be, dataset, model = build(cfg)
        with use_backend(be):
            engine = Engine(model, cfg, be)
            held = engine.ledger.budget.used["host"]
            for micro in range(2):
                loss, _ = model.loss(dataset.get_batch("train", micro, 4, 32))
                engine.backward(loss)
        assert engine.ledger.budget.peak["host"] == held, name      # nothing but the partition was ever held
        parts[name] = np.array(engine.zero.grad_partition)
    assert parts["host"].tobytes() == parts["device"].tobytes()
    assert np.abs(parts["host"]).max() > 0
