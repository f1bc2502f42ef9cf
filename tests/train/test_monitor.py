"""The monitor on its own: class-named TensorBoard tags, the config as text and hparams, the summary lines."""

from __future__ import annotations

import logging

import torch

from selmix_dist.config import config_yaml, flatten, load_config
from selmix_dist.train.monitor import Monitor
from selmix_dist.train.rundir import RunDir


def test_tags_named_by_class_config_text_and_hparams(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir(tmp_path / "run")
    run.open(fresh=True)
    cfg = load_config(None, [f"run.dir={run.root}", "optim.lr=0.02"])
    names = ["tabby cat", "golden/retriever", "ant"]
    monitor = Monitor(run, enabled=True, tensorboard=True, start_step=0, total_steps=10, progress=False,
                      class_names=names)
    monitor.run_config(flatten(cfg), config_yaml(cfg), ["val/min_recall"])
    monitor.evaluation(0, "val", {"min_recall": 0.25, "mean_recall": 0.5}, torch.tensor([0.25, 0.5, 0.75]))
    monitor.evaluation(10, "val", {"min_recall": 0.5, "mean_recall": 0.6}, torch.tensor([0.5, 0.6, 0.7]))
    with caplog.at_level(logging.INFO, logger="selmix_dist"):
        monitor.summary(10, {"metric": 0.5, "step": 10}, "min_recall", run)
    monitor.close()
    run.close()
    acc = EventAccumulator(str(run.tensorboard), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for k, name in enumerate(["tabby_cat", "golden_retriever", "ant"]):
        tag = f"val/per_class_recall/{k:03d}_{name}"
        assert tag in scalars, scalars
        assert [e.value for e in acc.Scalars(tag)] == [float(torch.tensor([0.25, 0.5, 0.75])[k]),
                                                       float(torch.tensor([0.5, 0.6, 0.7])[k])]
    tensors = acc.Tags()["tensors"]
    assert "config/text_summary" in tensors
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lr: 0.02" in text
    hparams = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in hparams and "_hparams_/session_start_info" in hparams
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["optim.lr"].number_value == 0.02
    assert "val min_recall: 0.2500 at step 0 → 0.5000 at step 10" in caplog.text
    assert "best validation min_recall 0.5000 at step 10" in caplog.text
    listed = run.manifest()["artifacts"]
    assert "history.jsonl" in listed and any(a.startswith("tb/events.out.tfevents") for a in listed)
