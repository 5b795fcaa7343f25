"""Train a Titans model: a thin wrapper over `titans-train` (titans_runtime/cli/train.py)."""
import sys

from titans_runtime.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
