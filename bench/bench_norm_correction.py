"""Does the calibrated norm-gain correction lower the pruned loss? Measured before any retraining.

Removing hidden channels makes every RMSNorm divide by the root mean square of fewer (the
most important) channels. `prune(..., norm_correction=True)` rescales each norm's gain by
sqrt(mean square of its calibration input over the kept channels / over all channels).
This script prunes the real teacher to several widths with and without it and measures
held-out LM loss and KL divergence to the teacher on WikiText-2 test, with the standard
error of each difference paired over the same blocks. Writes reports/benchmarks/norm_correction.md.

    .venv/bin/python bench/bench_norm_correction.py [--blocks 32] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import REPORTS, Run, markdown_table

from minitron_nas.config.settings import RankSettings
from minitron_nas.data import token_blocks
from minitron_nas.distill.teacher_cache import TeacherLogitCache
from minitron_nas.evaluate.metrics import HeldoutKLD, HeldoutLoss, Measurement, paired_stderr
from minitron_nas.model.architecture import Architecture, ParamCounter
from minitron_nas.model.teachers import load_teacher
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import load_or_rank

ARCHS = [  # hidden / FFN / heads:KV / layers; the first four cut the hidden size only
    {"hidden_size": 504},
    {"hidden_size": 432},
    {"hidden_size": 360},
    {"hidden_size": 288},
    {"hidden_size": 480, "intermediate_size": 1024, "num_attention_heads": 6, "num_hidden_layers": 24},
    {"hidden_size": 432, "intermediate_size": 1280, "num_attention_heads": 6, "num_hidden_layers": 22},
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=32, help="WikiText-2 test blocks of 256 tokens")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", type=Path, default=REPORTS / "norm_correction.md")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-norm"), help="keeps the rankings between runs")
    args = parser.parse_args()
    run = Run()
    data = Path(args.data_dir)
    teacher = load_teacher("smollm2-135m")
    rankings = load_or_rank(teacher, RankSettings(data=str(data / "wikitext2/valid.txt"), samples=64, seq_len=256), args.work / "rankings")
    test = token_blocks(str(data / "wikitext2/test.txt"), teacher.tokenizer, 256, args.blocks, "all")
    cache = TeacherLogitCache.compute(teacher.model, test, 64, 1.0, 4, {"teacher_fingerprint": teacher.fingerprint})
    metrics = {"loss": HeldoutLoss(test, 4), "kld": HeldoutKLD(test, cache, 4)}
    base = Architecture.from_config(teacher.model.config)
    counter = ParamCounter(teacher.model.config)
    rows, wins, losses = [], 0, 0
    for spec in ARCHS:
        arch = Architecture.from_dict(spec, base)
        measured: dict[str, dict[bool, Measurement]] = {name: {} for name in metrics}
        for corrected in (False, True):
            student = prune(teacher.model, rankings, arch, norm_correction=corrected)
            for name, metric in metrics.items():
                measured[name][corrected] = metric.measure(student)
        cells = []
        for name in metrics:
            plain, fixed = measured[name][False], measured[name][True]
            diff, se = fixed.value - plain.value, paired_stderr(fixed, plain)
            cells += [f"{plain.value:.3f}", f"{fixed.value:.3f}", f"{diff:+.3f} ± {se:.3f}"]
            if name == "loss":
                wins += diff < -se
                losses += diff > se
        key = f"{arch.hidden_size}/{arch.intermediate_size}/{arch.num_attention_heads}:{arch.num_key_value_heads}/{arch.num_hidden_layers}"
        rows.append([key, f"{counter.count(arch).total / 1e6:.1f}M", *cells])
        print(rows[-1], flush=True)
    verdict = (
        f"The correction lowers the pruned loss by more than one standard error on {wins} of {len(ARCHS)} architectures "
        f"and raises it by more than one on {losses}."
    )
    body = [
        f"SmolLM2-135M-Instruct pruned along rankings of 64 x 256 tokens of WikiText-2 valid; measured on the first "
        f"{args.blocks} blocks of 256 tokens of WikiText-2 test, before any retraining. Differences are corrected minus "
        "plain, ± the standard error paired over blocks (negative: the correction helps).",
        "",
        *markdown_table(
            ["hidden/FFN/heads:KV/layers", "params", "loss plain", "loss corrected", "difference", "KLD plain", "KLD corrected", "difference"],
            rows,
        ),
        "",
        verdict,
    ]
    run.write_report(args.out, "Norm-gain correction after hidden-channel pruning (real teacher)", [], body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
