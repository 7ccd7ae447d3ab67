"""Does vLLM serve an export as transformers runs it? Greedy outputs and log-likelihoods, side by side.

An export is only useful if the serving engine computes the same model. This script loads
one exported folder (default: the demo's, runs/demo/export) twice, in transformers and in
vLLM, in the same dtype on the same GPU, and compares:
  (i)  log-likelihoods: every token of `--blocks` held-out blocks scored by teacher forcing
       (vLLM's `prompt_logprobs`); the mean and largest per-token difference, and the mean
       NLL (perplexity) of each engine;
  (ii) greedy decoding: `--new-tokens` tokens from the first `--prompt-len` tokens of each
       block (temperature 0, EOS ignored); the share of identical continuations, their mean
       common prefix, and, at each first divergence, transformers' own log-probability margin
       between its token and vLLM's there. In bf16 two engines may break a near tie
       differently: a divergence counts as explained when that margin is under `--tie-nats`.
Verdict: agree when the mean per-token log-likelihood difference is under `--tie-nats` and
every greedy divergence is explained. Writes reports/benchmarks/vllm.md (or --out).

vLLM needs a CUDA GPU and `pip install vllm`; where it cannot be imported the script says so
in one line and exits 0 without writing a report (nothing was measured). Run from the
repository root:

    .venv/bin/python bench/bench_vllm.py [--model runs/demo/export] [--data ../shared/data/wikitext2/test.txt]
        [--blocks 16] [--seq-len 256] [--prompt-len 64] [--new-tokens 32] [--dtype bfloat16] [--tie-nats 0.05]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from common import REPORTS, Run, markdown_table, require_at_least

from minitron_nas.data import token_blocks

DEFAULT_MODEL = Path("runs/demo/export")
DEFAULT_DATA = "../shared/data/wikitext2/test.txt"
DEFAULT_OUT = REPORTS / "vllm.md"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="an exported folder (default: %(default)s)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="held-out text (default: %(default)s)")
    parser.add_argument("--blocks", type=int, default=16, help="blocks of text (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per block (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens for greedy decoding (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="both engines' dtype (default: %(default)s)")
    parser.add_argument("--tie-nats", type=float, default=0.05, help="differences under this are rounding (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report (default: reports/benchmarks/vllm.md)")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        parser.error(f"'{args.model}' is not an exported folder (no config.json): give --model RUN/export")
    if not Path(args.data).is_file():
        parser.error(f"'{args.data}' is not a file (paths are relative to the current directory)")
    if not 1 <= args.prompt_len < args.seq_len:
        parser.error("--prompt-len must be at least 1 and shorter than --seq-len")
    require_at_least(parser, args, ("blocks", "new_tokens"))
    return args


# ---- the two engines -------------------------------------------------------------------


@torch.no_grad()
def hf_token_logprobs(model, blocks: torch.Tensor) -> torch.Tensor:
    """[n, T-1] log-probability of each block's next token under `model` (teacher forcing)."""
    rows = []
    for block in blocks:  # one at a time: the same shapes vLLM sees
        logits = model(input_ids=block[None].to(model.device)).logits[0, :-1].float()  # [T-1, vocab]
        rows.append(torch.log_softmax(logits, -1).gather(-1, block[1:, None].to(logits.device))[:, 0].cpu())
    return torch.stack(rows).double()


@torch.no_grad()
def hf_greedy(model, prompts: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """Greedy continuations [n, new_tokens] and, per prompt and step, the full log-softmax
    row [vocab] they were taken from (to measure the margin where another engine differs).
    A plain loop of whole forwards: `generate` would stop at EOS or bend it with
    min_new_tokens, and no KV-cache argument is spelled alike in every transformers version."""
    tokens, rows = [], []
    for prompt in prompts:
        ids, steps = prompt[None].to(model.device), []  # [1, P + step]
        for _ in range(new_tokens):
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)  # [vocab]
            steps.append(logp.cpu())
            ids = torch.cat([ids, logp.argmax().view(1, 1)], dim=1)
        tokens.append(ids[0, prompt.shape[0] :].cpu())
        rows.append(steps)
    return torch.stack(tokens), rows


def vllm_engine(path: Path, dtype: str, max_len: int):
    """vLLM's offline engine on `path`, or the one-line reason it cannot be had here."""
    try:
        from vllm import LLM
    except ImportError:
        return "vLLM check skipped: vllm is not installed (it needs a CUDA GPU: `pip install vllm`)"
    if not torch.cuda.is_available():
        return "vLLM check skipped: no CUDA GPU here"
    # enforce_eager: no CUDA-graph capture, so start-up is quick and kernels match a plain run.
    return LLM(model=str(path), dtype=dtype, seed=0, max_model_len=max_len, enforce_eager=True, gpu_memory_utilization=0.5)


