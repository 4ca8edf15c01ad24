#!/usr/bin/env bash
# Wraps a UKI into boot media, reproducibly (fixed timestamps, serials and GUIDs):
#   storagetm.iso  — El Torito EFI boot from an appended ESP; boots as a CD and as a USB stick
#   storagetm.raw  — GPT with a single ESP, for dd to a USB stick
# Usage: make-media.sh UKI OUTPUT_DIR
set -euo pipefail
uki=$1 out=$2
epoch=${SOURCE_DATE_EPOCH:-1735689600}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ESP_TYPE=C12A7328-F81F-11D2-BA4B-00A0C93EC93B

# FAT ESP sized to the UKI plus 4 MiB of slack, rounded to whole MiB.
uki_mib=$(( ($(stat -c %s "$uki") + 1048575) / 1048576 ))
esp_mib=$(( uki_mib + 4 ))
truncate -s "${esp_mib}M" "$tmp/esp.img"
mformat -i "$tmp/esp.img" -F -N 57544d31 -v STORAGETM ::
mkdir -p "$tmp/root/EFI/BOOT"
cp "$uki" "$tmp/root/EFI/BOOT/BOOTX64.EFI"
mkdir -p "$tmp/iso"
printf 'storagetm boot medium: boot it with UEFI (the EFI image is in the appended ESP).\n' > "$tmp/iso/README.TXT"
find "$tmp/root" "$tmp/iso" -exec touch -h -d "@$epoch" {} +
export MTOOLS_SKIP_CHECK=1
mcopy -i "$tmp/esp.img" -s -m "$tmp/root/EFI" ::
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
