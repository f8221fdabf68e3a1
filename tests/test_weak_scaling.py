"""benchmarks/weak_scaling.py on simulated ranks (the CPU dry run of the multi-GPU script, issue 17).

Every (variant, ranks) runs and is measured; with parameters offloaded to the host every rank's ledger shows
host->device traffic (its own partition moving up), without offload none; the efficiency of the 1-rank run is
100% by definition and the table has one row per run.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import weak_scaling  # noqa: E402

TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.max_seq_len=32", "data.seq_len=32",
        "bf16.enabled=false"]


def test_every_run_is_measured_and_offloaded_ranks_move_their_partitions_up(tmp_path):
    argv = ["--backend", "numpy", "--ranks", "1", "2", "--steps", "2", "--warmup", "1", "--batch", "2",
            "--out", str(tmp_path / "table.md")]
    got = weak_scaling.main(argv + [a for s in TINY for a in ("--set", s)])
    results = got["results"]
    assert set(results) == {(v, n) for v in ("none", "cpu") for n in (1, 2)}
    for (variant, n), r in results.items():
        assert r["steps"] == 2 and r["tokens_per_s_per_gpu"] > 0
        assert len(r["h2d_GB_per_s"]) == (n if variant == "cpu" else 0)
    lines = (tmp_path / "table.md").read_text().splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines
            if line.startswith(("| cpu |", "| none |"))]
    assert len(rows) == 4
    assert [row[3] for row in rows if row[1] == "1"] == ["100%", "100%"]


def test_gpu_runs_launch_one_process_per_rank_and_always_set_the_world_size():
    """The default run of `refimpl train` has 4 ranks: a 1-rank GPU run must say world_size=1 (it once ran 4
    simulated ranks on the one GPU), and N > 1 goes through mpirun with the same N."""
    args = weak_scaling.argparse.Namespace(batch=8, warmup=3, steps=6, set=[], backend="cupy", mpi=True,
                                           mpirun="mpirun")
    one, four = (weak_scaling.command(args, "cpu", n, "OUT") for n in (1, 4))
    assert "world_size=1" in one and "mpirun" not in one
    assert four[:5] == ["mpirun", "--allow-run-as-root", "-n", "4", "-x"] and "world_size=4" in four
