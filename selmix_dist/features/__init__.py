"""Features: frozen backbones, the on-disk feature cache, and the feature sets the trainer reads.

backbones.py (timm models, Lite weights, transforms) → cache.py (sharded extraction, chunked safetensors
cache) → sets.py (`FeatureSet`, `TrainData`) ← load.py (the sets a config names, cached or online).
"""
