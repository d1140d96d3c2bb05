#!/usr/bin/env bash
# Long fuzz campaign: every atheris harness in fuzz/, one after another, in ONE process at a time
# (the machine is shared). Not run in CI. Crashes land in fuzz/crashes/<harness>-crash-*, logs and
# a per-harness count table in fuzz/campaign-logs/.
#
#   bash fuzz/campaign.sh                       # 1,000,000 inputs per harness, no time cap
#   RUNS=2000000 bash fuzz/campaign.sh stack    # only fuzz_stack.py
#   MAX_TIME=600 bash fuzz/campaign.sh          # also stop each harness after 600 s
#
# Reproduce a crash: PYTHONPATH=. .venv/bin/python fuzz/fuzz_<harness>.py fuzz/crashes/<harness>-crash-<hash>
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
RUNS="${RUNS:-1000000}"
MAX_TIME="${MAX_TIME:-0}"
LOGS="$HERE/campaign-logs"
# the checkout's venv (tests/install-deps.sh puts atheris there); PY=... overrides
PY="${PY:-$ROOT/.venv/bin/python}"
mkdir -p "$HERE/crashes" "$LOGS"
[ -d "$HERE/corpus/stack" ] || PYTHONPATH="$ROOT" "$PY" "$HERE/make_corpus.py"
if [ $# -gt 0 ]; then names=("$@"); else
  names=(stack tcp_engine reassembly ipv4 ipv6 tcp udp icmp arp ethernet ndp_options tcp_options)
fi
summary="$LOGS/summary.txt"
for h in "${names[@]}"; do
  mkdir -p "$HERE/corpus/$h"
  log="$LOGS/$h.log"
  start=$(date +%s)
  # the worktree's slirpy, not whatever is pip-installed
  (cd "$HERE" && PYTHONPATH="$ROOT" nice -n 10 "$PY" "fuzz_$h.py" -atheris_runs="$RUNS" \
      -max_total_time="$MAX_TIME" -max_len=4096 -rss_limit_mb=1024 -timeout=10 \
      -artifact_prefix="$HERE/crashes/$h-" "corpus/$h") >"$log" 2>&1
  rc=$?
  done_line="$(grep -a '^Done ' "$log" | tail -1)"
  last="$(grep -aE '^#[0-9]+' "$log" | tail -1 | awk '{print $1}')"
  echo "$(date -u +%FT%TZ) $h rc=$rc secs=$(( $(date +%s) - start )) ${done_line:-no-Done-line last=$last}" | tee -a "$summary"
done
