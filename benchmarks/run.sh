#!/usr/bin/env bash
# Every benchmark, results in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
fedmq bench he --quick --json benchmarks/results/he-quick.json
fedmq bench he --json benchmarks/results/he.json
fedmq bench accuracy --json benchmarks/results/accuracy.json
fedmq bench aggregator-memory --json benchmarks/results/aggregator_memory.json
fedmq bench agent-idle --json benchmarks/results/agent_idle.json
fedmq fieldtest configs/fieldtests/thirty-percent.yaml --json benchmarks/results/fieldtest-thirty-percent.json
fedmq bench broker --json benchmarks/results/broker.json
fedmq bench cycle --samples 256 --json benchmarks/results/cycle-cpu.json
