#!/usr/bin/env bash
# Two machines, no scheduler: start the same ftlaunch command on every host over ssh
# (only --node-rank differs; node 0 is the first of HOSTS), wait for all, and exit with
# the highest of their exit codes, as srun does (0 done, 2 user error, 75 preempted with
# a checkpoint, 128+N stopped by a signal; 255 is ssh's own failure). Run it from tmux or
# screen: if this script dies, the remote commands keep training.
#
# Ctrl-C or SIGTERM here is passed on as SIGTERM to ftlaunch on every host still running
# (a second ssh kills the PID the remote shell wrote before it exec'd ftlaunch): all nodes
# stop at the same step, checkpoint and exit 75. A second Ctrl-C stops them at once. Not
# `ssh -tt`: closing a remote terminal sends SIGHUP, which kills ftlaunch without its
# exit code, and two remote terminals cannot share this one.
set -u

read -r -a HOSTS <<< "${HOSTS:-gpu-node-0 gpu-node-1}"  # node 0 first; names ssh uses
MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}     # node 0's address as the other nodes reach it
PORT=${PORT:-29500}                         # free on node 0, open between the nodes
RUN_DIR=${RUN_DIR:-/shared/runs/llama-70b}  # a shared mount, the same path on every host
WORKDIR=${WORKDIR:-$PWD}                    # where ftlaunch runs on each host
FTLAUNCH=${FTLAUNCH:-.venv/bin/ftlaunch}    # relative to WORKDIR, or absolute
REMOTE_ENV=${REMOTE_ENV:-}                  # e.g. "NCCL_SOCKET_IFNAME=eth0 NCCL_IB_DISABLE=1"
PID_DIR=${PID_DIR:-/tmp}                    # where each host keeps its ftlaunch's PID

TRAIN=(--model llama-70b --gpus auto --data /shared/data/train.jsonl --output-dir "$RUN_DIR"
       --grace 150s --save-every 30m)
SSH=(ssh -n -o BatchMode=yes -o ConnectTimeout=10)

pidfile() { printf '%q' "$PID_DIR/ftlaunch-$PORT-node$1.pid"; }
prefix() { while IFS= read -r line; do printf '[node %s] %s\n' "$1" "$line"; done; }

pids=()
for i in "${!HOSTS[@]}"; do
  command=$(printf '%q ' "$FTLAUNCH" "${TRAIN[@]}" --nnodes "${#HOSTS[@]}" \
            --node-rank "$i" --master-addr "$MASTER_ADDR" --master-port "$PORT")
  # The remote shell notes its PID, then becomes ftlaunch (exec keeps the PID).
  "${SSH[@]}" "${HOSTS[$i]}" "echo \$\$ > $(pidfile "$i") && cd $(printf '%q' "$WORKDIR") &&
    exec env $REMOTE_ENV $command" > >(trap '' INT TERM; prefix "$i") 2>&1 &
  pids+=("$!")
done

stop() {
  echo "ssh-two-nodes: passing SIGTERM to ftlaunch on every node" >&2
  for i in "${!HOSTS[@]}"; do
    kill -0 "${pids[$i]}" 2>/dev/null || continue  # that node's command has ended
    # Only a process whose command line names ftlaunch: never a stale PID's new owner.
    "${SSH[@]}" "${HOSTS[$i]}" "pid=\$(cat $(pidfile "$i")) &&
      ps -o args= -p \$pid | grep -q ftlaunch && kill -TERM \$pid"
  done
}
trap stop INT TERM

status=0
for i in "${!HOSTS[@]}"; do
  # A signal interrupts `wait`; wait again until that ssh has really ended.
  while kill -0 "${pids[$i]}" 2>/dev/null; do wait "${pids[$i]}"; done
  wait "${pids[$i]}"
  code=$?
  echo "ssh-two-nodes: node $i (${HOSTS[$i]}) exited $code"
  [ "$code" -gt "$status" ] && status=$code
done
exit "$status"
