"""Where evaluation time goes: `mathtune eval`'s decoding of N GSM8K problems, timed by stage.

The packaged Gemma 3 270M, greedy, 8-shot, the seeded test problems `mathtune eval` picks. Wall
time of each stage of mathtune.generation (the shared prefix, prefills of joining problems, decoding
steps and, inside them, the LM head's argmax; slot moves; the stop checks' text decoding), then a
torch profile of one full decoding step split into matrix products, attention and the rest.

    MATHTUNE_DATA=../shared/data/gsm8k PYTHONPATH=src .venv/bin/python bench/profile_eval.py --n 256
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mathtune import data as data_module
from mathtune import speedups
from mathtune.speedups import onednn_attention
from mathtune.config import load_config
from mathtune.data import fewshot_prompt
from mathtune.evaluate import choose_fewshot_examples, generate_answers
from mathtune.generation import decode
from mathtune.generation.head import CHUNK_ROWS, GreedyHead
from mathtune.models import PACKAGED_GEMMA, load_model, load_tokenizer
from mathtune.pipeline import evaluation_problems

SECONDS: collections.Counter = collections.Counter()
CALLS: collections.Counter = collections.Counter()


def timed(name, function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        SECONDS[name] += time.perf_counter() - start
        CALLS[name] += 1
        return result
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-new-tokens", type=int, help="default: the cpu-demo preset's (make bench-eval: 256)")
    parser.add_argument("--head-only", action="store_true", help="only the head's side-by-side")
    parser.add_argument("--compare-heads", action="store_true",
                        help="decode the N problems with the head as it is and with 65,536-row slices (max with "
                             "positions), alternating new, old, new, and print each run's time")
    parser.add_argument("--compare-bands", action="store_true",
                        help="decode the N problems with rows in bands (each attending to its keys up to its own "
                             "longest row) and as one band: one decoding step in three states, alternating, then whole "
                             "decodes, bands, one band, bands")
    parser.add_argument("--compare-attention", action="store_true",
                        help="decode the N problems with attention from oneDNN's float32-result products and with "
                             "torch's flash kernel, alternating oneDNN, flash, oneDNN")
    args = parser.parse_args()
    overrides = [f"eval.limit={args.n}", f"eval.shots={args.shots}"]
    if args.max_new_tokens:
        overrides.append(f"eval.max_new_tokens={args.max_new_tokens}")
    config = load_config("cpu-demo", overrides)
    dataset = data_module.load_dataset(config.data)
    if not dataset.is_gsm8k:
        raise SystemExit("profile_eval measures GSM8K test problems: point MATHTUNE_DATA at the GSM8K files")
    problems, train = evaluation_problems(config, dataset)
    examples = choose_fewshot_examples(train, args.shots, config.eval.seed)
    prompts = [fewshot_prompt(p["question"], examples) for p in problems]
    model, tokenizer = load_model(PACKAGED_GEMMA), load_tokenizer(PACKAGED_GEMMA)
    if args.head_only:
        head_side_by_side(model, args.batch_size or decode.SLOTS_CAP[model.device.type])
        return
    if args.compare_heads:
        compare_heads(model, tokenizer, prompts, config.eval.max_new_tokens, args.batch_size)
        return
    if args.compare_attention:
        compare_attention(model, tokenizer, prompts, config.eval.max_new_tokens, args.batch_size)
        return
    if args.compare_bands:
        bands_side_by_side(model, tokenizer, prompts, args.batch_size or decode.SLOTS_CAP[model.device.type])
        compare_bands(model, tokenizer, prompts, config.eval.max_new_tokens, args.batch_size)
        return
    list(generate_answers(model, tokenizer, prompts[:2], 4, progress=False))  # warm-up

    forward = decode._forward

    def stage(model, kv, first, start, inputs, head=None, bands=None, attention=None):
        name = ("shared prefix" if kv.prefix_len == 0 and len(kv.layers[0].k) == 1
                else "prefill of joining problems" if max(map(len, inputs)) > 1 else "decoding steps")
        return timed(name, forward)(model, kv, first, start, inputs, head, bands, attention)

    decode._forward = stage
    decode.GreedyHead.__call__ = timed("  of which the LM head's argmax", decode.GreedyHead.__call__)
    decode._close_holes = timed("moving rows into freed slots", decode._close_holes)
    tokenizer.decode = timed("stop checks and final texts (text decoding)", tokenizer.decode)
    start, generated = time.perf_counter(), 0
    for _, _, n_tokens in generate_answers(model, tokenizer, prompts, config.eval.max_new_tokens, args.batch_size,
                                           progress=False):
        generated += n_tokens
    elapsed = time.perf_counter() - start
    print(f"{len(prompts)} problems, {args.shots}-shot, {model.dtype}: {elapsed:.1f} s, "
          f"{len(prompts) / elapsed:.2f} problems/s, {generated / len(prompts):.0f} generated tokens a problem")
    print("| stage | seconds | share | calls | ms a call |\n|---|---|---|---|---|")
    for name in SECONDS:
        print(f"| {name} | {SECONDS[name]:.1f} | {SECONDS[name] / elapsed:.0%} | {CALLS[name]} | "
              f"{SECONDS[name] / CALLS[name] * 1000:.1f} |")
    print(f"| the rest (tokenizing, scheduling, Python) | "
          f"{elapsed - sum(v for k, v in SECONDS.items() if not k.startswith(' ')):.1f} | | | |")
    decode._forward = forward
    head_side_by_side(model, args.batch_size or decode.SLOTS_CAP[model.device.type])
    step_profile(model, tokenizer, prompts, args.batch_size or decode.SLOTS_CAP[model.device.type])


class WideHead(GreedyHead):
    """The head as it ran before 801470d: 65,536-row slices, each slice's max and position at once."""

    def __init__(self, weight, rows=1, chunk_rows=None):
        super().__init__(weight, rows, 65536)
        self.select_rows = False


