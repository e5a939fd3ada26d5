"""The search core's ``Tokenizer`` protocol over a Hugging Face tokenizer."""

from __future__ import annotations

from typing import Sequence


class HFTokenizer:
    """Text is derived from token ids for display and answer extraction; special tokens are dropped."""

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(model_dir)
        self.eos_token_id = self.hf.eos_token_id
        # The Rust tokenizer itself decodes about twice as fast as transformers' decode, which adds a Python layer
        # per call (the tree manager decodes every chunk); the same text unless transformers would also clean up
        # spaces around punctuation.
        backend = getattr(self.hf, "backend_tokenizer", None)
        self._rust = None if backend is None or self.hf.clean_up_tokenization_spaces else backend

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, token_ids: Sequence[int]) -> str:
        if self._rust is not None:
            return self._rust.decode(list(token_ids), skip_special_tokens=True)
        return self.hf.decode(list(token_ids), skip_special_tokens=True)
