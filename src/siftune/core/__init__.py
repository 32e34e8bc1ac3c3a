"""The sparse step: which components to train (select, budget), where their values live (storage), the
optimizer over them (optim), the hooks that tie them to a model (engine) and a slow dense twin (reference)."""
