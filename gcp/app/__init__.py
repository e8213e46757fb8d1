"""The application: configuration, run directories and the pipeline's stages, plots, the command line, and the
Ultralytics trainer integration (``gcp.app.ultralytics``). Top of the import order: nothing imports it."""
