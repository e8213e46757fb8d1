"""The detection toolkit the method runs on: detectors (``models``), datasets (``data``), the YOLO loss, the
training loop and mAP evaluation. Knows nothing of pruning."""
