"""The data loop's second round (``deploy.data_loop``): a build again, by another model, on a real engine."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from tests.integration.conftest import write_build_config


def test_a_second_round_builds_the_problems_again_with_the_given_model(ray_cluster, tiny_model, tmp_path):
    from cluster.config import load_config
    from dataset.problems import Problem
    from deploy.data_loop import build_tokens, second_round_build

    first = tmp_path / "first"
    first.mkdir()
    (first / "manifest.json").write_text(json.dumps({"config": {"build": {"strategy": "best_of_n"}}}))
    config = load_config(write_build_config(tmp_path / "config.yaml", "models/not-this-one"),
                         **{"search.budget_tokens": 96})
    problems = [Problem("q1", "What is 2 + 2?", "4"), Problem("q2", "What is 3 + 5?", "8")]
    output = second_round_build(config, str(first), tiny_model, problems, tmp_path / "work")
    manifest = json.loads((tmp_path / "work" / "tiny-random-round2-build" / "manifest.json").read_text())
    assert manifest["config"]["engine"]["model"] == tiny_model
    assert manifest["config"]["build"]["strategy"] == "best_of_n"  # the first build's strategy, not the config's
    trees = pq.read_table(f"{output}/trees").to_pylist()
    assert sorted(t["problem_id"] for t in trees) == ["q1", "q2"]
    assert {t["reference_answer"] for t in trees} == {"4", "8"}
    assert build_tokens(output, {"q1", "q2"}) == sum(t["tokens_generated"] for t in trees) > 0
