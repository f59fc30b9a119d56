"""Capture: the model as revify sees it, before any decision.

In: an ``nn.Module`` and example inputs. Out: a ``CallTrace`` (every module call of one
recorded forward, with the tensors that flow between sibling calls: ``record_calls``), fx or
``torch.export`` graphs of the regions and blocks that trace, with the reason each other module
stays eager (``capture``), a networkx view of an fx graph (``dataflow_graph``), and the
parameters PEFT added (``peft_parameters``).
Nothing here decides anything; nothing here imports a later stage.
"""
