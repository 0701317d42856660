"""Run directories cannot be escaped or lost: run names are one path component, --overwrite deletes only a
mathtune run directory and only once the new run's model has been checked, and --resume RUN_DIR is that run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from mathtune import model_cache
from mathtune.cli import main
from mathtune.config import ConfigError, load_config


def marked_run(run_dir: Path) -> dict[Path, bytes]:
    """An old mathtune run directory (with mathtune's marker); returns its files' contents."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(load_config("tiny").to_dict()))
    (run_dir / "environment.json").write_text(json.dumps({"mathtune": "0.1.0", "python": "3"}))
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n')
    (run_dir / "eval" / "base").mkdir(parents=True)
    (run_dir / "eval" / "base" / "scores.json").write_text("{}\n")
    return contents(run_dir)


def contents(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- run names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", "../../x", "/abs", "a/b", "a\\b", ".", ""])
def test_a_run_name_that_is_not_one_path_component_is_refused_naming_the_key(name):
    with pytest.raises(ConfigError, match=r"\bname\b"):
        load_config("tiny", [f"name={name}"])


def test_a_run_name_that_escapes_the_output_dir_touches_nothing_outside(tmp_path, small_gsm8k, capsys):
    outside = tmp_path / "project"
    outside.mkdir()
    (outside / "config.yaml").write_text("name: precious\n")
    code = main(["train", "--preset", "tiny", "--output-dir", str(tmp_path / "runs" / "sub"), "--name", "../../project",
                 "--data", str(small_gsm8k), "--overwrite"])
    assert code == 2
    assert "name" in capsys.readouterr().err
    assert (outside / "config.yaml").read_text() == "name: precious\n"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["train", "run"])
def test_overwrite_never_deletes_a_directory_without_mathtunes_marker(tmp_path, small_gsm8k, capsys, command):
    folder = tmp_path / "runs" / "tiny"  # someone's folder that happens to hold a config.yaml
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("name: precious\n")
    (folder / "notes.txt").write_text("keep me\n")
    before = contents(folder)
    code = main([command, "--preset", "tiny", "--output-dir", str(tmp_path / "runs"), "--data", str(small_gsm8k),
                 "--overwrite"])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not look like a mathtune run directory" in err and str(folder) in err
    assert contents(folder) == before


# --- --overwrite checks the model before deleting anything --------------------------------------


@pytest.fixture
def weightless_model(tmp_path) -> Path:
    """A model directory with a config and a tokenizer but no weights."""
    folder = tmp_path / "weightless"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(model_cache.tiny_random_dir() / name, folder / name)
    return folder


@pytest.mark.parametrize("command", ["train", "run"])
def test_overwrite_with_a_model_without_weights_keeps_the_old_run(
    tmp_path, small_gsm8k, weightless_model, capsys, command
):
    old_run = tmp_path / "runs" / "tiny"
    before = marked_run(old_run)
    code = main([command, "--preset", "tiny", "--output-dir", str(tmp_path / "runs"), "--data", str(small_gsm8k),
                 "--set", f"model.name={weightless_model}", "--overwrite"])
    assert code == 2
    assert contents(old_run) == before
    err = capsys.readouterr().err
    assert str(weightless_model) in err and "has no weights" in err


# --- --resume RUN_DIR is that run ---------------------------------------------------------------


def test_resume_by_path_from_another_folder_continues_that_run_with_the_data_given(
    tmp_path, small_gsm8k, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "tiny", "--output-dir", "runs", "--data", str(small_gsm8k),
                 "--set", "train.max_steps=2", "--set", "train.eval_steps=2"]) == 0
    moved = tmp_path / "moved-data"
    shutil.copytree(small_gsm8k, moved)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", "../runs/tiny", "--data", str(moved), "--set", "train.max_steps=4"]) == 0
    assert list(elsewhere.iterdir()) == []
    run_dir = tmp_path / "runs" / "tiny"
    result = json.loads((run_dir / "train_result.json").read_text())
    assert result["steps_done"] == 4 and result["resumed_from"].endswith("checkpoint-2")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["path"] == str(moved)
