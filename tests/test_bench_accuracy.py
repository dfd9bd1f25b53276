"""The accuracy benchmark's path with the real system, kept small (3 agents, 2 rounds)."""

import json

import pytest

from fedmq.tools.bench import accuracy

pytestmark = [pytest.mark.slow, pytest.mark.long]


def test_accuracy_bench_small(tmp_path):
    rows = accuracy.run(["none", "quantize"], agents=3, rounds=2, progress=False)
    assert [r["mode"] for r in rows] == ["none", "quantize"]
    for r in rows:
        assert [x["round"] for x in r["per_round"]] == [1, 2]
        assert r["final_accuracy"] > 0.5 and all(x["participants"] == 3 for x in r["per_round"])
    assert rows[0]["delta_vs_none"] == 0.0
    # int8/int16 codes instead of float32: the quantized upload is several times smaller
    assert rows[1]["per_round"][-1]["bytes_received"] * 2 < rows[0]["per_round"][-1]["bytes_received"]
    accuracy.write(rows, tmp_path / "acc.json", tmp_path / "acc.png")
    assert json.loads((tmp_path / "acc.json").read_text())["rows"][1]["mode"] == "quantize"
    assert (tmp_path / "acc.png").stat().st_size > 1000
