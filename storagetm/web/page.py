"""The HTML of the web page: plain, no JavaScript, readable on a phone. What it says comes
from the same RunState and the same wording as the screen (storagetm.console.screen)."""

from __future__ import annotations

from html import escape

from msgspec import Struct

from storagetm.console.screen import connect_lines, mode_text, warnings
from storagetm.model import IO_TRSVCID
from storagetm.security.chap import CHAP_USER
from storagetm.state import RunState
from storagetm.text import human_size
from storagetm.web.hashing import HashJob
from storagetm.web.images import Image
from storagetm.web.links import NO_DOWNLOADS
from storagetm.web.token import COOKIE, QUERY

REFRESH = 5  # seconds: the page follows the live state without a script
HELPER = "/storagetm.pyz"
STYLE = """body{font-family:sans-serif;margin:0 auto;max-width:60em;padding:.5em;line-height:1.4}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ccc;padding:.3em;text-align:left;
vertical-align:top}code,pre{background:#f3f3f3;overflow-wrap:anywhere}pre{padding:.4em;white-space:pre-wrap}
.warn{background:#fff3cd;padding:.4em}progress{width:6em}"""


class Page(Struct, frozen=True):
    """What one rendering needs besides the state."""

    host: str  # as the browser reached us (Host header, with its port): the address in the commands shown
    io_port: int = IO_TRSVCID
    token: bool = False  # the page asks for a token: commands say where to put it
    helper: bool = False  # the initiator-side helper is there to download
    downloads: bool = True  # the disks are offered as downloads (not with TLS on unless asked for)

    @property
    def base(self) -> str:
        return f"http://{self.host}"


def _address(host: str) -> str:
    """The Host header without a port, an IPv6 literal without its brackets."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _pre(lines: list[str]) -> str:
    return "<pre>" + escape("\n".join(lines)) + "</pre>"


def hash_cell(image: Image, job: HashJob | None) -> str:
    link = f'<a href="/disks/{escape(image.name)}.sha256">sha256</a>'
    if job is None:
        return link
    if job.error:
        return f"{link}: {escape(job.error)}"
    if not job.finished:
        return f'{link}: <progress max="100" value="{job.fraction * 100:.0f}"></progress> {job.fraction:.0%}'
    return f"{link}: <code>{job.digest}</code>"


def disk_rows(state: RunState, images: dict[str, Image], hashes: dict[str, HashJob | None],
              downloads: bool = True) -> list[str]:  # fmt: skip
    rows = []
    for name, image in sorted(images.items()):
        export, n = image.export, escape(name)
        activity = state.activity.get(export.nqn)
        read = "" if activity is None else (
            f'<progress max="100" value="{activity.read_fraction * 100:.0f}"></progress> '
            f"{activity.read_fraction:.0%} read, {human_size(int(activity.read_rate))}/s")  # fmt: skip
        rows.append(
            f"<tr><td><b>{n}</b></td><td>{human_size(export.disk.size)}</td><td>{escape(export.identity.model)}</td>"
            f"<td>{escape(export.identity.serial)}</td><td>{escape(mode_text(state, export))}</td><td>{read}</td>"
            + (f'<td><a href="/disks/{n}.img">{n}.img</a> · <a href="/disks/{n}.vhd">{n}.vhd</a> · '
               f"{hash_cell(image, hashes.get(name))}</td></tr>" if downloads else "<td>-</td></tr>")  # fmt: skip
        )
    return rows


def instructions(state: RunState, page: Page, images: dict[str, Image]) -> str:
    address = _address(page.host)
    first = next(iter(sorted(images)), "DISK")
    cookie = f"-b {COOKIE}=TOKEN " if page.token else ""
    curl = f"curl {cookie}-C - -o {first}.img {page.base}/disks/{first}.img"
    parts = ["<h2>Connect from another computer</h2>"]
    if page.token:
        parts.append(f"<p>TOKEN below: the token of the web page's address on the target's screen "
                     f"(<code>?{QUERY}=…</code>).</p>")  # fmt: skip
    parts.append("<h3>Linux</h3>")
    if page.helper:
        parts.append(f'<p>The helper (Python 3, as root): <a href="{HELPER}">storagetm.pyz</a></p>'
                     + _pre([f"curl {cookie}-O {page.base}{HELPER}",
                             "sudo python3 storagetm.pyz connect -     # then type the code from the target's screen",
                             "sudo python3 storagetm.pyz copy DISK laptop.img   # verified, resumable"]))  # fmt: skip
    parts.append(f"<p>{'Or with' if page.helper else 'With'} nvme-cli, as on the target's screen:</p>"
                 + _pre(connect_lines(state.without_secrets(), page.io_port)))  # fmt: skip
    if page.downloads:
        parts.append("<p>Or download a disk (resumes where it broke off):</p>" + _pre([curl]))
    parts.append("<h3>Windows</h3>")
    if state.iscsi.enabled:
        steps = [f"iSCSI Initiator → Quick Connect → {address} → Quick Connect."]
        if state.iscsi.chap:
            steps.append(f"Then the target → Connect → Advanced → Enable CHAP log on: name {CHAP_USER}, "
                         "secret: the CHAP secret on the target's screen.")  # fmt: skip
        parts.append("<p>" + " ".join(escape(step) for step in steps) + "</p>")
    if not page.downloads:
        parts.append(f"<p class=warn>{escape(NO_DOWNLOADS)}.</p>")
        return "\n".join(parts)
    parts.append(f'<p>Or download the .vhd of a disk and double-click it (Windows mounts it): '
                 f'<a href="/disks/{escape(first)}.vhd">{escape(first)}.vhd</a></p>')  # fmt: skip
    attach = f"hdiutil attach -imagekey diskimage-class=CRawDiskImage -nomount {first}.img"
    parts.append("<h3>macOS</h3><p>Download the .img of a disk, then attach it (read its files in Finder):</p>"
                 + _pre([curl, attach]))  # fmt: skip
    return "\n".join(parts)


def render(state: RunState, page: Page, images: dict[str, Image], hashes: dict[str, HashJob | None]) -> str:
    rows = disk_rows(state, images, hashes, page.downloads)
    header = "".join(f"<th>{column}</th>" for column in ("disk", "size", "model", "serial", "mode", "read", "download"))
    table = f"<table><tr>{header}</tr>{''.join(rows)}</table>" if rows else "<p>No disks exported yet.</p>"
    warning = "".join(f"<p class=warn>{escape(w)}</p>" for w in warnings(state)) if images else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH}">
<title>storagetm: {escape(page.host)}</title><style>{STYLE}</style></head>
<body><h1>storagetm: target disk mode</h1>
{warning}
<h2>Disks ({len(rows)})</h2>
{table}
<p>Initiators connected: {escape(", ".join(state.initiators) or "none")}</p>
<p class=warn>This page and its downloads are plain HTTP: anyone on the network path can read what they carry.</p>
{instructions(state, page, images)}
</body></html>
"""


def refused() -> str:
    return """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>storagetm: token needed</title></head><body><h1>A token is needed</h1>
<p>This target asks for a token. Open the web page's address as the target's screen shows it (with
<code>?token=</code>).</p></body></html>
"""
