#!/usr/bin/env bash
# Wraps a UKI into boot media that boot with Secure Boot on, reproducibly (fixed timestamps,
# serials and GUIDs):
#   storagetm.iso  — El Torito EFI boot from an ESP; boots as a CD and as a USB stick
#   storagetm.raw  — GPT with a single ESP, for dd to a USB stick
# The ESP holds the chain firmware trusts out of the box: Debian's shim (signed by Microsoft's
# third-party UEFI CA) as EFI/BOOT/BOOTX64.EFI, which starts its second stage from its own
# directory (grubx64.efi: here Debian's signed systemd-boot), which shows a menu with one entry
# per UKI profile and boots Debian's signed kernel with the storagetm system as its initrd
# (ci/boot_menu.py). No fbx64.efi: with it, shim would run the fallback first.
# Usage: make-media.sh UKI OUTPUT_DIR   (signed binaries from $SIGNED_BOOT, set up by setup-host.sh)
set -euo pipefail
uki=$1 out=$2
epoch=${SOURCE_DATE_EPOCH:-1735689600}
SIGNED_BOOT=${SIGNED_BOOT:-${STORAGETM_CACHE:-/var/cache/storagetm}/signed-boot/root}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ESP_TYPE=C12A7328-F81F-11D2-BA4B-00A0C93EC93B

for f in usr/lib/shim/shimx64.efi.signed usr/lib/shim/mmx64.efi.signed usr/lib/systemd/boot/efi/systemd-bootx64.efi.signed; do
    [ -s "$SIGNED_BOOT/$f" ] || { echo "make-media: $SIGNED_BOOT/$f missing; run ci/setup-host.sh" >&2; exit 1; }
done
mkdir -p "$tmp/root/EFI/BOOT"
cp "$SIGNED_BOOT/usr/lib/shim/shimx64.efi.signed" "$tmp/root/EFI/BOOT/BOOTX64.EFI"
cp "$SIGNED_BOOT/usr/lib/shim/mmx64.efi.signed" "$tmp/root/EFI/BOOT/mmx64.efi"
cp "$SIGNED_BOOT/usr/lib/systemd/boot/efi/systemd-bootx64.efi.signed" "$tmp/root/EFI/BOOT/grubx64.efi"
python3 "$(dirname "$0")/boot_menu.py" "$uki" "$tmp/root"

# FAT ESP sized to its contents plus 4 MiB of slack, rounded to whole MiB.
esp_mib=$(( ($(du -s --block-size=1 --apparent-size "$tmp/root" | cut -f1) + 1048575) / 1048576 + 4 ))
truncate -s "${esp_mib}M" "$tmp/esp.img"
mformat -i "$tmp/esp.img" -F -N 57544d31 -v STORAGETM ::
mkdir -p "$tmp/iso"
printf 'storagetm boot medium: boot it with UEFI (the EFI image is in the appended ESP).\n' > "$tmp/iso/README.TXT"
find "$tmp/root" "$tmp/iso" -exec touch -h -d "@$epoch" {} +
export MTOOLS_SKIP_CHECK=1
# One directory or file at a time, in sorted order, so the FAT's entries (and the short names
# mtools makes up) do not depend on the order the build directory lists them in.
(cd "$tmp/root" && find . -mindepth 1 | LC_ALL=C sort) | while read -r path; do
    if [ -d "$tmp/root/$path" ]; then mmd -i "$tmp/esp.img" "::${path#.}"; else mcopy -i "$tmp/esp.img" -m "$tmp/root/$path" "::${path#.}"; fi
done
python3 "$(dirname "$0")/fat_timestamps.py" "$tmp/esp.img" "$epoch"

# ISO: the ESP is a file in the ISO 9660 tree and the El Torito EFI boot image; a GPT
# partition points at the same blocks, so the ISO also boots from a USB stick. (An ESP
# appended after the ISO 9660 volume is not found by OVMF as a CD: its boot entry has no
# load size for images over 32 MiB, and the volume then ends before the image starts.)
cp "$tmp/esp.img" "$tmp/iso/esp.img"
touch -d "@$epoch" "$tmp/iso/esp.img" "$tmp/iso"
SOURCE_DATE_EPOCH=$epoch xorriso -as mkisofs -quiet \
    -V STORAGETM -iso-level 3 -J -r \
    --modification-date="$(date -u -d "@$epoch" +%Y%m%d%H%M%S00)" \
    -e esp.img -no-emul-boot -efi-boot-part --efi-boot-image \
    -o "$tmp/storagetm.iso" "$tmp/iso" 2>/dev/null

# Raw USB image: 1 MiB GPT header area, the ESP, 1 MiB for the backup GPT.
raw=$tmp/storagetm.raw
truncate -s "$(( esp_mib + 2 ))M" "$raw"
sfdisk -q --no-reread --no-tell-kernel "$raw" <<SFDISK
label: gpt
label-id: 5354524D-0000-4000-8000-000000000001
first-lba: 2048
start=2048, size=$(( esp_mib * 2048 )), type=$ESP_TYPE, uuid=5354524D-0000-4000-8000-000000000002, name="STORAGETM-ESP"
SFDISK
dd if="$tmp/esp.img" of="$raw" bs=1M seek=1 conv=notrunc status=none

mv "$tmp/storagetm.iso" "$out/storagetm.iso"
mv "$raw" "$out/storagetm.raw"
