#!/usr/bin/env bash
# Re-run the same ftlaunch command until the run is complete: for spot / preemptible
# machines, or any supervisor that restarts a job after it was stopped.
#
#   exit 0      done (adapter/ written, or the run had already finished): stop looping
#   exit 2      a user error (flag, data, plan that does not fit): looping cannot fix it
#   exit 75     preempted with a complete checkpoint: run again, it resumes
#   exit 128+N  killed by signal N (e.g. 137 after SIGKILL): run again, it resumes from
#               the last complete checkpoint
#   other       a training failure: retried a few times, then given up
set -u
RUN_DIR=${RUN_DIR:-runs/llama-8b}
MAX_FAILURES=${MAX_FAILURES:-3}
failures=0
while true; do
  ftlaunch --model llama-8b --gpus auto --data train.jsonl --output-dir "$RUN_DIR" --grace 150s "$@"
  code=$?
  case $code in
    0) echo "spot-loop: $RUN_DIR is complete"; exit 0 ;;
    2) echo "spot-loop: user error, not retrying"; exit 2 ;;
    75) echo "spot-loop: preempted with a checkpoint; resuming" ;;
    *)
      if [ "$code" -gt 128 ]; then
        echo "spot-loop: killed by signal $((code - 128)); resuming from the last checkpoint"
      else
        failures=$((failures + 1))
        echo "spot-loop: training failed (exit $code), failure $failures of $MAX_FAILURES"
        [ "$failures" -ge "$MAX_FAILURES" ] && exit "$code"
      fi ;;
  esac
  sleep "${PAUSE_SECONDS:-10}"
done
