"""Training step time of the demo recipe at K = 100,000 (lc) against K = 1,024: now `vqtok bench train`.

    .venv/bin/python benchmarks/bench_train_step.py [--config configs/demo.yaml] [--repeats 12] [--json PATH]

Runs `vqtok bench train --sizes 1024 100000 --repeats 12` with any further options appended (they win; see
`vqtok bench train --help`). The target of the demo recipe: K = 100,000's step within 1.2x of K = 1,024's, the
"x smallest K" column of the 100,000 row (benchmarks/results/train_step.json: 1.147 on the 2-core CPU, measured
before this wrapper, when the script also timed the search alone).
"""

from __future__ import annotations

import sys

from vqtok.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train", "--sizes", "1024", "100000", "--repeats", "12", *sys.argv[1:]]))
