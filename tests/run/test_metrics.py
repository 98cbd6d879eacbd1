"""run/metrics.py: the comparison plot of several runs."""

import json

import pytest

from transformer.run.metrics import plot_comparison, read_metrics


def _run(folder, records):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


def test_plot_comparison_draws_each_runs_metric_and_names_a_run_without_it(tmp_path):
    a = _run(tmp_path / "a", [{"step": 0, "split": "run"}, {"step": 10, "split": "train", "accuracy": 0.4},
                              {"step": 10, "split": "validation", "accuracy": 0.5},
                              {"step": 20, "split": "validation", "accuracy": 0.7, "perplexity": 3.0}])
    b = _run(tmp_path / "b", [{"step": 10, "split": "validation", "accuracy": 0.6}])
    out = plot_comparison({"scratch": a, "tuned": b}, str(tmp_path / "both.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [r["step"] for r in read_metrics(a) if r["split"] == "validation"] == [10, 20]
    with pytest.raises(ValueError, match=f"{b} has no validation perplexity"):
        plot_comparison({"scratch": a, "tuned": b}, str(tmp_path / "x.png"), metric="perplexity")
