#!/usr/bin/env bash
# Prepare the real-kernel test lab (see scripts/lab/README.md and docs/lab.md).
#
# Idempotent: every step checks its result first, so a second run only verifies the cache and takes seconds.
# Needs root on Debian 12 (apt-get). Everything large lands in the cache directory:
#   ${VM2CORE_LAB_CACHE:-/var/cache/vm2core-lab}
# Config:
#   VM2CORE_LAB_KERNEL   ABI number NN of the generic kernel linux-image-6.1.0-NN-amd64 (default 56; if apt no
#                        longer offers it, the newest 6.1.0-NN-amd64 that has a -dbg package is used)
set -euo pipefail

CACHE="${VM2CORE_LAB_CACHE:-/var/cache/vm2core-lab}"
KERNEL_ABI="${VM2CORE_LAB_KERNEL:-56}"
# crash 8.0.6 is the oldest release that reads these kernels' struct pid correctly (docs/lab.md); its unmodified
# upstream source is kept in Debian's pool. The digest pins exactly that tarball.
CRASH_VERSION=8.0.6
CRASH_TARBALL="crash_${CRASH_VERSION}.orig.tar.gz"
CRASH_POOL_PATH="pool/main/c/crash/${CRASH_TARBALL}"
CRASH_SHA256=097c6c94ded7e24db4af58de24744bd28276d6f5bae0828bc6b6a02664c4282a

PACKAGES=(
    qemu-system-x86 busybox-static cpio zstd openssh-server curl ca-certificates
    build-essential bison flex gawk texinfo zlib1g-dev libncurses-dev
    python3 python3-venv
    makedumpfile
)

log() { printf '[lab-setup %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (apt-get is needed)"
mkdir -p "$CACHE"

# ---------------------------------------------------------------- apt
APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        apt-get -o DPkg::Lock::Timeout=900 update -qq
        APT_UPDATED=1
    fi
}

has_candidate() {  # has_candidate PKG: apt knows an installable version of PKG
    local cand
    cand=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
    [[ -n $cand && $cand != "(none)" ]]
}

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "packages: all installed"
        return
    fi
    for pkg in "${missing[@]}"; do
        has_candidate "$pkg" || { apt_update_once; break; }
    done
    log "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ---------------------------------------------------------------- mirror (never hard-coded)
debian_mirror() {
    # First "deb" URI of the main Debian archive (not -security) from apt's own configuration.
    local uri=""
    if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
        uri=$(awk '
            BEGIN { RS=""; FS="\n" }
            {
                types=""; uris=""; suites=""
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^Types:/)  types = $i
                    if ($i ~ /^URIs:/)   uris = $i
                    if ($i ~ /^Suites:/) suites = $i
                }
                if (types ~ /[ \t]deb([ \t]|$)/ && suites !~ /-security/ && uris != "") {
                    sub(/^URIs:[ \t]*/, "", uris); split(uris, u, /[ \t]+/); print u[1]; exit
                }
            }' /etc/apt/sources.list.d/*.sources)
    fi
    if [[ -z $uri && -f /etc/apt/sources.list ]]; then
        uri=$(awk '$1 == "deb" {
                    i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                    if ($(i+1) !~ /-security/) { print $i; exit } }' /etc/apt/sources.list)
    fi
    [[ -n $uri ]] || die "no Debian mirror found in apt's sources"
    printf '%s\n' "${uri%/}"
}

# ---------------------------------------------------------------- kernel
choose_kernel_release() {  # sets KERNEL_RELEASE
    local want="6.1.0-${KERNEL_ABI}-amd64"
    KERNEL_RELEASE=$want
    if [[ -s "$CACHE/kernel/$want/vmlinuz-$want" && -s "$CACHE/kernel/$want/vmlinux-$want" ]]; then
        return
    fi
    if has_candidate "linux-image-$want" && has_candidate "linux-image-$want-dbg"; then
        return
    fi
    # An earlier run already fell back to another ABI (recorded in lab.env): keep it without asking apt again.
    local recorded=""
    if [[ -z ${VM2CORE_LAB_KERNEL:-} && -f "$CACHE/lab.env" ]]; then
        recorded=$(sed -n 's/^KERNEL_RELEASE=//p' "$CACHE/lab.env")
    fi
    if [[ -n $recorded && -s "$CACHE/kernel/$recorded/vmlinuz-$recorded" \
          && -s "$CACHE/kernel/$recorded/vmlinux-$recorded" ]]; then
        KERNEL_RELEASE=$recorded
        return
    fi
    apt_update_once
    if has_candidate "linux-image-$want" && has_candidate "linux-image-$want-dbg"; then
        return
    fi
    local newest
    newest=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64-dbg$' \
             | awk '{print $1}' | sed -E 's/^linux-image-(6\.1\.0-[0-9]+-amd64)-dbg$/\1/' \
             | sort -t- -k2,2n | tail -n 1)
    [[ -n $newest ]] || die "apt offers no linux-image-6.1.0-NN-amd64-dbg"
    log "linux-image-$want not offered; using $newest"
    KERNEL_RELEASE=$newest
}

extract_member() {  # extract_member DEB DESTDIR MEMBER...: stream only MEMBERs out of DEB's data.tar
    local deb=$1 dest=$2; shift 2
    mkdir -p "$dest"
    # tar stops after the last wanted member (--occurrence), so dpkg-deb dies of SIGPIPE: that exit status is
    # expected, and the result is checked by file existence below instead.
    set +o pipefail
    dpkg-deb --fsys-tarfile "$deb" 2>/dev/null | tar -x -C "$dest" --occurrence=1 "$@"
    local tar_rc=${PIPESTATUS[1]}
    set -o pipefail
    local m
    for m in "$@"; do [[ -s "$dest/$m" ]] || die "$m missing from $deb (tar exit $tar_rc)"; done
}

