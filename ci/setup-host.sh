#!/usr/bin/env bash
# Installs everything this repository needs on a fresh Debian 12 host, idempotently:
# QEMU + OVMF for the VM suite, chromium (headless, renders the web page in the VM suite),
# xorriso/mtools/sfdisk for the ISO and USB images, the Python test tools, and mkosi 25
# unpacked from Debian trixie's package.
# Never upgrades the host OS. Safe to run again at any time.
set -euo pipefail

CACHE=${STORAGETM_CACHE:-/var/cache/storagetm}
MKOSI_VERSION=25.3-7
MKOSI_SHA256=ef56c81324fd47d65490e944ec4697bb3f6fb21326d0d071bfc2fb5ba5383252
HOST_PACKAGES=(qemu-system-x86 qemu-utils ovmf xorriso mtools dosfstools fdisk zstd
               binutils python3-venv ca-certificates imagemagick e2fsprogs
               dnsmasq-base iproute2 fonts-dejavu-core btrfs-progs chromium)
QEMU_PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data)
SIGNED_BOOT_PACKAGES=(shim-signed shim-helpers-amd64-signed systemd-boot-efi-amd64-signed)
SIGNED_BOOT_FILES=(usr/lib/shim/shimx64.efi.signed usr/lib/shim/mmx64.efi.signed
                   usr/lib/systemd/boot/efi/systemd-bootx64.efi.signed)
PIP_PACKAGES=(pytest==8.3.4 ruff==0.8.6 mypy==1.14.1 qemu.qmp==0.0.6 pyudev==0.24.3 hypothesis==6.170.15 msgspec==0.19.0)

log() { printf 'setup-host: %s\n' "$*"; }

# The Debian mirror this host already uses; the image build and mkosi's tools tree use it too.
debian_mirror() {
    local uri
    uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk '$1=="deb" && $3 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$uri" ] || { echo "setup-host: no Debian mirror found in /etc/apt sources" >&2; exit 1; }
    printf '%s\n' "$uri"
}

install_host_packages() {
    local missing=()
    for p in "${HOST_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
}

# A virtual environment of our own: works whether or not the host's python3 lets pip
# install into it (PEP 668), and pins the tools.
install_python_tools() {
    local venv=$CACHE/venv
    if [ ! -x "$venv/bin/python" ]; then
        log "creating $venv"
        python3 -m venv "$venv"
    fi
    if [ "$(cat "$venv/.storagetm-packages" 2>/dev/null)" != "${PIP_PACKAGES[*]}" ]; then
        log "installing Python tools into $venv"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "${PIP_PACKAGES[@]}"
        echo "${PIP_PACKAGES[*]}" > "$venv/.storagetm-packages"
    fi
}

# apt-get against a private list of Debian trixie on the host's mirror: packages are
# downloaded (and checked against the signed archive) without touching the host's own apt.
trixie_apt() {
    local apt=$CACHE/apt-trixie
    mkdir -p "$apt/lists/partial" "$apt/archives/partial"
    echo "deb $(debian_mirror) trixie main" > "$apt/sources.list"
    apt-get -q -o Dir::Etc::SourceList="$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt" -o Dir::Cache::Archives="$apt/archives" \
        -o APT::Sandbox::User=root "$@"
}

trixie_lists_fresh=
trixie_update() {
    [ -n "$trixie_lists_fresh" ] || { trixie_apt update; trixie_lists_fresh=1; }
}

install_mkosi() {
    local dir=$CACHE/mkosi-$MKOSI_VERSION deb
    if [ -f "$dir/.installed" ]; then return; fi
    log "fetching mkosi $MKOSI_VERSION from Debian trixie"
    mkdir -p "$dir"
    trixie_update
    (cd "$CACHE/apt-trixie/archives" && trixie_apt download "mkosi=$MKOSI_VERSION")
    deb=$CACHE/apt-trixie/archives/mkosi_${MKOSI_VERSION}_all.deb
    echo "$MKOSI_SHA256  $deb" | sha256sum -c --quiet
    dpkg-deb -x "$deb" "$dir"
    touch "$dir/.installed"
}

