"""revify: make PyTorch training fit in less activation memory."""
from revify.api import RevifyError, inspect, revify, stored_activations
from revify.runtime.reversible_chain import ReconstructionError
from revify.report import report

__all__ = ["revify", "inspect", "report", "stored_activations", "RevifyError", "ReconstructionError"]
__version__ = "0.1.0"
