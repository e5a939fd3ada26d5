"""The viewer in a real headless Chromium: `forest view OUT` (an index of the build and a page per tree) and
`forest view OUT --tree ID` for a 5,000-node tree. Trees come from SIMULATED searches written by the real
DatasetWriter; the bundled-model tests view a real build."""

import asyncio
import re
from pathlib import Path

from dataset.problems import Problem
from dataset.records import node_table, preference_pairs, tree_row
from dataset.writer import DatasetWriter, write_manifest
from deploy.cli import main as forest
from deploy.viewer import answer_groups
from search import Budget, MCTSParams, build_prompt, run_mcts
from search.simulated import SimulatedEngine, SimulatedTokenizer
from tests.integration.conftest import run_chromium

TOK = SimulatedTokenizer()
BIG_NODES = 5_000


def search(answer: str, iterations: int, seed: int = 2):
    """A SIMULATED search whose lines answer ``answer``."""
    engine = SimulatedEngine(TOK, seed=seed, steps=20, answer=lambda r: answer)
    params = MCTSParams(budget=Budget(iterations=iterations), children=3, early_stop=False, max_depth=30,
                        max_path_tokens=4000)
    return asyncio.run(run_mcts(engine, TOK, TOK.encode(build_prompt("q")), params))


def write_build(out: Path, trees: list[tuple[str, Problem, object]]) -> None:
    sink = DatasetWriter(str(out), session="v", flush_trees=1)
    for tree_id, problem, result in trees:
        row = tree_row(result, problem, run_id="r", tree_id=tree_id, strategy="mcts", model="sim", config_hash_="h")
        if problem.problem_id == "unanswered":
            row.update(final_answer=None, correct=None)
        sink.add_tree(node_table(result.tree, run_id="r", tree_id=tree_id, decode=TOK.decode), row,
                      preference_pairs(result, problem, run_id="r", tree_id=tree_id, decode=TOK.decode))
    sink.flush()
    write_manifest(str(out), {"run_id": "r", "model": "sim"})


def visible_rows(dom: str) -> int:
    return int(re.search(r'data-visible-rows="(\d+)"', dom).group(1))


def test_a_5000_node_tree_page_shows_the_problem_the_legend_and_every_node(tmp_path):
    result = search("</script><b>42</b>", iterations=1_800)
    assert result.tree.num_nodes >= BIG_NODES
    out = tmp_path / "out"
    write_build(out, [("tree-1", Problem("p1", "What is <6> times 7?", "42"), result)])
    page = tmp_path / "tree.html"
    assert forest(["view", str(out), "--tree", "tree-1", "--html", str(page)]) == 0
    dom, console, shot = run_chromium(page.as_uri(), tmp_path)
    assert re.search(r'data-drawn-nodes="(\d+)"', dom).group(1) == str(result.tree.num_nodes)
    assert dom.count("<circle") >= result.tree.num_nodes  # the legend draws a few more
    assert "What is &lt;6&gt; times 7?" in dom and "chosen line" in dom and "reflection" in dom
    nodes = [{"id": i, "parent": int(result.tree.nodes["parent"][i]), "text": TOK.decode(
        result.tree.node_token_ids(i).tolist()), "terminal": bool(result.tree.nodes["is_terminal"][i]),
        "value": result.tree.mean_value(i), "visits": int(result.tree.nodes["visits"][i])}
        for i in range(result.tree.num_nodes)]
    groups, chosen = answer_groups(nodes, result.path)
    assert f'data-finished-lines="{sum(len(g["lines"]) for g in groups)}"' in dom and groups
    assert "(wrong)" in dom  # the answer carries markup, so it does not match the reference
    assert any(f"drew {result.tree.num_nodes} nodes" in line for line in console), console
    assert not [line for line in console if "Uncaught" in line or "Error" in line], console
    assert Path(shot).stat().st_size > 10_000


def test_the_index_lists_every_tree_and_filters_by_outcome(tmp_path):
    out = tmp_path / "out"
    write_build(out, [("t-right", Problem("right", "How many? (right)", "42"), search("42", 8)),
                      ("t-wrong", Problem("wrong", "How many? (wrong)", "41"), search("42", 8, seed=3)),
                      ("t-none", Problem("unanswered", "How many? (none)", "42"), search("42", 8, seed=4))])
    assert forest(["view", str(out), "--html", str(tmp_path / "view")]) == 0
    index = tmp_path / "view" / "index.html"
    assert {p.name for p in index.parent.iterdir()} == {"index.html", "tree-t-right.html", "tree-t-wrong.html",
                                                         "tree-t-none.html"}
    dom, console, _ = run_chromium(index.as_uri(), tmp_path)
    assert 'data-rows="3"' in dom and visible_rows(dom) == 3
    assert all(f'href="tree-{t}.html"' in dom for t in ("t-right", "t-wrong", "t-none"))
    assert not [line for line in console if "Uncaught" in line or "Error" in line], console
    for outcome, shown in (("wrong", "t-wrong"), ("right", "t-right"), ("unanswered", "t-none")):
        dom, _, _ = run_chromium(f"{index.as_uri()}#filter={outcome}", tmp_path)
        assert visible_rows(dom) == 1
        hidden = set(re.findall(r'<tr data-tree="([^"]+)"[^>]*hidden', dom))
        assert hidden == {"t-right", "t-wrong", "t-none"} - {shown}
    dom, _, _ = run_chromium(f"{index.as_uri()}#text=none", tmp_path)
    assert visible_rows(dom) == 1
    page, _, _ = run_chromium((index.parent / "tree-t-right.html").as_uri(), tmp_path)
    assert "How many? (right)" in page and "(right)" in page and 'href="index.html"' in page


def test_forest_view_rejects_bad_and_unknown_ids(tmp_path, capsys):
    assert forest(["view", str(tmp_path), "--tree", "../../etc/passwd"]) == 2
    assert "not a valid id" in capsys.readouterr().err
    assert forest(["view", str(tmp_path), "--tree", "nope"]) == 2
    assert "no tree 'nope'" in capsys.readouterr().err
    assert forest(["view", str(tmp_path / "nothing")]) == 2
    assert "no Forest build" in capsys.readouterr().err
