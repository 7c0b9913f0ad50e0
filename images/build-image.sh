#!/usr/bin/env bash
# The shared recipe of the debootstrap sandbox images: each images/<name>/build.sh sets the parameters below and
# sources this file.
#
#   NAME=debian                        the image's name (also written into the stamp)
#   INCLUDE=python3,netbase            packages debootstrap adds to the minbase tree (comma-separated)
#   ETC_EXPOSED=(ld.so.cache ...)      files under etc/ the daemon exposes (the image's image.toml); each must exist
#   VERIFY='import sys; ...'           Python run with the tree's /usr/bin/python3 in a chroot; must exit 0, and its
#                                      last line of output (the Python version) goes into the stamp
#   VERIFY_ENV=(MPLBACKEND=Agg ...)    optional: extra environment for VERIFY
#   APT_INSTALL="pkg ..."              optional: packages apt-get installs into the tree after debootstrap, without
#                                      Recommends. Unlike debootstrap, which always takes the first of `a | b`,
#                                      apt takes an alternative that is already named, so a recipe can steer it.
#
# Idempotent: the tree carries .sandboxd-image with the sha256 of the image's recipe and of this file; when it
# matches, nothing is done. Editing either (or FORCE=1) rebuilds. Atomic: the tree is built, stripped and verified
# in a temp dir next to rootfs/ and only then renamed into place (swapped with renameat2(RENAME_EXCHANGE) when an
# old tree exists), so rootfs/ is always either the previous complete tree or the new complete tree.
#
# Needs root (debootstrap, chroot) and network access to the Debian mirror configured on this machine (the
# `URIs:` / `deb` line for the suite below in /etc/apt/sources.list{,.d/*}); MIRROR=... overrides it.
set -euo pipefail

: "${NAME:?set by the image recipe}" "${INCLUDE:?set by the image recipe}" "${VERIFY:?set by the image recipe}"
[ "${#ETC_EXPOSED[@]}" -gt 0 ] || { echo "build-image.sh: ETC_EXPOSED is not set" >&2; exit 1; }
[ -n "${VERIFY_ENV+x}" ] || VERIFY_ENV=()
SUITE=bookworm
VARIANT=minbase

# The image's own recipe is the script that sourced this one.
HERE=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
RECIPE="$HERE/$(basename "${BASH_SOURCE[1]}")"
ENGINE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOTFS="$HERE/rootfs"
CACHE="$HERE/.cache/debs"          # downloaded .debs, reused by rebuilds (gitignored)
STAMP_NAME=.sandboxd-image

log() { printf '%s: %s\n' "$NAME" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap and chroot need it)"

ARCH=$(dpkg --print-architecture)
RECIPE_SHA=$(cat "$RECIPE" "$ENGINE" <(printf 'arch=%s\n' "$ARCH") | sha256sum | cut -d' ' -f1)

stamp_value() {  # stamp_value FILE KEY -> value of `KEY = "value"` or empty
    sed -n "s/^$2 = \"\(.*\)\"\$/\1/p" "$1" 2>/dev/null | head -n1
}

if [ "${FORCE:-0}" != 1 ] && [ "$(stamp_value "$ROOTFS/$STAMP_NAME" recipe_sha256)" = "$RECIPE_SHA" ]; then
    log "$ROOTFS is up to date (recipe $RECIPE_SHA); FORCE=1 rebuilds"
    exit 0
fi

# --- one build at a time --------------------------------------------------------------------------------------
exec 9>"$HERE/.build.lock"
flock -n 9 || { log "another build holds $HERE/.build.lock; waiting"; flock 9; }
# The build we waited for may have produced exactly this recipe.
if [ "${FORCE:-0}" != 1 ] && [ "$(stamp_value "$ROOTFS/$STAMP_NAME" recipe_sha256)" = "$RECIPE_SHA" ]; then
    log "$ROOTFS is up to date (built concurrently)"
    exit 0
fi

# --- tools ----------------------------------------------------------------------------------------------------
if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y debootstrap || { apt-get update && apt-get install -y debootstrap; }
fi
for tool in chroot flock sha256sum dpkg-query; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

