"""`refimpl crosscheck`: the command against PyTorch, and the comparison and diagnosis on traces that differ in
one known way. Two refimpl runs that differ in exactly one semantic knob must be told apart, and the knob named;
a peer pushed off the true trajectory must be the one the fp64 arbiter blames. (DeepSpeed runs in .ci/run.)"""
import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refimpl.cli import main  # noqa: E402
from refimpl.config import load_config  # noqa: E402
from refimpl.crosscheck import compare, diagnose  # noqa: E402
from refimpl.crosscheck.refimpl_side import fp64_config, initial_weights, run_refimpl  # noqa: E402
from refimpl.crosscheck.trace import Trace  # noqa: E402
from tests.conftest import TINY_MODEL  # noqa: E402

pytestmark = pytest.mark.crosscheck

TINY = [*TINY_MODEL, "train_micro_batch_size_per_gpu=4", "scheduler=null", "optimizer.params.lr=3e-3",
        "optimizer.params.weight_decay=0.1"]


def tiny(*extra):
    return load_config(None, [*TINY, *extra])


def run(cfg, steps=3, name="refimpl"):
    return run_refimpl(cfg, steps, range(1, steps + 1), name)


def first_and_cause(ours, theirs, cfg, prec="fp32"):
    skip = compare.excluded(ours.snapshots[1]["weight"])
    budget = compare.BUDGETS[prec]
    diffs = compare.scalar_differences(ours, theirs, budget) + compare.snapshot_differences(ours, theirs, budget, skip)
    first = compare.first_divergence(diffs)
    cause = None if first is None else diagnose.explain(first, ours, theirs, cfg, initial_weights(cfg), skip)
    return first, cause


