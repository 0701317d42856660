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


RESULT = README.parent / "bench" / "results" / "gemma-3-270m-gsm8k"


def _interval(block: dict) -> str:
    low, high = block["ci95"]
    return f"{block['value']:.1%} ({block['correct']}/{block['total']}; 95% CI {low:.1%}-{high:.1%})"


def _result_section_and_summary() -> tuple[str, dict]:
    """The README's '## Result:' section, whitespace folded, and the committed run's summary.json."""
    import json

    section = re.search(r"^## Result:(.*?)(?=^## )", README.read_text(encoding="utf-8"), re.S | re.M)
    assert section, "README has no '## Result:' section"
    return " ".join(section.group(1).split()), json.loads((RESULT / "summary.json").read_text(encoding="utf-8"))


def test_the_readmes_result_is_the_committed_full_runs_summary():
    text, summary = _result_section_and_summary()
    acc = summary["accuracy"]
    assert acc["paired"]["n"] == 1319 and acc["base"]["total"] == acc["tuned"]["total"] == 1319
    for side in ("base", "tuned"):
        assert _interval(acc[side]) in text, f"README does not state the {side} model's {_interval(acc[side])}"
    paired = acc["paired"]
    assert f"| base right | {paired['both_right']} | {paired['only_base']} |" in text
    assert f"| base wrong | {paired['only_tuned']} | {paired['both_wrong']} |" in text
    p = acc["mcnemar_p"]
    assert (f"McNemar p = {p:.2g}" if p < 0.001 else f"McNemar p = {p:.3f}") in text


def test_the_readmes_stage_times_are_the_committed_full_runs():
    text, summary = _result_section_and_summary()
    minutes = {phase["phase"]: f"{phase['hours'] * 60:.1f}" for phase in summary["cost"]["phases"]}
    assert f"| base evaluation | {minutes['base evaluation']} min |" in text
    assert re.search(rf"\| training \([^|]*\) \| {re.escape(minutes['training'])} min \|", text)
    assert f"| tuned evaluation | {minutes['tuned evaluation']} min |" in text
    robustness = (minutes["robustness evaluation, base model"], minutes["robustness evaluation, tuned model"])
    assert "| robustness, base and tuned | {} and {} min |".format(*robustness) in text
