"""refimpl estimate: every expected number is worked out by hand here from the published formulas and, where a
source prints one, checked against the number it prints.

Sources: ZeRO (arXiv 1910.02054) Figure 1; ZeRO-Infinity (arXiv 2104.07857) §3 and Figure 2a, §4 and Figure 3;
DeepSpeed docs/code-docs/source/memory.rst (the estimate_zero2/zero3 examples) and
deepspeed/runtime/zero/{stage_1_and_2,stage3}.py.
"""
import argparse
import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import estimate as E

GiB, TiB = 2**30, 2**40


def cli(capsys, *argv):
    """(exit code, stdout, stderr) of `refimpl estimate ARGV`; argparse errors exit through SystemExit."""
    try:
        code = E.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def human(b):
    """The table's byte format, written independently: GB = 2^30, TB = 2^40, two decimals."""
    return f"{b / TiB:.2f} TB" if b >= TiB else f"{b / GiB:.2f} GB"


# ------------------------------------------------------------------------------------------------ input
@pytest.mark.parametrize("text,value", [("3e9", 3_000_000_000), ("3B", 3_000_000_000), ("175B", 175_000_000_000),
                                        ("1.5T", 1_500_000_000_000), ("350m", 350_000_000), ("7K", 7_000),
                                        ("2851e6", 2_851_000_000), ("42", 42)])
def test_parse_count(text, value):
    assert E.parse_count(text) == value


@pytest.mark.parametrize("text", ["0", "-3B", "abc", "3X", "nan", "inf", "", "0.4"])
def test_parse_count_rejects_with_the_flag_named(text):
    with pytest.raises(E.EstimateError, match="--params"):
        E.parse_count(text, "--params")


def test_gpt2_small_with_vocab():
    # 12 layers, hd 768, vocab 50257: 12·12·768² + 50257·768 = 84,934,656 + 38,597,376 = 123,532,032 (GPT-2's
    # "124M"). The largest layer is then the embedding (38.6M), not the 768x3072 MLP linear (2.36M).
    r = E.estimate(layers=12, hidden=768, vocab=50257)
    assert r["inputs"]["params"] == 123_532_032
    assert r["inputs"]["largest_layer_params"] == 38_597_376


# ------------------------------------------------------------------------------------------------ ZeRO
def test_zero_figure1_7p5B_on_64_gpus():
    # ZeRO Figure 1 (Ψ = 7.5B, N_d = 64, K = 12): baseline 120 GB, P_os 31.4 GB, P_os+g 16.6 GB, P_os+g+p 1.9 GB.
    psi, n = 7.5e9, 64
    by_hand = {0: (2 + 2 + 12) * psi,               # 120.0e9
               1: (2 + 2) * psi + 12 * psi / n,     # 30e9 + 1.40625e9 = 31.40625e9
               2: 2 * psi + (2 + 12) * psi / n,     # 15e9 + 1.640625e9 = 16.640625e9
               3: (2 + 2 + 12) * psi / n}           # 1.875e9
    printed = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}  # decimal GB, as the ZeRO paper prints them
    for stage in range(4):
        got = E.zero_model_state_bytes(7_500_000_000, stage, n)
        assert got["gpu"] == pytest.approx(by_hand[stage]) and got["cpu"] == got["nvme"] == 0
        assert abs(got["gpu"] / 1e9 - printed[stage]) <= 0.05 + 1e-12   # the figure's one decimal


def test_a_trillion_parameters_need_16_TB():
    # ZeRO §1 / ZeRO-Infinity §1: 16 bytes per parameter, so 1T -> 16 TB, 100B -> 1.6 TB (decimal TB).
    assert E.estimate(params=10**12)["model_state_bytes"]["zero_16_per_param"] == 16e12
    assert E.estimate(params=10**11)["model_state_bytes"]["zero_16_per_param"] == 1.6e12


@given(psi=st.integers(1, 10**13), n=st.integers(1, 4096))
def test_stage3_offload_moves_bytes_between_tiers_and_keeps_the_total(psi, n):
    for opt, par in [("none", "none"), ("cpu", "none"), ("cpu", "cpu"), ("nvme", "none"), ("nvme", "cpu"),
                     ("nvme", "nvme"), ("cpu", "nvme")]:
        got = E.zero_model_state_bytes(psi, 3, n, opt, par)
        assert sum(got.values()) == pytest.approx(16 * psi / n)
    all_nvme = E.zero_model_state_bytes(psi, 3, n, "nvme", "nvme")
    assert all_nvme == {"gpu": 0, "cpu": 0, "nvme": pytest.approx(16 * psi / n)}
    # ZeRO-Offload at stage 2: only the fp16 parameters stay on the GPU (DeepSpeed's zero2 cpu_offload: 2Ψ)
    got = E.zero_model_state_bytes(psi, 2, n, "cpu")
    assert got["gpu"] == pytest.approx(2 * psi) and got["cpu"] == pytest.approx(14 * psi / n)


