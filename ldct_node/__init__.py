"""ldct-node: a DICOM node that makes low-dose CT readable with the TSC-Net student network."""

__version__ = "0.1.0"
