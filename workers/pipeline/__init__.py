"""The ML pipeline: plain Python with NO Django imports (a test enforces it). Functions take
dataclasses and a ``report(progress, message)`` callback and return dataclasses."""
