"""The problems a dataset is built from: JSONL or Parquet rows with an id, a question and an optional answer.

Bad rows never stop a build: each becomes an ``InputError`` (recorded in ``errors/``) and the good rows go on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator



@dataclass(frozen=True, slots=True)
class Problem:
    """One input row: a question to search, with its reference answer when known."""

    problem_id: str
    question: str
    answer: str | None = None


@dataclass(frozen=True, slots=True)
class InputError:
    problem_id: str
    message: str


def _rows(path: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """(1-based row number, row or None, error) for every row of a JSONL or Parquet file."""
    from dataset.layout import open_output  # pyarrow stays out of the CLI's start-up

    filesystem, resolved = open_output(path)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        with filesystem.open_input_file(resolved) as f:
            for number, row in enumerate(pq.read_table(f).to_pylist(), 1):
                yield number, row, None
        return
    with filesystem.open_input_stream(resolved) as f:
        data = f.read()
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            yield number, None, f"line {number} is not valid JSON: {exc}"
            continue
        if not isinstance(row, dict):
            yield number, None, f"line {number} is a JSON {type(row).__name__}, not an object"
            continue
        yield number, row, None


def read_problems(path: str, *, id_field: str = "id", question_field: str = "question",
                  answer_field: str = "answer") -> tuple[list[Problem], list[InputError]]:
    """Valid problems in file order, and one error per bad row (a missing id falls back to ``row-N``)."""
    problems, errors, first_seen = [], [], {}
    for number, row, error in _rows(path):
        if row is None:
            errors.append(InputError(f"row-{number}", error))
            continue
        problem_id = str(row[id_field]) if row.get(id_field) not in (None, "") else f"row-{number}"
        question, answer = row.get(question_field), row.get(answer_field)
        problem_error = None
        if question is None:
            problem_error = f"row {number}: missing field {question_field!r}"
        elif not isinstance(question, str):
            problem_error = f"row {number}: {question_field!r} must be a string, got {type(question).__name__}"
        elif not question.strip():
            problem_error = f"row {number}: {question_field!r} is empty"
        elif problem_id in first_seen:
            problem_error = f"row {number}: duplicate id {problem_id!r} (first at row {first_seen[problem_id]})"
        if problem_error:
            errors.append(InputError(problem_id, problem_error))
            continue
        first_seen[problem_id] = number
        problems.append(Problem(problem_id, question, None if answer is None else str(answer)))
    return problems, errors
