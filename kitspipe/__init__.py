"""kitspipe: an nnU-Net-style pipeline for kidney and kidney-tumour segmentation in CT."""

__version__ = "0.1.0"
