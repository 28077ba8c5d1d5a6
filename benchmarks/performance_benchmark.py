"""`minillm bench` as a script: training, prefill and decode speed of MiniGPT against transformers on the
same weights, interleaved in one process (see `minillm.benchmarks.performance` for what is measured).

    .venv/bin/python benchmarks/performance_benchmark.py --quick
    .venv/bin/python benchmarks/performance_benchmark.py --preset tiny --preset micro --out bench.json
    .venv/bin/python benchmarks/performance_benchmark.py --preset mini --device cuda --compile
"""

import sys

from minillm.benchmarks.performance import main

if __name__ == "__main__":
    sys.exit(main())
