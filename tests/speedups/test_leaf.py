"""mathtune.speedups is a leaf package reached through speedups.apply: it imports nothing else from mathtune, and
apply patches exactly what its flags allow, reporting the patches it ran."""

import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mathtune
from mathtune import speedups
from mathtune.models import TINY_RANDOM, load_model

PACKAGE = Path(speedups.__file__).resolve().parent
FLAG_NAMES = [field.name for field in dataclasses.fields(speedups.Flags) if field.name not in speedups.GENERATION_ONLY]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def inside_speedups(module: str) -> bool:
    return module == "mathtune.speedups" or module.startswith("mathtune.speedups.")


def imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, module) for every import in the tree, function-local ones included; relative imports resolved
    against `package`, and `from a import b` read as a.b where a is a package of mathtune (b may be a module)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            if base in ("mathtune", "mathtune.speedups"):
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def test_the_import_reader_sees_every_kind_of_import():
    source = ("import mathtune.models\nfrom mathtune import config\nfrom .. import data\nfrom ..report import render\n"
              "from . import memory\ndef f():\n    from mathtune.speedups.lm_loss import head_weight\n"
              "    importlib.import_module('mathtune.pipeline')\n")
    modules = [module for _, module in imported_modules(ast.parse(source), "mathtune.speedups")]
    assert modules == ["mathtune.models", "mathtune.config", "mathtune.data", "mathtune.report",
                       "mathtune.speedups.memory", "mathtune.speedups.lm_loss", "mathtune.pipeline"]
    assert [inside_speedups(m) for m in modules] == [False] * 4 + [True, True, False]


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_no_speedups_module_imports_the_rest_of_mathtune(path):
    outside = [(line, module) for line, module in imported_modules(ast.parse(path.read_text()), "mathtune.speedups")
               if module.split(".")[0] == "mathtune" and not inside_speedups(module)]
    assert outside == [], f"{path.name} imports from mathtune outside mathtune.speedups: {outside}"


def test_importing_speedups_and_all_its_modules_loads_nothing_else_of_mathtune():
    probe = ("import pkgutil, sys, importlib, mathtune.speedups as s\n"
             "for info in pkgutil.iter_modules(s.__path__):\n    importlib.import_module(f'mathtune.speedups.{info.name}')\n"
             "print('\\n'.join(sorted(m for m in sys.modules if m == 'mathtune' or m.startswith('mathtune.'))))")
    source_root = str(Path(mathtune.__file__).resolve().parents[1])  # the mathtune these tests import
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    assert "mathtune.speedups.lm_loss" in loaded  # the probe did import the modules
    for elsewhere in ("mathtune.models", "mathtune.data", "mathtune.config"):
        assert elsewhere not in loaded
    assert [m for m in loaded if m != "mathtune" and not inside_speedups(m)] == []


def lora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(TINY_RANDOM, "float32"), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS, task_type="CAUSAL_LM"))
    return model.train()


def layout(model) -> tuple:
    """What a patch changes: each module's class and instance attributes (a patched forward, a compact weight,
    a replaced dropout), and the attention implementation."""
    modules = [(name, type(m), tuple(sorted(vars(m)))) for name, m in model.named_modules()]
    return modules, model.get_base_model().config._attn_implementation


def outputs(model, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    ids = torch.randint(5, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def expected_counts(model) -> dict[str, int]:
    """How many modules each patch changes in the tiny random model wrapped by PEFT, on a CPU."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    modules = list(model.modules())
    return {
        "packed_attention": 1,
        "loss_head": 1,
        "uniform_dropout": sum(type(d) is torch.nn.Dropout for m in modules if type(m) is LoraLinear
                               for d in m.lora_dropout.values()),
        "fused_lora": sum(type(m) is LoraLinear for m in modules),
        "gated_mlp": sum(type(m).__name__ == "Gemma3MLP" for m in modules),
        "compact_weights": 0,  # random float32 weights are neither int8 blocks nor bfloat16 numbers
        "rms_norm": sum(type(m).__name__ == "Gemma3RMSNorm" for m in modules),
    }


def test_apply_with_every_flag_off_changes_nothing():
    model = lora_model()
    before, logits = layout(model), outputs(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert speedups.apply(model.train(), speedups.Flags(**dict.fromkeys(FLAG_NAMES, False))) == {}
    assert layout(model) == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(outputs(model), logits)


@pytest.mark.parametrize("flag", FLAG_NAMES)
def test_apply_with_one_flag_on_runs_that_patch_only(flag):
    model = lora_model()
    expected = expected_counts(model)[flag]
    assert expected > 0 or flag == "compact_weights"
    before = layout(model)
    only = speedups.Flags(**{name: name == flag for name in FLAG_NAMES})
    assert speedups.apply(model, only) == {flag: expected}
    assert (layout(model) != before) == (expected > 0)


def test_apply_with_every_flag_on_reports_each_patch_on_a_cpu():
    model = lora_model()
    expected = expected_counts(model)
    assert speedups.apply(model, speedups.Flags()) == expected
    assert set(expected) == set(FLAG_NAMES)
    assert torch.isfinite(outputs(model)).all()  # the patched model still runs


def test_a_patch_that_does_not_apply_is_left_out_of_the_report():
    model = lora_model()
    model.get_base_model().get_output_embeddings().weight.requires_grad_(True)  # a trained head: not the loss head's
    assert set(speedups.apply(model, speedups.Flags())) == set(FLAG_NAMES) - {"loss_head"}


def test_off_the_cpu_only_the_device_independent_patches_run():
    model = lora_model().to("meta")
    assert set(speedups.apply(model, speedups.Flags())) == set(FLAG_NAMES) - set(speedups.CPU_ONLY)
