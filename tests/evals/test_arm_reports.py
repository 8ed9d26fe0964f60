"""The side-by-side table and heatmaps of several runs' eval reports (minicpm_jax.evals.arm_reports)."""

from __future__ import annotations

import pytest
from PIL import Image

from minicpm_jax.evals import arm_reports


def _report(loss, acc2k, acc4k, floor=1.0):
    grid = {2048: {0.0: acc2k, 1.0: acc2k}, 4096: {0.0: acc4k, 1.0: acc4k}}
    task = {"kind": "needle", "value": (acc2k + acc4k) / 2, "by_length": {2048: acc2k, 4096: acc4k}, "grid": grid,
            "floor_first_number": floor, "seconds": 10.0}
    multi = dict(task, floor_first_number=0.25, value=0.0, by_length={2048: 0.0, 4096: 0.0},
                 grid={2048: {0.0: 0.0, 1.0: 0.0}, 4096: {0.0: 0.0, 1.0: 0.0}}, seconds=5.0)
    return {"heldout": {"wiki_en": {"loss": 9.0, "tokens": 1}, "all": {"loss": loss, "tokens": 10}},
            "tasks": {"niah_en": task, "niah_en_multikey": multi}}


def test_table_rows_and_floors():
    md = arm_reports.table({"dense": _report(4.5, 0.75, 0.25), "sparse": _report(4.25, 0.5, 0.0)})
    lines = md.splitlines()
    assert lines[0] == ("| run | held-out loss | niah_en @ 2048 | niah_en @ 4096 | niah_en_multikey @ 2048 | "
                        "niah_en_multikey @ 4096 | seconds |")
    assert lines[2] == "| dense | 4.5000 | 0.75 | 0.25 | 0.00 | 0.00 | 15 |"
    assert lines[3] == "| sparse | 4.2500 | 0.50 | 0.00 | 0.00 | 0.00 | 15 |"
    assert lines[4].startswith("| floor: first number (pooled over lengths) / random |  "
                               "| 1.00 / 1.00 | 1.00 / 1.00 | 0.25 / 0.25 |")


def test_missing_heldout_and_plot(tmp_path):
    r = _report(4.0, 1.0, 0.0)
    del r["heldout"]
    assert arm_reports.heldout_loss(r) is None
    assert "| a | — |" in arm_reports.table({"a": r})
    merged = _report(4.0, 0.0, 1.0)
    merged["tasks"]["niah_en"]["grid"][8192] = {0.5: 0.0}      # a length scored at other depths (merged groups)
    png = arm_reports.plot({"a": r, "b": merged}, tmp_path / "x.png")
    with Image.open(png) as im:
        w, h = im.size
    assert w > h > 100                          # two rows of two heatmaps


def test_losses_fill_in_for_a_missing_heldout_section():
    r = _report(4.0, 1.0, 0.0)
    del r["heldout"]
    assert "| a | 3.2500 |" in arm_reports.table({"a": r}, losses={"a": 3.25})
    assert "| a | 4.0000 |" in arm_reports.table({"a": _report(4.0, 1.0, 0.0)}, losses={"a": 3.25})


def test_merge_pools_items_over_length_groups():
    a = _report(4.0, 1.0, 0.5)                                     # lengths 2048 and 4096, 4 items each
    for t in a["tasks"].values():
        t["n"] = 4
    b = {"tasks": {"niah_en": {"kind": "needle", "value": 0.0, "n": 2, "by_length": {8192: 0.0},
                               "grid": {8192: {0.5: 0.0}}, "floor_first_number": 1.0, "seconds": 20.0},
                   "niah_en_multikey": {"kind": "needle", "value": 1.0, "n": 2, "by_length": {8192: 1.0},
                                        "grid": {8192: {0.5: 1.0}}, "floor_first_number": 0.0, "seconds": 1.0}}}
    m = arm_reports.merge([a, b])
    assert m["heldout"] == a["heldout"]
    t = m["tasks"]["niah_en"]
    assert t["by_length"] == {2048: 1.0, 4096: 0.5, 8192: 0.0} and list(t["grid"]) == [2048, 4096, 8192]
    assert t["n"] == 6 and abs(t["value"] - 0.75 * 4 / 6) < 1e-12 and t["seconds"] == 30.0
    k = m["tasks"]["niah_en_multikey"]
    assert abs(k["value"] - 2 / 6) < 1e-12 and abs(k["floor_first_number"] - 1.0 / 6) < 1e-12
    with pytest.raises(ValueError, match="two reports"):
        arm_reports.merge([a, a])


def test_digit_diagnostics_pool_over_groups_and_tabulate():
    def part(length, n, lead, place):
        return {"tasks": {"niah_en": {"kind": "needle", "value": 0.0, "n": n, "by_length": {length: 0.0},
                                      "grid": {length: {0.5: 0.0}}, "floor_first_number": 1.0, "seconds": 1.0,
                                      "leading_digits": lead, "digits_in_place": place,
                                      "digits_by_length": {length: {"leading_digits": lead,
                                                                    "digits_in_place": place}}}}}
    m = arm_reports.merge([part(2048, 3, 2.0, 0.5), part(8192, 1, 6.0, 0.9)])["tasks"]["niah_en"]
    assert m["leading_digits"] == pytest.approx(3.0) and m["digits_in_place"] == pytest.approx(0.6)
    assert m["digits_by_length"] == {2048: {"leading_digits": 2.0, "digits_in_place": 0.5},
                                     8192: {"leading_digits": 6.0, "digits_in_place": 0.9}}
    md = arm_reports.digits_table({"dense": {"tasks": {"niah_en": m}}}, ("niah_en",))
    assert md.splitlines()[0] == "| run | niah_en @ 2048 | niah_en @ 8192 |"
    assert md.splitlines()[2] == "| dense | 2.00 / 0.50 | 6.00 / 0.90 |"
    old = part(4096, 1, 1.0, 0.1)["tasks"]["niah_en"]            # a part without the diagnostics: none pooled
    for key in ("leading_digits", "digits_in_place", "digits_by_length"):
        del old[key]
    mixed = arm_reports.merge([part(2048, 3, 2.0, 0.5), {"tasks": {"niah_en": old}}])["tasks"]["niah_en"]
    assert "leading_digits" not in mixed and "digits_by_length" not in mixed
    assert "| dense | — | — |" in arm_reports.digits_table({"dense": {"tasks": {"niah_en": mixed}}}, ("niah_en",))
