"""selmix_dist: distributed SelMix fine-tuning of classifier heads for non-decomposable metrics.

Rooms, one noun each: `core` (pure-torch maths: confusion, metrics, objectives, gain, P, pair sampler, the
refresh), `data` (image sources, long-tailed splits, shards), `features` (backbones, feature cache, the
feature sets the trainer reads), `heads` (start heads and the head-only baselines), `train` (config and the
training loop with its components), `experiments` (the generic experiment runner), `report`. `distributed`
is the one module that talks to accelerate / torch.distributed; `atomic` the one that renames files.
"""

from selmix_dist.version import __version__  # noqa: F401 - the package's public version


def __getattr__(name: str):  # PEP 562: `selmix_dist.load_classifier` without importing torch/timm on every import
    if name == "load_classifier":
        from selmix_dist.classifier import load_classifier

        return load_classifier
    raise AttributeError(f"module 'selmix_dist' has no attribute {name!r}")