def test_configurations_deepspeed_refuses_are_errors():
    for stage, opt, par in [(0, "cpu", "none"), (2, "nvme", "none"), (2, "cpu", "cpu"), (3, "none", "cpu")]:
        with pytest.raises(E.EstimateError, match=f"stage {stage}"):
            E.zero_model_state_bytes(10**9, stage, 8, opt, par)


# ------------------------------------------------------------------------------------------------ DeepSpeed
DS_ZERO3_COLD = """\
   71.69GB |   0.12GB | offload_param=cpu , offload_optimizer=cpu , zero_init=1
  127.45GB |   0.12GB | offload_param=cpu , offload_optimizer=cpu , zero_init=0
   63.72GB |   0.78GB | offload_param=none, offload_optimizer=cpu , zero_init=1
  127.45GB |   0.78GB | offload_param=none, offload_optimizer=cpu , zero_init=0
    1.43GB |   6.09GB | offload_param=none, offload_optimizer=none, zero_init=1
  127.45GB |   6.09GB | offload_param=none, offload_optimizer=none, zero_init=0"""


def test_deepspeed_zero3_docs_example(capsys):
    # memory.rst: estimate_zero3_model_states_mem_needs_all_cold(total_params=2851e6, largest_layer_params=32e6,
    # num_gpus_per_node=8, num_nodes=1) prints DS_ZERO3_COLD. By hand, e.g. the first and fifth lines:
    psi, big = 2851e6, 32e6
    assert f"{psi * 18 * 1 * 1.5 / GiB:.2f}" == "71.69"               # 18Ψ/nodes·1.5 on the CPU
    assert f"{4 * big / GiB:.2f}" == "0.12"                            # the largest layer, fp16 p + g
    assert f"{big * 4 * 8 * 1.5 / GiB:.2f}" == "1.43"                  # zero.Init: one fp32 layer per process
    assert f"{(4 * big + 18 * psi / 8) / GiB:.2f}" == "6.09"
    code, out, _ = cli(capsys, "--params", "2851e6", "--largest-layer", "32e6", "--gpus", "8")
    assert code == 0
    assert DS_ZERO3_COLD in out


def test_deepspeed_zero2_docs_example(capsys):
    # memory.rst prints, for estimate_zero2_model_states_mem_needs_all_cold(total_params=2851e6, 8 GPUs, 1 node):
    #   127.45GB |   5.31GB | offload_optimizer=cpu
    #   127.45GB |  15.93GB | offload_optimizer=none
    # The second GPU figure is the pre-PR-#5099 formula (4Ψ + 16Ψ/N = 15.93); the code now says 2Ψ + 18Ψ/N.
    psi = 2851e6
    assert f"{psi * max(4 * 8, 16) * 1.5 / GiB:.2f}" == "127.45"
    assert f"{2 * psi / GiB:.2f}" == "5.31"
    new_no_offload = 2 * psi + int(18 * psi / 8)            # 5.702e9 + 6.41475e9 = 12.11675e9 bytes
    code, out, _ = cli(capsys, "--params", "2851e6", "--gpus", "8")
    assert code == 0
    assert "  127.45GB |   5.31GB | offload_optimizer=cpu\n" in out
    assert f"  127.45GB | {new_no_offload / GiB:6.2f}GB | offload_optimizer=none\n" in out
    assert f"{new_no_offload / GiB:.2f}" == "11.28"


@given(psi=st.integers(10**6, 10**13), big=st.integers(1, 10**10), gpus=st.integers(1, 16), nodes=st.integers(1, 64))
def test_deepspeed_zero3_every_branch_by_hand(psi, big, gpus, nodes):
    f = 1.5
    cases = {  # (cpu_offload, cpu_offload_params, zero_init): (cpu per node, gpu per GPU), stage3.py by hand
        (True, True, True): (psi * 18 / nodes * f, 4 * big),
        (True, True, False): (psi * max(4 * gpus, 18 / nodes) * f, 4 * big),
        (True, False, True): (psi * 16 / nodes * f, 4 * big + int(2 * psi / (gpus * nodes))),
        (True, False, False): (psi * max(4 * gpus, 16 / nodes) * f, 4 * big + int(2 * psi / (gpus * nodes))),
        (False, False, True): (big * 4 * gpus * f, 4 * big + int(18 * psi / (gpus * nodes))),
        (False, False, False): (psi * 4 * gpus * f, 4 * big + int(18 * psi / (gpus * nodes))),
    }
    for (opt, par, init), (cpu, gpu) in cases.items():
        got_cpu, got_gpu, layer = E.deepspeed_zero3_mem_needs(psi, big, gpus, nodes, opt, par, init)
        assert got_cpu == pytest.approx(int(cpu), abs=1) and got_gpu == gpu and layer == 4 * big


