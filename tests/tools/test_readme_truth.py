"""What the README's set-up says agrees with the scripts that do the set-up."""

from __future__ import annotations

import re

from tests.tools.conftest import ROOT

README = (ROOT / "README.md").read_text()
SETUP = README[README.index("## Set-up"):README.index("## grpcurl")]
# A command the scripts or tests require on PATH -> the word the README names it by.
NAMED = {"python3": "Python", "go": "Go", "gcc": "C and C++ compiler",
         "g++": "C and C++ compiler", "curl": "curl", "cmake": "CMake", "npm": "npm",
         "node": "Node.js", "java": "JDK", "mvn": "Maven"}


def _first_build(text: str) -> tuple[str, ...]:
    found = re.findall(r"(\d+)-(\d+) min on 2 idle cores, (\d+) on 2 busy ones", text)
    assert len(found) == 1, found
    return tuple(found[0])


def test_the_first_build_time_is_the_same_everywhere() -> None:
    figure = _first_build(SETUP)
    for script in ("scripts/demo", "scripts/ollama-dev"):
        assert _first_build((ROOT / script).read_text()) == figure, script


def test_the_prerequisites_name_every_toolchain_the_scripts_and_tests_require() -> None:
    required = set()
    for path in [*(ROOT / "scripts").iterdir(), *(ROOT / "tests").rglob("*.py")]:
        if path.is_file() and path.name != "bench":
            text = path.read_text(errors="replace")
            required |= set(re.findall(r"^\s*need (\w+) ", text, flags=re.M))  # scripts/tools
            required |= set(re.findall(r"_need\(\"(\w+)\"", text))  # tests/polyglot
            required |= set(re.findall(r"command -v (\w+) >/dev/null 2>&1 \|\| \{", text))
            required |= set(re.findall(r"have ([\w+]+) \|\| die", text))  # scripts/*-dev
    assert {"npm", "go", "node", "java", "mvn", "gcc", "g++", "cmake"} <= required, required
    unnamed = {tool for tool in required if tool not in NAMED}
    assert not unnamed, f"add these to NAMED and to the README's Set-up: {unnamed}"
    missing = {tool for tool in required if NAMED[tool] not in SETUP}
    assert not missing, f"the README's Set-up does not name {missing}"
