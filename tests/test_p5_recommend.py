"""examples/p5_recommend.py --quick: the P5-style study runs end to end, beats popularity, and ZeRO-3 with offload
gives stage 0's metrics exactly."""
import importlib.util
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_quick_study_beats_popularity_and_stage3_changes_nothing(tmp_path):
    spec = importlib.util.spec_from_file_location("p5_recommend", ROOT / "examples" / "p5_recommend.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    model_rows, stage3_row, baselines = study.main(["--quick", "--seeds", "2", "--out", str(tmp_path)])
    assert len(model_rows) == 2 and stage3_row == model_rows[0]        # bitwise the same weights, same metrics
    for row in model_rows:
        assert all(np.isfinite(v) for v in row.values())
        assert 0 <= row["NDCG@5"] <= row["HR@5"] <= row["HR@10"] <= 1 and row["NDCG@10"] <= row["HR@10"]
        assert row["HR@10"] > baselines["popularity"]["HR@10"] + 0.05    # 20 steps already learn the tastes
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("| method | HR@5 | NDCG@5 | HR@10 | NDCG@10 | star accuracy | star RMSE |")
    assert "gives seed 0's stage-0 metrics exactly: **True**" in text
    assert set(json.loads((tmp_path / "results.json").read_text())) == {"model", "stage3", "baselines"}
    assert (tmp_path / "p5.png").stat().st_size > 10_000
