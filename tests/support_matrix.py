"""Generate the support matrix from test results: `python tests/support_matrix.py`.

Runs the remote tests (first, alone: their servers must start in time; `test_remote_families`
serves every family and runs each family's request where only NDIF's packages import), then the
family reference tests (and BLIP's, the T5 decoder's, ...), reads each test's outcome from
pytest's JUnit XML, and writes `vlmtrace/models/support.json` (printed by `vlmtrace models`)
and the README table between its markers. Nothing in the matrix is written by hand: a family
whose test fails shows "FAILS", one whose check is skipped shows the skip reason.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/test_families.py",
    "tests/test_t5_decoder.py",
    "tests/test_blip.py",
    "tests/test_sites_match_torch_hooks.py",
    "tests/test_prefix_reuse.py",
    "tests/test_transformer_lens.py",
]
SERVED_TESTS = ["tests/test_remote.py", "tests/test_remote_families.py"]
"""Run first, on their own: their servers must start within a time limit, which a busy machine
(the other tests' workers) can exceed, failing them for a reason unrelated to what they test."""
COMMAND = "python tests/support_matrix.py"
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
CORRUPTION_NAMES = {"str": "STR", "image_pair": "image pair", "noise": "noise"}


def outcomes(xml: Path) -> dict[str, tuple[str, str]]:
    """Test node name -> (status, message): pass, fail or skip."""
    found = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        status, message = "pass", ""
        for child in case:
            if child.tag in ("failure", "error"):
                status, message = "fail", (child.get("message") or "")[:80]
            elif child.tag == "skipped":
                status, message = "skip", (child.get("message") or "").removeprefix("Skipped: ")
        found[name] = (status, message)
    return found


def summarise(results: dict[str, tuple[str, str]]) -> dict:
    """Per family, each column's text from the outcomes of the tests behind it."""
    checks: dict[str, dict[str, list[tuple[str, str]]]] = defaultdict(lambda: defaultdict(list))
    pattern = re.compile(r"test_families::(?P<test>\w+)\[(?P<params>[^\]]+)\]")
    for name, outcome in results.items():
        match = pattern.match(name)
        if not match:
            continue
        params = match["params"].split("-")
        family = params[0]
        test = match["test"]
        if test.startswith("test_every_site"):
            _, direction, corruption = params
            checks[family]["corruptions:" + corruption].append(outcome)
            checks[family]["directions:" + direction].append(outcome)
            checks[family]["sites"].append(outcome)
        elif "knockout" in test:
            checks[family]["knockout"].append(outcome)
        elif "patterns" in test:
            checks[family]["patterns"].append(outcome)
        elif "prefix_reuse" in test:
            checks[family]["prefix reuse"].append(outcome)
    decoder = re.compile(r"test_t5_decoder::test_every_decoder_site\w*\[(?P<family>\w+)\]")
    for name, outcome in results.items():  # the answer decoder's sites of the Flan-T5 variants
        match = decoder.match(name)
        if match:
            checks[match["family"]]["sites"].append(outcome)
    blip = {  # BLIP-VQA's own tests (the family tests of blip2, instructblip, ... are theirs)
        key: value
        for key, value in results.items()
        if "blip" in key.lower() and not key.startswith(("test_families::", "test_t5_decoder::"))
    }
    if blip:
        for name, outcome in blip.items():
            if "site_equals" in name:
                checks["blip"]["sites"].append(outcome)
                checks["blip"]["corruptions:image_pair"].append(outcome)
                checks["blip"]["directions:denoise"].append(outcome)
            elif "knockout" in name:
                checks["blip"]["knockout"].append(outcome)
            elif "prefix" in name or "reuse" in name:
                checks["blip"]["prefix reuse"].append(outcome)
    for name, outcome in results.items():  # text LMs: every cell against TransformerLens
        if name.startswith("test_transformer_lens::") and "[" in name:
            params = name.split("[", 1)[1].rstrip("]")
            for family in ("llama", "gpt2"):
                if family in params:
                    checks[family]["sites"].append(outcome)
                    checks[family]["corruptions:str"].append(outcome)  # SymmetricTokenReplacement
                    for direction in ("denoise", "noise"):
                        if direction in params.split("-"):
                            checks[family]["directions:" + direction].append(outcome)
    served = re.compile(r"test_remote_families::test_(?P<test>\w+)\[(?P<family>\w+)\]")
    for name, outcome in results.items():  # every family served, and its request on NDIF's terms
        match = served.match(name)
        if match:
            column = "ndif" if "ndif" in match["test"] else "remote"
            checks[match["family"]][column].append(outcome)
    remote = [outcome for name, outcome in results.items() if name.startswith("test_remote::")]
    return checks, remote


def text(outcomes_: list[tuple[str, str]]) -> str:
    statuses = {status for status, _ in outcomes_}
    if not outcomes_:
        return "untested"
    if "fail" in statuses:
        return "FAILS"
    if statuses == {"skip"}:
        return "no: " + outcomes_[0][1]
    return "yes"


def columns(family: str, checks: dict, remote: list, sites: list[str]) -> dict[str, str]:
    family_checks = checks[family]
    corruptions = [
        CORRUPTION_NAMES[c]
        for c in CORRUPTION_NAMES
        if text(family_checks.get("corruptions:" + c, [])) == "yes"
    ]
    directions = [d for d in ("denoise", "noise") if text(family_checks.get("directions:" + d, [])) == "yes"]
    served = family_checks.get("remote", [])
    if family in ("llava", "blip"):  # test_remote's recipes, knockout, noise, errors, polling, ...
        served = served + remote
    remote_text = text(served)
    ndif_text = text(family_checks.get("ndif", []))
    site_text = text(family_checks.get("sites", []))
    return {
        "sites": ", ".join(sites) if site_text == "yes" else site_text,
        "corruptions": ", ".join(corruptions) or "untested",
        "directions": ", ".join(directions) or "untested",
        "knockout": text(family_checks.get("knockout", [])),
        "patterns": text(family_checks.get("patterns", [])),
        "prefix reuse": text(family_checks.get("prefix reuse", [])),
        "remote": "yes (tested)" if remote_text == "yes" else remote_text,
        "ndif": "yes (tested)" if ndif_text == "yes" else ndif_text,
    }


def main() -> int:
    sys.path.insert(0, str(ROOT))
    results: dict[str, tuple[str, str]] = {}
    with tempfile.TemporaryDirectory() as folder:
        runs = (("served", SERVED_TESTS, "0", "slow or not slow"), ("local", TESTS, "2", "not slow"))
        for name, tests, workers, marks in runs:  # every family served: slow, so not in the suite
            xml = Path(folder) / f"{name}.xml"
            subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", workers, "-m", marks]
                + [f"--junitxml={xml}", *tests],
                cwd=ROOT,
                check=False,
            )
            results |= outcomes(xml)
    checks, remote = summarise(results)
    from vlmtrace.models.registry import registered

    families: dict[str, dict] = {}
    for adapter in registered():
        sites = sorted({site for stack in adapter.stacks.values() for site in stack.sites})
        families[adapter.family] = {
            "architectures": list(adapter.architectures),
            "columns": columns(adapter.family, checks, remote, sites),
        }
    import transformers

    data = {
        "generated": date.today().isoformat(),
        "command": COMMAND,
        "transformers": transformers.__version__,
        "families": families,
    }
    (ROOT / "vlmtrace/models/support.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    write_readme(data)
    print(json.dumps({f: e["columns"] for f, e in families.items()}, indent=1))
    return 0


def write_readme(data: dict) -> None:
    sys.path.insert(0, str(ROOT))
    from vlmtrace.cli.models import COLUMNS, matrix_rows

    lines = ["| family | " + " | ".join(COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 1)]
    lines += ["| " + " | ".join(row) + " |" for row in matrix_rows(data)]
    readme = ROOT / "README.md"
    content = readme.read_text()
    if START in content and END in content:
        before, rest = content.split(START, 1)
        _, after = rest.split(END, 1)
        table = "\n".join(lines)
        note = (
            f"\n\nGenerated by `{data['command']}` on {data['generated']} "
            f"(transformers {data['transformers']}).\n"
        )
        readme.write_text(f"{before}{START}\n{table}{note}{END}{after}")


if __name__ == "__main__":
    raise SystemExit(main())
