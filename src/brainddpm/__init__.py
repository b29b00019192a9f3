"""brain-ddpm: train, sample and evaluate a 3D DDPM of T1-weighted brain MRI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("brainddpm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
