"""Robust fine-tuning of a Vision Transformer with AdamW, L2-SP, SPD and FTP.

Run the default study from the repository root::

  python -m examples.vit.train
"""
