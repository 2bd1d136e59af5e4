"""Reports: metrics.jsonl reading, loss-curve plot, self-contained HTML page, rich tables."""

from potstill.report.html import (
    format_value,
    plot_loss_curve,
    read_metrics,
    rich_table,
    table_columns,
    write_report,
)

__all__ = ["format_value", "plot_loss_curve", "read_metrics", "rich_table", "table_columns", "write_report"]
