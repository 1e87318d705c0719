#!/bin/bash
# Build the tfgpud Debian package: `make deb` runs this as packaging/debian/build.sh OUTDIR.
#
# Layout: the daemon and its Python dependencies (not TensorFlow: the daemon never imports it)
# live in a virtual environment at /opt/tfgpud that uses Debian's /usr/bin/python3; the unit,
# sysusers and tmpfiles files go to /usr/lib, the configuration to /etc/tfgpud (a conffile).
# Built with plain dpkg-deb, so it needs no debhelper and no source package.
set -euo pipefail

OUT=${1:-build/deb}
PY=${PY:-.venv/bin/python}   # pip runs from the dev venv; must be the same Python minor
SYSPY=/usr/bin/python3
HERE=packaging/debian

VERSION=$($PY -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
ARCH=$(dpkg --print-architecture)
PYVER=$($SYSPY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
DEVVER=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ "$PYVER" != "$DEVVER" ]; then
    echo "build.sh: $SYSPY is $PYVER but $PY is $DEVVER; the wheels must match Debian's python3" >&2
    exit 1
fi
NEXT=$($SYSPY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
STAGE=$OUT/stage
VENV=$STAGE/opt/tfgpud
SITE=$VENV/lib/python$PYVER/site-packages
DOC=$STAGE/usr/share/doc/tfgpud
DEB=$OUT/tfgpud_${VERSION}_${ARCH}.deb
EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

rm -rf "$STAGE" "$DEB"
mkdir -p "$STAGE/DEBIAN"

# 1. The venv skeleton: bin/python3 -> /usr/bin/python3, pyvenv.cfg; no pip, no activate scripts.
$SYSPY -m venv --without-pip "$VENV"
rm -f "$VENV"/bin/activate* "$VENV"/bin/Activate.ps1
sed -i "s|^command = .*|command = $SYSPY -m venv --without-pip /opt/tfgpud|" "$VENV/pyvenv.cfg"
[ -e "$VENV/lib64" ] && rm -f "$VENV/lib64"   # a symlink venv adds on some systems

# 2. tfgpud and its dependencies from wheels (binary only: nothing compiles here). No bytecode:
#    postinst compiles it, prerm removes it.
$PY -m pip install --quiet --disable-pip-version-check --no-compile --no-warn-script-location \
    --no-build-isolation --only-binary=:all: --target "$SITE" .
rm -rf "${SITE:?}/bin" "$SITE"/tfgpud-*.dist-info/direct_url.json
find "$SITE" -name __pycache__ -type d -prune -exec rm -rf {} +
# PyYAML's C accelerator embeds its own libyaml (lintian: embedded-library); tfgpud parses one
# small web config, which the pure-Python parser PyYAML falls back to does just as well.
rm -f "$SITE"/yaml/_yaml.*.so
find "$SITE" -name '*.so' -exec strip --strip-unneeded --remove-section=.comment {} +
# The launcher runs python3 -I (isolated: no CWD on sys.path, no PYTHON* variables).
install -m 0755 "$HERE/tfgpud-launcher" "$VENV/bin/tfgpud"
ln -s python3 "$VENV/bin/tfgpud-python"   # the name the launcher runs it under (see there)
mkdir -p "$STAGE/usr/bin"
ln -s /opt/tfgpud/bin/tfgpud "$STAGE/usr/bin/tfgpud"

# 3. systemd, configuration, docs, dashboards.
install -D -m 0644 packaging/systemd/tfgpud.service "$STAGE/usr/lib/systemd/system/tfgpud.service"
install -D -m 0644 packaging/systemd/tfgpud.sysusers "$STAGE/usr/lib/sysusers.d/tfgpud.conf"
install -D -m 0644 packaging/systemd/tfgpud.tmpfiles "$STAGE/usr/lib/tmpfiles.d/tfgpud.conf"
install -D -m 0644 config/tfgpud.toml "$STAGE/etc/tfgpud/tfgpud.toml"
install -D -m 0644 "$HERE/web-config.yml.example" "$DOC/examples/web-config.yml"
install -D -m 0644 README.md "$DOC/README.md"
install -D -m 0644 "$HERE/copyright" "$DOC/copyright"
install -D -m 0644 "$HERE/lintian-overrides" "$STAGE/usr/share/lintian/overrides/tfgpud"
for f in packaging/grafana/*.json; do
    [ -e "$f" ] && install -D -m 0644 "$f" "$STAGE/usr/share/tfgpud/grafana/$(basename "$f")"
done
if [ -d packaging/prometheus ]; then
    for f in packaging/prometheus/*.yml; do
        case "$f" in *.test.yml) continue ;; esac
        [ -e "$f" ] && install -D -m 0644 "$f" "$STAGE/usr/share/tfgpud/prometheus/$(basename "$f")"
    done
fi
{
    printf 'tfgpud (%s) unstable; urgency=medium\n\n' "$VERSION"
    printf '  * Package of tfgpud %s: daemon venv in /opt/tfgpud, hardened systemd unit.\n\n' "$VERSION"
    printf ' -- tfgpud developers <tfgpud-dev@example.org>  %s\n' "$(date -R -u -d "@$EPOCH")"
} | gzip -9n > "$DOC/changelog.gz"

# 4. Control files.
for s in postinst prerm postrm; do install -m 0755 "$HERE/$s" "$STAGE/DEBIAN/$s"; done
install -m 0644 "$HERE/conffiles" "$STAGE/DEBIAN/conffiles"
find "$STAGE" -path "$STAGE/DEBIAN" -prune -o -type d -exec chmod 0755 {} +
find "$STAGE" -path "$STAGE/DEBIAN" -prune -o -type f -exec chmod go-w,a+r {} +
SIZE=$(du -sk --apparent-size --exclude=DEBIAN "$STAGE" | cut -f1)
# The C libraries the wheels' extension modules link (bcrypt needs glibc >= 2.34), with the
# versions dpkg-shlibdeps reads from this machine's symbols files. It wants a debian/control.
SHL=$OUT/shlibdeps
mkdir -p "$SHL/debian"
printf 'Source: tfgpud\n\nPackage: tfgpud\nArchitecture: any\n' > "$SHL/debian/control"
mapfile -t SOS < <(find "$(realpath "$STAGE")" -name '*.so' -type f | LC_ALL=C sort)
SHLIBS=$(cd "$SHL" && dpkg-shlibdeps --warnings=0 -O "${SOS[@]}" | sed -n 's/^shlibs:Depends=//p')
rm -rf "$SHL"
[ -n "$SHLIBS" ] || { echo "build.sh: dpkg-shlibdeps found no library dependencies" >&2; exit 1; }
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@SIZE@/$SIZE/" \
    -e "s/@PYVER@/$PYVER/" -e "s/@PYNEXT@/$NEXT/" -e "s/@SHLIBS@/$SHLIBS/" \
    "$HERE/control.in" > "$STAGE/DEBIAN/control"
(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
    | xargs -0 md5sum) > "$STAGE/DEBIAN/md5sums"
chmod 0644 "$STAGE/DEBIAN/md5sums" "$STAGE/DEBIAN/control"
find "$STAGE" -exec touch -h -d "@$EPOCH" {} +

SOURCE_DATE_EPOCH=$EPOCH dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
