"""selmix_dist: distributed SelMix fine-tuning of classifier heads for non-decomposable metrics.

Subpackages: `core` (pure-torch maths: metrics, objectives, gain, P, pair sampler), `data` (sources,
long-tailed splits, backbones, feature cache), `train` (config, trainer, checkpoints, monitoring),
`baselines`; `distributed` is the one module that talks to accelerate / torch.distributed.
"""

__version__ = "0.1.0"
