"""The shared figure helpers live in :mod:`splitveil.results.figures` (runs save their reconstruction grids
there without importing report/); re-exported here for the report's figures."""
from ..results.figures import finish_figure, image_grid, pyplot, save_recon_grid  # noqa: F401
