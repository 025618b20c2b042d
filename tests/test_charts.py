"""Server-side SVG geometry (gateway/core/charts.py) and result URLs (gateway/core/results.py)."""

from __future__ import annotations

import json

import pytest

from gateway.core.charts import gauge, nice_ceiling, stacked_bars
from gateway.core.results import result_urls


@pytest.mark.parametrize(
    ("value", "ceiling"), [(0, 1), (0.3, 0.5), (1, 1), (1.2, 2), (2.2, 2.5), (7, 10), (130, 200)]
)
def test_the_scale_ends_on_a_round_number(value: float, ceiling: float) -> None:
    assert nice_ceiling(value) == pytest.approx(ceiling)


def test_bars_stack_by_series_largest_first_and_fit_the_chart() -> None:
    days = ["2026-11-01", "2026-11-02", "2026-11-03"]
    chart = stacked_bars(
        days, {"b": {"2026-11-02": 1.0}, "a": {"2026-11-02": 2.0, "2026-11-03": 1}}
    )
    assert [item.name for item in chart.legend] == ["a", "b"]
    bars = [b for b in chart.bars if "2026-11-02" in b.title]
    assert [b.series for b in bars] == [0, 1]  # a at the bottom
    assert bars[1].y + bars[1].height == pytest.approx(bars[0].y)  # stacked, no gap
    top = min(b.y for b in chart.bars)
    assert top >= 0 and all(b.y + b.height <= chart.height for b in chart.bars)
    assert chart.gridlines[-1].text == "5"  # 3 CNY on the busiest day, on a scale to 5


def test_more_series_than_colours_are_summed_as_other() -> None:
    series = {f"key-{n}": {"2026-11-01": float(n + 1)} for n in range(10)}
    chart = stacked_bars(["2026-11-01"], series)
    assert len(chart.legend) == 8 and chart.legend[-1].name == "other"
    assert chart.legend[-1].total == pytest.approx(1 + 2 + 3)


def test_the_gauge_draws_each_part_over_the_track_and_never_past_the_end() -> None:
    arcs = gauge([("spent", 30), ("reserved", 10), ("uncertain", 500)], 100)
    assert [a.kind for a in arcs] == ["track", "spent", "reserved", "uncertain"]
    assert arcs[-1].path.endswith("196.0 104.0")  # the right end, not beyond
    assert [a.kind for a in gauge([("spent", 1)], 0)] == ["track"]  # no budget, no parts


def test_result_urls_come_from_data_or_a_tasks_result_url() -> None:
    sync = {"data": [{"url": "https://h/1.png"}, {"url": "https://h/2.png"}]}
    assert result_urls(json.dumps(sync)) == ["https://h/1.png", "https://h/2.png"]
    task = {"status": "completed", "result_url": "https://h/t.png"}
    assert result_urls(json.dumps(task)) == ["https://h/t.png"]
    for odd in (None, "", "not json", "[]", '{"data": "x"}', '{"result_url": "javascript:x"}'):
        assert result_urls(odd) == []
