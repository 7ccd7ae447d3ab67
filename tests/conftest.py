"""Tiny random-init models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

_COMMON = dict(
    vocab_size=128,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
)

TINY_CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**{**_COMMON, "tie_word_embeddings": True, **kw}),
    "llama-untied-bias": lambda **kw: LlamaConfig(**{**_COMMON, "tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True, **kw}),
    "mistral": lambda **kw: MistralConfig(**{**_COMMON, "sliding_window": 16, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**_COMMON, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2, **kw}),
    "qwen3": lambda **kw: Qwen3Config(**{**_COMMON, "tie_word_embeddings": True, **kw}),
    "gemma3": lambda **kw: Gemma3TextConfig(
        **{**_COMMON, "sliding_window": 16, "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"], **kw}
    ),
}
FAMILY_NAMES = sorted(TINY_CONFIGS)


def tiny_model(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name](**overrides))
    with torch.no_grad():  # norms start at exactly 1 (or 0); randomise them so slicing errors show
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def random_blocks(n: int = 8, seq_len: int = 32, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=FAMILY_NAMES)
def family_name(request):
    return request.param


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "wikitext2" / "valid.txt").is_file():
        pytest.fail(f"shared data not found at {SHARED_DATA}: tests need ../shared/data beside the checkout")
    return SHARED_DATA


EOS = 256  # byte_tokenizer: ids 0..255 are UTF-8 bytes, 256 is <eos>


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenizes to)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A local byte-level tokenizer (no downloads): token id == UTF-8 byte value, <eos> = 256."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab["<eos>"] = EOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


# --------------------------------------------------------------------------- a throwaway PostgreSQL server
# Self-contained (own imports): `postgres_url` is a fresh, empty database `minitron` on a
# server started on loopback for the session; tests that use it are marked `postgres`.


def _postgres_bin() -> Path:
    import glob

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not found:
        pytest.fail("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl): run `make postgres`")
    return Path(found[-1]).parent


@pytest.fixture(scope="session")
def postgres_server():
    """(bin folder, port) of a server in a temporary folder, stopped and removed at the end."""
    import os
    import shutil
    import socket
    import subprocess
    import tempfile

    bin_dir = _postgres_bin()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # postgres refuses root
    root = Path(tempfile.mkdtemp(prefix="minitron-pg-"))  # under /tmp: the postgres user can reach it
    data, sockets, log = root / "data", root / "sockets", root / "server.log"
    sockets.mkdir()
    if as_postgres:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*command: str) -> None:
        done = subprocess.run([*as_postgres, *command], capture_output=True, text=True)
        if done.returncode != 0:
            tail = log.read_text()[-2000:] if log.is_file() else ""
            pytest.fail(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()} {tail}")

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start")
    try:
        yield bin_dir, port
    finally:
        subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh database `minitron` on the session's server (dropped afterwards, workers or not)."""
    import subprocess

    bin_dir, port = postgres_server
    client = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
    subprocess.run([str(bin_dir / "dropdb"), *client, "--if-exists", "--force", "minitron"], check=True, capture_output=True)
    subprocess.run([str(bin_dir / "createdb"), *client, "minitron"], check=True, capture_output=True)
    yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/minitron"
    subprocess.run([str(bin_dir / "dropdb"), *client, "--if-exists", "--force", "minitron"], capture_output=True)