# --- mirror: the one this machine's apt uses for $SUITE ---------------------------------------------------------
detect_mirror() {
    local f
    # deb822 (*.sources): first URI of a `Types: deb` stanza whose Suites contain $SUITE.
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "") {
                    split(uris, u, " "); print u[1]; found = 1; exit
                }
                types = suites = uris = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "types:"  { $1 = ""; types  = $0 }
            tolower($1) == "suites:" { $1 = ""; suites = $0 }
            tolower($1) == "uris:"   { $1 = ""; uris   = $0 }
            END { if (!found) flush() }' "$f"
    done
    # One-line style (sources.list, *.list): deb [options] URI SUITE COMPONENTS...
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            $1 != "deb" { next }
            { i = 2; if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ } }
            $(i + 1) == suite { print $i; exit }' "$f"
    done
}
MIRROR=${MIRROR:-$(detect_mirror | head -n1)}
[ -n "$MIRROR" ] || die "no apt source for suite '$SUITE' in /etc/apt/sources.list{,.d/*}; set MIRROR=http://..."

# --- temp dir next to rootfs/, removed on any exit --------------------------------------------------------------
unmount_under() {  # lazily unmount anything left mounted below $1 (deepest first)
    local dir=$1 m
    awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done
}
remove_tree() {  # never follows a mount: a leftover bind mount of host /dev or /proc must not be emptied
    [ -e "$1" ] || return 0
    unmount_under "$1"
    rm -rf --one-file-system -- "$1"
}
# Leftovers of an interrupted build (we hold the lock, so none of them is in use).
for stale in "$HERE"/.rootfs.tmp.* "$HERE"/.rootfs.old.*; do
    if [ -e "$stale" ]; then log "removing leftover $stale"; remove_tree "$stale"; fi
done