# ------------------------------------------------------------------------------------------------ paper §3
# Figure 2a of ZeRO-Infinity: (params in T, layers, hidden, model states in TB = 2^40 bytes).
FIGURE_2A = [(0.10, 80, 10 * 1024, 1.83), (0.50, 100, 20 * 1024, 9.16), (1.01, 128, 25 * 1024, 18.31),
             (10.05, 195, 64 * 1024, 182.81), (101.47, 315, 160 * 1024, 1845.70)]


@pytest.mark.parametrize("params_t,nl,hd,states_tb", FIGURE_2A)
def test_figure2a_parameters_and_model_states(params_t, nl, hd, states_tb):
    r = E.estimate(layers=nl, hidden=hd)
    assert round(12 * nl * hd * hd / 1e12, 2) == params_t == round(r["inputs"]["params"] / 1e12, 2)
    assert round(240 * nl * hd * hd / TiB, 2) == states_tb          # §3: 240 × nl × hd² bytes
    assert round(r["model_state_bytes"]["paper_20_per_param"] / TiB, 2) == states_tb


def test_activation_and_working_memory_formulas():
    # GPT-3 175B's shape (nl 96, hd 12288, 96 heads), bsz 1, seq 2048, a checkpoint every 3 blocks.
    # (The formulas are quoted from §3 in DeepSpeed issue #1861 and in the AISystem notes on ZeRO-Infinity.)
    nl, hd, heads, bsz, seq, ci = 96, 12288, 96, 1, 2048, 3
    r = E.estimate(layers=nl, hidden=hd, heads=heads, bsz=bsz, seq=seq, ci=ci, gpus=8)["activations"]
    ckpt = 2 * 1 * 2048 * 12288 * 96 / 3                   # 1,610,612,736 bytes = 1.50 GB
    assert r["checkpoints_per_gpu"] == ckpt == 1_610_612_736
    assert r["checkpoints_per_node"] == 8 * ckpt
    assert r["awm_per_gpu"] == 1 * 2048 * 3 * (16 * 12288 + 2 * 96 * 2048) == 3_623_878_656
    assert r["mswm_per_gpu"] == 4 * 12288 * 4 * 12288 == 2_415_919_104   # fp16 W + dW of the 12288x49152 linear


def test_awm_needs_heads_and_is_absent_without(capsys):
    assert E.estimate(layers=2, hidden=64)["activations"]["awm_per_gpu"] is None
    code, out, _ = cli(capsys, "--layers", "2", "--hidden", "64")
    assert code == 0 and "(give --heads)" in out


# ------------------------------------------------------------------------------------------------ paper §4
def test_section4_bandwidth_thresholds():
    peak = 70e12                                            # Figure 3: 70 TFLOP/s per GPU
    # params + grads, ait = seq·bsz: "bandwidth over 70 GB/s ... more than 50% efficiency even at the smallest
    # batch size" (seq 1024, bsz 1): 70e12 / 1024 = 68.4 GB/s.
    assert E.bandwidth_for_efficiency(1024 * 1, 0.5, peak) == pytest.approx(70e12 / 1024)
    assert E.efficiency(1024, 70e9, peak) > 0.5
    # optimizer states, ait = seq·bsz/4: "nearly 4x higher bandwidth" for 50%, and "nearly 1.5 TB/s" for 90% at
    # batch 2 per GPU: 9 · 70e12 / (2048/4) = 1.23 TB/s.
    assert E.bandwidth_for_efficiency(1024 / 4, 0.5, peak) == pytest.approx(4 * 70e12 / 1024)
    bw90 = E.bandwidth_for_efficiency(2048 / 4, 0.9, peak)
    assert bw90 == pytest.approx(9 * 70e12 / 512) and 1.0e12 < bw90 < 1.5e12
    # activation checkpoints, ait = 24·hd·ci: "2 GB/s ... over 50% efficiency even for a hidden size of 2K",
    # "below 1 GB/s" from 8K; and §5: ~3 GB/s per GPU to CPU keeps "over 80%" at 8K.
    assert E.bandwidth_for_efficiency(24 * 2048, 0.5, peak) == pytest.approx(70e12 / 49152)   # 1.42 GB/s
    assert E.bandwidth_for_efficiency(24 * 2048, 0.5, peak) < 2e9 and E.efficiency(24 * 2048, 2e9, peak) > 0.5
    assert E.bandwidth_for_efficiency(24 * 8192, 0.5, peak) < 1e9
    eff = E.efficiency(24 * 8192, 3e9, peak)
    assert eff == pytest.approx(24 * 8192 * 3e9 / (24 * 8192 * 3e9 + 70e12)) and eff > 0.8   # 0.894