def head_side_by_side(model, rows: int, repeats: int = 5) -> None:
    """The head's argmax over `rows` hidden states, alternating on the same inputs: as decoding runs it,
    with plain products (the weight not reordered), and with 65,536-row slices whose max and position
    are taken at once (the way before 8,192-row slices and positions looked up only where a slice
    raises a row's best)."""
    weight = model.get_output_embeddings().weight
    hidden = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    current, plain, wide = GreedyHead(weight, rows), GreedyHead(weight, rows), WideHead(weight, rows)
    plain.packed = False
    chunk = CHUNK_ROWS[weight.device.type]
    plain.slices = [(first, weight[first : first + chunk]) for first in range(0, weight.shape[0], chunk)]
    heads = {"as decoding runs it": current, "plain products": plain, "65,536-row slices, max with positions": wide}
    seconds, ids = collections.Counter(), {}
    for _ in range(repeats):
        for name, head in heads.items():
            start = time.perf_counter()
            ids[name] = head(hidden).tolist()
            seconds[name] += time.perf_counter() - start
    mine = seconds["as decoding runs it"]
    print(f"the LM head's argmax, {rows} rows (weight reordered: {current.packed}): "
          + ", ".join(f"{name} {seconds[name] / repeats * 1000:.1f} ms (x{seconds[name] / mine:.2f})" for name in heads)
          + f"; same ids: {all(v == ids['as decoding runs it'] for v in ids.values())}")


def alternate_decodes(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int | None,
                      ways: dict, order: tuple[str, ...]) -> None:
    """Whole decodes of the same prompts, one way after another in `order` (`ways[name]()` sets a way
    up and may return the speedups.Flags to decode with), in one process: the host's speed drifts, so
    only neighbouring runs compare. Prints each run's
    time, the ratio of the second way's mean time to the first's, and how many texts the two share (in
    bfloat16 a way can round a near-tie differently, so the tokens generated may differ a little:
    tokens/s is printed beside problems/s)."""
    list(generate_answers(model, tokenizer, prompts[:2], 4, progress=False))  # warm-up
    seconds, texts = collections.defaultdict(list), collections.defaultdict(dict)
    for name in order:
        flags = ways[name]() or speedups.Flags()
        start, generated = time.perf_counter(), 0
        for i, text, n_tokens in generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size,
                                                  progress=False, speedups_flags=flags):
            texts[name][i] = text
            generated += n_tokens
        elapsed = time.perf_counter() - start
        seconds[name].append(elapsed)
        print(f"{name}: {len(prompts)} problems in {elapsed:.1f} s, {len(prompts) / elapsed:.2f} problems/s, "
              f"{generated / elapsed:.1f} generated tokens/s", flush=True)
    first, second = order[0], order[1]
    ratio = (sum(seconds[second]) / len(seconds[second])) / (sum(seconds[first]) / len(seconds[first]))
    same = sum(texts[first][i] == texts[second][i] for i in texts[first])
    print(f"ratio ({second}'s mean time over {first}'s): {ratio:.2f}; same texts: {same}/{len(prompts)}")


