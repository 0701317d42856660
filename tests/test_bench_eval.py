"""bench_eval's search for the other text's token where two generations part, on hand-made texts."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_eval import continues_other  # noqa: E402


def test_a_token_running_past_the_difference_is_the_other_texts():
    # generate wrote " 12 apples", the other " 13 apples"; they differ at character 2
    assert continues_other(" 13", 0, " 13 apples", 2, at_parting=True)
    assert continues_other(" 13", 0, " 13 apples", 2, at_parting=False)


def test_a_shorter_token_ending_at_the_difference_counts_at_the_parting_token_only():
    # generate wrote " They said", the other " The total": they differ at character 4, where " The" ends
    assert continues_other(" The", 0, " The total", 4, at_parting=True)
    assert not continues_other(" The", 0, " The total", 4, at_parting=False)


def test_a_token_that_is_not_the_start_of_the_other_text_or_stops_short_is_not():
    assert not continues_other(" She", 0, " The total", 1, at_parting=True)
    assert not continues_other(" T", 0, " The total", 4, at_parting=True)
    assert not continues_other("", 0, " The total", 0, at_parting=True)
