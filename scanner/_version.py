"""The installed package's version: a leaf that every layer (pipeline, SARIF, the API, the client) may import."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("backdoor-scan")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
