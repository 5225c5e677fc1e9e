"""smarttrim: adaptive per-input token and head trimming (SmartTrim) for vision-language models."""
__version__ = "0.1.0"
