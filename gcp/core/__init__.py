"""The pruning core: ``prune_detector``'s steps, channel importances, the dependency graph, budgets, the latency
model, the report and the model file format. Imports only torch, torch-pruning, ``grouping`` and gcp's base
modules (``gcp.io``, ``gcp.limits``, ``gcp.vocab``); what it needs from detector families and runtimes it finds
through ``gcp.core.registry``."""
