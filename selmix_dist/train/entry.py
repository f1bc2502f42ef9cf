"""`train(cfg)`: build the data the config names, run the trainer, close accelerate."""

from __future__ import annotations

from typing import Any

from selmix_dist import distributed as dist
from selmix_dist.features.load import train_data
from selmix_dist.train.config import Config
from selmix_dist.train.trainer import Trainer


def train(cfg: Config) -> dict[str, Any]:
    """Run one SelMix fine-tuning job as configured; returns the trainer's summary."""
    acc = dist.make_accelerator()
    try:
        data = train_data(cfg, acc.device)
        trainer = Trainer(cfg, data, accelerator=acc)
        summary = trainer.run()
    except BaseException:
        acc.end_training()  # no barrier here: the other ranks may not be coming
        raise
    trainer.close()
    return summary
