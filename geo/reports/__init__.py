"""Reports: read run directories, write tables, plots and maps."""
