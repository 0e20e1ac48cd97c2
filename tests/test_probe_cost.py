"""benchmarks/probe_cost.py --quick runs in-process: every measured layer has its cost-model agreement computed and both
Gram forms agree numerically. No timing is asserted (timings never go into pass/fail tests)."""
from benchmarks import probe_cost


def test_probe_cost_quick(tmp_path):
    out = tmp_path / "probe_cost.md"
    result = probe_cost.main(["--quick", "--quiet", "--out", str(out)])
    rows = result["measured"]
    assert len(rows) == 2 * len(probe_cost.QUICK_CELLS)  # QKV and output projection per cell
    for r in rows:
        assert r["faster"] in ("materialized", "ghost") and r["auto_pick"] in ("materialized", "ghost")
        assert r["agree"] == (r["auto_pick"] == r["faster"])
        assert r["max_rel_diff"] < 1e-4, r  # ghost vs materialised, fp32
        assert r["auto_rel_diff"] == 0.0  # auto IS its pick
        assert all(v > 0 for v in r["ms"].values())
    assert result["decisions"] == len(rows)
    assert result["agreements"] == sum(r["agree"] for r in rows)
    text = out.read_text()
    assert "| agree |" in text and "Cost model vs measurement" in text
    assert f"in **{result['agreements']} of {result['decisions']}**" in text
    # the d = 4096 / 8192 figures are computed, never measured
    assert {r["d"] for r in result["computed"]} == {4096, 8192}
    assert not result["train"]
