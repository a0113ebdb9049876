"""luks-ephemeral-csi: per-pod LUKS2 scratch volumes."""

__version__ = "0.1.0"
