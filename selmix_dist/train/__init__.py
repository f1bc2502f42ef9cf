"""Training: `entry.train(load_config(path, overrides))`, or `Trainer(cfg, TrainData(...)).run()` and `close()`.

trainer.py is the loop; rundir, lock, checkpointer, resume, evaluator, refresher, monitor, preemption and build
are its components, each owning one concern; config.py is the one config system.
"""
