"""Figures (palettes, overlays, prediction grids, histograms, one curve plotter of Lightning
logs) and the run's ``report.md``."""
