"""Build the one-file helper, storagetm.pyz: the storagetm package as a Python zip
application (what `python3 -m zipapp` makes: a `#!` line, then a zip with __main__.py), run
as `sudo python3 storagetm.pyz targets` on a machine with nothing but Python and nvme-cli.

Written with zipfile directly rather than zipapp.create_archive, so that every entry has
the same fixed time and order: the image is built bit-identical (SourceDateEpoch), and
this file inside it too.

    python3 ci/build_helper.py OUTPUT.pyz
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "storagetm"
SHEBANG = b"#!/usr/bin/env python3\n"
MAIN = "import sys\n\nfrom storagetm.cli import main\n\nsys.exit(main())\n"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def build(output: Path, package: Path = PACKAGE) -> Path:
    files = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    temporary = output.with_name(output.name + ".tmp")
    with temporary.open("wb") as out:
        out.write(SHEBANG)
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(zipfile.ZipInfo("__main__.py", FIXED_TIME), MAIN, zipfile.ZIP_DEFLATED)
            for path in files:
                name = f"storagetm/{path.relative_to(package).as_posix()}"
                archive.writestr(zipfile.ZipInfo(name, FIXED_TIME), path.read_bytes(), zipfile.ZIP_DEFLATED)
    temporary.chmod(0o755)
    temporary.replace(output)
    return output


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build_helper.py OUTPUT.pyz")
    build(Path(sys.argv[1]))
