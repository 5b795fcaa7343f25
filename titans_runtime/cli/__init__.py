"""Command-line entry points (`titans-run`): argument parsing, progress, summaries; the work itself lives in
titans_runtime.runtime (the Ray pipeline) and titans_runtime.model."""
