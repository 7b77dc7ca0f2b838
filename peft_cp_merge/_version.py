"""The installed version of peft-cp-merge, looked up once for every module that records it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("peft-cp-merge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
