"""Run the gateway benchmarks of issue 8: ``.venv/bin/python bench/run.py [--quick]``.

Starts a fake upstream, the gateway and a bare passthrough on 127.0.0.1, measures six
scenarios against same-run references, prints a table and writes bench/results/latest.json.
See bench/README.md.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``gateway`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import main

if __name__ == "__main__":
    raise SystemExit(main())
