"""Marco-o1's chat format and answer handling.

Prompts use Qwen's ChatML; responses look like ``<Thought>...</Thought>\n<Output>...</Output>``.
"""

from __future__ import annotations

import re

DEFAULT_SYSTEM_PROMPT = (
    "You are a well-trained AI assistant. Important: when answering, think inside <Thought> and </Thought>, "
    "mostly in English. Then give the result inside <Output> and </Output>, in the language of the user's "
    "question."
)
REFLECTION_PHRASE = "Wait! Maybe I made some mistakes! I need to rethink from scratch."
"""Marco-o1's reflection: forced where a thought ends, then the model continues."""

THOUGHT_END = "</Thought>"
OUTPUT_START = "<Output>"
OUTPUT_END = "</Output>"

MIN_GENERATION_ROOM = 16
"""A prompt must leave at least this many tokens of the model's context to generate into."""

_TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>\n"
"""What closes a ChatML turn (after a prompt's answer, where a model that reads whole conversations expects it)."""
_ASSISTANT_HEADER = f"{_TURN_START}assistant\n"
_CHAT_TURN = re.compile(re.escape(_TURN_START) + r"(\w+)\n(.*?)" + re.escape(TURN_END), re.DOTALL)
_OUTPUT_RE = re.compile(r"<Output>(.*?)(?:</Output>|$)", re.DOTALL)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def build_prompt(question: str, *, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The ChatML text the model sees before its answer."""
    return build_chat_prompt([("user", question)], system_prompt=system_prompt)


def prompt_token_ids(tokenizer, question: str, *, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """The token ids of ``build_prompt(question)``: what a search starts from (``tokenizer``: a ``Tokenizer``)."""
    return tokenizer.encode(build_prompt(question, system_prompt=system_prompt))


def build_chat_prompt(messages: list[tuple[str, str]], *, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """ChatML for a conversation of (role, content); a leading system message replaces ``system_prompt``."""
    if messages and messages[0][0] == "system":
        system_prompt, messages = messages[0][1], messages[1:]
    turns = "".join(f"{_TURN_START}{role}\n{content}{TURN_END}" for role, content in messages)
    return f"{_TURN_START}system\n{system_prompt}{TURN_END}{turns}{_ASSISTANT_HEADER}"


def parse_chat_prompt(text: str) -> list[tuple[str, str]]:
    """The (role, content) turns of a ``build_chat_prompt`` text, its system message first; ValueError for text
    that is not such a prompt."""
    turns, end = [], 0
    for match in _CHAT_TURN.finditer(text):
        if match.start() != end:
            break
        turns.append((match.group(1), match.group(2)))
        end = match.end()
    if not turns or turns[0][0] != "system" or text[end:] != _ASSISTANT_HEADER:
        raise ValueError(f"not a ChatML prompt ending in an assistant header: {text[:80]!r}...")
    return turns


def extract_answer(response: str) -> str | None:
    """The text inside the last ``<Output>`` block, stripped; an unclosed block runs to the end.

    None when there is no ``<Output>`` or it is empty.
    """
    matches = _OUTPUT_RE.findall(response)
    if not matches:
        return None
    answer = matches[-1].strip()
    return answer or None


def normalize_answer(answer: str) -> str:
    """Comparable form: the last number in the text if there is one (commas dropped, 3.0 -> 3), else
    lower-cased text with whitespace collapsed."""
    numbers = _NUMBER_RE.findall(answer)
    if numbers:
        value = float(numbers[-1].replace(",", ""))
        return str(int(value)) if value.is_integer() else repr(value)
    return " ".join(answer.lower().split())


def answers_match(answer: str | None, reference: str | None) -> bool:
    if answer is None or reference is None:
        return False
    return normalize_answer(answer) == normalize_answer(reference)


def split_response(response: str) -> tuple[str, str | None]:
    """(reasoning, answer): the reasoning is the response before ``<Output>`` with the Thought tags removed."""
    reasoning = response.split(OUTPUT_START, 1)[0]
    reasoning = reasoning.replace("<Thought>", "").replace(THOUGHT_END, "").strip()
    return reasoning, extract_answer(response)
