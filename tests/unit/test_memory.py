"""The check that refuses to run on a system the kernel could only partly unpack into RAM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storagetm.errors import ExitCode
from storagetm.system import memory


def mounts(tmp_path: Path, root_type: str) -> Path:
    path = tmp_path / "mounts"
    path.write_text(f"rootfs / rootfs rw 0 0\n/dev/vda1 / {root_type} rw 0 0\nproc /proc proc rw 0 0\n")
    return path


def kmsg(tmp_path: Path, *records: str) -> Path:
    """/dev/kmsg hands out one record per read; a FIFO with small writes is close enough."""
    path = tmp_path / "kmsg"
    path.write_text("".join(f"6,{i},0,-;{r}\n" for i, r in enumerate(records)))
    return path


def test_root_in_ram_follows_the_last_mount_on_slash(tmp_path: Path) -> None:
    assert not memory.root_is_in_ram(mounts(tmp_path, "ext4"))
    assert memory.root_is_in_ram(mounts(tmp_path, "tmpfs"))


def test_kernel_log_search(tmp_path: Path) -> None:
    log = kmsg(tmp_path, "Run /init as init process", "Initramfs unpacking failed: write error")
    assert memory.kernel_log_mentions(memory.UNPACK_FAILED, log)
    assert not memory.kernel_log_mentions("nothing like this", log)
    assert not memory.kernel_log_mentions(memory.UNPACK_FAILED, tmp_path / "missing")


def test_partial_unpack_is_refused_with_the_minimum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "root_is_in_ram", lambda: True)
    monkeypatch.setattr(memory, "kernel_log_mentions", lambda text: text == memory.UNPACK_FAILED)
    monkeypatch.setattr(memory, "usable_ram_mib", lambda: 392)
    with pytest.raises(memory.InsufficientMemoryError) as caught:
        memory.check_system_complete()
    assert caught.value.exit_code == ExitCode.INSUFFICIENT_MEMORY
    line = caught.value.one_line()
    assert "392 MiB" in line and f"at least {memory.MINIMUM_RAM_MIB} MiB" in line and "\n" not in line


def test_complete_system_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "root_is_in_ram", lambda: True)
    monkeypatch.setattr(memory, "kernel_log_mentions", lambda text: False)
    memory.check_system_complete()


def test_usable_ram(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:         401408 kB\nMemFree: 1 kB\n")
    assert memory.usable_ram_mib(meminfo) == 392


def test_image_fallback_init_states_the_same_minimum() -> None:
    script = (Path(__file__).resolve().parents[2] / "mkosi.extra" / "etc" / "init").read_text()
    assert f"MINIMUM={memory.MINIMUM_RAM_MIB}\n" in script
    assert os.access(Path(__file__).resolve().parents[2] / "mkosi.extra" / "etc" / "init", os.X_OK)
