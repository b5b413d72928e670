"""metrics.jsonl, TensorBoard, progress, PNG plots, sample grids and summary.json."""
