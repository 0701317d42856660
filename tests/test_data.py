import json

import pytest

from mathtune import data
from mathtune.config import DataConfig
from conftest import write_jsonl


def test_every_gsm8k_record_parses_and_the_split_is_6725_748(gsm8k_dir):
    dataset = data.load_local(gsm8k_dir)
    assert (len(dataset.train), len(dataset.test)) == (7473, 1319)
    assert dataset.skipped == []
    train, validation = data.split_train_validation(dataset.train, 0.1, seed=42)
    assert (len(train), len(validation)) == (6725, 748)
    assert not {p["id"] for p in train} & {p["id"] for p in validation}


def test_split_is_deterministic_for_a_seed_and_differs_across_seeds(gsm8k_dir):
    problems = data.load_local(gsm8k_dir).train[:500]
    first = data.split_train_validation(problems, 0.1, seed=1)[1]
    again = data.split_train_validation(problems, 0.1, seed=1)[1]
    other = data.split_train_validation(problems, 0.1, seed=2)[1]
    assert [p["id"] for p in first] == [p["id"] for p in again]
    assert [p["id"] for p in first] != [p["id"] for p in other]


def test_a_split_that_leaves_one_side_empty_is_refused():
    problems = [{"id": f"train-{i}", "question": "q", "answer": "#### 1"} for i in range(1)]
    with pytest.raises(data.DataError, match="leaves one side empty"):
        data.split_train_validation(problems, 0.1, seed=0)[1]


def test_malformed_file_lists_every_bad_record_with_file_and_line(tmp_path):
    good = {"question": "What is 1+1?", "answer": "1+1 = <<1+1=2>>2\n#### 2"}
    path = write_jsonl(tmp_path / "train.jsonl", [
        good,
        '{"question": "broken json"',
        {"question": "No answer line?", "answer": "It is 3."},
        {"answer": "#### 4"},
        good,
    ])
    with pytest.raises(data.DataError) as error:
        data.read_problems(path, "train")
    message = str(error.value)
    assert f"{path}:2: not valid JSON" in message
    assert f"{path}:3: the answer's last line is not '#### <number>'" in message
    assert f"{path}:4: missing or empty 'question'" in message
    assert "--skip-invalid" in message


def test_skip_invalid_drops_and_counts_bad_records(tmp_path):
    good = {"question": "What is 1+1?", "answer": "#### 2"}
    path = write_jsonl(tmp_path / "train.jsonl", [good, {"question": "x", "answer": "no"}, good])
    problems, skipped = data.read_problems(path, "train", skip_invalid=True)
    assert [p["id"] for p in problems] == ["train-0", "train-2"]
    assert len(skipped) == 1 and ":2:" in skipped[0]


def test_an_empty_file_is_an_error(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("")
    with pytest.raises(data.DataError, match="no valid problems"):
        data.read_problems(path, "test")


def test_unreachable_hub_fails_fast_and_says_how_to_use_local_files(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MATHTUNE_DATA", raising=False)
    with pytest.raises(data.DataError, match=r"--data DIR \(or MATHTUNE_DATA=DIR\)"):
        data.load_dataset(DataConfig(source="gsm8k"))


def test_template_masks_the_prompt_and_trains_the_eos():
    from mathtune.models import load_tokenizer

    tokenizer = load_tokenizer("tiny-random")
    example = data.tokenize_example(tokenizer, "What is 2+3?", "2+3 = <<2+3=5>>5\n#### 5")
    prompt_len = len(tokenizer(data.format_prompt("What is 2+3?"))["input_ids"])
    assert example["labels"][:prompt_len] == [-100] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id and example["labels"][-1] == tokenizer.eos_token_id
    text = tokenizer.decode(example["input_ids"], skip_special_tokens=True)
    assert text == "Question: What is 2+3?\nAnswer: 2+3 = <<2+3=5>>5\n#### 5"


def test_fewshot_prompt_uses_the_same_template():
    shots = [{"question": "A?", "answer": "#### 1"}, {"question": "B?", "answer": "#### 2"}]
    prompt = data.fewshot_prompt("C?", shots)
    assert prompt == "Question: A?\nAnswer: #### 1\n\nQuestion: B?\nAnswer: #### 2\n\nQuestion: C?\nAnswer:"


def test_the_run_split_is_a_seeded_subset_of_the_training_file_split_in_two():
    problems = [{"id": f"train-{i}", "question": f"Q{i}?", "answer": f"#### {i}"} for i in range(50)]
    dataset = data.Dataset("synthetic", "here", problems, [])
    config = DataConfig(train_limit=20, validation_fraction=0.25, seed=7)
    train, validation = data.run_split(config, dataset)
    pool = data.seeded_subset(problems, 20, 7)
    assert (train, validation) == data.split_train_validation(pool, 0.25, 7)
    assert (len(train), len(validation)) == (15, 5)
    assert data.run_split(config, dataset) == (train, validation)


def test_the_data_line_names_the_source_and_says_when_it_is_not_gsm8k():
    local = data.Dataset("gsm8k-local", "/data/gsm8k", [], [])
    assert data.describe(local) == "Data: GSM8K from local files (/data/gsm8k)"
    generated = data.Dataset("synthetic", "mathtune.synthetic seeds 1/2", [], [])
    assert "NOT GSM8K" in data.describe(generated)
    assert data.describe(local, [{}] * 3, [{}]) == (
        "Data: GSM8K from local files (/data/gsm8k); 3 training and 1 validation problems.")


def test_an_indented_gold_line_is_read_and_scored_alike(tmp_path):
    from mathtune.answers import gold_answer

    path = write_jsonl(tmp_path / "train.jsonl", [
        {"question": "What is 3+2?", "answer": "3+2 = <<3+2=5>>5\n  #### 5"},
        {"question": "What is 3+3?", "answer": "3+3 = 6\n#### 6 apples"},
    ])
    problems, skipped = data.read_problems(path, "train", skip_invalid=True)
    assert [p["id"] for p in problems] == ["train-0"] and gold_answer(problems[0]["answer"]) == "5"
    assert skipped == [f"{path}:2: the answer's last line is not '#### <number>'"]
