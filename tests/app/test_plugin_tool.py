"""The plug-in as a training run's final step (plugin.enabled, export --which plugin) and on an exported
classifier (tools/plugin.py): a plug-in head is the head with bias b + log g, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from selmix_dist.classifier import load_classifier, read_run_head
from selmix_dist.config import load_config
from selmix_dist.core import compute_metrics, confusion_counts, head_tail_masks
from selmix_dist.features.reader import load_features
from selmix_dist.report import write_report
from selmix_dist.train.entry import train


def probe(model: torch.nn.Module, size: int) -> torch.Tensor:
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def plugin_run(lite_run, run_overrides, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plugin_run") / "run"
    train(load_config(None, [*run_overrides, f"run.dir={run_dir}", f"data.features={lite_run['cache']}",
                             f"data.split_dir={lite_run['split']}", "plugin.enabled=true"]))
    return run_dir


def test_the_run_logs_the_gain_forecast_and_reports_it(plugin_run):
    # 50 steps, a refresh every 10: refreshes at 0, 10, …, 50 close 5 intervals.
    lines = [json.loads(x) for x in (plugin_run / "forecast.jsonl").read_text().splitlines()]
    assert [(r["from_step"], r["step"]) for r in lines] == [(s, s + 10) for s in range(0, 50, 10)]
    report = write_report(plugin_run)["gain_forecast"]
    assert report["intervals"] == 5
    assert report["predicted_sum"] == pytest.approx(sum(r["predicted"] for r in lines))
    assert report["realised_sum"] == pytest.approx(sum(r["realised"] for r in lines))
    assert "## Does the gain predict?" in (plugin_run / "report.md").read_text()


def test_a_run_with_plugin_enabled_saves_the_plugin_head_and_its_validation_metrics(lite_run, plugin_run, tool,
                                                                                   tmp_path):
    run_dir = plugin_run
    record = json.loads((run_dir / "plugin.json").read_text())
    best, plug = read_run_head(run_dir, "best"), read_run_head(run_dir, "plugin")
    beta = torch.tensor(record["log_weights"])
    assert plug.step == best.step == record["head_step"]
    torch.testing.assert_close(plug.weight, best.weight, rtol=0, atol=0)
    torch.testing.assert_close(plug.bias, best.bias + beta, rtol=0, atol=1e-6)
    # The recorded validation metrics, recomputed from the cached features with the plug-in head.
    val = load_features(lite_run["cache"], "val")
    preds = (val.features.float() @ plug.weight.T + plug.bias).argmax(dim=1)
    train_counts = torch.bincount(load_features(lite_run["cache"], "labeled").labels, minlength=10)
    head, _ = head_tail_masks(train_counts, head_fraction=0.9)
    expected = compute_metrics(confusion_counts(val.labels, preds, 10), head=head)
    assert record["val"]["min_recall"] == expected["min_recall"]
    assert record["val_score"][1] >= record["start_val_score"][1]
    assert "test" in record and set(record["test"]) >= {"min_recall", "h_mean"}
    out = tmp_path / "export"
    assert tool("export").main([str(run_dir), "--out", str(out), "--which", "plugin"]) == 0
    meta = json.loads((out / "selmix_export.json").read_text())
    assert meta["which"] == "plugin" and meta["metrics"]["val"]["metrics"] == record["val"]


def test_tools_plugin_rewrites_the_bias_of_an_export(lite_run, lite_export, tool, tmp_path, capsys):
    out = tmp_path / "plugged"
    code = tool("plugin").main([str(lite_export), str(lite_run["split"] / "val.txt"), "--root",
                                str(lite_run["images"]), "--objective", "h_mean", "--out", str(out),
                                "--no-progress"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "selmix_export.json").read_text())
    beta = torch.tensor(meta["plugin"]["log_weights"])
    before, _, names = load_classifier(lite_export)
    after, _, names_after = load_classifier(out)
    size = lite_run["image_size"]
    torch.testing.assert_close(probe(after, size), probe(before, size) + beta, rtol=1e-5, atol=1e-5)
    assert names_after == names and meta["complete"] and meta["plugin"]["objective"] == "h_mean"
    assert "h_mean" in capsys.readouterr().out


def test_tools_plugin_refuses_its_source_as_target_and_names_a_bad_label(lite_run, lite_export, tool, tmp_path,
                                                                         capsys):
    args = [str(lite_run["split"] / "val.txt"), "--root", str(lite_run["images"]), "--objective", "min_recall",
            "--no-progress"]
    assert tool("plugin").main([str(lite_export), *args, "--out", str(lite_export)]) == 2
    assert "not over its source" in capsys.readouterr().err
    bad = tmp_path / "val.txt"
    bad.write_text((lite_run["split"] / "val.txt").read_text().splitlines()[0].rsplit(" ", 1)[0] + " 12\n")
    assert tool("plugin").main([str(lite_export), str(bad), "--root", str(lite_run["images"]), "--objective",
                                "min_recall", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "label 12" in capsys.readouterr().err
