"""Stream text through the Titans pipeline on Ray: `python launch/run.py --stream book.txt` (see --help).
The same command is installed as `titans-run`."""
import sys

from titans_runtime.cli.run import main

if __name__ == "__main__":
    sys.exit(main())
