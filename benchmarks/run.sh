#!/usr/bin/env bash
# Every benchmark, results in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
fedmq bench he --quick --json benchmarks/results/he-quick.json
fedmq bench he --json benchmarks/results/he.json
fedmq bench accuracy --json benchmarks/results/accuracy.json
