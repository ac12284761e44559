"""The CLIP machinery every trainer shares: backbones and their weight files, the prompt layer
(text and image encoders that take deep prompts), description files, the image/text feature cache
and the readers of checkpoints written by the original code.

Scripts, benchmarks and tests import these modules directly (``from clipkit.backbones import
load_backbone``); trainers build on ``trainers.base.CLIPTrainer``.
"""