def test_estimate_reports_the_three_intensities():
    rows = {e["data"]: e for e in E.estimate(layers=4, hidden=8192, bsz=2, seq=1024, ci=2)["efficiency"]}
    assert rows["params_grads"]["ait"] == 2048
    assert rows["optimizer_states"]["ait"] == 512
    assert rows["activation_checkpoints"]["ait"] == 24 * 8192 * 2
    assert rows["params_grads"]["efficiency"]["cpu_gpu"] == pytest.approx(2048 * 12e9 / (2048 * 12e9 + 70e12))


@given(ait=st.floats(1, 1e7), target=st.floats(0.01, 0.99), peak=st.floats(1e12, 1e16))
def test_bandwidth_for_efficiency_inverts_efficiency(ait, target, peak):
    assert E.efficiency(ait, E.bandwidth_for_efficiency(ait, target, peak), peak) == pytest.approx(target)


# ------------------------------------------------------------------------------------------------ CLI
def test_json_parses_and_matches_the_tables(capsys):
    argv = ["--layers", "128", "--hidden", "25600", "--heads", "256", "--gpus", "16", "--nodes", "2"]
    code, text, _ = cli(capsys, *argv)
    assert code == 0
    code, raw, _ = cli(capsys, *argv, "--json")
    assert code == 0
    r = json.loads(raw)
    lines = text.splitlines()
    for z in r["zero"]:
        cells = [str(z["stage"]), z["offload_optimizer"], z["offload_param"],
                 *(human(z["per_rank"][t]) for t in ("gpu", "cpu", "nvme")),
                 *(human(z["per_node"][t]) for t in ("gpu", "cpu", "nvme"))]
        assert sum(line.split() == " ".join(cells).split() for line in lines) == 1, cells
    for d in r["deepspeed"]["zero3"]:
        assert f"{d['cpu_bytes_per_node'] / GiB:7.2f}GB | {d['gpu_bytes_per_gpu'] / GiB:6.2f}GB" in text
    a = r["activations"]
    assert "activation checkpoints" in text and human(a["checkpoints_per_gpu"]) in text
    assert human(a["mswm_per_gpu"]) in text and human(a["awm_per_gpu"]) in text
    assert r["world_size"] == 32 and r["inputs"]["params"] == 12 * 128 * 25600**2


@pytest.mark.parametrize("kwargs,flag", [({"params": 10**9, "gpus": 0}, "--gpus"), ({"params": 0}, "--params"),
                                         ({"params": 10**9, "bw_nvme": -1.0}, "--bw-nvme"),
                                         ({"params": 10**9, "seq": 2.5}, "--seq")])
def test_library_calls_check_their_numbers_too(kwargs, flag):
    with pytest.raises(E.EstimateError, match=flag):
        E.estimate(**kwargs)


def test_params_and_shape_may_be_given_together_when_they_agree(capsys):
    # 12 · 32 · 2560² = 2,516,582,400, within 5% of 2.5B: the stated count wins, the shape feeds §3.
    r = E.estimate(params=2_500_000_000, layers=32, hidden=2560)
    assert r["inputs"]["params"] == 2_500_000_000 and r["activations"] is not None


@pytest.mark.parametrize("argv,flag", [
    (["--params", "0"], "--params"), (["--params", "abc"], "--params"), (["--params=-3B"], "--params"),
    (["--layers", "2"], "--hidden"), (["--params", "3B", "--layers", "2", "--hidden", "64"], "--params"),
    (["--bw-nvme", "0", "--params", "1B"], "--bw-nvme"), (["--gpus", "0", "--params", "1B"], "--gpus"),
    (["--ci", "0", "--params", "1B"], "--ci"), ([], "--params"),
    (["--layers", "2", "--hidden", "8", "--ci", "3"], "--ci"),
    (["--params", "3B", "--heads", "4"], "--heads"), (["--peak-tflops", "nan", "--params", "1B"], "--peak-tflops"),
    (["--nodes", "1.5", "--params", "1B"], "--nodes"),
])
def test_bad_input_is_one_error_line_and_exit_2(capsys, argv, flag):
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == ""
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and flag in error_lines[0]


def test_subcommand_wiring_and_python_dash_m():
    # How the lead wires it into refimpl/cli.py: a subparser gets add_arguments, and run(args) does the work.
    p = argparse.ArgumentParser(prog="refimpl")
    E.add_arguments(p.add_subparsers(dest="command").add_parser("estimate"))
    args = p.parse_args(["estimate", "--params", "7B", "--gpus", "8", "--json"])
    assert args.params == 7_000_000_000 and args.gpus == 8
    done = subprocess.run([sys.executable, "-m", "refimpl.estimate", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--params" in done.stdout and "--bw-nvme" in done.stdout