def compare_heads(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int | None) -> None:
    """The head as it is and the wide-slice one (see head_side_by_side), alternating new, old, new."""
    ways = {"8,192-row slices": lambda: setattr(decode, "GreedyHead", GreedyHead),
            "65,536-row slices": lambda: setattr(decode, "GreedyHead", WideHead)}
    try:
        alternate_decodes(model, tokenizer, prompts, max_new_tokens, batch_size, ways,
                          ("8,192-row slices", "65,536-row slices", "8,192-row slices"))
    finally:
        decode.GreedyHead = GreedyHead


def compare_attention(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int | None) -> None:
    """Decoding's attention from oneDNN's float32-result products (speedups.onednn_attention) and torch's
    flash kernel: whole decodes alternating oneDNN, flash, oneDNN."""
    if speedups.decoding_attention(model) is None:
        raise SystemExit(f"oneDNN attention does not run here ({model.dtype}; "
                         f"{onednn_attention.why_unavailable() or 'see speedups.decoding_attention'})")
    ways = {"oneDNN": lambda: speedups.Flags(), "flash": lambda: speedups.Flags(onednn_attention=False)}
    alternate_decodes(model, tokenizer, prompts, max_new_tokens, batch_size, ways, ("oneDNN", "flash", "oneDNN"))


