#!/usr/bin/env bash
# Build the "debian" sandbox image: a Debian bookworm minbase tree with python3, in images/debian/rootfs.
#
#   sudo bash images/debian/build.sh          (or: make image-debian)
#
# The steps (debootstrap, strip, check, stamp, atomic swap) are images/build-image.sh's; this file names the image.
NAME=debian
INCLUDE=python3,netbase            # python3 for the runner; netbase for etc/protocols + services (socket.getservbyname)
# Files under etc/ the daemon exposes (images/debian/image.toml); the build fails if one is missing.
ETC_EXPOSED=(ld.so.cache alternatives localtime mime.types protocols services)
VERIFY='import sys, json, sqlite3, ssl, zlib, hashlib, socket
socket.getservbyname("http")
print(sys.version.split()[0])'
source "$(dirname "${BASH_SOURCE[0]}")/../build-image.sh"
