"""Activation patching: interventions on visual embeddings and the residual stream, and a batched engine."""
