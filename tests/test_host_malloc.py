"""refimpl/host_malloc.py: after `keep_freed`, a training step reuses the memory of the step before.

The default model's step on the NumPy backend faulted about 17,000 fresh pages in every step without it
(glibc gave the temporaries' memory back to the kernel after each step), and about one with it. Run in a
fresh process: the thresholds are process-wide and cannot be unset.
"""
import subprocess
import sys
import textwrap

import pytest

CODE = textwrap.dedent("""
    import resource
    from refimpl import host_malloc
    if KEEP:
        assert host_malloc.keep_freed()
    from refimpl.backend import use_backend
    from refimpl.config import load_config
    from refimpl.engine import Engine
    from refimpl.train import build
    config = load_config(None, ["backend=numpy"])
    be, dataset, model = build(config)
    with use_backend(be):
        engine = Engine(model, config, be)
        def step(s):
            loss, _ = model.loss(dataset.get_batch("train", s, 16, 128))
            engine.backward(loss)
            engine.step()
        for s in range(3):
            step(s)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for s in range(3, 6):
            step(s)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
""")


def faults_per_step(keep: bool) -> float:
    out = subprocess.run([sys.executable, "-c", f"KEEP = {keep}\n" + CODE], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux")
def test_a_step_reuses_the_last_steps_memory():
    kept = faults_per_step(True)
    assert kept < 500, f"{kept} page faults per step with the memory kept"
    assert faults_per_step(False) > 10 * max(kept, 100)   # the test can tell: without it, thousands
