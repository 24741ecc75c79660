"""Tables and figures from the results store."""
from .figures import save_recon_grid
from .results import load_records, load_results, worst_case
from .tables import collect, to_csv, to_markdown, write_report

__all__ = ["collect", "load_records", "load_results", "save_recon_grid", "to_csv", "to_markdown", "worst_case",
           "write_report"]
