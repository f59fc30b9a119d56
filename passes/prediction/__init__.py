"""Prediction: memory of models too big to run, as formulas of batch and sequence length.

In: a model (possibly on the meta device) and example inputs. Out: fake-tensor copies
(``fake_copy``, with ``fake_transformers`` keeping transformers on the real run's path), symbolic
input sizes (``symbolic_inputs``), fitted polynomials (``fit_polynomial``) and the
``MemoryFormula`` of saved bytes and peak (``predict_memory``). Every figure here is a prediction.
"""
