import pytest

from mathtune.config import ConfigError, load_config


def test_reference_preset_matches_the_reference_run():
    config = load_config("gemma-2b-gsm8k")
    assert config.model.name == "google/gemma-2b"
    assert (config.lora.r, config.lora.alpha, config.lora.dropout, config.lora.bias) == (8, 16, 0.1, "none")
    assert (config.train.epochs, config.train.learning_rate) == (3, 2e-4)
    assert config.train.gradient_accumulation_steps == 1
    assert config.train.early_stopping_patience == 5
    assert config.train.early_stopping_metric == "eval_loss"
    assert config.data.validation_fraction == 0.1
    assert config.data.hub_id == "openai/gsm8k" and config.data.hub_config == "main"


def test_every_preset_loads():
    for name in ("cpu-demo", "gemma-2b-gsm8k", "gemma-3-270m-gsm8k", "tiny"):
        assert load_config(name).name == name


def test_the_full_gsm8k_preset_trains_on_the_whole_split_and_scores_the_whole_test_set():
    config = load_config("gemma-3-270m-gsm8k")
    assert config.model.name == "gemma-3-270m" and config.data.source == "gsm8k"
    assert config.data.train_limit is None and config.data.validation_fraction == 0.1  # 6,725 / 748
    assert config.train.epochs == 1 and config.train.max_steps == -1
    assert config.train.early_stopping_patience and config.train.early_stopping_metric == "eval_loss"
    assert config.eval.split == "test" and config.eval.limit is None
    assert (config.eval.shots, config.eval.robustness_size) == (8, 200)
    assert config.eval.generate_every >= 1 and config.eval.generate_subset > 0


def test_overrides_are_typed_and_applied():
    config = load_config("tiny", ["train.epochs=2", "lora.target_modules=[q_proj]", "train.learning_rate=1e-3"])
    assert config.train.epochs == 2.0
    assert config.lora.target_modules == ["q_proj"]
    assert config.train.learning_rate == pytest.approx(1e-3)


def test_unknown_key_names_the_key_and_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown key 'train.learnig_rate'.*did you mean 'learning_rate'"):
        load_config("tiny", ["train.learnig_rate=0.1"])


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*'train'"):
        load_config("tiny", ["trian.epochs=1"])


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=-0.1", "train.learning_rate must be a positive number"),
    ("lora.r=0", "lora.r must be a positive number"),
    ("lora.dropout=1.0", r"lora.dropout must be in \[0, 1\)"),
    ("data.validation_fraction=0", r"data.validation_fraction must be in \(0, 1\)"),
    ("train.batch_size=two", "train.batch_size must be of type int"),
    ("model.dtype=float33", "did you mean .float32."),
    ("report.examples_per_group=-1", r"report.examples_per_group must be >= 0"),
    ("report.examples_per_group=2.5", "report.examples_per_group must be of type int"),
])
def test_impossible_values_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_unknown_preset_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'cpu-demo'"):
        load_config("cpu-dem")


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora:\n  alpah: 8\n")
    with pytest.raises(ConfigError, match=rf"{path}.*unknown key 'lora.alpah'.*did you mean 'alpha'"):
        load_config(str(path))


def test_report_settings_default_and_override():
    assert (load_config("tiny").report.examples_per_group, load_config("tiny").report.examples_seed) == (3, 0)
    config = load_config("tiny", ["report.examples_per_group=0", "report.examples_seed=9"])
    assert (config.report.examples_per_group, config.report.examples_seed) == (0, 9)


def test_eval_protocol_defaults_to_mathtune_and_lm_eval_means_five_shots():
    config = load_config("tiny")
    assert config.eval.protocol == "mathtune" and config.eval.base_shots == config.eval.shots == 1
    config = load_config("tiny", ["eval.protocol=lm-eval", "eval.shots=3"])
    assert config.eval.protocol == "lm-eval" and config.eval.base_shots == 5  # eval.shots is not used


@pytest.mark.parametrize("value, message", [
    ("lm_eval", r"eval.protocol must be one of \['mathtune', 'lm-eval'\], got 'lm_eval' \(did you mean 'lm-eval'\?\)"),
    ("harness", r"eval.protocol must be one of \['mathtune', 'lm-eval'\], got 'harness'"),
    ("5", "eval.protocol must be of type str, got 5"),
])
def test_an_unknown_protocol_is_refused_naming_the_key_and_the_choices(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [f"eval.protocol={value}"])


def test_the_protocol_is_set_from_the_command_line(capsys):
    from mathtune.cli import build_parser, config_from_args, main

    args = build_parser().parse_args(["eval", "--preset", "tiny", "--model", "m", "--set", "eval.protocol=lm-eval"])
    assert config_from_args(args).eval.protocol == "lm-eval"
    assert main(["eval", "--preset", "tiny", "--model", "m", "--set", "eval.protocol=lmeval"]) == 2
    assert "eval.protocol must be one of" in capsys.readouterr().err


def test_the_vllm_backend_needs_vllm_and_is_named_in_the_error(vllm_installed, capsys, tmp_path):
    from mathtune.cli import main

    assert load_config("tiny").eval.backend == "mathtune"
    with pytest.raises(ConfigError, match=r"eval.backend must be one of \['mathtune', 'vllm'\], got 'vlm' "
                                          r"\(did you mean 'vllm'\?\)"):
        load_config("tiny", ["eval.backend=vlm"])
    vllm_installed(False)
    config = load_config("tiny", ["eval.backend=vllm"])  # a run made with vLLM elsewhere still loads
    with pytest.raises(ConfigError, match="eval.backend is vllm, but the vllm package is not installed"):
        config.eval.check_backend_installed()
    load_config("tiny").eval.check_backend_installed()
    out = tmp_path / "eval"
    assert main(["eval", "--preset", "tiny", "--model", "m", "--backend", "vllm", "--out", str(out)]) == 2
    assert "use eval.backend: mathtune" in capsys.readouterr().err and not out.exists()
    assert main(["run", "--preset", "tiny", "--set", "eval.backend=vllm", "--output-dir", str(tmp_path)]) == 2
    assert "use eval.backend: mathtune" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
    vllm_installed(True)
    load_config("tiny", ["eval.backend=vllm"]).eval.check_backend_installed()