def bands_side_by_side(model, tokenizer, prompts: list[str], rows: int, repeats: int = 6) -> None:
    """One decoding step with the rows in bands and as one band, alternating `repeats` times on the same
    cache, in three states: the N problems all started together (as `make bench-eval`'s 200 do), 50 and
    150 tokens in; and a full batch in steady state, where groups of rows that joined 30 steps apart
    share the slots (as on the whole test set). Prints the keys read per layer, the median step and its
    own-keys attention, and the ratios."""
    import random
    import statistics

    from mathtune.generation import shared_prefix
    from mathtune.generation.shared_prefix import SlotKV

    ids = tokenizer(prompts)["input_ids"]
    prefix_len = decode.common_prefix_length(ids)
    lengths = sorted(len(x) - prefix_len for x in ids)
    together = lengths[:rows]
    overhead = decode.BAND_OVERHEAD[model.device.type]
    states = {f"{len(together)} rows started together, {t} tokens in":
              ([n + t for n in together], decode.split_bands(together, overhead)) for t in (50, 150)}
    def longest(starts: list[int], sizes: list[int]) -> list[int]:
        """Each band's longest row."""
        ends = [sum(sizes[: k + 1]) for k in range(len(sizes))]
        return [max(starts[end - size : end]) for size, end in zip(sizes, ends)]

    sampler, starts, sizes = random.Random(0), [], []
    cohorts = max(1, rows // 32)
    for cohort in range(cohorts):  # the oldest group first, as decoding keeps them
        joined = sorted(sampler.sample(lengths, min(32, len(lengths))))
        starts += [n + 30 * (cohorts - 1 - cohort) for n in joined]
        sizes += decode.split_bands(joined, overhead)
    steady = decode.merge_bands(sizes, longest(starts, sizes), overhead)
    states[f"{len(starts)} rows in steady state"] = (starts, steady)

    own_seconds = [0.0]
    attend = shared_prefix._attend
    groups = model.config.num_attention_heads // model.config.num_key_value_heads  # queries a row, a step

    def timed_attend(query, key, value, mask, scale, softcap=None, kernel=None):
        start = time.perf_counter()
        result = attend(query, key, value, mask, scale, softcap, kernel)
        if query.shape[2] == groups:  # a band's rows' own keys (the prefix's call holds every row's queries)
            own_seconds[0] += time.perf_counter() - start
        return result

    shared_prefix._attend = timed_attend
    try:
        with torch.inference_mode(), decode.shared_prefix_attention(model):
            prefix = SlotKV.empty(model.config, 1, prefix_len, model.dtype, model.device)
            decode._forward(model, prefix, 0, [0], [ids[0][:prefix_len]])
            for name, (starts, sizes) in states.items():
                n = len(starts)
                kv = SlotKV.empty(model.config, n, max(starts) + 2, model.dtype, model.device,
                                  prefix=prefix, prefix_len=prefix_len)
                head = decode.GreedyHead(model.get_output_embeddings().weight, n)
                steps, owns = collections.defaultdict(list), collections.defaultdict(list)
                for _ in range(repeats):
                    for label, bands in (("bands", sizes), ("one band", None)):
                        own_seconds[0] = 0.0
                        start = time.perf_counter()
                        decode._forward(model, kv, 0, starts, [[100]] * n, head, bands)
                        steps[label].append(time.perf_counter() - start)
                        owns[label].append(own_seconds[0])
                step = {label: statistics.median(v) * 1000 for label, v in steps.items()}
                own = {label: statistics.median(v) * 1000 for label, v in owns.items()}
                keys = sum(size * (top + 1) for size, top in zip(sizes, longest(starts, sizes)))
                print(f"{name}, {len(sizes)} bands: keys read per layer {keys} against {n * (max(starts) + 1)} "
                      f"(x{n * (max(starts) + 1) / keys:.2f}); own-keys attention {own['bands']:.1f} ms against "
                      f"{own['one band']:.1f} (x{own['one band'] / own['bands']:.2f}); step {step['bands']:.1f} ms "
                      f"against {step['one band']:.1f} (x{step['one band'] / step['bands']:.2f})", flush=True)
    finally:
        shared_prefix._attend = attend


def compare_bands(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int | None) -> None:
    """Rows in bands (decode.BAND_OVERHEAD as it is) and in one band (no device named), alternating
    bands, one band, bands."""
    bands = dict(decode.BAND_OVERHEAD)
    ways = {"bands": lambda: setattr(decode, "BAND_OVERHEAD", bands),
            "one band": lambda: setattr(decode, "BAND_OVERHEAD", {})}
    try:
        alternate_decodes(model, tokenizer, prompts, max_new_tokens, batch_size, ways, ("bands", "one band", "bands"))
    finally:
        decode.BAND_OVERHEAD = bands


def step_profile(model, tokenizer, prompts: list[str], rows: int) -> None:
    """One decoding step of `rows` rows, each 150 tokens past the prefix, split by operator kind. The
    attention is decoding's (speedups.decoding_attention): the calls of its kernel count as attention,
    with everything they run (oneDNN's products through ctypes are invisible to the profiler)."""
    from torch.profiler import record_function

    from mathtune.generation import shared_prefix
    from mathtune.generation.shared_prefix import SlotKV

    kernel = speedups.decoding_attention(model)
    attend = shared_prefix._attend

    def marked_attend(*args):
        with record_function("attention"):
            return attend(*args)

    ids = tokenizer(prompts[:2])["input_ids"]
    prefix_len = decode.common_prefix_length(ids)
    shared_prefix._attend = marked_attend
    try:
        with torch.inference_mode(), decode.shared_prefix_attention(model):
            prefix = SlotKV.empty(model.config, 1, prefix_len, model.dtype, model.device)
            forward = decode._forward
            forward(model, prefix, 0, [0], [ids[0][:prefix_len]], attention=kernel)
            kv = SlotKV.empty(model.config, rows, 400, model.dtype, model.device, prefix=prefix,
                              prefix_len=prefix_len)
            inputs = [[100]] * rows
            head = decode.GreedyHead(model.get_output_embeddings().weight, rows)
            forward(model, kv, 0, [150] * rows, inputs, head, attention=kernel)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    forward(model, kv, 0, [150] * rows, inputs, head, attention=kernel)
    finally:
        shared_prefix._attend = attend
    kinds = collections.Counter()
    for event in prof.events():
        parent, in_attention = event, False
        while parent is not None and not in_attention:
            in_attention, parent = parent.name == "attention", parent.cpu_parent
        name = event.name
        kind = ("attention" if in_attention
                else "matrix products" if name in ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise")
                else "elementwise, copies and the rest")
        kinds[kind] += event.self_cpu_time_total
    total = sum(kinds.values())
    label = "from oneDNN" if kernel else "torch's kernel"
    print(f"one decoding step, {rows} rows at 150 tokens past a {prefix_len}-token prefix, attention {label}: "
          f"{total / 3 / 1000:.1f} ms of operator time")
    for kind, micros in kinds.most_common():
        print(f"  {kind}: {micros / 3 / 1000:.1f} ms ({micros / total:.0%})")


if __name__ == "__main__":
    main()
