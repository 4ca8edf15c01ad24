"""Property: whatever the kernel command line or the argument vector says, parsing it raises
nothing but a usage error, and the result is never more permissive than what was asked.

"More permissive", precisely (each check below is one of these):
- auth: a word or flag that turns authentication on (auth=/auth_ctrl= other than an explicit
  0/no/off/false, allow_hosts= with any value; --auth, --dhchap-secret, --dhchap-ctrl-secret,
  --allow-host), even malformed, leaves authentication on or nothing exported. Likewise TLS.
- a malformed auth, auth_ctrl, allow_hosts, tls or disks word, and an unknown storagetm.*
  word, exports nothing.
- a disk is exported read-write only if it was asked for: no malformed default mode and no
  malformed mode for that disk anywhere; and then the disk's first valid per-disk mode is rw,
  or it has none and the last valid default mode is rw (or none was given).
- with nothing to refuse, every disk is exported only if the last valid disks= says `all`
  (or there is none and the command line said --all); named disks only if named.
- no secret or key of the input appears in any message.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storagetm.backing.modes import Mode
from storagetm.cli import serve_parser, settings_from
from storagetm.config.options import KERNEL_WHITESPACE, apply_kernel_cmdline, split_kernel_cmdline
from storagetm.config.settings import Settings
from storagetm.disks.disk import Disk
from storagetm.disks.policy import SystemFacts
from storagetm.errors import UsageError
from storagetm.security.auth import generate_secret
from storagetm.security.tls import generate_key
from storagetm.selection import plan

BASE = "nqn.2023-10.io.systemd:storagetm.0123456789ab"
HOST = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"
DISKS = (
    Disk(name="sda", devnode="/dev/sda", devnum=1, devtype="disk", size=1 << 30, serial="SA"),
    Disk(name="sdb", devnode="/dev/sdb", devnum=2, devtype="disk", size=1 << 30, serial="SB"),
    Disk(name="nvme0n1", devnode="/dev/nvme0n1", devnum=3, devtype="disk", size=1 << 30, serial="N1"),
)
# The test's own table of valid mode names, independent of the code under test.
MODES = {"rw": Mode.READ_WRITE, "read-write": Mode.READ_WRITE, "ro": Mode.READ_ONLY, "read-only": Mode.READ_ONLY,
         "snapshot": Mode.SNAPSHOT, "cow": Mode.SNAPSHOT}  # fmt: skip
OFF = {"0", "no", "off", "false"}
KNOWN = {"disks", "nqn", "port", "mode", "snapshot_size", "auth", "auth_ctrl", "allow_hosts", "tls", "announce",
         "realtime", "dhchap_secret", "dhchap_ctrl_secret", "tls_key"}  # fmt: skip
REFUSING = {"disks", "auth", "auth_ctrl", "allow_hosts", "tls", "dhchap_secret", "dhchap_ctrl_secret", "tls_key"}
SECRET = generate_secret()
KEY = generate_key()
BAD_SECRETS = (SECRET[:12] + ("A" if SECRET[12] != "A" else "B") + SECRET[13:],  # bad CRC
               "DHHC-1:00:abc:", "DHHC-1:00:" + "A" * 44)  # fmt: skip
BAD_KEYS = (KEY[:20] + ("A" if KEY[20] != "A" else "B") + KEY[21:], "NVMeTLSkey-1:01:abcde:", "NVMeTLSkey-1:01:=:")
SECRETS = (SECRET, KEY, *BAD_SECRETS, *BAD_KEYS)
EXAMPLES = {"kernel": 5500, "text": 2000, "argv": 2500}  # 10,000 in all

# Text without the characters that split or quote a word, for values and other words. From a
# fixed alphabet with awkward characters (drawing from all of Unicode costs hypothesis 3x the
# time); the free-text test below draws from all of it.
ALPHABET = "abcdeorswxyzABS019=,-_.:/'\\é²٣İ\u00a0\u2003\u200b\x00\x1b\x7f😀"
word_text = st.text(st.sampled_from(ALPHABET), max_size=6)
assert not set(ALPHABET) & (KERNEL_WHITESPACE | {'"'})
specs = st.sampled_from(["sda", "sdb", "/dev/sda", "SB", "N1", "nvme0n1", "sdz", ""]) | word_text
mode_names = st.sampled_from([*MODES, "RO", "\u00a0ro", "read_only", "snapshto", "", "rw=ro"]) | word_text


@dataclass(frozen=True)
class Word:
    key: str  # as the code should understand it: known name, `-` as `_`
    value: str | None  # None: no `=`
    valid: bool | None  # None: not known by construction


@st.composite
def mode_values(draw: st.DrawFn) -> str:
    items = draw(st.lists(st.tuples(st.none() | specs, mode_names), min_size=0, max_size=3))
    return ",".join(name if spec is None else f"{spec}={name}" for spec, name in items)


def flag_or(valid: tuple[str, ...], invalid: tuple[str, ...]) -> st.SearchStrategy[tuple[str, bool | None]]:
    return (st.sampled_from(("1", "0", "yes", "OFF", "true", *valid)).map(lambda v: (v, True))
            | st.sampled_from(("", "2", "maybe", *invalid)).map(lambda v: (v, False))
            | word_text.map(lambda v: (v, None)))  # fmt: skip


VALUES: dict[str, st.SearchStrategy[tuple[str, bool | None]]] = {
    "auth": flag_or((SECRET,), BAD_SECRETS),
    "auth_ctrl": flag_or((SECRET,), BAD_SECRETS),
    "tls": flag_or((KEY,), BAD_KEYS),
    "allow_hosts": st.sampled_from([(HOST, True), (f"{HOST},{HOST}", True), (f"{HOST},host2", False), ("", False),
                                    (",", False), ("host2", False)]) | word_text.map(lambda v: (v, None)),  # fmt: skip
    "disks": st.sampled_from([("all", True), ("none", True), ("sda,SB", True), ("sdz", True), ("all,sda", False),
                              ("", False), (",", False), ("none,all", False)])
    | st.lists(specs, max_size=3).map(lambda s: (",".join(s), None)),
    "mode": mode_values().map(lambda v: (v, None)),
    "port": st.sampled_from(["4420", "²", "٣", "0", "70000", "abc"]).map(lambda v: (v, None)),
    "nqn": st.sampled_from(["nqn.2024-01.com.example:lab", "bogus"]).map(lambda v: (v, None)),
    "snapshot_size": st.sampled_from(["64M", "1x", "1K"]).map(lambda v: (v, None)),
    "announce": st.sampled_from(["1", "0", "maybe"]).map(lambda v: (v, None)),
}


# Known names, some with `-` for `_`, and unknown ones (typos, wrong case, empty).
KEYS = (*VALUES, "snapshot-size", "auth-ctrl", "allow-hosts", "mdoe", "atuh", "AUTH", "", "frobnicate", "disks_",
        "tls-", "Mode")  # fmt: skip

FORMS = ("storagetm.{k}={v}", 'storagetm.{k}="{v}"', '"storagetm.{k}={v}"', "storagetm.{k}")  # the last: no value


@st.composite
def storagetm_words(draw: st.DrawFn) -> tuple[Word | None, str]:
    """One storagetm.* word, and how it is written on the command line (quoted or not)."""
    typed = draw(st.sampled_from(KEYS))
    normal = typed.replace("-", "_")
    if normal not in KNOWN:
        value, valid = draw(st.sampled_from([SECRET, "ro", "1"]) | word_text), None
    else:
        value, valid = draw(VALUES[normal])
    form = draw(st.sampled_from(FORMS))
    if "=" not in form:
        return Word(normal, None, False), form.format(k=typed)
    return Word(normal, value, valid), form.format(k=typed, v=value)


other_words = st.sampled_from(["quiet", "systemd.hostname=bob's", "ip=dhcp", "console=ttyS0,115200",
                               'x="a storagetm.disks=all storagetm.mode=rw b"', "'storagetm.mode=rw",
                               "rd.systemd.unit=storage-target-mode.target"]) | word_text.filter(
    lambda w: not w.startswith("storagetm."))  # fmt: skip


def matches(disk: Disk, spec: str) -> bool:
    return spec in (disk.name, disk.devnode, disk.serial)


def mode_items(value: str | None) -> list[tuple[str | None, str]]:
    """(spec or None, mode name) of a mode value; an empty or missing value is one bad default."""
    items = [item for item in (value or "").split(",") if item] or [""]
    return [(None, name) if not sep else (spec, name) for spec, sep, name in (i.rpartition("=") for i in items)]


def must_not_be_rw(disk: Disk, items: list[tuple[str | None, str]]) -> bool:
    def valid(name: str) -> bool:
        return name.strip().lower() in MODES

    if any((spec is None or spec == "") and not valid(name) for spec, name in items):
        return True  # a bad default mode: every disk read-only
    if any(spec == "" for spec, _ in items):
        return True  # `=ro`: a disk is missing, taken as a bad default
    if any(spec is not None and matches(disk, spec) and not valid(name) for spec, name in items):
        return True
    per_disk = [MODES[n.strip().lower()] for s, n in items if s is not None and matches(disk, s)]
    if per_disk:
        return per_disk[0] is not Mode.READ_WRITE
    defaults = [MODES[n.strip().lower()] for s, n in items if s is None]
    return bool(defaults) and defaults[-1] is not Mode.READ_WRITE


def check_modes(result: Settings, items: list[tuple[str | None, str]]) -> None:
    for disk in DISKS:
        if must_not_be_rw(disk, items):
            assert result.mode_for(disk) is not Mode.READ_WRITE, (disk.name, items)
    exported = plan(list(DISKS), result, SystemFacts(), BASE).exports.values()
    assert all(export.mode is result.mode_for(export.disk) for export in exported)
    if result.refusals:
        assert not exported


def check_kernel(words: list[Word], result: Settings, problems: list[str]) -> None:
    def asks(key: str, w: Word) -> bool:
        return w.key == key and (w.value is None or w.value.lower() not in OFF)

    if any(asks("auth", w) or asks("auth_ctrl", w) or w.key == "allow_hosts" for w in words):
        assert result.auth or result.refusals
    if any(asks("tls", w) for w in words):
        assert result.tls or result.refusals
    if any(w.key not in KNOWN or (w.key in REFUSING and (w.valid is False or w.value is None)) for w in words):
        assert result.refusals
    check_modes(result, [item for w in words if w.key == "mode" for item in mode_items(w.value)])
    disks_words = [w.value for w in words if w.key == "disks" and w.valid is not False and w.value is not None]
    if result.all_disks and not result.refusals:
        assert not disks_words or [spec for spec in disks_words[-1].split(",") if spec] == ["all"]
    named = {spec for w in words if w.key == "disks" and w.value for spec in w.value.split(",")}
    assert set(result.devices) <= named
    text = "\n".join(problems)
    assert not any(secret in text for secret in SECRETS)


@settings(max_examples=EXAMPLES["kernel"], database=None, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(st.lists(storagetm_words() | other_words.map(lambda text: (None, text)), max_size=6))
def test_kernel_cmdline_never_widens_access(parts: list[tuple[Word | None, str]]) -> None:
    cmdline = " ".join(text for _, text in parts)
    words = [word for word, _ in parts if word is not None]
    result, problems = apply_kernel_cmdline(Settings(all_disks=True), cmdline)
    check_kernel(words, result, problems)


@settings(max_examples=EXAMPLES["text"], database=None, derandomize=True, deadline=None)
@given(st.lists(st.sampled_from(['"', "'", " ", "\t", "storagetm.", "auth", "tls", "mode", "=", ",", "-", "_",
                                 "allow_hosts", "disks", "ro", "1", "0", "\\", "é", "²", "\x00", "\n"])
                | st.text(max_size=4), max_size=20).map("".join))  # fmt: skip
def test_any_text_never_raises_and_never_widens_access(cmdline: str) -> None:
    result, problems = apply_kernel_cmdline(Settings(all_disks=True), cmdline)
    for word in split_kernel_cmdline(cmdline):
        if not word.startswith("storagetm."):
            continue
        key, sep, value = word.removeprefix("storagetm.").partition("=")
        key = key.replace("-", "_")
        off = bool(sep) and value.lower() in OFF
        if key in ("auth", "auth_ctrl", "allow_hosts") and not off:
            assert result.auth or result.refusals, cmdline
        if key == "tls" and not off:
            assert result.tls or result.refusals, cmdline
        if key not in KNOWN:
            assert result.refusals, cmdline
    assert all(line.isprintable() for line in problems)


ARGV_TOKENS = st.sampled_from([
    "--all", "--read-only", "--snapshot", "--auth", "--dhchap-secret", "--dhchap-ctrl-secret", "--allow-host",
    "--tls", "--tls-key", "--mode", "--port", "--nqn", "--snapshot-size", "--announce", "--list-devices",
    HOST, "host2", SECRET, KEY, *BAD_SECRETS, *BAD_KEYS, "4420", "²", "64M", "sda", "/dev/sdb", "SB",
])  # fmt: skip
PARSER = serve_parser()  # parse_args leaves it as it was; made once, it takes a third of the time
argv_values = ARGV_TOKENS | mode_values() | word_text.filter(lambda t: not t.startswith("-"))


@settings(max_examples=EXAMPLES["argv"], database=None, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(st.lists(argv_values, max_size=6))
def test_command_line_never_widens_access(argv: list[str]) -> None:
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = PARSER.parse_args(argv)
        result, problems = settings_from(args)
    except (SystemExit, UsageError):
        return  # a usage error: storagetm does not start
    assert problems == []  # without --kernel-cmdline
    if {"--auth", "--dhchap-secret", "--dhchap-ctrl-secret", "--allow-host"} & set(argv):
        assert result.auth
    if {"--tls", "--tls-key"} & set(argv):
        assert result.tls
    items: list[tuple[str | None, str]] = []
    for i, token in enumerate(argv):
        if token in ("--read-only", "--snapshot"):
            items.append((None, "ro" if token == "--read-only" else "snapshot"))
        elif token == "--mode" and i + 1 < len(argv):
            items += mode_items(argv[i + 1])
    check_modes(result, items)
