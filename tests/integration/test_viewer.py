"""The tree viewer in a real headless Chromium: `forest view` pages for 1,000+ node trees."""

import asyncio
import re
from pathlib import Path

from dataset.problems import Problem
from dataset.records import node_table, preference_pairs, tree_row
from dataset.writer import DatasetWriter
from deploy.cli import main as forest
from search import Budget, MCTSParams, build_prompt, run_mcts
from search.simulated import SimulatedEngine, SimulatedTokenizer
from tests.integration.conftest import run_chromium

TOK = SimulatedTokenizer()


def big_search():
    """A SIMULATED search of well over 1,000 nodes, with markup in its text to be escaped."""
    engine = SimulatedEngine(TOK, seed=2, steps=20, answer=lambda r: "</script><b>42</b>")
    params = MCTSParams(budget=Budget(iterations=500), children=3, early_stop=False, max_depth=30,
                        max_path_tokens=4000)
    return asyncio.run(run_mcts(engine, TOK, TOK.encode(build_prompt("q")), params))


def test_forest_view_draws_every_node_without_console_errors(tmp_path, capsys):
    result = big_search()
    assert result.tree.num_nodes > 1000
    out = tmp_path / "out"
    sink = DatasetWriter(str(out), session="v", flush_trees=1)
    problem = Problem("p1", "q", "42")
    sink.add_tree(node_table(result.tree, run_id="r", tree_id="tree-1", decode=TOK.decode),
                  tree_row(result, problem, run_id="r", tree_id="tree-1", strategy="mcts", model="sim",
                           config_hash_="h"),
                  preference_pairs(result, problem, run_id="r", tree_id="tree-1", decode=TOK.decode))
    page = tmp_path / "tree.html"
    assert forest(["view", str(out), "--tree", "tree-1", "--html", str(page)]) == 0
    dom, console, shot = run_chromium(page.as_uri(), tmp_path)
    assert re.search(r'data-drawn-nodes="(\d+)"', dom).group(1) == str(result.tree.num_nodes)
    assert dom.count("<circle") == result.tree.num_nodes
    assert any(f"drew {result.tree.num_nodes} nodes" in line for line in console), console
    assert not [line for line in console if "Uncaught" in line or "Error" in line], console
    assert Path(shot).stat().st_size > 10_000


def test_forest_view_rejects_bad_and_unknown_ids(tmp_path, capsys):
    assert forest(["view", str(tmp_path), "--tree", "../../etc/passwd"]) == 2
    assert "not a valid id" in capsys.readouterr().err
    assert forest(["view", str(tmp_path), "--tree", "nope"]) == 2
    assert "no tree 'nope'" in capsys.readouterr().err
