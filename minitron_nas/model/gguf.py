"""Write an exported Llama folder as one GGUF file that llama.cpp loads, and check it.

`write_gguf` follows llama.cpp's `convert_hf_to_gguf.py` for Llama, through the `gguf`
package's own writer and names: the `llama.*` metadata (context, embedding and
feed-forward lengths, block count, head counts, key/value length = head_dim, rope base
and dimension count, RMS eps, vocabulary size), a `gpt2` (byte-level BPE) tokenizer with
its tokens, token types, merges, special ids and chat template (the pre-tokenizer is named
`gpt-2` or `smollm` when tokenizer.json's matches, else llama.cpp's `default`), and the tensors under
`gguf.TENSOR_NAMES`, q_proj and k_proj permuted as llama.cpp expects. Tied embeddings
write no `output.weight`. 1-D tensors (norms, biases) stay float32, as in the converter;
with q8_0, a matrix whose rows are not a multiple of 32 is written in f16.

`compare` measures two causal LMs on the same token blocks: the largest logit difference
and the mean next-token NLL of each. `check_gguf` runs it for the GGUF in llama.cpp
(llama-cpp-python, or the prebuilt ik-llama-cpp-python) against transformers, or says in one line why it cannot.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from minitron_nas.errors import MinitronError
from minitron_nas.files import file_mode, write_atomic
from minitron_nas.model.families import FAMILIES

GGUF_TYPES = {
    # --gguf name -> (type of the matrices, file type recorded in general.file_type)
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# Hugging Face Llama module -> llama.cpp tensor
_LAYER_TENSORS = {
    "input_layernorm": gguf.MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj": gguf.MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": gguf.MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": gguf.MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": gguf.MODEL_TENSOR.ATTN_OUT,
    "post_attention_layernorm": gguf.MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj": gguf.MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": gguf.MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": gguf.MODEL_TENSOR.FFN_DOWN,
}
_MODEL_TENSORS = {
    "model.embed_tokens": gguf.MODEL_TENSOR.TOKEN_EMBD,
    "model.norm": gguf.MODEL_TENSOR.OUTPUT_NORM,
    "lm_head": gguf.MODEL_TENSOR.OUTPUT,
}

# tokenizer.json pre-tokenizer -> llama.cpp's name for the same splitting (tokenizer.ggml.pre)
_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_PRE_TOKENIZERS = (
    ("gpt-2", [_BYTE_LEVEL]),  # llama.cpp names GPT-2's pre-tokenizer so (and its tokenizer model gpt2)
    ("smollm", [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]),
)


def gguf_path(folder: Path, gguf_type: str) -> Path:
    """Where `--gguf TYPE` writes: beside the folder, `RUN/export` -> `RUN/export-f16.gguf`."""
    folder = Path(folder)
    return folder.with_name(f"{folder.name}-{gguf_type}.gguf")


def check_gguf_type(gguf_type: str) -> str:
    if gguf_type not in GGUF_TYPES:
        raise MinitronError(f"--gguf {gguf_type!r} is not a GGUF type written here: give one of {', '.join(GGUF_TYPES)}")
    return gguf_type


def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q_proj / k_proj reordered from Hugging Face's rope layout to llama.cpp's."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def check_llama(config, where: str) -> None:
    """Refuse, in one line, what this writer cannot put in a GGUF: a mixture of experts, another family, scaled rope."""
    if any(config.model_type in family.model_types and family.moe for family in FAMILIES):
        raise MinitronError(
            f"{where} is a mixture-of-experts model ({config.model_type}): --gguf does not write mixture-of-experts models; export without --gguf"
        )
    if config.model_type != "llama":
        raise MinitronError(f"{where} is a {config.model_type} model: --gguf writes Llama models only; export without --gguf")
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise MinitronError(f"{where} uses {rope['rope_type']} rope scaling, which --gguf does not write: export without --gguf")


def _llama_config(folder: Path):
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise MinitronError(f"cannot read the config of '{folder}' ({str(err).splitlines()[0][:160]}): give a folder written by the export") from None
    check_llama(config, f"'{folder}'")
    return config


def _pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name, or 'default' (llama.cpp's own fallback) when none matches."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for name, pattern in _PRE_TOKENIZERS:
        if len(steps) == len(pattern) and all(all(step.get(k) == v for k, v in want.items()) for step, want in zip(steps, pattern)):
            return name
    return "default"


def _add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> str:
    """tokens, types, merges, special ids and chat template, as the converter's gpt2 vocabulary."""
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise MinitronError(f"'{folder}' has no tokenizer.json: --gguf needs the byte-level BPE tokenizer saved with the model")
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        raise MinitronError(f"the tokenizer in '{folder}' is not a BPE tokenizer: --gguf writes byte-level BPE (gpt2) tokenizers only")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(vocab) >= vocab_size:
        raise MinitronError(f"the tokenizer in '{folder}' has ids up to {max(vocab)} but the model only {vocab_size} rows: save the matching tokenizer")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in vocab:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(vocab[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(vocab[index])
            types.append(gguf.TokenType.NORMAL)
    pre = _pre_tokenizer(tokenizer_json)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    # whether llama.cpp adds BOS / EOS, as the tokenizer itself does (5.x's tokenizer_config no longer says)
    with_special, plain = tokenizer("a").input_ids, tokenizer("a", add_special_tokens=False).input_ids
    added_first = with_special[: len(with_special) - len(plain)] if with_special[-len(plain) :] == plain else []
    added_last = with_special[len(plain) :] if with_special[: len(plain)] == plain else []
    special.add_special_token.setdefault("bos", tokenizer.bos_token_id is not None and added_first[:1] == [tokenizer.bos_token_id])
    special.add_special_token.setdefault("eos", tokenizer.eos_token_id is not None and added_last[-1:] == [tokenizer.eos_token_id])
    special.add_to_gguf(writer, quiet=True)
    return pre


def _tensor_name(name: str, n_layers: int) -> str:
    module, _, kind = name.rpartition(".")
    if module in _MODEL_TENSORS:
        return f"{gguf.TENSOR_NAMES[_MODEL_TENSORS[module]]}.{kind}"
    parts = module.split(".", 3)
    if parts[:2] == ["model", "layers"] and len(parts) == 4 and parts[2].isdigit() and parts[3] in _LAYER_TENSORS and int(parts[2]) < n_layers:
        return f"{gguf.TENSOR_NAMES[_LAYER_TENSORS[parts[3]]].format(bid=int(parts[2]))}.{kind}"
    raise MinitronError(f"tensor '{name}' has no place in a Llama GGUF: give a Llama model written by the export")


def encode_tensor(data: torch.Tensor, matrix_type: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """(array, raw dtype for the writer, None when the array's own dtype says it): 1-D stays
    float32; q8_0 needs rows that are whole blocks of 32, others are written in f16."""
    array = data.float().numpy()
    if array.ndim == 1:
        return array, None
    if matrix_type == gguf.GGMLQuantizationType.F16 or (matrix_type == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32):
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, matrix_type), matrix_type


def write_gguf(folder: Path, out: Path | None = None, gguf_type: str = "f16", name: str | None = None) -> Path:
    """The Llama model in `folder` as one GGUF file `out` (default `gguf_path`), written whole or not at all.

    `general.name` is `name`, else the model's name in config.json (`_name_or_path`, which
    `save_model` sets), else the folder's name."""
    folder = Path(folder)
    matrix_type, file_type = GGUF_TYPES[check_gguf_type(gguf_type)]
    out = Path(out) if out is not None else gguf_path(folder, gguf_type)
    config = _llama_config(folder)
    weights_file = folder / "model.safetensors"
    if not weights_file.is_file():
        raise MinitronError(f"'{folder}' has no model.safetensors: give a folder written by the export")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or json.loads((folder / "config.json").read_text()).get("_name_or_path") or folder.name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, folder, config.vocab_size)
        with safe_open(str(weights_file), "pt") as weights:
            for key in weights.keys():
                if key == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # llama.cpp reuses token_embd
                data = weights.get_tensor(key)
                if key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                    data = permute(data, config.num_attention_heads)
                elif key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                    data = permute(data, config.num_key_value_heads)
                array, raw_dtype = encode_tensor(data, matrix_type)
                writer.add_tensor(_tensor_name(key, config.num_hidden_layers), array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.chmod(file_mode())

    return write_atomic(out, write)


# --------------------------------------------------------------------------- checking a GGUF


@dataclass(frozen=True)
class Agreement:
    """Two models on the same blocks: the largest logit difference, and each one's mean NLL."""

    max_abs_logit_diff: float
    nll_reference: float
    nll_candidate: float
    tokens: int

    @property
    def nll_diff(self) -> float:
        return self.nll_candidate - self.nll_reference


def _nll(logits: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:-1].float(), block[1:], reduction="sum")


def compare(reference: Callable[[torch.Tensor], torch.Tensor], candidate: Callable[[torch.Tensor], torch.Tensor], blocks: torch.Tensor) -> Agreement:
    """Each callable maps one block of token ids [T] to its logits [T, vocab]."""
    worst, nll_ref, nll_cand = 0.0, 0.0, 0.0
    for block in blocks:
        a, b = reference(block).float(), candidate(block).float()
        worst = max(worst, float((a - b).abs().max()))
        nll_ref += float(_nll(a, block))
        nll_cand += float(_nll(b, block))
    tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    return Agreement(worst, nll_ref / tokens, nll_cand / tokens, tokens)


def transformers_logits(model) -> Callable[[torch.Tensor], torch.Tensor]:
    def logits(block: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=block[None].to(model.device)).logits[0].cpu()

    return logits


Logits = Callable[[torch.Tensor], torch.Tensor]
_LogCallback = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_SILENT = _LogCallback(lambda level, text, data: None)  # a module global: the C side keeps calling it
NO_LLAMA_CPP = (
    "GGUF check skipped: llama.cpp is not installed (`pip install ik-llama-cpp-python`, a prebuilt wheel of the "
    "ik_llama.cpp fork, or `pip install llama-cpp-python`, which builds llama.cpp from source in about an hour on 2 cores)"
)


def llama_cpp_logits(gguf_file: Path, n_ctx: int) -> tuple[Logits, str] | str:
    """Logits from llama.cpp and the binding that gave them, or the one-line reason they cannot
    be had here: llama-cpp-python when installed, else ik-llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return _ik_llama_logits(gguf_file, n_ctx)
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=n_ctx, logits_all=True, verbose=False)

    def logits(block: torch.Tensor) -> torch.Tensor:
        llm.reset()
        llm.eval(block.tolist())
        return torch.from_numpy(np.array(llm.scores[: len(block)], dtype=np.float32))

    return logits, f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"


def _ik_llama_logits(gguf_file: Path, n_ctx: int) -> tuple[Logits, str] | str:
    """The same through ik-llama-cpp-python's ctypes API: its high-level class returns no logits,
    so one batch per block asks llama_decode for the logits of every position."""
    try:
        import ik_llama_cpp
        from ik_llama_cpp import _ctypes_api as api
        from ik_llama_cpp._internals import IkContext, IkModel
    except ImportError:
        return NO_LLAMA_CPP
    api._lib.llama_log_set.argtypes, api._lib.llama_log_set.restype = [_LogCallback, ctypes.c_void_p], None
    api._lib.llama_log_set(_SILENT, None)  # llama.cpp logs every load to stderr otherwise
    model = IkModel(str(gguf_file))
    context = IkContext(model, n_ctx=n_ctx, flash_attn=False)

    def logits(block: torch.Tensor) -> torch.Tensor:
        api.llama_kv_cache_clear(context.ctx)
        n = len(block)
        batch = api.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, token in enumerate(block.tolist()):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
                batch.seq_id[i][0] = 0
            if context.decode(batch) != 0:
                raise MinitronError(f"llama.cpp could not evaluate '{gguf_file}' (llama_decode failed): check the file with `gguf-dump`")
            rows = [np.ctypeslib.as_array(context.get_logits(i), shape=(model.n_vocab,)).copy() for i in range(n)]
        finally:
            api.llama_batch_free(batch)
        return torch.from_numpy(np.stack(rows))  # [T, vocab]

    return logits, f"llama.cpp (ik-llama-cpp-python {ik_llama_cpp.__version__})"


def check_gguf(gguf_file: Path, model, blocks: torch.Tensor) -> str:
    """One line: llama.cpp's next-token NLL on `blocks` beside transformers', or why it was skipped."""
    found = llama_cpp_logits(gguf_file, blocks.shape[1])
    if isinstance(found, str):
        return found
    candidate, backend = found
    seen = compare(transformers_logits(model), candidate, blocks)
    return (
        f"GGUF check on {seen.tokens:,} tokens: mean NLL {seen.nll_candidate:.4f} in {backend}, {seen.nll_reference:.4f} in "
        f"transformers (difference {seen.nll_diff:+.4f}); largest logit difference {seen.max_abs_logit_diff:.4f}"
    )
