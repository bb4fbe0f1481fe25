import json

from fireflow.bench.solvers import STEPS, main


def test_solver_benchmark_writes_table_json_and_plot(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--samples", "32", "--grid", "linear"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| solver | N=4 |") and "fireflow / euler =" in out
    result = json.loads((tmp_path / "solvers.json").read_text())
    rows = {(r["solver"], r["steps"]): r for r in result["rows"]}
    assert len(rows) == 3 * len(STEPS)
    assert rows["fireflow", 8]["nfe"] == 18 and rows["euler", 8]["nfe"] == 16 and rows["midpoint", 8]["nfe"] == 32
    assert result["equal_nfe_18"]["fireflow_over_euler"] <= 0.1
    assert result["global_order"]["fireflow"] >= 1.8 and 0.9 <= result["global_order"]["euler"] <= 1.1
    assert (tmp_path / "solvers.png").read_bytes()[:4] == b"\x89PNG"
