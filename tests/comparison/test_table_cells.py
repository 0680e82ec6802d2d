"""The comparison's table (and the seed study's, which is one): undefined COCO metrics are
shown as such, never averaged."""

from __future__ import annotations

from structkd.comparison.report import cell as _cell
from structkd.comparison.runner import metric_stats as _metric_stats


def test_undefined_metric_is_a_dash_not_a_mean() -> None:
    assert _metric_stats([-1.0, -1.0, -1.0]) == (-1.0, 0.0)
    assert _metric_stats([2.0, -1.0, 4.0]) == (-1.0, 0.0)  # not (1.67, 2.5)
    assert _cell(_metric_stats([-1.0, -1.0])) == "-"
    mean, std = _metric_stats([2.0, 3.0, 4.0])
    assert (mean, std) == (3.0, 1.0)
    assert _cell((mean, std)) == "3.00 ± 1.00"
