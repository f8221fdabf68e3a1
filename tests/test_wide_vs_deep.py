"""examples/wide_vs_deep.py --quick: the Wide Attention study runs end to end and its table is sane."""
import importlib.util
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("wide_vs_deep", ROOT / "examples" / "wide_vs_deep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_study_writes_a_sane_table_and_plot(tmp_path):
    study = load_example()
    assert study.shapes(8) == [(8, 1), (4, 2), (2, 4), (1, 8)]
    results, latency = study.main(["--quick", "--total-heads", "2", "--seeds", "2", "--reps", "2",
                                   "--out", str(tmp_path)])
    assert set(results) == {(t, L, h) for t in study.TASKS for L, h in [(2, 1), (1, 2)]}
    for (task, L, h), r in results.items():
        assert len(r["accuracy"]) == 2 and all(0.0 <= a <= 1.0 for a in r["accuracy"])
        assert 0.0 < r["majority"] < 0.5
        for n in (1, 32):
            assert 0.0 < latency[(task, L, h, "numpy", n)] < 60.0
    for task in study.TASKS:   # the same total heads: the deeper model has the extra MLP and norms, so more weights
        assert results[(task, 2, 1)]["parameters"] > results[(task, 1, 2)]["parameters"]
    rows = (tmp_path / "results.md").read_text().splitlines()
    assert rows[0].startswith("| task | layers x heads | parameters | eval accuracy") and len(rows) == 2 + 4 + 2
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved) == 4 and all(np.isfinite(list(r["latency_s"].values())).all() for r in saved)
    assert (tmp_path / "wide_vs_deep.png").stat().st_size > 10_000
