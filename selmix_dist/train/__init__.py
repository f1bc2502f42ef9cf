"""Training: `entry.train(load_config(path, overrides))`, or `Trainer(cfg, TrainData(...)).run()` and `close()`.

trainer.py is the loop; rundir, lock, checkpointer, resume, evaluator, refresher, stopping, monitor, preemption
and build are its components, each owning one concern; the trainer owns them and none imports it (tests/
test_imports.py). The one config system is selmix_dist.config, below every package that reads it.
"""
