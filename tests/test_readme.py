"""The README's description of the presets says what the presets do."""

import re
from pathlib import Path

from mathtune.config import load_config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_states_the_demo_presets_number_of_test_problems():
    entry = re.search(r"^- `cpu-demo`:(.*?)(?=^- `)", README.read_text(encoding="utf-8"), re.S | re.M)
    assert entry, "README lists no cpu-demo preset"
    stated = re.search(r"evaluated on (\d+) test problems", " ".join(entry.group(1).split()))
    assert stated, "README's cpu-demo entry does not say how many test problems it evaluates"
    assert int(stated.group(1)) == load_config("cpu-demo").eval.limit