def vllm_token_logprobs(llm, blocks: torch.Tensor) -> torch.Tensor:
    """[n, T-1] log-probability of each block's next token under vLLM (`prompt_logprobs`)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": b.tolist()} for b in blocks], params, use_tqdm=False)
    rows = []
    for block, out in zip(blocks.tolist(), outs, strict=True):
        # prompt_logprobs[0] is None (nothing precedes the first token); each later entry maps
        # token id -> Logprob and always holds the prompt's own token.
        rows.append([out.prompt_logprobs[i][tok].logprob for i, tok in enumerate(block) if i > 0])
    return torch.tensor(rows, dtype=torch.float64)


def vllm_greedy(llm, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuations [n, new_tokens] from vLLM (temperature 0, EOS ignored)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, repetition_penalty=1.0)
    outs = llm.generate([{"prompt_token_ids": p.tolist()} for p in prompts], params, use_tqdm=False)
    return torch.tensor([list(out.outputs[0].token_ids) for out in outs])


# ---- the comparison (pure) -------------------------------------------------------------


@dataclass(frozen=True)
class LoglikAgreement:
    mean_abs: float  # mean |logp_a - logp_b| over tokens, nats
    max_abs: float
    nll_a: float  # mean NLL per token
    nll_b: float
    tokens: int


def compare_logprobs(a: torch.Tensor, b: torch.Tensor) -> LoglikAgreement:
    """Two engines' [n, T-1] per-token log-probabilities of the same tokens."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = (a - b).abs()
    return LoglikAgreement(float(diff.mean()), float(diff.max()), float(-a.mean()), float(-b.mean()), a.numel())


@dataclass(frozen=True)
class GreedyAgreement:
    identical: int  # continuations equal token for token
    prompts: int
    mean_prefix: float  # mean length of the common prefix, tokens
    margins: tuple[float, ...]  # at each first divergence: logp_a(a's token) - logp_a(b's token)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compare_greedy(a: torch.Tensor, b: torch.Tensor, rows_a: list[list[torch.Tensor]]) -> GreedyAgreement:
    """Greedy continuations [n, k] of engine a and b, and a's log-softmax rows per step."""
    prefixes, margins = [], []
    for i, (x, y) in enumerate(zip(a.tolist(), b.tolist(), strict=True)):
        n = common_prefix(x, y)
        prefixes.append(n)
        if n < len(x):  # same context up to step n, so a's row there scores both choices
            row = rows_a[i][n]
            margins.append(float(row[x[n]] - row[y[n]]))
    identical = sum(p == a.shape[1] for p in prefixes)
    return GreedyAgreement(identical, a.shape[0], sum(prefixes) / len(prefixes), tuple(margins))


def verdict(loglik: LoglikAgreement, greedy: GreedyAgreement, tie_nats: float) -> str:
    unexplained = [m for m in greedy.margins if m >= tie_nats]
    if loglik.mean_abs < tie_nats and not unexplained:
        return f"agree: mean log-likelihood difference under {tie_nats} nats, every greedy divergence a near tie"
    reasons = []
    if loglik.mean_abs >= tie_nats:
        reasons.append(f"mean log-likelihood difference {loglik.mean_abs:.4f} nats >= {tie_nats}")
    if unexplained:
        reasons.append(f"{len(unexplained)} greedy divergence(s) with a margin >= {tie_nats} nats (largest {max(unexplained):.3f})")
    return "differ: " + "; ".join(reasons)


# ---- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    llm = vllm_engine(args.model, args.dtype, args.seq_len + args.new_tokens)
    if isinstance(llm, str):
        print(llm)
        return 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = Run()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    blocks = token_blocks(args.data, tokenizer, args.seq_len, args.blocks, "all")
    prompts = blocks[:, : args.prompt_len]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to("cuda").eval()
    loglik = compare_logprobs(hf_token_logprobs(model, blocks), vllm_token_logprobs(llm, blocks))
    hf_tokens, hf_rows = hf_greedy(model, prompts, args.new_tokens)
    greedy = compare_greedy(hf_tokens, vllm_greedy(llm, prompts, args.new_tokens), hf_rows)
    said = verdict(loglik, greedy, args.tie_nats)
    import vllm

    details = [f"- Model: `{args.model}`; text: `{args.data}`; dtype {args.dtype}; vLLM {vllm.__version__}"]
    margins = ", ".join(f"{m:.3f}" for m in greedy.margins) or "none"
    body = [
        *markdown_table(
            ["measure", "transformers", "vLLM"],
            [
                ["mean NLL per token (nats)", f"{loglik.nll_a:.5f}", f"{loglik.nll_b:.5f}"],
                ["perplexity", f"{torch.tensor(loglik.nll_a).exp():.3f}", f"{torch.tensor(loglik.nll_b).exp():.3f}"],
            ],
        ),
        "",
        f"- Per-token log-likelihood difference over {loglik.tokens} tokens: mean {loglik.mean_abs:.5f}, largest {loglik.max_abs:.5f} nats.",
        f"- Greedy, {args.new_tokens} tokens from {greedy.prompts} prompts of {args.prompt_len} tokens: {greedy.identical}/{greedy.prompts} identical, "
        f"mean common prefix {greedy.mean_prefix:.1f} tokens; transformers' margin at each divergence (nats): {margins}.",
        f"- Verdict: {said}.",
    ]
    run.write_report(args.out, "vLLM against transformers on an export", details, body)
    return 0 if said.startswith("agree") else 1


if __name__ == "__main__":
    sys.exit(main())
