"""The studies behind the README's tables (``research/``, run from a checkout), at toy size."""

import json

from research import solvers, t2i


def test_solver_benchmark_writes_table_json_and_plot(tmp_path, capsys):
    assert solvers.main(["--out", str(tmp_path), "--samples", "32", "--grid", "linear"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| solver | N=4 |") and "fireflow / euler =" in out
    result = json.loads((tmp_path / "solvers.json").read_text())
    rows = {(r["solver"], r["steps"]): r for r in result["rows"]}
    assert len(rows) == 3 * len(solvers.STEPS)
    assert rows["fireflow", 8]["nfe"] == 18 and rows["euler", 8]["nfe"] == 16 and rows["midpoint", 8]["nfe"] == 32
    assert result["equal_nfe_18"]["fireflow_over_euler"] <= 0.1
    assert result["global_order"]["fireflow"] >= 1.8 and 0.9 <= result["global_order"]["euler"] <= 1.1
    assert (tmp_path / "solvers.png").read_bytes()[:4] == b"\x89PNG"


def test_t2i_benchmark_smoke(tmp_path, capsys):
    """``python -m research.t2i`` at toy size: the table, the JSON fields and the model-call counts."""
    args = ["--out", str(tmp_path), "--steps", "1", "2", "--prompts", "3", "--reference-steps", "6"]
    assert t2i.main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("| N | setting | model calls |") and "at equal calls" in out
    result = json.loads((tmp_path / "t2i.json").read_text())
    rows = {(r["solver"], r["steps"]): r for r in result["rows"]}
    expected = [("euler", 1), ("euler", 2), ("euler", 3), ("euler", 4), ("midpoint", 1), ("fireflow", 1)]
    assert set(rows) == {*expected, ("fireflow", 2)}
    assert [rows[s]["nfe"] for s in [("euler", 3), ("midpoint", 1), ("fireflow", 2)]] == [3, 2, 3]
    assert result["reference"]["nfe"] == 7 and result["num_prompts"] == 3
    for r in rows.values():
        assert 0 < r["error"] <= r["error_max"] and 0 <= r["top1"] <= r["top5"] <= 1
    g = result["groups"][1]
    assert g["n"] == 2 and g["rows"] == ["euler-2", "midpoint-1", "fireflow-2", "euler-3", "euler-4"]
    assert g["fireflow_beats_euler_equal_calls"] == (rows["fireflow", 2]["error"] < rows["euler", 3]["error"])
    assert result["scheduler_check"]["max_rel_diff"] <= 1e-5
    assert (tmp_path / "t2i.png").read_bytes()[:4] == b"\x89PNG"
