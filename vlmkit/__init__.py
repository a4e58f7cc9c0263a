"""vlmkit: build, train, evaluate and stress-test vision-language models."""

__version__ = "0.1.0"
