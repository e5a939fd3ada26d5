"""Problems in, Parquet out, without Ray: input validation, node rows, commit markers and resume cleanup."""

import asyncio
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from dataset.exports import read_pairs, write_exports
from dataset.problems import Problem, read_problems
from dataset.reader import committed_problem_ids, recorded_errors, remove_uncommitted
from dataset.records import node_table, preference_pairs, tree_row
from dataset.writer import DatasetWriter
from search import Budget, MCTSParams, build_prompt, run_mcts
from search.confidence import token_confidence
from search.simulated import SimulatedEngine, SimulatedTokenizer

TOK = SimulatedTokenizer()


def write_lines(path, lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return str(path)


def test_bad_rows_are_reported_and_good_rows_kept(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        json.dumps({"id": "a", "question": "1+1?", "answer": 2}),
        json.dumps({"id": "b"}),
        json.dumps({"id": "c", "question": "  "}),
        json.dumps({"id": "d", "question": 17}),
        json.dumps({"id": "a", "question": "again?"}),
        "{not json",
        b"\xff\xfe binary",
        json.dumps(["a", "list"]),
        json.dumps({"question": "no id"}),
    ])
    problems, errors = read_problems(path)
    assert [p.problem_id for p in problems] == ["a", "row-9"]
    assert problems[0].answer == "2"
    messages = {e.problem_id: e.message for e in errors}
    assert "missing field 'question'" in messages["b"]
    assert "is empty" in messages["c"]
    assert "must be a string, got int" in messages["d"]
    assert "duplicate id 'a' (first at row 1)" in [e.message for e in errors if e.problem_id == "a"][0]
    assert "not valid JSON" in messages["row-6"] and "not valid JSON" in messages["row-7"]
    assert "not an object" in messages["row-8"]


def test_configurable_field_names_and_parquet_input(tmp_path):
    import pyarrow as pa
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"key": ["x", "y"], "prompt": ["q1", "q2"], "gold": ["1", None]}), path)
    problems, errors = read_problems(str(path), id_field="key", question_field="prompt", answer_field="gold")
    assert problems == [Problem("x", "q1", "1"), Problem("y", "q2", None)] and errors == []


def search_result(seed=0):
    prompt = TOK.encode(build_prompt("q"))
    params = MCTSParams(budget=Budget(iterations=12), children=3)
    return asyncio.run(run_mcts(SimulatedEngine(TOK, seed=seed), TOK, prompt, params, reference="42"))


def test_node_rows_carry_the_tree_and_confidence_recomputes_from_top5():
    result = search_result()
    result.tree.nodes["weight"][1] = 3  # as if two more samples had repeated node 1
    table = node_table(result.tree, run_id="r", tree_id="t", decode=TOK.decode)
    assert table.num_rows == result.tree.num_nodes
    rows = table.to_pylist()
    assert rows[0]["parent_id"] == -1 and rows[0]["kind"] == "root" and rows[0]["token_ids"] == []
    for row in rows[1:]:
        assert row["token_ids"] and len(row["top_ids"]) == len(row["token_ids"])
        assert all(len(t) == 5 for t in row["top_logprobs"])
        c = token_confidence(np.array(row["token_ids"]), np.array(row["logprobs"]), np.array(row["top_ids"]),
                             np.array(row["top_logprobs"]))
        assert row["confidence"] == pytest.approx(c.mean(), rel=1e-5)
        assert row["text"] == TOK.decode(row["token_ids"])
    assert sum(r["visits"] for r in rows if r["parent_id"] == 0) == rows[0]["visits"]
    assert [r["weight"] for r in rows] == result.tree.nodes["weight"][:len(rows)].tolist() and rows[1]["weight"] == 3
    assert [r["exhausted"] for r in rows] == result.tree.nodes["exhausted"][:len(rows)].tolist()


def test_sink_commits_trees_last_and_resume_removes_uncommitted_parts(tmp_path):
    out = str(tmp_path / "out")
    sink = DatasetWriter(out, session="s1", flush_trees=100)
    for i in range(3):
        result = search_result(seed=i)
        problem = Problem(f"p{i}", "q", "42")
        sink.add_tree(node_table(result.tree, run_id="r", tree_id=f"t{i}", decode=TOK.decode),
                      tree_row(result, problem, run_id="r", tree_id=f"t{i}", strategy="mcts", model="sim",
                               config_hash_="h"),
                      preference_pairs(result, problem, run_id="r", tree_id=f"t{i}", decode=TOK.decode))
    sink.add_errors([{"run_id": "r", "problem_id": "bad", "stage": "input", "message": "empty"}])
    assert committed_problem_ids(out) == set()  # nothing is visible before a flush
    sink.flush()
    assert committed_problem_ids(out) == {"p0", "p1", "p2"}
    assert recorded_errors(out) == {("bad", "input", "empty")}
    # a crash after the nodes part but before its trees part, plus a half-written temporary file
    (tmp_path / "out" / "nodes" / "part-s2-000000.parquet").write_bytes(b"partial")
    (tmp_path / "out" / "trees" / "_tmp-part-s2-000000.parquet").write_bytes(b"partial")
    assert remove_uncommitted(out) == 2
    counts = write_exports(out, {"run_id": "r"})
    assert counts["trees"] == 3 and counts["errors"] == 1
    nodes = pq.read_table(tmp_path / "out" / "nodes")
    assert set(nodes.column("tree_id").to_pylist()) == {"t0", "t1", "t2"}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["trees"] == 3
    sft = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == counts["sft_rows"] == 3 and all("<Output>" in r["response"] for r in sft)
    pairs = pq.read_table(tmp_path / "out" / "pairs.parquet").to_pylist()
    assert all(p["chosen_value"] > p["rejected_value"] for p in pairs)
    assert pairs and all(p["prompt"] == (p["question"] + "\n" + p["prefix"] if p["prefix"] else p["question"])
                         for p in pairs)
    assert read_pairs(str(tmp_path / "out" / "pairs.parquet")) == [
        {k: p[k] for k in ("problem_id", "question", "prefix", "chosen", "rejected")} for p in pairs]


def test_writer_writes_through_a_filesystem_uri(tmp_path):
    uri = (tmp_path / "out").as_uri()  # file:///...: the same code path as s3:// or gs://
    sink = DatasetWriter(uri, session="u", flush_trees=64)
    sink.add_errors([{"run_id": "r", "problem_id": "x", "stage": "input", "message": "m"}])
    sink.flush()
    assert recorded_errors(uri) == {("x", "input", "m")} and committed_problem_ids(uri) == set()
    assert list((tmp_path / "out" / "errors").glob("part-u-*.parquet"))


def test_the_writer_records_each_error_once(tmp_path):
    """A manager that dies after reporting a failure has the problem redone elsewhere, where it fails again."""
    out = str(tmp_path / "out")
    earlier = {"run_id": "r", "problem_id": "bad", "stage": "input", "message": "empty"}
    failed = {"run_id": "r", "problem_id": "long", "stage": "prompt", "message": "prompt has 3000 tokens"}
    sink = DatasetWriter(out, session="s1", flush_trees=100, recorded={("bad", "input", "empty")})
    sink.add_errors([earlier, failed])
    sink.add_errors([failed, {**failed, "stage": "search"}])
    sink.flush()
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert sorted((e["problem_id"], e["stage"]) for e in errors) == [("long", "prompt"), ("long", "search")]
