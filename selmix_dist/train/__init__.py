"""The SelMix trainer: `train(load_config(path, overrides))`, or `Trainer(cfg, TrainData(...)).run()`."""
