"""The JS client's types: rtcvoice.d.ts and the React example type-check (tsc --noEmit, packages
from npm), and the module exports exactly what the .d.ts declares."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parents[1] / "web"
REACT = WEB / "react"


def test_the_types_and_the_react_example_type_check() -> None:
    tsc = REACT / "node_modules" / ".bin" / "tsc"
    if not tsc.exists():
        pytest.fail("web/react/node_modules is missing: run `npm ci` in web/react (scripts/test does).")
    result = subprocess.run(
        [str(tsc), "--noEmit", "-p", str(REACT)], capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_module_exports_what_its_types_declare() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed to load web/rtcvoice.js (Node 18 or newer).")
    declared = set(
        re.findall(
            r"^export declare (?:function|class|const) (\w+)", (WEB / "rtcvoice.d.ts").read_text(), re.M
        )
    )
    # The module touches no browser API when loaded, so Node can import it as it is.
    script = "import(process.argv[1]).then((m) => console.log(JSON.stringify(Object.keys(m))))"
    result = subprocess.run(
        [node, "--input-type=module", "-e", script, (WEB / "rtcvoice.js").as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)) == sorted(declared)
