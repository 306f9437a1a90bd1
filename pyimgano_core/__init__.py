"""pyimgano: pixel-first industrial visual anomaly detection (library)."""
__version__ = "0.1.0"
