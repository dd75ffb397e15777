"""vitkit's version, in a leaf module so that the model files can record it without importing the package."""

__version__ = "0.1.0"
