#!/usr/bin/env bash
# Build the "python-data" sandbox image: the debian image's tree plus numpy, pandas, matplotlib and Pillow from
# Debian's own packages, in images/python-data/rootfs.
#
#   sudo bash images/python-data/build.sh     (or: make image-data)
#
# The steps (debootstrap, strip, check, stamp, atomic swap) are images/build-image.sh's; this file names the image.
NAME=python-data
INCLUDE=python3,netbase
# Debian's packages rather than wheels: signed by the archive, built against the tree's own libraries; Depends
# only, no Recommends. Installed by apt, not debootstrap: python3-fonttools depends on `python3-scipy |
# python3-munkres`, and debootstrap's first-alternative rule would bring scipy, pythran, g++ and boost (~1 GB).
# fonts-dejavu-core is matplotlib's default font.
APT_INSTALL="python3-numpy python3-pandas python3-matplotlib python3-pil fonts-dejavu-core python3-munkres"
# Debian's matplotlib reads its defaults from /etc/matplotlibrc (mpl-data/matplotlibrc is a link to it), so the
# image exposes it next to the debian image's etc files.
ETC_EXPOSED=(ld.so.cache alternatives localtime mime.types protocols services matplotlibrc)
VERIFY_ENV=(MPLBACKEND=Agg)
# The runner's own imports, and one figure rendered to PNG, so a tree missing a font or a native library fails here.
VERIFY='import io, sys, socket, numpy, pandas, PIL.Image, matplotlib.pyplot as plt
socket.getservbyname("http")
df = pandas.DataFrame({"x": numpy.arange(3)})
assert "<table" in df._repr_html_()
fig, ax = plt.subplots(); ax.plot(df["x"]); buf = io.BytesIO(); fig.savefig(buf, format="png")
assert PIL.Image.open(io.BytesIO(buf.getvalue())).size[0] > 0
print(sys.version.split()[0])'
source "$(dirname "${BASH_SOURCE[0]}")/../build-image.sh"