TMP=$(mktemp -d "$HERE/.rootfs.tmp.XXXXXX")
cleanup() { remove_tree "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

START=$(date +%s)
log "debootstrap $SUITE ($VARIANT, +$INCLUDE, $ARCH) from $MIRROR into $TMP"
mkdir -p "$CACHE"
DEBOOTSTRAP_ARGS=(--variant="$VARIANT" --include="$INCLUDE" --arch="$ARCH" --merged-usr --components=main
                  --cache-dir="$CACHE")
if [ -f /usr/share/keyrings/debian-archive-keyring.gpg ]; then
    DEBOOTSTRAP_ARGS+=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
fi
debootstrap "${DEBOOTSTRAP_ARGS[@]}" "$SUITE" "$TMP" "$MIRROR"
unmount_under "$TMP"

if [ -n "${APT_INSTALL:-}" ]; then
    log "apt-get install $APT_INSTALL"
    # Against debootstrap's own sources.list (the mirror above); resolv.conf goes again in the strip step.
    cp -L /etc/resolv.conf "$TMP/etc/resolv.conf"
    mkdir -p "$CACHE/partial"
    mount --bind "$CACHE" "$TMP/var/cache/apt/archives"
    mount -t proc proc "$TMP/proc"
    in_tree() { chroot "$TMP" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
                DEBIAN_FRONTEND=noninteractive "$@"; }
    in_tree apt-get -q update
    # shellcheck disable=SC2086  # a list of package names
    in_tree apt-get -q install -y --no-install-recommends $APT_INSTALL
    in_tree apt-get -q clean
    unmount_under "$TMP"
fi

# --- strip: nothing a sandbox must not carry or never needs -----------------------------------------------------
log "stripping"
cd "$TMP"
# apt state and caches: the image is read-only and never runs apt.
find var/cache/apt -type f -delete
rm -rf var/lib/apt/lists && mkdir -p var/lib/apt/lists/partial
rm -f var/lib/dpkg/*-old var/cache/debconf/*-old
# Build-time logs, host details debootstrap copies in, and scratch content.
find var/log -type f -delete
rm -f etc/resolv.conf etc/hostname
find dev tmp var/tmp run root -mindepth 1 -delete 2>/dev/null || true
# Documentation: keep only the copyright files.
find usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
find usr/share/doc -mindepth 1 -type d -empty -delete
find usr/share/man usr/share/info usr/share/lintian -mindepth 1 -delete 2>/dev/null || true
# Message translations of the base tools (~33 MB); the C.UTF-8 locale itself (usr/lib/locale) stays.
find usr/share/locale -name '*.mo' -delete
find usr/share/locale -mindepth 1 -type d -empty -delete
# Alternatives whose targets went with the man pages (links are absolute: resolve them inside the tree).
chroot "$TMP" /usr/bin/find /etc/alternatives -xtype l -delete
# No privilege-carrying files: setuid/setgid bits and file capabilities.
find . -xdev -perm /6000 ! -type l -exec chmod ug-s {} +
[ -z "$(find . -xdev -perm /6000 ! -type l -print -quit)" ] || die "setuid/setgid files remain"
python3 - <<'EOF' 2>/dev/null || log "warning: could not scan for file capabilities (python3 missing?)"
import os
for root, dirs, files in os.walk(".", followlinks=False):
    for n in files:
        p = os.path.join(root, n)
        if os.path.islink(p):
            continue
        if "security.capability" in os.listxattr(p, follow_symlinks=False):
            os.removexattr(p, "security.capability", follow_symlinks=False)
            print(f"build-image.sh: removed file capabilities from {p[1:]}")
EOF

# --- check layout and the files the daemon exposes -------------------------------------------------------------
for e in usr bin sbin lib lib64; do
    [ -e "$e" ] || die "top-level entry $e missing"
done
for e in "${ETC_EXPOSED[@]}"; do
    [ -e "etc/$e" ] || die "etc/$e missing (listed in image.toml)"
done

# --- verify it runs --------------------------------------------------------------------------------------------
# A clean environment and a scratch HOME, so nothing the check writes (caches) lands in the tree.
PYVER=$(chroot "$TMP" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/tmp LANG=C.UTF-8 "${VERIFY_ENV[@]}" \
        /usr/bin/python3 -I -B -c "$VERIFY" | tail -n1) \
    || die "the check (VERIFY) failed inside the new tree"
find tmp -mindepth 1 -delete

# --- record what was built -------------------------------------------------------------------------------------
dpkg-query --admindir="$TMP/var/lib/dpkg" -W -f='${binary:Package}\t${Version}\n' | LC_ALL=C sort \
    > "$TMP/.sandboxd-packages"
cat > "$TMP/$STAMP_NAME" <<EOF
# Written by images/$NAME/build.sh; recipe_sha256 decides whether a rebuild is needed.
name = "$NAME"
suite = "$SUITE"
variant = "$VARIANT"
include = "$INCLUDE"
apt_install = "${APT_INSTALL:-}"
arch = "$ARCH"
mirror = "$MIRROR"
built = "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
recipe_sha256 = "$RECIPE_SHA"
packages = $(wc -l < "$TMP/.sandboxd-packages")
packages_sha256 = "$(sha256sum < "$TMP/.sandboxd-packages" | cut -d' ' -f1)"
python = "$PYVER"
EOF
chmod 0755 "$TMP"   # mktemp made it 0700
cd "$HERE"

# --- install atomically ----------------------------------------------------------------------------------------
exchange() {  # atomically swap two directories (renameat2 RENAME_EXCHANGE); fails if unsupported
    python3 - "$1" "$2" <<'EOF'
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.renameat2(-100, os.fsencode(sys.argv[1]), -100, os.fsencode(sys.argv[2]), 2) != 0:
    e = ctypes.get_errno()
    raise OSError(e, os.strerror(e))
EOF
}
if [ -e "$ROOTFS" ] && exchange "$TMP" "$ROOTFS" 2>/dev/null; then
    :                                   # $TMP now holds the old tree; the EXIT trap removes it
elif [ -e "$ROOTFS" ]; then
    OLD="$HERE/.rootfs.old.$$"
    mv -T "$ROOTFS" "$OLD"
    mv -T "$TMP" "$ROOTFS"
    remove_tree "$OLD"
else
    mv -T "$TMP" "$ROOTFS"
fi

log "built $ROOTFS in $(( $(date +%s) - START ))s: python $PYVER, $(du -sh --one-file-system "$ROOTFS" | cut -f1)," \
    "$(wc -l < "$ROOTFS/.sandboxd-packages") packages"
