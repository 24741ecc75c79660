"""Tables and figures from the results store."""
from .figures import save_recon_grid
from .tables import collect, to_csv, to_markdown, write_report

__all__ = ["collect", "save_recon_grid", "to_csv", "to_markdown", "write_report"]
