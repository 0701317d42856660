"""Training mechanics on the tiny random model, one real run on the packaged Gemma 3 270M, and 2-process DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mathtune.config import load_config
from mathtune.runfiles import read_jsonl
from mathtune.training import RunDirError, train

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path, data_dir, *overrides):
    return load_config("tiny", [f"output_dir={tmp_path}", f"data.path={data_dir}", *overrides])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, gsm8k_dir):
    config = tiny_config(tmp_path_factory.mktemp("runs"), gsm8k_dir)
    result = train(config)
    return config.run_dir, result


def test_run_directory_holds_every_documented_file(tiny_run):
    run_dir, result = tiny_run
    for name in ("config.yaml", "environment.json", "data.json", "metrics.jsonl", "example_losses.jsonl",
                 "train_result.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (run_dir / name).exists(), name
    environment = json.loads((run_dir / "environment.json").read_text())
    assert {"torch", "transformers", "peft", "trl"} <= environment["packages"].keys()
    assert environment["seed"] == 42


def test_data_json_records_the_split_ids(tiny_run):
    run_dir, _ = tiny_run
    split = json.loads((run_dir / "data.json").read_text())
    assert split["source"] == "gsm8k-local"
    assert len(split["train_ids"]) == 32 and len(split["validation_ids"]) == 8
    assert not set(split["train_ids"]) & set(split["validation_ids"])


def test_metrics_have_train_and_eval_records_with_the_documented_fields(tiny_run):
    run_dir, result = tiny_run
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    train_records = [m for m in metrics if m["kind"] == "train"]
    eval_records = [m for m in metrics if m["kind"] == "eval"]
    assert [m["step"] for m in eval_records] == [4, 8]
    for record in train_records:
        assert {"loss", "learning_rate", "grad_norm", "mean_token_accuracy", "num_tokens", "num_loss_tokens",
                "elapsed_s", "epoch"} <= record.keys()
    for record in eval_records:
        assert {"eval_loss", "eval_mean_token_accuracy", "elapsed_s"} <= record.keys()
    assert eval_records[-1]["eval_loss"] < eval_records[0]["eval_loss"]


def test_example_losses_pool_to_the_logged_validation_loss(tiny_run):
    run_dir, _ = tiny_run
    rows = read_jsonl(run_dir / "example_losses.jsonl")
    validation_ids = json.loads((run_dir / "data.json").read_text())["validation_ids"]
    expected = set(validation_ids) - set(json.loads((run_dir / "train_result.json").read_text())["dropped_too_long"])
    evals = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["kind"] == "eval"]
    for record in evals:
        at_step = [r for r in rows if r["step"] == record["step"]]
        assert {r["id"] for r in at_step} == expected
        pooled = sum(r["loss"] * r["n_tokens"] for r in at_step) / sum(r["n_tokens"] for r in at_step)
        assert pooled == pytest.approx(record["eval_loss"], rel=1e-6)


def test_adapter_loads_with_peft(tiny_run):
    from peft import PeftModel
    from mathtune.models import load_model

    run_dir, _ = tiny_run
    model = PeftModel.from_pretrained(load_model("tiny-random", "float32"), str(run_dir / "adapter"))
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_a_directory_holding_another_run_is_refused(tiny_run, gsm8k_dir):
    run_dir, _ = tiny_run
    config = tiny_config(run_dir.parent, gsm8k_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match="--resume.*--overwrite"):
        train(config)
    assert (run_dir / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_packaged_gemma_learns_in_a_few_steps(tmp_path, small_gsm8k):
    """The real model: validation loss goes down after a few LoRA steps on a handful of GSM8K problems."""
    config = load_config("cpu-demo", [
        f"output_dir={tmp_path}", f"data.path={small_gsm8k}", "data.train_limit=24", "data.validation_fraction=0.25",
        "train.max_steps=4", "train.eval_steps=2", "train.logging_steps=1", "train.batch_size=4",
        "train.learning_rate=5e-4",
    ])
    train(config)
    evals = [m for m in read_jsonl(config.run_dir / "metrics.jsonl") if m["kind"] == "eval"]
    assert len(evals) == 2
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_two_process_data_parallel_run_writes_one_consistent_run_directory(tmp_path, gsm8k_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "mathtune", "train", "--preset", "tiny", "--output-dir", str(tmp_path), "--name", "ddp",
               "--data", str(gsm8k_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    result = json.loads((run_dir / "train_result.json").read_text())
    assert result["num_processes"] == 2
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    keys = [(m["kind"], m["step"]) for m in metrics]
    assert len(keys) == len(set(keys)), "a log line was written twice"
    # 32 examples, batch 4 per process, 2 processes: 4 steps, one evaluation at step 4.
    assert result["steps_done"] == 4
    assert [m["step"] for m in metrics if m["kind"] == "eval"] == [4]
    # Exact match: each process answers half of the tiny preset's 4 problems; one gathered result is logged.
    assert [m["eval_exact_match_n"] for m in metrics if m["kind"] == "eval"] == [4]
    validation_ids = json.loads((run_dir / "data.json").read_text())["validation_ids"]
    dropped = set(result["dropped_too_long"])
    assert sorted(r["id"] for r in read_jsonl(run_dir / "example_losses.jsonl")) == sorted(
        set(validation_ids) - dropped)


def test_validation_examples_dropped_as_too_long_do_not_shift_the_ids(tmp_path, gsm8k_dir):
    """Per-example losses stay attached to the right problem when some validation problems are dropped."""
    config = tiny_config(tmp_path, gsm8k_dir, "data.max_length=330", "train.max_steps=2", "train.eval_steps=2")
    result = train(config)
    validation_ids = json.loads((config.run_dir / "data.json").read_text())["validation_ids"]
    dropped = set(result["dropped_too_long"]) & set(validation_ids)
    assert dropped and len(dropped) < len(validation_ids), "the case needs some, not all, validation problems dropped"
    rows = read_jsonl(config.run_dir / "example_losses.jsonl")
    assert [r["id"] for r in rows] == [i for i in validation_ids if i not in dropped]


def test_our_lm_head_trains_as_trls_does(tmp_path, gsm8k_dir):
    """The loss-positions head and per-example attention change the speed, not the run: with dropout
    off, the losses logged step by step and the validation losses match TRL's own head and SDPA's mask."""
    settings = ["lora.dropout=0.0", "train.max_steps=4", "train.eval_steps=2", "train.logging_steps=1"]
    fast = train(tiny_config(tmp_path / "fast", gsm8k_dir, *settings))
    plain = train(tiny_config(tmp_path / "plain", gsm8k_dir, *settings, "speedups.loss_head=false",
                              "speedups.packed_attention=false"))
    assert fast["train_tokens"] == plain["train_tokens"] and fast["train_loss_tokens"] == plain["train_loss_tokens"]
    for key in ("loss", "eval_loss", "mean_token_accuracy", "eval_mean_token_accuracy"):
        ours = [m[key] for m in read_jsonl(tmp_path / "fast/tiny/metrics.jsonl") if key in m]
        trls = [m[key] for m in read_jsonl(tmp_path / "plain/tiny/metrics.jsonl") if key in m]
        assert len(ours) == len(trls) >= 2
        assert ours == pytest.approx(trls, rel=1e-4, abs=1e-5), key


def test_micro_batches_with_gradient_accumulation_train_as_one_batch(tmp_path, gsm8k_dir):
    """batch_size 1 with gradient_accumulation_steps 4 (a quarter of the activation memory) takes the
    same optimizer steps as batch_size 4: each step's loss is token-weighted over the same four
    examples either way, so with dropout off the logged training and validation losses agree."""
    common = ["lora.dropout=0.0", "train.max_steps=3", "train.eval_steps=3", "train.logging_steps=1"]
    train(tiny_config(tmp_path / "whole", gsm8k_dir, *common, "train.batch_size=4",
                      "train.gradient_accumulation_steps=1"))
    train(tiny_config(tmp_path / "micro", gsm8k_dir, *common, "train.batch_size=1",
                      "train.gradient_accumulation_steps=4"))
    for key in ("loss", "eval_loss"):
        whole = [m[key] for m in read_jsonl(tmp_path / "whole/tiny/metrics.jsonl") if key in m]
        micro = [m[key] for m in read_jsonl(tmp_path / "micro/tiny/metrics.jsonl") if key in m]
        assert len(whole) == len(micro) >= 1
        assert micro == pytest.approx(whole, rel=1e-4, abs=1e-5), key
    losses = [m["loss"] for m in read_jsonl(tmp_path / "whole/tiny/metrics.jsonl") if "loss" in m]
    assert len(set(losses)) > 1, "the steps must see different examples for the comparison to mean anything"


def collated_row(lengths):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, return_position_ids=True)
    examples, token = [], 1
    for length in lengths:
        ids = list(range(token, token + length))
        examples.append({"input_ids": ids, "labels": [-100] + ids[1:]})
        token += length
    return collate(examples)


def test_a_packed_row_splits_into_pieces_of_whole_examples_within_the_budget():
    from mathtune.training.batches import split_packed_row

    row = collated_row([3, 5, 2, 4, 9])
    pieces = split_packed_row(row, max_tokens=7)
    # 3 | 5 + 2 | 4 | 9 (longer than the budget: alone)
    assert [p["input_ids"].shape[1] for p in pieces] == [3, 7, 4, 9]
    assert torch.equal(torch.cat([p["input_ids"] for p in pieces], dim=1), row["input_ids"])
    assert torch.equal(torch.cat([p["labels"] for p in pieces], dim=1), row["labels"])
    second = pieces[1]
    assert second["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert second["cu_seq_lens_q"].tolist() == second["cu_seq_lens_k"].tolist() == [0, 5, 7]
    assert second["max_length_q"] == second["max_length_k"] == 5
    assert second["seq_idx"].tolist() == [[0, 0, 0, 0, 0, 1, 1]]
    assert second["cu_seq_lens_q"].dtype == row["cu_seq_lens_q"].dtype
    assert [p["input_ids"].shape[1] for p in split_packed_row(row, max_tokens=100)] == [23]


def test_a_batch_that_is_not_one_packed_row_stays_whole():
    from mathtune.training.batches import split_packed_row

    row = collated_row([3, 5])
    assert split_packed_row({**row, "attention_mask": torch.ones(1, 8)}, max_tokens=4)[0]["input_ids"].shape[1] == 8
    two_rows = {"input_ids": torch.ones(2, 4, dtype=torch.long), "position_ids": torch.arange(4).repeat(2, 1)}
    assert split_packed_row(two_rows, max_tokens=2) == [two_rows]
    padded = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)}
    assert split_packed_row(padded, max_tokens=2) == [padded]


def test_batches_split_into_passes_train_as_whole_batches(tmp_path, gsm8k_dir):
    """train.max_tokens_per_pass cuts activation memory, not the run: with dropout off, every logged
    training loss, token accuracy and validation loss matches whole batches."""
    common = ["lora.dropout=0.0", "train.max_steps=3", "train.eval_steps=3", "train.logging_steps=1"]
    whole = train(tiny_config(tmp_path / "whole", gsm8k_dir, *common))
    split = train(tiny_config(tmp_path / "split", gsm8k_dir, *common, "train.max_tokens_per_pass=400"))
    assert split["train_tokens"] == whole["train_tokens"]
    assert split["train_loss_tokens"] == whole["train_loss_tokens"]
    for key in ("loss", "mean_token_accuracy", "eval_loss"):
        ours = [m[key] for m in read_jsonl(tmp_path / "split/tiny/metrics.jsonl") if key in m]
        reference = [m[key] for m in read_jsonl(tmp_path / "whole/tiny/metrics.jsonl") if key in m]
        assert len(ours) == len(reference) >= 1
        assert ours == pytest.approx(reference, rel=1e-4, abs=1e-5), key
