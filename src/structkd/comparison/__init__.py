"""Does distillation help on your data? Methods x paired seeds, a confidence interval, a verdict.

    from structkd import compare
    c = compare("my.yaml", ["none", "ssim", "mgd:auto"], seeds=3, out="cmp")
    print(open("cmp/report.md").read())
"""

from .report import markdown, plot_gains, write_report
from .runner import (
    Comparison,
    Row,
    compare,
    parse_rows,
    resolve_row,
    row_config,
    run_row,
    teacher_fingerprint,
)
from .stats import PairedGain, detectable_gain, paired_gain, seeds_to_resolve

__all__ = ["Comparison", "PairedGain", "Row", "compare", "detectable_gain", "markdown",
           "paired_gain", "parse_rows", "plot_gains", "resolve_row", "row_config", "run_row",
           "seeds_to_resolve", "teacher_fingerprint", "write_report"]
