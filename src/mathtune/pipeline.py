"""The `mathtune run` recipe, top to bottom: evaluate the base model, train, evaluate the tuned model, report.

Each stage leaves its files in the run directory and is skipped when they are already complete,
so running the same command again on a run that died continues where it stopped.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

from mathtune import data as data_module
from mathtune import synthetic
from mathtune.config import Config, load_config
from mathtune.evaluate import EvalError, choose_fewshot_examples, evaluate_problems, harness_fewshot_examples
from mathtune.models import (
    ModelError, adapter_base_model, check_model, load_model, load_tokenizer, load_vllm,
)
from mathtune.runfiles import read_json


def evaluation_problems(config: Config, dataset: data_module.Dataset) -> tuple[list[dict], list[dict]]:
    """(problems to evaluate, training problems for worked examples); the same for every model."""
    train, validation = data_module.run_split(config.data, dataset)
    problems = dataset.test if config.eval.split == "test" else validation
    return data_module.seeded_subset(problems, config.eval.limit, config.eval.seed), train


ROBUSTNESS_SEED_OFFSET = 1000  # data.load_synthetic uses synthetic_seed and synthetic_seed + 1


def robustness_seed(config: Config) -> int:
    """The seed of the fresh generated problems: neither the training nor the test seed of load_synthetic."""
    return config.data.synthetic_seed + ROBUSTNESS_SEED_OFFSET


def run_evaluation(
    config: Config, dataset: data_module.Dataset, out_dir: Path, model_name: str,
    adapter: Path | None, shots: int, robustness: int = 0, training_ids: tuple[Path, list[str]] | None = None,
) -> dict:
    """Evaluate on the configured problems, or with robustness=N on N fresh generated problems instead.

    training_ids, (the run's data.json, its train_ids): problems the adapter was trained on are refused.
    The model is loaded only when some problem is left to generate.
    """
    config.eval.check_backend_installed()
    problems, train = evaluation_problems(config, dataset)
    split = config.eval.split
    if robustness:
        split = f"synthetic-{robustness_seed(config)}"
        problems = synthetic.generate(robustness, robustness_seed(config))
    if training_ids:
        refuse_training_problems(problems, split, *training_ids)
    examples = fewshot_examples(config, dataset, problems, train, shots)
    kind = f"{model_name} + adapter {adapter}" if adapter else model_name
    print(f"Evaluating {kind} on {len(problems)} {split} problems ({shots}-shot, greedy, up to "
          f"{config.eval.max_new_tokens} new tokens, protocol {config.eval.protocol}, "
          f"backend {config.eval.backend})...", flush=True)

    with tempfile.TemporaryDirectory(prefix="mathtune-merged-") as workdir:  # vLLM's merged model, if any

        def load() -> tuple:
            if config.eval.backend == "vllm":
                return load_vllm(model_name, config.model.dtype, config.model.revision, adapter, Path(workdir),
                                 config.eval.seed, config.eval.batch_size), None
            return (load_model(model_name, config.model.dtype, config.model.revision, adapter=adapter,
                               merge_adapter=True),
                    load_tokenizer(model_name, config.model.revision))

        scores = evaluate_problems(
            None, None, problems, out_dir, fewshot_examples=examples, model_label=model_name,
            adapter=str(adapter) if adapter else None, split=split,
            max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size, load=load,
            protocol=config.eval.protocol, backend=config.eval.backend, speedups_flags=config.speedups,
        )
    strict = scores["strict"]
    print(f"  exact match (strict): {strict['correct']}/{strict['total']} = {strict['value']:.1%} "
          f"(95% CI {strict['ci95'][0]:.1%}-{strict['ci95'][1]:.1%})", flush=True)
    return scores


def fewshot_examples(
    config: Config, dataset: data_module.Dataset, problems: list[dict], train: list[dict], shots: int,
) -> list[dict] | dict[str, list[dict]] | None:
    """The base model's worked examples: a seeded sample of the run's training problems, shared by every
    problem; under protocol lm-eval each GSM8K test problem's own, as the harness chooses them, where the
    whole GSM8K training file is there (else the seeded sample, with a note)."""
    if not shots:
        return None
    if config.eval.protocol == "lm-eval":
        chosen = harness_fewshot_examples(dataset.train, problems, shots) if dataset.is_gsm8k else None
        if chosen is not None:
            return chosen
        print("note: lm-evaluation-harness's worked examples need the whole GSM8K training file and test "
              f"problems; these get {shots} seeded ones from the run's training problems instead", flush=True)
    return choose_fewshot_examples(train, shots, config.eval.seed)


def trained_on(problem_ids: list[str], train_ids: list[str]) -> list[str]:
    """The problem ids (in order) that are among the training ids."""
    seen = set(train_ids)
    return [i for i in problem_ids if i in seen]


def refuse_training_problems(problems: list[dict], split: str, data_json: Path, train_ids: list[str]) -> None:
    """A model scored on problems it was trained on measures memory, not skill: refuse, naming them."""
    seen = trained_on([p["id"] for p in problems], train_ids)
    if seen:
        raise EvalError(
            f"{len(seen)} of the {len(problems)} {split} problems to score are among the run's training problems "
            f"(train_ids in {data_json}): {', '.join(seen[:5])}{', ...' if len(seen) > 5 else ''}. The data "
            "settings given (--data, --set data.*) split the problems differently from the run: evaluate with "
            "the run's own data settings, or on the test split."
        )


def run_training_ids(run_dir: Path) -> tuple[Path, list[str]] | None:
    """(data.json, its train_ids) of a run directory, or None where it has none."""
    record = read_json(run_dir / "data.json")
    return (run_dir / "data.json", record["train_ids"]) if record and "train_ids" in record else None


def eval_out_dir(default: Path, split: str, robustness: bool, tuned: bool) -> Path:
    """Where `mathtune eval` writes by default: the report's slots (eval/tuned, eval/robustness-tuned) for
    the test split and robustness, a directory of its own for any other split (eval/tuned-validation)."""
    if robustness:
        return default.with_name("robustness-tuned" if tuned else default.name + "-robustness")
    return default if split == "test" else default.with_name(f"{default.name}-{split}")


def run_dir_of(model: str) -> Path | None:
    """The run directory `mathtune eval --model M` names: M itself, or the run M's adapter directory is in."""
    path = Path(model)
    if (path / "adapter" / "adapter_config.json").exists():
        return path
    if path.name == "adapter" and (path / "adapter_config.json").exists() and (path.parent / "config.yaml").exists():
        return path.parent
    return None


def resolve_eval_target(model: str, config: Config) -> tuple[str, Path | None, Path]:
    """(base model, adapter or None, default output directory) for `mathtune eval --model M`."""
    path = Path(model)
    run_dir = run_dir_of(model)
    if run_dir is not None:  # config is the run's own (cli.run_config)
        return config.model.name, run_dir / "adapter", run_dir / "eval" / "tuned"
    if (path / "adapter_config.json").exists():  # an adapter directory
        return adapter_base_model(path), path, path.parent / "eval" / "tuned"
    if (path / "config.yaml").exists():
        raise ModelError(f"{path} is a run directory without a trained adapter yet: train it first, or resume it")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-")
    return model, None, Path(config.output_dir) / f"eval-{safe}"


def run(config: Config, overwrite: bool = False) -> dict:
    """Base evaluation, training, tuned evaluation and the report, in one run directory."""
    from mathtune.report.render import write_report
    from mathtune.training import RunDirError, check_run_dir, prepare_run_dir, train, write_run_record
    from mathtune.training.trackers import check_installed, log_final_accuracy

    run_dir = config.run_dir
    existing = (run_dir / "config.yaml").exists()
    if existing and not overwrite:
        saved = load_config(run_dir / "config.yaml")
        if settings(saved) != settings(config):
            raise RunDirError(
                f"{run_dir} holds a run with another configuration. Run `mathtune run {run_dir}/config.yaml` "
                "to continue it, pass --overwrite to replace it, or choose another --name."
            )
        print(f"Continuing the run in {run_dir}.", flush=True)
    # Nothing is deleted before the directory, the data, the split and the model (config, tokenizer, weights;
    # loaded when --overwrite would replace a run) have passed: even --overwrite keeps the old run on bad input.
    check_run_dir(run_dir, overwrite=overwrite, resume=not overwrite)
    check_installed(config.train.report_to)
    config.eval.check_backend_installed()
    dataset = data_module.load_dataset(config.data)
    train_problems, validation_problems = data_module.run_split(config.data, dataset)
    check_model(config.model.name, config.model.revision)
    if existing and overwrite:  # a Hub model's weights are only known to load once loaded; dropped at once
        load_model(config.model.name, config.model.dtype, config.model.revision)
    print(data_module.describe(dataset), flush=True)
    prepare_run_dir(run_dir, overwrite=overwrite, resume=existing and not overwrite)
    if overwrite or not existing:  # the record (and mathtune's marker) from the start; training rewrites it
        write_run_record(run_dir, config, dataset, train_problems, validation_problems)
    started = time.time()

    base = run_evaluation(config, dataset, run_dir / "eval" / "base", config.model.name, None, config.eval.base_shots)
    if read_json(run_dir / "train_result.json") is None:
        train(config, resume=True)
    tuned = run_evaluation(config, dataset, run_dir / "eval" / "tuned", config.model.name, run_dir / "adapter", 0)
    log_final_accuracy(config, run_dir, {"base": base, "tuned": tuned},
                       (read_json(run_dir / "train_result.json") or {}).get("steps_done", 0))
    if config.eval.robustness_size:
        for name, adapter, shots in (("base", None, config.eval.base_shots), ("tuned", run_dir / "adapter", 0)):
            run_evaluation(config, dataset, run_dir / "eval" / f"robustness-{name}", config.model.name, adapter,
                           shots, robustness=config.eval.robustness_size)
    summary = write_report(run_dir)
    print(f"Done in {(time.time() - started) / 60:.1f} min. Report: {run_dir / 'report.html'} "
          f"(also report.md, summary.json)", flush=True)
    return summary


def settings(config: Config) -> dict:
    """A config's settings apart from where its directory is (the same run may be named from another folder)."""
    return {k: v for k, v in config.to_dict().items() if k not in ("output_dir", "name")}
