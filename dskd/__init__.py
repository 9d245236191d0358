"""dskd: Decoder-based Sense Knowledge Distillation (arXiv 2602.22351)."""

__version__ = "0.1.0"
