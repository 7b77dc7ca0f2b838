"""Where adapters interfere, module by module: metrics (:mod:`.metrics`) and the report (:mod:`.report`).

Every metric is computed exactly in the compressed core (``docs/design.md`` section 5).
"""

from .metrics import InterferenceReport, ModuleInterference, analyze_adapter_folders
from .report import format_report, plot_report, write_report_json

__all__ = [
    "InterferenceReport",
    "ModuleInterference",
    "analyze_adapter_folders",
    "format_report",
    "plot_report",
    "write_report_json",
]
