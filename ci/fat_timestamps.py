"""Set every time stamp in a FAT32 image to one fixed time, for reproducible images.

mtools in Debian 12 (4.0.33) stamps directory entries with the clock and knows no
SOURCE_DATE_EPOCH. Usage: fat_timestamps.py IMAGE EPOCH
"""

from __future__ import annotations

import struct
import sys
import time
from typing import BinaryIO

END_OF_CHAIN = 0x0FFFFFF8
ATTR_LFN, ATTR_DIR = 0x0F, 0x10


def dos_time(epoch: int) -> tuple[int, int]:
    t = time.gmtime(epoch)
    date = ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday
    return date, (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2)


class Fat32:
    def __init__(self, image: BinaryIO) -> None:
        self.image = image
        image.seek(0)
        boot = image.read(512)
        self.bps, self.spc, reserved, nfats = struct.unpack_from("<HBHB", boot, 11)
        fat_size, self.root = struct.unpack_from("<I4xI", boot, 36)
        self.fat_offset = reserved * self.bps
        self.data_offset = (reserved + nfats * fat_size) * self.bps

    def chain(self, cluster: int) -> list[int]:
        clusters = []
        while 2 <= cluster < END_OF_CHAIN:
            clusters.append(cluster)
            self.image.seek(self.fat_offset + 4 * cluster)
            cluster = struct.unpack("<I", self.image.read(4))[0] & 0x0FFFFFFF
        return clusters

    def normalize(self, directory: int, date: int, clock: int) -> None:
        cluster_bytes = self.bps * self.spc
        for cluster in self.chain(directory):
            base = self.data_offset + (cluster - 2) * cluster_bytes
            self.image.seek(base)
            data = bytearray(self.image.read(cluster_bytes))
            subdirs = []
            for off in range(0, cluster_bytes, 32):
                if data[off] == 0:
                    break
                if data[off] == 0xE5 or data[off + 11] == ATTR_LFN:
                    continue
                struct.pack_into("<BHHHH", data, off + 13, 0, clock, date, date, 0)
                struct.pack_into("<HH", data, off + 22, clock, date)
                name = bytes(data[off : off + 11])
                if data[off + 11] & ATTR_DIR and name not in (b".          ", b"..         "):
                    hi, lo = struct.unpack_from("<H4xH", data, off + 20)
                    subdirs.append(hi << 16 | lo)
            self.image.seek(base)
            self.image.write(data)
            for sub in subdirs:
                self.normalize(sub, date, clock)


def main() -> int:
    path, epoch = sys.argv[1], int(sys.argv[2])
    date, clock = dos_time(epoch)
    with open(path, "r+b") as image:
        fat = Fat32(image)
        fat.normalize(fat.root, date, clock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
