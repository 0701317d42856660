"""GSM8K data: loading (local files, the Hub, or generated problems), checking, splitting, and the template.

One instruction template serves training and evaluation alike, so what the model learns to
continue is exactly what it is asked at test time.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path

from mathtune.answers import gold_line
from mathtune.config import DataConfig

HUB_HOST = ("huggingface.co", 443)
SOURCE_BANNER = {
    "gsm8k-local": "GSM8K from local files",
    "gsm8k-hub": "GSM8K from the Hugging Face Hub",
    "synthetic": "generated GSM8K-style problems (mathtune.synthetic), NOT GSM8K",
}


class DataError(ValueError):
    """Bad or unreachable data; the message names the file and line and says what to do."""


@dataclass
class Dataset:
    """The problems a run uses, with where they came from."""

    source: str  # gsm8k-local, gsm8k-hub, synthetic
    location: str
    train: list[dict]
    test: list[dict]
    skipped: list[str] = field(default_factory=list)

    @property
    def is_gsm8k(self) -> bool:
        return self.source.startswith("gsm8k")


def describe(dataset: Dataset, train: list[dict] | None = None, validation: list[dict] | None = None) -> str:
    """The line a command prints about its data (saying plainly when it is not GSM8K), with the split's
    sizes when given."""
    line = f"Data: {SOURCE_BANNER[dataset.source]} ({dataset.location})"
    if train is not None and validation is not None:
        line += f"; {len(train)} training and {len(validation)} validation problems."
    return line


# --- the template -------------------------------------------------------------------------------


def format_prompt(question: str) -> str:
    """The prompt, in lm-evaluation-harness's GSM8K format; the solution follows after one space."""
    return f"Question: {question.strip()}\nAnswer:"


def format_completion(answer: str) -> str:
    return " " + answer.strip()


def fewshot_prompt(question: str, examples: list[dict]) -> str:
    """Worked examples in the same template, then the question: how a base model is asked."""
    shots = [format_prompt(ex["question"]) + format_completion(ex["answer"]) for ex in examples]
    return "\n\n".join(shots + [format_prompt(question)])


def tokenize_example(tokenizer, question: str, answer: str) -> dict:
    """input_ids and labels with the prompt masked (-100): the loss counts the solution and its EOS.

    The EOS is appended by id, not by text, so it carries loss even where pad equals EOS.
    """
    prompt_ids = tokenizer(format_prompt(question))["input_ids"]
    completion_ids = tokenizer(format_completion(answer), add_special_tokens=False)["input_ids"]
    completion_ids = completion_ids + [tokenizer.eos_token_id]
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [-100] * len(prompt_ids) + completion_ids,
    }


# --- checking records ---------------------------------------------------------------------------


def check_record(record: object) -> str | None:
    """What is wrong with one GSM8K record, or None when it is valid."""
    if not isinstance(record, dict):
        return "expected a JSON object with 'question' and 'answer'"
    question, answer = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        return "missing or empty 'question'"
    if not isinstance(answer, str) or not answer.strip():
        return "missing or empty 'answer'"
    try:
        gold_line(answer)  # the rule scoring applies, so a record that passes here can be scored
    except ValueError:
        return "the answer's last line is not '#### <number>'"
    return None


def read_problems(path: Path, split: str, skip_invalid: bool = False) -> tuple[list[dict], list[str]]:
    """Problems from a GSM8K JSONL file, each with an id `<split>-<line index>`.

    Every bad line is reported at once (file:line: what), so a user fixes a file in one pass.
    """
    if not path.exists():
        raise DataError(f"{path} does not exist: a GSM8K directory needs train.jsonl and test.jsonl")
    problems, errors = [], []
    with path.open("rb") as handle:  # bytes: a line that is not UTF-8 is one bad record, not a crash
        for index, line in enumerate(handle):
            if not line.strip():
                errors.append(f"{path}:{index + 1}: empty line")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{path}:{index + 1}: not valid JSON ({exc.msg})")
                continue
            except (UnicodeDecodeError, RecursionError) as exc:
                what = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else "JSON nested too deeply"
                errors.append(f"{path}:{index + 1}: {what}")
                continue
            problem = check_record(record)
            if problem:
                errors.append(f"{path}:{index + 1}: {problem}")
                continue
            problems.append({"id": f"{split}-{index}", "question": record["question"], "answer": record["answer"]})
    if errors and not skip_invalid:
        shown = "\n  ".join(errors[:50]) + (f"\n  ... and {len(errors) - 50} more" if len(errors) > 50 else "")
        raise DataError(
            f"{len(errors)} invalid record(s) in {path}:\n  {shown}\n"
            "Fix them, or pass --skip-invalid to drop them (they are counted in the run's data.json)."
        )
    if not problems:
        raise DataError(f"{path} holds no valid problems")
    return problems, errors


