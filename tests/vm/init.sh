#!/bin/busybox sh
# /init of the cgroup2 test VM's initramfs (built by run_cgroup2_vm.py). It mounts the host's root read-only
# and the project directory writable over 9p, with only cgroup2 mounted (that alone makes the VM pure v2), and
# switch_roots into it to run guest-run.sh. switch_root rather than chroot: the kernel refuses user namespaces
# to chrooted processes, and the sandbox tests that run here need them.
# PROJ and RUN arrive from the kernel command line as environment variables.
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "init: $*"; poweroff -f; }

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for module in $(cat /modules/order); do
    insmod "/modules/$module" || echo "init: insmod $module failed"
done

mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro,cache=loose hostroot /host || fail "no host root"
# The host's /proc, /sys, /dev, /tmp, /run must not show through: the guest gets its own.
mount --move /proc /host/proc
mount --move /sys /host/sys
mount --move /dev /host/dev
mount -t cgroup2 -o nsdelegate cgroup2 /host/sys/fs/cgroup || fail "cannot mount cgroup2"
mkdir -p /host/dev/shm /host/dev/pts
mount -t tmpfs -o mode=1777,size=1g shm /host/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /host/dev/pts
mount -t tmpfs -o mode=1777 tmp /host/tmp
mount -t tmpfs -o mode=0755 run /host/run
# A checkout under /tmp or /run is hidden by the tmpfs just mounted: give it a mount point there.
[ -d "/host$PROJ" ] || mkdir -p "/host$PROJ"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none proj "/host$PROJ" || fail "no project share"
# Loopback up, as on any host; the daemon tests themselves only use a Unix socket.
ip link set lo up

exec switch_root /host /bin/sh "$PROJ/tests/vm/guest-run.sh" "$PROJ" "$RUN"
