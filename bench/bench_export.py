"""Round trip of the export's GGUF files on the real SmolLM2-135M teacher.

For the teacher exported unpruned and for one pruned cut (FFN 1024, 24 of 30 layers, 6 of
9 heads), each exported folder is written as GGUF (f16 and q8_0) by `write_gguf`, read
back by transformers' own GGUF reader (`from_pretrained(..., gguf_file=...)`, which
dequantises and undoes llama.cpp's q/k permutation independently of this project), and
compared with the exported folder on WikiText-2 test text: the largest logit difference
and the mean next-token NLL of each. Beside it, the same exported model with each weight
rounded in place exactly as the file stores it (f16, or q8_0 and back): when the two
largest differences agree, the file adds nothing to the rounding. Then llama.cpp itself runs
each file (llama-cpp-python, or the prebuilt ik-llama-cpp-python), on the same blocks. Prints a markdown table and writes it, with the
command, machine and date, to reports/benchmarks/export.md (or --out). Run from the
repository root:

    .venv/bin/python bench/bench_export.py [--data ../shared/data/wikitext2/test.txt]
        [--blocks 8] [--seq-len 256] [--work runs/bench-export]
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import gguf
import torch
from common import REPORTS, Run, markdown_table, require_at_least, require_file
from transformers import AutoModelForCausalLM

from minitron_nas.data import token_blocks
from minitron_nas.model.architecture import Architecture
from minitron_nas.model.gguf import GGUF_TYPES, compare, encode_tensor, llama_cpp_logits, transformers_logits, write_gguf
from minitron_nas.model.saving import save_model
from minitron_nas.model.teachers import load_teacher
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import compute_rankings

DEFAULT_DATA = "../shared/data/wikitext2/test.txt"
CALIBRATION = "../shared/data/wikitext2/valid.txt"
DEFAULT_OUT = REPORTS / "export.md"
TEACHER = "smollm2-135m"
CUT = {"intermediate_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 6}
TYPES = ("f16", "q8_0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="text the logits are compared on (default: %(default)s)")
    parser.add_argument("--blocks", type=int, default=8, help="blocks of text (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per block (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-export"), help="exports and GGUF files (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report (default: reports/benchmarks/export.md)")
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("blocks", "seq_len"), low=2)
    require_file(parser, args.data)
    require_file(parser, CALIBRATION, "the calibration text")
    return args


def rounded(model, gguf_type: str):
    """A copy of `model` whose weights went through the file's encoding and back, in place."""
    copy = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for param in copy.parameters():
            array, raw_dtype = encode_tensor(param.detach(), GGUF_TYPES[gguf_type][0])
            back = gguf.quants.dequantize(array, raw_dtype) if raw_dtype is not None else array
            param.copy_(torch.from_numpy(back.astype("float32")).reshape(param.shape))
    return copy


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run()
    teacher = load_teacher(TEACHER, "cpu", "float32")
    blocks = token_blocks(args.data, teacher.tokenizer, args.seq_len, args.blocks, "all")
    calibration = token_blocks(CALIBRATION, teacher.tokenizer, 128, 16, "all")
    rankings = compute_rankings(teacher.model, calibration, batch_size=4, progress=False)
    cut = prune(teacher.model, rankings, Architecture.from_dict(CUT, Architecture.from_config(teacher.model.config))).eval()
    shutil.rmtree(args.work, ignore_errors=True)
    rows, exact, llama_note = [], True, "not installed: columns empty"
    for label, model in (("teacher, unpruned", teacher.model), (f"pruned: {CUT}", cut)):
        folder = save_model(model, args.work / ("teacher" if model is teacher.model else "pruned"), teacher.tokenizer, {"name": label})
        exported = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        for gguf_type in TYPES:
            start = time.perf_counter()
            path = write_gguf(folder, gguf_type=gguf_type)
            seconds = time.perf_counter() - start
            reloaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
            seen = compare(transformers_logits(exported), transformers_logits(reloaded), blocks)
            alone = compare(transformers_logits(exported), transformers_logits(rounded(exported, gguf_type)), blocks)
            found = llama_cpp_logits(path, args.seq_len)
            cpp = None if isinstance(found, str) else compare(transformers_logits(exported), found[0], blocks)
            backend = llama_note = found if isinstance(found, str) else found[1]
            print(f"{label} {gguf_type}: {seen}; rounding alone: {alone}; {backend}: {cpp}", flush=True)
            exact = exact and (seen.max_abs_logit_diff, seen.nll_candidate) == (alone.max_abs_logit_diff, alone.nll_candidate)
            rows.append(
                [
                    label,
                    gguf_type,
                    f"{path.stat().st_size / 2**20:.0f} MiB",
                    f"{seconds:.1f} s",
                    f"{seen.max_abs_logit_diff:.4f}",
                    f"{alone.max_abs_logit_diff:.4f}",
                    f"{seen.nll_reference:.4f}",
                    f"{seen.nll_candidate:.4f}",
                    f"{seen.nll_diff:+.5f}",
                    f"{alone.nll_diff:+.5f}",
                    "-" if cpp is None else f"{cpp.nll_candidate:.4f}",
                    "-" if cpp is None else f"{100 * math.expm1(cpp.nll_diff):+.3f}%",
                    "-" if cpp is None else f"{cpp.max_abs_logit_diff:.4f}",
                ]
            )
            del reloaded
    details = [f"- Text: {args.blocks} blocks x {args.seq_len} tokens of `{args.data}` ({blocks.shape[0] * (blocks.shape[1] - 1):,} next-token predictions)"]
    body = [
        *markdown_table(
            [
                "Model",
                "GGUF",
                "Size",
                "Write",
                "Max abs logit diff",
                "same, rounding alone",
                "NLL export",
                "NLL GGUF",
                "NLL diff",
                "same, rounding alone",
                "NLL llama.cpp",
                "ppl llama.cpp vs export",
                "max abs logit diff, llama.cpp",
            ],
            rows,
        ),
        "",
        "`NLL export`: the exported folder in transformers (float32); `NLL GGUF`: the GGUF file read back by "
        "transformers' GGUF reader, which dequantises it and undoes the q/k permutation written for llama.cpp. "
        f"The pruned cut is ranked on 16 x 128 tokens of `{CALIBRATION}` and not retrained: its NLL is that of a "
        "freshly pruned model. `rounding alone`: the exported model with every weight rounded in place as the file "
        "stores it (norms in float32, matrices in f16 or q8_0), no file involved. `NLL llama.cpp`: the GGUF file run by "
        f"{llama_note}, on the same blocks, the logits of every position; its perplexity beside the exported folder's "
        "in transformers. With q8_0, llama.cpp also rounds the activations to 8 bits in each matrix product, so it "
        "differs from the rounded weights alone. `minitron-nas export --gguf TYPE --check` prints the same comparison.",
        "",
        "In every row the GGUF file gives exactly the logits of the model rounded in place: names, permutation and "
        "metadata add no error beyond the storage type's rounding."
        if exact
        else "**Some rows differ from rounding alone: the file adds error beyond the storage type's rounding.**",
    ]
    run.write_report(args.out, "Benchmark: GGUF export round trip", details, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
