"""Ultralytics' own trainer running gcp's stages on a pruned module (``trainer``) and the pipeline family that
drives it (``family``)."""
