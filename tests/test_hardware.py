"""The CPU kind printed beside every speed figure, from hand-made /proc/cpuinfo texts."""

from mathtune.hardware import cpu_facts, cpu_kind

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni
processor\t: 1
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni
"""


def test_cpu_facts_reads_the_first_model_name_and_flags():
    model, flags = cpu_facts(CPUINFO)
    assert model == "AMD EPYC 9R14 96-Core Processor"
    assert flags == {"fpu", "sse2", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"}


def test_cpu_facts_names_the_family_and_model_numbers_where_given():
    numbered = CPUINFO.replace("vendor_id\t: AuthenticAMD\n", "vendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n", 1)
    model, flags = cpu_facts(numbered)
    assert model == "AMD EPYC 9R14 96-Core Processor (family 26, model 2)"
    assert "avx512_bf16" in flags


def test_cpu_facts_of_a_text_without_them_is_empty():
    assert cpu_facts("processor\t: 0\n") == ("", set())


def test_each_kind_of_cpu_is_named_by_what_its_products_run_on():
    assert cpu_kind("Xeon", {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}) == (
        "Xeon, AMX (bfloat16); flags: avx2 avx512f avx512_bf16 amx_bf16 amx_tile")
    assert cpu_kind("EPYC", {"avx2", "avx512f", "avx512_bf16"}) == (
        "EPYC, AVX-512 BF16, no AMX (bfloat16); flags: avx2 avx512f avx512_bf16")
    assert cpu_kind("EPYC", {"avx2", "fma"}) == "EPYC, AVX2, no AVX-512 (float32); flags: avx2"
    assert cpu_kind("Old", {"avx512f", "avx2"}) == "Old, AVX-512 without BF16 (float32); flags: avx2 avx512f"
    assert cpu_kind("Arm", set()).startswith("Arm, no AVX2 (float32); flags: none of avx2")


def test_a_limit_on_onednn_names_the_code_path_it_leaves():
    amx = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert cpu_kind("Xeon", amx, "avx512_core_bf16") == (
        "Xeon, AVX-512 BF16, no AMX (bfloat16); flags: avx2 avx512f avx512_bf16; "
        "oneDNN limited to AVX512_CORE_BF16 (ONEDNN_MAX_CPU_ISA)")
    assert cpu_kind("Xeon", amx, "AVX2").startswith("Xeon, AVX2, no AVX-512 (float32); flags: avx2;")
    assert cpu_kind("Xeon", amx, "AVX512_CORE_AMX") == cpu_kind("Xeon", amx) + (
        "; oneDNN limited to AVX512_CORE_AMX (ONEDNN_MAX_CPU_ISA)")
