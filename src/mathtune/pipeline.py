"""The `mathtune run` recipe, top to bottom: evaluate the base model, train, evaluate the tuned model, report.

Each stage leaves its files in the run directory and is skipped when they are already complete,
so running the same command again on a run that died continues where it stopped.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from mathtune import data as data_module
from mathtune import synthetic
from mathtune.config import Config, load_config
from mathtune.evaluate import choose_fewshot_examples, evaluate_problems
from mathtune.models import (
    ModelError, adapter_base_model, check_model, load_model, load_tokenizer,
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
    adapter: Path | None, shots: int, robustness: int = 0,
) -> dict:
    """Evaluate on the configured problems, or with robustness=N on N fresh generated problems instead."""
    problems, train = evaluation_problems(config, dataset)
    split = config.eval.split
    if robustness:
        split = f"synthetic-{robustness_seed(config)}"
        problems = synthetic.generate(robustness, robustness_seed(config))
    examples = choose_fewshot_examples(train, shots, config.eval.seed) if shots else None
    kind = f"{model_name} + adapter {adapter}" if adapter else model_name
    print(f"Evaluating {kind} on {len(problems)} {split} problems "
          f"({shots}-shot, greedy, up to {config.eval.max_new_tokens} new tokens)...", flush=True)
    model = load_model(model_name, config.model.dtype, config.model.revision, adapter=adapter)
    tokenizer = load_tokenizer(model_name, config.model.revision)
    scores = evaluate_problems(
        model, tokenizer, problems, out_dir, fewshot_examples=examples, model_label=model_name,
        adapter=str(adapter) if adapter else None, split=split,
        max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
    )
    strict = scores["strict"]
    print(f"  exact match (strict): {strict['correct']}/{strict['total']} = {strict['value']:.1%} "
          f"(95% CI {strict['ci95'][0]:.1%}-{strict['ci95'][1]:.1%})", flush=True)
    return scores


def resolve_eval_target(model: str, config: Config) -> tuple[str, Path | None, Path]:
    """(base model, adapter or None, default output directory) for `mathtune eval --model M`."""
    path = Path(model)
    if (path / "adapter" / "adapter_config.json").exists():  # a run directory
        run_config = load_config(path / "config.yaml")
        return run_config.model.name, path / "adapter", path / "eval" / "tuned"
    if (path / "adapter_config.json").exists():  # an adapter directory
        return adapter_base_model(path), path, path.parent / "eval" / "tuned"
    if (path / "config.yaml").exists():
        raise ModelError(f"{path} is a run directory without a trained adapter yet: train it first, or resume it")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-")
    return model, None, Path(config.output_dir) / f"eval-{safe}"


def run(config: Config, overwrite: bool = False) -> dict:
    """Base evaluation, training, tuned evaluation and the report, in one run directory."""
    from mathtune.report.render import write_report
    from mathtune.training import RunDirError, prepare_run_dir, train

    run_dir = config.run_dir
    existing = (run_dir / "config.yaml").exists()
    if existing and not overwrite:
        saved = load_config(run_dir / "config.yaml")
        if saved.to_dict() != config.to_dict():
            raise RunDirError(
                f"{run_dir} holds a run with another configuration. Run `mathtune run {run_dir}/config.yaml` "
                "to continue it, pass --overwrite to replace it, or choose another --name."
            )
        print(f"Continuing the run in {run_dir}.", flush=True)
    # bad data or a model that cannot be found fail before the run directory is touched (or --overwrite empties it)
    dataset = data_module.load_dataset(config.data)
    check_model(config.model.name, config.model.revision)
    print(data_module.describe(dataset), flush=True)
    prepare_run_dir(run_dir, overwrite=overwrite, resume=existing and not overwrite)
    started = time.time()

    run_evaluation(config, dataset, run_dir / "eval" / "base", config.model.name, None, config.eval.shots)
    if read_json(run_dir / "train_result.json") is None:
        train(config, resume=True)
    run_evaluation(config, dataset, run_dir / "eval" / "tuned", config.model.name, run_dir / "adapter", 0)
    if config.eval.robustness_size:
        for name, adapter, shots in (("base", None, config.eval.shots), ("tuned", run_dir / "adapter", 0)):
            run_evaluation(config, dataset, run_dir / "eval" / f"robustness-{name}", config.model.name, adapter,
                           shots, robustness=config.eval.robustness_size)
    summary = write_report(run_dir)
    print(f"Done in {(time.time() - started) / 60:.1f} min. Report: {run_dir / 'report.html'} "
          f"(also report.md, summary.json)", flush=True)
    return summary
