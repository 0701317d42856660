"""`mathtune`: train, evaluate and report on a GSM8K LoRA fine-tune from one command line."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from mathtune.config import DEFAULT_PRESET, EVAL_BACKENDS, ConfigError, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="a YAML config file (or use --preset)")
    parser.add_argument("--preset", help=f"a preset shipped with mathtune (mathtune/presets/) (default {DEFAULT_PRESET})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.epochs=1 (repeatable)")
    parser.add_argument("--data", help="GSM8K directory with train.jsonl and test.jsonl, or 'synthetic' "
                        "(default: $MATHTUNE_DATA, else the Hub)")
    parser.add_argument("--skip-invalid", action="store_true", help="drop invalid records instead of failing")
    parser.add_argument("--name", help="run name (the run directory is OUTPUT_DIR/NAME)")
    parser.add_argument("--output-dir", help="where run directories go (default runs/)")


def config_from_args(args: argparse.Namespace):
    if args.config and args.preset:
        raise ConfigError("give either a config file or --preset, not both")
    overrides = command_line_overrides(args)
    if args.name:
        overrides.append(f"name={args.name}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config or args.preset, overrides)


def command_line_overrides(args: argparse.Namespace) -> list[str]:
    """--set, --data and --skip-invalid as `--set` overrides, in that order."""
    overrides = list(args.overrides)
    if args.data == "synthetic":
        overrides.append("data.source=synthetic")
    elif args.data:
        overrides.append(f"data.path={args.data}")
    if args.skip_invalid:
        overrides.append("data.skip_invalid=true")
    return overrides


def run_config(run_dir: Path, args: argparse.Namespace):
    """The config saved in run_dir with the command line's overrides on top, naming run_dir as its directory
    (the saved output_dir and name are relative to wherever the run was started)."""
    moved = [flag for flag, value in (("--name", args.name), ("--output-dir", args.output_dir)) if value]
    if moved:
        raise ConfigError(f"{run_dir} is the run's directory: drop {' and '.join(moved)}")
    if args.config or args.preset:
        print(f"note: {args.config or '--preset ' + args.preset} is not used: the settings of a run come from "
              f"{run_dir / 'config.yaml'} (change one with --set section.key=value)", file=sys.stderr)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir} has no config.yaml, so it is not a run directory: give the directory of a run")
    config = load_config(run_dir / "config.yaml", command_line_overrides(args))
    if config.run_dir.resolve() != run_dir.resolve():
        located = run_dir if run_dir.name not in ("", ".", "..") else run_dir.resolve()
        config.output_dir, config.name = str(located.parent), located.name
        config.check()
    return config


def cmd_train(args: argparse.Namespace) -> None:
    from mathtune.training import train

    if args.resume:
        train(run_config(Path(args.resume), args), resume=True, merge=args.merge)
    else:
        train(config_from_args(args), overwrite=args.overwrite, merge=args.merge)


def cmd_eval(args: argparse.Namespace) -> None:
    from mathtune import data as data_module
    from mathtune.pipeline import eval_out_dir, resolve_eval_target, run_dir_of, run_evaluation, run_training_ids

    run_dir = run_dir_of(args.model)
    config = run_config(run_dir, args) if run_dir else config_from_args(args)
    base, adapter, default_out = resolve_eval_target(args.model, config)
    if args.name and run_dir is None:  # --name names this evaluation's directory under --output-dir
        if adapter is not None:
            raise ConfigError(f"--name {args.name}: an adapter's evaluation goes beside it, in "
                              f"{default_out}; write it elsewhere with --out DIR")
        default_out = config.run_dir
    if args.split:
        config.eval.split = args.split
    if args.limit is not None:
        config.eval.limit = args.limit
    if args.max_new_tokens is not None:
        config.eval.max_new_tokens = args.max_new_tokens
    if args.backend:
        config.eval.backend = args.backend
    if args.robustness is not None:
        config.eval.robustness_size = args.robustness or config.eval.robustness_size or 50
    config.eval.check()
    config.eval.check_backend_installed()
    shots = 0 if adapter else (config.eval.base_shots if args.shots is None else args.shots)
    dataset = data_module.load_dataset(config.data)
    print(data_module.describe(dataset), flush=True)
    robustness = args.robustness is not None
    out = Path(args.out) if args.out else eval_out_dir(default_out, config.eval.split, robustness, adapter is not None)
    run_evaluation(config, dataset, out, base, adapter, shots,
                   robustness=config.eval.robustness_size if robustness else 0,
                   training_ids=run_training_ids(run_dir) if run_dir else None)
    print(f"Predictions and scores: {out}/predictions.jsonl, {out}/scores.json")


def cmd_run(args: argparse.Namespace) -> None:
    from mathtune.pipeline import run

    run(config_from_args(args), overwrite=args.overwrite)


def cmd_report(args: argparse.Namespace) -> None:
    from mathtune.report.render import publish_report, write_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory")
    if args.publish:
        _, copied = publish_report(run_dir, Path(args.publish))
        print(f"Published copy: {Path(args.publish) / 'report.html'} (also report.md, summary.json, plots/, "
              f"{', '.join(copied) or 'no run records'}); data-set text and generations left out")
        return
    write_report(run_dir)
    print(f"Report: {run_dir / 'report.html'} (also report.md, summary.json)")


def cmd_compare(args: argparse.Namespace) -> None:
    from mathtune.report.compare import default_html_path, markdown_table, write_compare_html

    run_dirs = [Path(d) for d in args.run_dirs]
    html = Path(args.html) if args.html else default_html_path(run_dirs)
    runs = write_compare_html(run_dirs, html)
    print(markdown_table(runs))
    print(f"\nSide by side, with the config differences and the loss curves: {html}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mathtune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a LoRA adapter")
    add_config_arguments(train)
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in the run directory")
    train.add_argument("--merge", action="store_true", help="also save the base model with the adapter merged")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="exact-match accuracy on GSM8K problems")
    add_config_arguments(evaluate)
    evaluate.add_argument("--model", required=True,
                          help="a run directory, an adapter directory, a Hub id, a local path, or gemma-3-270m")
    evaluate.add_argument("--split", choices=["test", "validation"], help="default: test")
    evaluate.add_argument("--limit", type=int, help="a fixed, seeded subset of N problems (same for every model)")
    evaluate.add_argument("--shots", type=int, help="worked examples for a base model (a tuned model gets none; "
                          "default eval.shots, under --set eval.protocol=lm-eval 5)")
    evaluate.add_argument("--max-new-tokens", type=int)
    evaluate.add_argument("--backend", choices=list(EVAL_BACKENDS),
                          help="what generates: mathtune's decoder (default, any device) or vLLM where it is installed")
    evaluate.add_argument("--robustness", type=int, nargs="?", const=0, metavar="N",
                          help="evaluate on N fresh generated problems (seeds never trained on) instead; "
                          "N defaults to eval.robustness_size, else 50")
    evaluate.add_argument("--out", help="output directory (default: RUN_DIR/eval/tuned, or runs/eval-MODEL)")
    evaluate.set_defaults(func=cmd_eval)

    run = commands.add_parser("run", help="evaluate the base model, train, evaluate the tuned model, report")
    add_config_arguments(run)
    run.add_argument("--overwrite", action="store_true", help="replace a run already in the run directory")
    run.set_defaults(func=cmd_run)

    report = commands.add_parser("report", help="(re)write the report of a run directory")
    report.add_argument("run_dir")
    report.add_argument("--publish", metavar="DEST", help="write a copy to share into DEST instead: the report "
                        "without data-set text or generations, and the run's small records (no weights, no predictions)")
    report.set_defaults(func=cmd_report)

    compare = commands.add_parser("compare", help="several runs side by side: a table, and an HTML page")
    compare.add_argument("run_dirs", nargs="+")
    compare.add_argument("--html", metavar="PATH", help="where the HTML page goes (default: compare.html in the "
                         "folder that holds the runs, e.g. runs/compare.html)")
    compare.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mathtune.speedups import apply_process_settings

    apply_process_settings()  # before any model loads: `mathtune run` evaluates the base model before training
    try:
        args.func(args)
    except (ConfigError, ValueError, RuntimeError, FileNotFoundError) as exc:
        if isinstance(exc, (ValueError, RuntimeError)) and not _is_ours(exc):
            raise
        print(f"mathtune: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        print(f"mathtune: error: the disk is full ({exc}). Free some space, then continue: what was written so far "
              "is kept (`mathtune run` picks up where it stopped; `mathtune train --resume RUN_DIR`).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmathtune: interrupted; what was written so far is kept (resume with --resume RUN_DIR)",
              file=sys.stderr)
        return 130
    return 0


def _is_ours(exc: Exception) -> bool:
    return type(exc).__module__.startswith("mathtune")
