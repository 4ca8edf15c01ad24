"""Build the one-file helper, storagetm.pyz: the storagetm package as a Python zip
application (what `python3 -m zipapp` makes: a `#!` line, then a zip with __main__.py), run
as `sudo python3 storagetm.pyz targets` on a machine with nothing but Python and nvme-cli.

Written with zipfile directly rather than zipapp.create_archive, so that every entry has
the same fixed time and order: the image is built bit-identical (SourceDateEpoch), and
this file inside it too.

Each module goes in twice: its source, and its bytecode for the Python that builds the file
(the image's, which also runs it there), as an unchecked-hash .pyc next to it. zipimport
uses the .pyc when its magic number matches that Python and the source otherwise; without
bytecode every start compiles every module imported (zipimport caches nothing), which was
about 40% of the helper's start-up on the host. The code objects are written in marshal
format 2, which has no back-references: format 3 (py_compile's) marks an object as shared
by its reference count at the time, which differs between processes for the same source.
So the bytecode depends only on the source and the Python version (a unit test checks). A
module format 2 cannot hold (Python 3.14 puts slices among a code object's constants, which
needs format 5) goes in as source only: slower to start, never different between builds.

    python3 ci/build_helper.py OUTPUT.pyz
"""

from __future__ import annotations

import importlib.util
import marshal
import sys
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "storagetm"
SHEBANG = b"#!/usr/bin/env python3\n"
MAIN = "import sys\n\nfrom storagetm.initiator.main import main\n\nsys.exit(main())\n"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)
UNCHECKED_HASH = (0b01).to_bytes(4, "little")  # PEP 552: hash-based, never checked (the archive is read-only)
MARSHAL_FORMAT = 2


def bytecode(source: bytes, name: str) -> bytes | None:
    """The .pyc of `source` as zipimport reads it (tracebacks name it by its path in the
    archive); None if marshal format 2 cannot hold its code."""
    code = compile(source, name, "exec", dont_inherit=True)
    try:
        marshalled = marshal.dumps(code, MARSHAL_FORMAT)
    except ValueError:
        return None
    return importlib.util.MAGIC_NUMBER + UNCHECKED_HASH + importlib.util.source_hash(source) + marshalled


def build(output: Path, package: Path = PACKAGE) -> Path:
    files = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    temporary = output.with_name(output.name + ".tmp")
    with temporary.open("wb") as out:
        out.write(SHEBANG)
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(zipfile.ZipInfo("__main__.py", FIXED_TIME), MAIN, zipfile.ZIP_DEFLATED)
            for path in files:
                name = f"storagetm/{path.relative_to(package).as_posix()}"
                source = path.read_bytes()
                archive.writestr(zipfile.ZipInfo(name, FIXED_TIME), source, zipfile.ZIP_DEFLATED)
                if (compiled := bytecode(source, name)) is not None:
                    archive.writestr(zipfile.ZipInfo(name + "c", FIXED_TIME), compiled, zipfile.ZIP_DEFLATED)
    temporary.chmod(0o755)
    temporary.replace(output)
    return output


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build_helper.py OUTPUT.pyz")
    build(Path(sys.argv[1]))
