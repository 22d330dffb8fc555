"""DICOM and pixel rules: which files form a series, how a derived slice is written, UIDs, fidelity checks."""