kernel_paths() {  # kernel_paths REL: sets VMLINUZ VMLINUX SYSTEM_MAP
    local kdir="$CACHE/kernel/$1"
    VMLINUZ="$kdir/vmlinuz-$1"
    VMLINUX="$kdir/vmlinux-$1"
    SYSTEM_MAP="$kdir/System.map-$1"
}

fetch_kernel() {
    local rel=$1 kdir="$CACHE/kernel/$1"
    kernel_paths "$rel"
    if [[ -s $VMLINUZ && -s $VMLINUX && -s $SYSTEM_MAP ]]; then
        log "kernel $rel: cached"
        return
    fi
    mkdir -p "$kdir"
    local dl="$CACHE/download"
    mkdir -p "$dl"
    chown _apt "$dl" 2>/dev/null || true   # apt-get download drops privileges to _apt
    if [[ ! -s $VMLINUZ ]]; then
        log "downloading linux-image-$rel"
        rm -f "$dl"/linux-image-"$rel"_*.deb
        (cd "$dl" && apt-get download -qq "linux-image-$rel")
        local tmp="$kdir/tmp-image"
        rm -rf "$tmp"
        extract_member "$dl"/linux-image-"$rel"_*.deb "$tmp" "./boot/vmlinuz-$rel"
        mv "$tmp/boot/vmlinuz-$rel" "$VMLINUZ"
        rm -rf "$tmp" "$dl"/linux-image-"$rel"_*.deb
    fi
    if [[ ! -s $VMLINUX || ! -s $SYSTEM_MAP ]]; then
        # The image package's System.map is a stub; the real one ships in -dbg next to vmlinux.
        log "downloading linux-image-$rel-dbg (~860 MB)"
        rm -f "$dl"/linux-image-"$rel"-dbg_*.deb
        (cd "$dl" && apt-get download -qq "linux-image-$rel-dbg")
        local tmp="$kdir/tmp-dbg"
        rm -rf "$tmp"
        extract_member "$dl"/linux-image-"$rel"-dbg_*.deb "$tmp" \
            "./usr/lib/debug/boot/vmlinux-$rel" "./usr/lib/debug/boot/System.map-$rel"
        mv "$tmp/usr/lib/debug/boot/vmlinux-$rel" "$VMLINUX"
        mv "$tmp/usr/lib/debug/boot/System.map-$rel" "$SYSTEM_MAP"
        rm -rf "$tmp" "$dl"/linux-image-"$rel"-dbg_*.deb
    fi
    log "kernel $rel: extracted"
}

# ---------------------------------------------------------------- crash
crash_path() { CRASH="$CACHE/crash-$CRASH_VERSION/bin/crash"; }

build_crash() {
    local cdir="$CACHE/crash-$CRASH_VERSION"
    crash_path
    if [[ -x $CRASH ]] && "$CRASH" --version 2>/dev/null | grep -q "crash $CRASH_VERSION"; then
        log "crash $CRASH_VERSION: cached"
        return
    fi
    mkdir -p "$cdir/bin"
    local tarball="$CACHE/download/$CRASH_TARBALL"
    mkdir -p "$CACHE/download"
    if ! echo "$CRASH_SHA256  $tarball" | sha256sum -c --status 2>/dev/null; then
        local url
        url="$(debian_mirror)/$CRASH_POOL_PATH"
        log "downloading $url"
        curl -fsS --retry 3 -o "$tarball.part" "$url"
        mv "$tarball.part" "$tarball"
        echo "$CRASH_SHA256  $tarball" | sha256sum -c --status || die "sha256 mismatch for $tarball"
    fi
    local src="$cdir/src"
    rm -rf "$src"
    mkdir -p "$src"
    tar -xzf "$tarball" -C "$src" --strip-components=1
    log "building crash $CRASH_VERSION (~5.5 min; log $cdir/build.log)"
    if ! make -C "$src" >"$cdir/build.log" 2>&1; then
        tail -n 30 "$cdir/build.log" >&2
        die "crash build failed (see $cdir/build.log)"
    fi
    install -m 0755 "$src/crash" "$CRASH"
    rm -rf "$src"
    "$CRASH" --version | grep -q "crash $CRASH_VERSION" || die "built crash does not report $CRASH_VERSION"
    log "crash $CRASH_VERSION: built"
}

# ---------------------------------------------------------------- main
install_packages
choose_kernel_release
kernel_paths "$KERNEL_RELEASE"
crash_path
# The kernel download (~930 MB) and the crash build (~5.5 min) are independent: run them side by side.
fetch_kernel "$KERNEL_RELEASE" &
kernel_job=$!
build_crash &
crash_job=$!
rc=0
wait "$kernel_job" || rc=1
wait "$crash_job" || rc=1
[[ $rc -eq 0 ]] || die "setup failed (see messages above)"

cat >"$CACHE/lab.env.tmp" <<EOF
# Written by scripts/lab/setup.sh; sourced by shells and parsed by scripts/lab/config.py.
KERNEL_RELEASE=$KERNEL_RELEASE
VMLINUZ=$VMLINUZ
VMLINUX=$VMLINUX
SYSTEM_MAP=$SYSTEM_MAP
CRASH=$CRASH
CRASH_VERSION=$CRASH_VERSION
EOF
mv "$CACHE/lab.env.tmp" "$CACHE/lab.env"

cat <<EOF
vm2core lab ready
  cache       $CACHE
  kernel      $KERNEL_RELEASE
  vmlinuz     $VMLINUZ
  vmlinux     $VMLINUX
  System.map  $SYSTEM_MAP
  crash       $CRASH
  env file    $CACHE/lab.env
EOF
