#!/bin/sh
# pid 1 of the cgroup2 test VM after switch_root (see init.sh): the host's root read-only, the project
# writable. Runs the cgroup2-marked tests, leaves pytest's exit status in the run directory on the project
# share for run_cgroup2_vm.py to check (qemu itself always exits 0), and powers off.
# Usage: guest-run.sh PROJECT_DIR RUN_DIR (RUN_DIR relative to PROJECT_DIR; it holds "args", pytest's
# arguments one per line, and receives "status").
proj=$1
run=$proj/$2
cd "$proj" || exit 1
echo "guest: Linux $(uname -r), cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"

set --
while IFS= read -r arg; do set -- "$@" "$arg"; done < "$run/args"
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp LANG=C.UTF-8 TERM=dumb \
    TMPDIR=/dev/shm PYTHONDONTWRITEBYTECODE=1 \
    "$proj/.venv/bin/python" -m pytest -p no:cacheprovider "$@"
status=$?
echo "$status" > "$run/status"
echo "guest: pytest exited with status $status"
sync
# busybox (busybox-static, installed on the host) powers off at once; the sysrq fallback is asynchronous and
# takes the 9p root away meanwhile, so wait without running anything from it.
/bin/busybox poweroff -f
echo o > /proc/sysrq-trigger
while :; do :; done
