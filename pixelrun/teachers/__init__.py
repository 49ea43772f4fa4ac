"""Frozen pretrained networks used as training signals (perceptual and representation losses).

Each teacher is defined here in plain PyTorch (no torchvision, no timm: neither works beside the
pinned torch) and loads third-party weight files by their published key layout.
"""
