"""revify: make PyTorch training fit in less activation memory."""
from revify.api import BudgetError, RevifyError, inspect, revify, stored_activations
from revify.checkpoint_io import load, save
from revify.estimate import estimate
from revify.runtime.reversible_chain import ReconstructionError
from revify.report import report

__all__ = ["revify", "inspect", "report", "estimate", "save", "load", "stored_activations", "RevifyError",
           "BudgetError", "ReconstructionError"]
__version__ = "0.1.0"