# QEMU 10 from bookworm-backports for the VM suite (QEMU 7.2's TCG crashed guest kernels under
# NVMe/TCP load; README, "Tests"): unpacked into the cache and run through a wrapper with its
# own firmware files and modules, so the host's QEMU and libraries stay as they are (every
# library it needs is bookworm's own).
bpo_apt() {
    local apt=$CACHE/apt-bookworm-backports
    mkdir -p "$apt/lists/partial" "$apt/archives/partial"
    echo "deb $(debian_mirror) bookworm-backports main" > "$apt/sources.list"
    apt-get -q -o Dir::Etc::SourceList="$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt" -o Dir::Cache::Archives="$apt/archives" \
        -o APT::Sandbox::User=root "$@"
}

install_qemu() {
    local dir=$CACHE/qemu-bpo wrapper=$CACHE/qemu/qemu-system-x86_64 deb
    if [ -f "$dir/.installed" ] && [ -x "$wrapper" ]; then return; fi
    log "fetching QEMU from bookworm-backports: ${QEMU_PACKAGES[*]}"
    rm -rf "$dir" && mkdir -p "$dir/root" "$(dirname "$wrapper")"
    bpo_apt update
    (cd "$dir" && bpo_apt download "${QEMU_PACKAGES[@]}")
    for deb in "$dir"/*.deb; do dpkg-deb -x "$deb" "$dir/root"; done
    cat > "$wrapper.new" <<WRAPPER
#!/bin/sh
# QEMU from bookworm-backports, unpacked by ci/setup-host.sh: its own firmware files and modules.
QEMU_MODULE_DIR=$dir/root/usr/lib/x86_64-linux-gnu/qemu exec $dir/root/usr/bin/qemu-system-x86_64 -L $dir/root/usr/share/qemu "\$@"
WRAPPER
    chmod 0755 "$wrapper.new" && mv "$wrapper.new" "$wrapper"
    "$wrapper" --version | head -n 1
    (cd "$dir" && ls ./*.deb) > "$dir/.installed"
}

# The Secure Boot chain the boot media carry: Debian's shim (signed by Microsoft's UEFI CA),
# its MokManager, and Debian's signed systemd-boot. Unpacked, never installed on the host;
# make-media.sh takes the .efi.signed files from here.
install_signed_boot() {
    local dir=$CACHE/signed-boot deb
    if [ -f "$dir/.installed" ]; then return; fi
    log "fetching the signed boot chain from Debian trixie: ${SIGNED_BOOT_PACKAGES[*]}"
    rm -rf "$dir" && mkdir -p "$dir/root"
    trixie_update
    (cd "$dir" && trixie_apt download "${SIGNED_BOOT_PACKAGES[@]}")
    for deb in "$dir"/*.deb; do dpkg-deb -x "$deb" "$dir/root"; done
    for f in "${SIGNED_BOOT_FILES[@]}"; do
        [ -s "$dir/root/$f" ] || { echo "setup-host: $f missing from ${SIGNED_BOOT_PACKAGES[*]}" >&2; exit 1; }
    done
    (cd "$dir" && ls ./*.deb) > "$dir/.installed"
}

# A sandbox tree with apt sources for trixie on the host's mirror, for mkosi and its tools tree.
write_apt_sandbox() {
    local mirror security tree=$CACHE/sandbox
    mirror=$(debian_mirror)
    security=$(awk '/^URIs:/ && $2 ~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$security" ] || security="${mirror%/debian}/debian-security"
    mkdir -p "$tree/etc/apt/sources.list.d"
    cat > "$tree/etc/apt/sources.list.d/mkosi.sources.new" <<SOURCES
Types: deb
URIs: $mirror
Suites: trixie trixie-updates
Components: main non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: trixie-security
Components: main non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    mv "$tree/etc/apt/sources.list.d/mkosi.sources.new" "$tree/etc/apt/sources.list.d/mkosi.sources"
}

main() {
    [ "$(id -u)" = 0 ] || { echo "setup-host: run as root (it installs packages)" >&2; exit 1; }
    mkdir -p "$CACHE"
    install_host_packages
    install_python_tools
    install_mkosi
    install_signed_boot
    install_qemu
    write_apt_sandbox
    log "ready (cache in $CACHE)"
}

main "$@"
