#!/bin/sh
# Runs Python with the interpreter of this node's Ray, whichever `python` the PATH finds first.
#
# A Ray Job's entrypoint is a shell command that the job's supervisor (a Ray worker) starts with the
# environment of `ray start`: when Ray runs from a virtualenv that was never activated, `python` on
# that PATH is another interpreter, without Ray or this package ("No module named 'pipelines'").
# The raylet starts every worker with `--python_worker_command=<its python> ...`, so the raylet above
# the supervisor names the right one. VIT_PYTHON (set where `ray start` runs) overrides the search;
# without /proc (macOS) it falls back to python3 on the PATH.
set -eu
python="${VIT_PYTHON:-}"
pid=$PPID
while [ -z "$python" ] && [ -r "/proc/$pid/cmdline" ]; do
    python=$(tr '\0' '\n' <"/proc/$pid/cmdline" | sed -n 's/^--python_worker_command="\{0,1\}\([^" ]*\).*/\1/p' | head -n 1)
    pid=$(sed -n 's/^PPid:[[:space:]]*//p' "/proc/$pid/status")
    [ "${pid:-0}" -gt 1 ] || break
done
if [ -z "$python" ]; then
    python=$(command -v python3 || command -v python || echo python3)
fi
echo "vit: python is $python" >&2
exec "$python" "$@"
