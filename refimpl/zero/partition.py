"""Per-parameter partitioning: which rank owns which elements of every parameter (ZeRO §5, DeepSpeed stage 3).

Each parameter is flattened and padded to a multiple of N (the number of partitions) and cut into N equal
chunks; rank r owns chunk r of every parameter. A rank's *partition* is its chunks of all parameters
concatenated in model order, so every rank's partition has the same length S (= sum of chunk sizes):

    param p (numel n, chunk c = ceil(n / N)):   [ chunk 0 | chunk 1 | ... | chunk N-1 ]   (last one padded)
    partition r:                                [ p0 chunk r | p1 chunk r | ... ]          (length S)

An all-gather of the N partitions therefore yields every parameter whole, and a reduce-scatter of a gradient
laid out as N rows of chunks leaves each rank exactly its rows' sum. DeepSpeed splits stages 1-2 as one
contiguous flat range instead; refimpl uses this one layout for every stage, so a checkpoint has a single
layout and resharding from N to M ranks is a per-parameter operation.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from ..kernels import array_module


class ZeroParamStatus(enum.Enum):
    """A stage-3 parameter's state on this rank, DeepSpeed's names (``deepspeed/runtime/zero/partition_parameters.py``)."""
    NOT_AVAILABLE = 1   # only this rank's chunk exists here
    INFLIGHT = 2        # an all-gather has been issued
    AVAILABLE = 3       # the whole parameter is in p.data


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives: `chunk` elements at `offset` in every rank's partition."""
    name: str
    shape: tuple
    numel: int
    chunk: int
    offset: int


class PartitionLayout:
    def __init__(self, named_shapes, num_partitions: int):
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        self.num_partitions = N = num_partitions
        self.slots, offset = [], 0
        for name, shape in named_shapes:
            numel = math.prod(shape)
            chunk = -(-numel // N)  # ceil: the last chunk carries the padding
            self.slots.append(Slot(name, tuple(shape), numel, chunk, offset))
            offset += chunk
        self.partition_numel = offset
        self.by_name = {s.name: s for s in self.slots}

    @property
    def numel(self) -> int:
        """Elements of the model (without padding)."""
        return sum(s.numel for s in self.slots)

    def padded_rows(self, slot: Slot, flat):
        """A parameter's flat values as (N, chunk) rows, zero-padded: row r is rank r's chunk."""
        xp = array_module(flat)
        padded = xp.zeros(self.num_partitions * slot.chunk, dtype=flat.dtype)
        padded[:slot.numel] = flat.reshape(-1)
        return padded.reshape(self.num_partitions, slot.chunk)

    def to_rows(self, arrays: dict, dtype=None, slots=None):
        """Full parameters (name -> array) -> (N, S') array whose row r is partition r restricted to `slots`
        (all slots by default: row r is then exactly rank r's partition)."""
        slots = self.slots if slots is None else slots
        first = arrays[slots[0].name]
        xp = array_module(first)
        rows = xp.empty((self.num_partitions, sum(s.chunk for s in slots)), dtype=dtype or first.dtype)
        col = 0
        for s in slots:
            rows[:, col:col + s.chunk] = self.padded_rows(s, arrays[s.name])
            col += s.chunk
        return rows

    def chunk_of(self, slot: Slot, full, rank: int, dtype=None):
        """Rank `rank`'s chunk (chunk,) of one whole parameter, zero-padded at the end."""
        xp = array_module(full)
        flat = full.reshape(-1)
        lo = rank * slot.chunk
        piece = flat[lo:min(lo + slot.chunk, slot.numel)]
        out = xp.zeros(slot.chunk, dtype=dtype or full.dtype)
        out[:len(piece)] = piece
        return out

    def partition(self, arrays: dict, rank: int, dtype=None):
        """Rank `rank`'s partition (S,) cut from full parameters."""
        first = next(iter(arrays.values()))
        xp = array_module(first)
        out = xp.empty(self.partition_numel, dtype=dtype or first.dtype)
        for s in self.slots:
            out[s.offset:s.offset + s.chunk] = self.chunk_of(s, arrays[s.name], rank, dtype=out.dtype)
        return out

    def unpartition(self, gathered) -> dict:
        """All N partitions, as (N, S) or (N*S,) -> name -> full parameter (shape restored, padding dropped)."""
        rows = gathered.reshape(self.num_partitions, self.partition_numel)
        return {s.name: self.slot_from_rows(s, rows[:, s.offset:s.offset + s.chunk]) for s in self.slots}

    @staticmethod
    def slot_from_rows(slot: Slot, rows):
        """(N, chunk) rows of one parameter -> the parameter, shape restored."""
        return rows.reshape(-1)[:slot.numel].reshape(slot.shape)

    def view(self, partition, slot: Slot):
        """The piece of a (S,) partition array that holds `slot`'s chunk (a view)."""
        return partition[slot.offset:slot.offset + slot.chunk]


def partition_bytes(layout: PartitionLayout, dtype) -> int:
    return layout.partition_numel * np.dtype(dtype).itemsize
