# Bounded suites for hack/test.sh (sourced, not run): every suite runs in its own session under its
# own time limit, inside a whole-run budget; a suite that hangs prints what was running before it
# is killed; the end prints every suite's wall time.
#
#   suite NAME LIMIT_SECONDS COMMAND...

# The whole run's budget for suites, from the first suite (CI allows 90 min in all; the cold test
# bed takes ~24 min of it).
: "${KATA_SUITES_BUDGET:=3600}"
suites_t0=""
failed=()
timings=()

# Prints the process tree of session $1 (what a hung suite was doing).
suite_dump() {
  local sid=$1
  log "processes of the hung suite (session $sid):"
  ps -e -o sid=,pid=,ppid=,etimes=,args= --sort=start_time |
    awk -v s="$sid" '$1 == s { $1 = ""; print }' | cut -c1-240 >&2
}

# Waits for pid $1 up to $2 seconds; on expiry prints its session, TERMs it, then KILLs it.
suite_wait() {
  local pid=$1 limit=$2 waited=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$waited" -ge "$limit" ]; then
      suite_dump "$pid"
      kill -TERM -- "-$pid" 2>/dev/null
      sleep 20
      kill -KILL -- "-$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      return 124
    fi
    sleep 1
    waited=$((waited + 1))
  done
  wait "$pid"
}

suite() { # name limit command...
  local name=$1 limit=$2; shift 2
  [ -n "$suites_t0" ] || suites_t0=$SECONDS
  local left=$((KATA_SUITES_BUDGET - (SECONDS - suites_t0)))
  if [ "$left" -le 0 ]; then
    log "=== suite $name: NOT RUN, the suites' budget of ${KATA_SUITES_BUDGET}s is spent"
    failed+=("$name(not run)")
    timings+=("$name not-run")
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  log "=== suite: $name (limit ${limit}s)"
  local t0=$SECONDS rc
  # Its own session: a time-out kills the suite's whole tree, and nothing else. With
  # KATA_SUITE_LOG, the output is also kept there (hack/gen-reliability.py reads it).
  if [ -n "${KATA_SUITE_LOG:-}" ]; then
    setsid bash -c '"$@" 2>&1 | tee -a "$KATA_SUITE_LOG"; exit "${PIPESTATUS[0]}"' suite "$@" &
  else
    setsid "$@" &
  fi
  suite_wait $! "$limit"
  rc=$?
  local took=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then
    log "=== suite $name: passed in ${took}s"
    timings+=("$name ${took}s passed")
  elif [ "$rc" -eq 124 ]; then
    log "=== suite $name: TIMED OUT after ${limit}s (killed)"
    failed+=("$name(timeout)")
    timings+=("$name ${took}s TIMEOUT")
  else
    log "=== suite $name: FAILED (exit $rc) in ${took}s"
    failed+=("$name")
    timings+=("$name ${took}s FAILED")
  fi
}

# The wall time of every suite, one per line.
suite_report() {
  log "suite times (wall):"
  local t
  for t in "${timings[@]}"; do printf '  %s\n' "$t" >&2; done
}
