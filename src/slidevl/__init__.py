"""slidevl: vision-language analysis of whole-slide pathology images."""

__version__ = "0.1.0"
