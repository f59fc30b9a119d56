"""revify's passes, one pass per module, in stage folders that read as the pipeline.

capture → analysis → planning → rewrite; prediction beside them for models too big to run.
Each stage imports only earlier ones and ``revify.runtime``'s data types; each folder's
``__init__`` says what enters and what leaves it.
"""
