"""report/records.py: a run directory read into RunRecords, question text looked up by problem id."""

from __future__ import annotations

import json

from handmade import EVIL, make_run
from mathtune.report.records import EVALUATIONS, RunRecords, load_run, source_problems


def test_gsm8k_questions_come_from_the_local_files(tmp_path):
    data = tmp_path / "gsm8k"
    data.mkdir()
    lines = [{"question": f"Question {i}?", "answer": "Step one.\nStep two.\n#### 4"} for i in range(5)]
    (data / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    found = source_problems({"source": "gsm8k-local", "location": str(data)}, {"train-1", "train-4", "train-9"})
    solution = "Step one.\nStep two.\n#### 4"
    assert found == {"train-1": {"question": "Question 1?", "solution": solution, "gold_steps": 2},
                     "train-4": {"question": "Question 4?", "solution": solution, "gold_steps": 2}}


def test_the_evaluated_problems_gold_solutions_come_from_the_data_source(tmp_path):
    run = make_run(tmp_path, source="gsm8k-local")
    data = tmp_path / "gsm8k"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"{i} + 1\n#### {i + 1}"})
                                             + "\n" for i in range(30)))
    info = json.loads((run / "data.json").read_text())
    (run / "data.json").write_text(json.dumps({**info, "path": str(data)}))
    records, _ = load_run(run)
    assert records.solutions == {f"test-{i}": f"{i} + 1\n#### {i + 1}" for i in range(20)}  # the 20 evaluated
    (run / "data.json").write_text(json.dumps({**info, "path": str(tmp_path / "elsewhere")}))
    assert load_run(run)[0].solutions == {}  # the files are not on this machine: no solutions, no error


def test_synthetic_questions_are_regenerated_from_their_seed():
    from mathtune import synthetic

    expected = synthetic.generate(8, 77)
    found = source_problems({"source": "synthetic"}, {"synthetic-77-2", "synthetic-77-7"})
    assert set(found) == {"synthetic-77-2", "synthetic-77-7"}
    assert found["synthetic-77-7"]["question"] == expected[7]["question"]
    assert found["synthetic-77-7"]["gold_steps"] == expected[7]["steps"]


def test_load_run_reads_every_file_and_finds_question_text(tmp_path):
    run = make_run(tmp_path)
    records, notes = load_run(run)
    assert notes == []
    assert records.config["name"] == "hand-made" and records.data_info["source"] == "synthetic"
    assert len(records.metrics) == 48 and len(records.example_losses) == 40
    assert records.train_result["steps_done"] == 400
    assert len(records.predictions["base"]) == 20 and records.scores["tuned"]["shots"] == 0
    assert records.predictions["robustness-base"] is None and records.scores["robustness-tuned"] is None
    assert records.questions["train-3"] == EVIL and records.gold_steps["train-3"] == 2  # from example_losses.jsonl
    assert records.questions["test-0"] == EVIL and records.gold_steps["test-1"] == 3  # from the predictions


def test_load_run_ignores_a_config_that_is_not_a_mapping(tmp_path):
    run = make_run(tmp_path, evaluate=False)
    (run / "config.yaml").write_text("- not\n- a mapping\n")
    records, notes = load_run(run)
    assert records.config == {} and notes == ["config.yaml is not a valid YAML mapping and was ignored."]
    assert records.predictions == {name: None for name in EVALUATIONS}


def test_load_run_of_an_empty_directory_is_empty(tmp_path):
    records, notes = load_run(tmp_path)
    assert records == RunRecords(predictions={name: None for name in EVALUATIONS},
                                 scores={name: None for name in EVALUATIONS}) and notes == []