def test_crosscheck_against_torch_stage3_two_ranks_is_within_budget(tmp_path, capsys):
    out = tmp_path / "xc"
    code = main(["crosscheck", "--against", "torch", "--steps", "3", "--world-size", "2", "--fp64-arbiter",
                 "--no-progress", "--out", str(out), *sum((["--set", s] for s in TINY), []),
                 "--set", "zero_optimization.stage=3", "--set", "train_micro_batch_size_per_gpu=2"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "verdict: within budget" in text and "torch vs fp64" in text
    report = json.loads((out / "report.json").read_text())
    assert report["first_divergence"] is None and report["zero_stage"] == 3 and report["world_size"] == 2
    assert report["excluded"] == ["blocks.0.attn.k_proj.bias"]
    # the three traces are there, and each side is close to fp64 but not equal to it (fp32 rounding)
    for side in ("refimpl", "torch", "fp64"):
        t = Trace.read(out / side)
        assert [r["step"] for r in t.steps] == [1, 2, 3] and set(t.snapshots) == {1, 2, 3}
    assert 0 < report["arbiter"]["weight"]["refimpl"] < 1e-4 and 0 < report["arbiter"]["weight"]["peer"] < 1e-4
    assert (out / "crosscheck.png").stat().st_size > 10_000


@pytest.mark.parametrize("theirs_sets, quantity, phrase", [
    # Adam's variant: replayed from the peer's own gradient, the update names the variant that produced it
    (["optimizer.type=Adam", "optimizer.params.adam_w_mode=false"], "weight", "matches Adam with L2 (Adam)"),
    (["optimizer.params.bias_correction=false"], "weight", "bias correction off"),
    (["gradient_clipping=0"], "weight", "without clipping"),
    # the schedule and the fp16 loss-scale sequence are scalars of every step
    (['scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 5}}'], "lr", "learning-rate schedule"),
])
def test_one_knob_apart_is_found_and_named(theirs_sets, quantity, phrase):
    cfg = tiny("gradient_clipping=1.0")
    ours, theirs = run(cfg), run(tiny("gradient_clipping=1.0", *theirs_sets), name="theirs")
    first, cause = first_and_cause(ours, theirs, cfg)
    assert first is not None and first.quantity == quantity and first.step == 1
    assert cause is not None and phrase in cause, cause


def test_loss_scale_sequence_is_named():
    cfg = tiny("fp16.enabled=true", "fp16.initial_scale_power=10", "fp16.loss_scale_window=1")
    ours = run(cfg, steps=4)
    theirs = run(tiny("fp16.enabled=true", "fp16.initial_scale_power=10", "fp16.loss_scale_window=2"), steps=4)
    first, cause = first_and_cause(ours, theirs, cfg, "fp16")
    assert first.quantity == "loss_scale" and first.step == 3      # window 1 grows after 2 clean steps, 2 after 3
    assert "loss-scale sequence" in cause and "loss_scale_window" in cause


def test_a_gradient_scaled_by_the_accumulation_steps_is_named():
    cfg = tiny("gradient_accumulation_steps=2")
    ours = run(cfg, steps=1)
    theirs = copy.deepcopy(ours)
    theirs.snapshots[1]["grad"] = {n: 2.0 * g for n, g in ours.snapshots[1]["grad"].items()}   # forgot the / gas
    first, cause = first_and_cause(ours, theirs, cfg)
    assert first.quantity == "grad" and "2x refimpl's" in cause and "gradient_accumulation_steps" in cause


def test_the_arbiter_blames_the_side_that_left_the_fp64_trajectory():
    cfg = tiny()
    ours = run(cfg)
    reference = run_refimpl(fp64_config(cfg), 3, range(1, 4), "fp64", initial=initial_weights(cfg))
    theirs = copy.deepcopy(ours)
    name = "blocks.0.mlp.fc1.weight"
    theirs.snapshots[2]["weight"][name] = theirs.snapshots[2]["weight"][name] * np.float32(1.01)   # a 1% bug
    first, _ = first_and_cause(ours, theirs, cfg)
    assert (first.step, first.quantity, first.parameter) == (2, "weight", name)
    arb = diagnose.arbitrate(first, ours, theirs, reference)
    assert arb["blame"] == "peer" and "the peer is off" in arb["verdict"]
    # swap the roles: now refimpl's side is the one that left
    arb = diagnose.arbitrate(first, theirs, ours, reference)
    assert arb["blame"] == "refimpl" and "refimpl is off" in arb["verdict"]
    # both pushed off alike: rounding, as far as the arbiter can tell (the command then exits 0)
    both = copy.deepcopy(theirs)
    both.snapshots[2]["weight"][name] = ours.snapshots[2]["weight"][name] * np.float32(0.99)
    assert diagnose.arbitrate(first, both, theirs, reference)["blame"] == "rounding"


def test_fp16_with_skipped_steps_writes_a_valid_report(tmp_path, capsys):
    # 2^24 overflows the first steps on both sides: their gradients (inf) are not compared, the grad norms
    # (inf) count as equal, and report.json stays valid JSON (inf written as a string)
    out = tmp_path / "xc"
    code = main(["crosscheck", "--against", "torch", "--steps", "4", "--fp64-arbiter", "--no-progress",
                 "--out", str(out), *sum((["--set", s] for s in TINY), []), "--set", "fp16.enabled=true",
                 "--set", "fp16.initial_scale_power=24", "--set", "fp16.hysteresis=1"])
    assert code == 0, capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    skipped = [r["step"] for r in report["per_step"] if r["refimpl"]["skipped"]]
    assert skipped and skipped == [r["step"] for r in report["per_step"] if r["torch"]["skipped"]]
    assert report["per_step"][0]["refimpl"]["grad_norm"] == "inf"


def test_trace_round_trips_through_its_files(tmp_path):
    t = Trace("x")
    t.record(1, loss=1.5, grad_norm=float("inf"), lr=0.1, loss_scale=2.0, skipped=True)
    t.snapshot(1, "weight", {"a.b": np.arange(6, dtype=np.float32).reshape(2, 3)})
    back = Trace.read(t.write(tmp_path / "x"))
    assert back.steps == t.steps and back.skipped_steps() == [1]
    np.testing.assert_array_equal(back.snapshots[1]["weight"]["a.b"], t.snapshots[1]["weight"]["a.b"])


@pytest.mark.parametrize("args, needle", [
    (["--set", "optimizer.params.bias_correction=false"], "bias_correction"),
    (["--snapshot-steps", "0,2"], "--snapshot-steps"),
    (["--set", "model.dtype=float64", "--against", "deepspeed"], "float64"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, needle):
    argv = ["crosscheck", "--against", "torch", "--steps", "2", "--no-progress", "--out", str(tmp_path / "o"),
            *sum((["--set", s] for s in TINY), []), *args]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err


def test_a_config_deepspeed_rejects_is_one_line_with_deepspeeds_own_error(tmp_path, capsys):
    """refimpl takes a fractional min_loss_scale; DeepSpeed's pydantic model does not: exit 2, DeepSpeed's words."""
    pytest.importorskip("deepspeed")
    code = main(["crosscheck", "--against", "deepspeed", "--steps", "1", "--no-progress", "--out", str(tmp_path / "o"),
                 *sum((["--set", s] for s in TINY), []), "--set", "fp16.enabled=true",
                 "--set", "fp16.min_loss_scale=0.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("refimpl: error: DeepSpeed failed") and "min_loss_scale" in err and "worker.log" in err
