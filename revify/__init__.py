"""revify: make PyTorch training fit in less activation memory."""
from revify.api import RevifyError, inspect, revify
from revify.report import report

__all__ = ["revify", "inspect", "report", "RevifyError"]
__version__ = "0.1.0"
