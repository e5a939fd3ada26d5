"""``forest make-model --tiny-random DIR``: a small random-weight Qwen2 model with a locally trained tokenizer.

No model hub is reachable, so tests and the demo use a model built here: a byte-level BPE tokenizer trained on
synthetic Marco-o1-style text (ChatML special tokens, a chat template) and a 2-layer Qwen2 with head_dim 64
(vLLM's CPU attention needs >= 64). Weights are random, so outputs are gibberish but carry real logprobs.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from search.prompts import REFLECTION_PHRASE

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def synthetic_corpus(lines: int, seed: int) -> list[str]:
    """Marco-o1-shaped text about small arithmetic problems, enough to train a tokenizer on."""
    rng = random.Random(seed)
    names = ["Ann", "Bo", "Cy", "Dee", "Eli", "Fay"]
    items = ["apples", "books", "coins", "pens", "cards", "eggs"]
    out = []
    for _ in range(lines):
        a, b, name, item = rng.randint(2, 99), rng.randint(2, 99), rng.choice(names), rng.choice(items)
        out.append(
            f"<|im_start|>user\n{name} has {a} {item} and buys {b} more. How many {item} now?<|im_end|>\n"
            f"<|im_start|>assistant\n<Thought>\n{name} starts with {a} {item}.\n\n"
            f"Adding {b} gives {a} + {b} = {a + b}.\n</Thought>\n<Output>\n{a + b}\n</Output><|im_end|>\n"
            f"{REFLECTION_PHRASE}\n")
    return out


def train_tokenizer(out_dir: Path, corpus: list[str], *, vocab_size: int, split_digits: bool = False):
    """Train and save a byte-level BPE tokenizer with the ChatML special tokens and chat template; returns it.

    ``split_digits`` makes every digit its own token (arithmetic is learnable that way)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_random(out_dir: str | Path, *, seed: int = 0, vocab_size: int = 2048, hidden_size: int = 128,
                     layers: int = 2, max_position_embeddings: int = 4096) -> Path:
    """Write the model and tokenizer to ``out_dir``; returns it. Deterministic for a seed."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    real_vocab = len(train_tokenizer(out, synthetic_corpus(4000, seed), vocab_size=vocab_size))
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    eos_id = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"].get("<|im_end|>", 2)
    config = Qwen2Config(
        vocab_size=max(real_vocab, vocab_size), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=hidden_size // 64, num_key_value_heads=hidden_size // 64,
        head_dim=64, max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
        eos_token_id=eos_id, bos_token_id=None, pad_token_id=tokenizer_config.get("pad_token_id", 0),
        torch_dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(eos_token_id=eos_id).save_pretrained(out)
    log.info("wrote a tiny random Qwen2 model (%d parameters) to %s", model.num_parameters(), out)
    return out