# --- sources ------------------------------------------------------------------------------------


def load_local(directory: Path, skip_invalid: bool = False) -> Dataset:
    train, bad_train = read_problems(directory / "train.jsonl", "train", skip_invalid)
    test, bad_test = read_problems(directory / "test.jsonl", "test", skip_invalid)
    return Dataset("gsm8k-local", str(directory), train, test, bad_train + bad_test)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in seconds rather than after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def load_hub(config: DataConfig) -> Dataset:
    if not hub_reachable():
        raise DataError(
            f"the Hugging Face Hub cannot be reached, so {config.hub_id} cannot be downloaded.\n"
            "Point mathtune at local GSM8K files instead: --data DIR (or MATHTUNE_DATA=DIR), where DIR holds "
            "train.jsonl and test.jsonl in the original format; or use --data synthetic for generated problems."
        )
    import datasets

    loaded = datasets.load_dataset(config.hub_id, config.hub_config)
    splits = {}
    for split in ("train", "test"):
        problems = []
        for index, record in enumerate(loaded[split]):
            problem = check_record(record)
            if problem and not config.skip_invalid:
                raise DataError(f"{config.hub_id} {split} record {index}: {problem}")
            if not problem:
                problems.append({"id": f"{split}-{index}", "question": record["question"], "answer": record["answer"]})
        splits[split] = problems
    return Dataset("gsm8k-hub", config.hub_id, splits["train"], splits["test"])


def load_synthetic(config: DataConfig) -> Dataset:
    from mathtune import synthetic

    # Train and test come from different seeds, so no test problem was seen in training.
    train = synthetic.generate(config.synthetic_size, config.synthetic_seed)
    test = synthetic.generate(max(200, config.synthetic_size // 5), config.synthetic_seed + 1)
    location = f"mathtune.synthetic seeds {config.synthetic_seed}/{config.synthetic_seed + 1}"
    return Dataset("synthetic", location, train, test)


def load_dataset(config: DataConfig) -> Dataset:
    """GSM8K from --data / MATHTUNE_DATA, else the Hub; or generated problems; `auto` tries each in turn."""
    local = config.path or os.environ.get("MATHTUNE_DATA")
    if local == "synthetic" or config.source == "synthetic":
        return load_synthetic(config)
    if local:
        return load_local(Path(local), config.skip_invalid)
    if config.source == "auto" and not hub_reachable():
        return load_synthetic(config)
    return load_hub(config)


# --- subsets and splits -------------------------------------------------------------------------


def split_train_validation(problems: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split; the validation side has ceil(fraction * n) problems, as datasets' train_test_split.

    Done by hand so the split depends only on the seed, not on a library's shuffling across versions.
    """
    n_validation = math.ceil(fraction * len(problems))
    if n_validation < 1 or n_validation >= len(problems):
        raise DataError(
            f"a validation fraction of {fraction} of {len(problems)} problems leaves one side empty; "
            "use more problems (data.train_limit) or another data.validation_fraction"
        )
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    validation = sorted(order[:n_validation])
    training = sorted(order[n_validation:])
    return [problems[i] for i in training], [problems[i] for i in validation]


def run_split(config: DataConfig, dataset: Dataset) -> tuple[list[dict], list[dict]]:
    """The run's (training, validation) problems: a seeded subset of the training file, split in two.

    Training and evaluation both call it, so the validation problems a run evaluates on are the
    ones it held out.
    """
    pool = seeded_subset(dataset.train, config.train_limit, config.seed)
    return split_train_validation(pool, config.validation_fraction, config.seed)


def seeded_subset(problems: list[dict], limit: int | None, seed: int) -> list[dict]:
    """A fixed subset, the same for every model given the seed, kept in file order."""
    if limit is None or limit >= len(problems):
        return list(problems)
    chosen = sorted(random.Random(seed).sample(range(len(problems)), limit))
    return [problems[i] for i in chosen]
