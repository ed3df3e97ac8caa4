"""Integrations of fusedloss with other libraries, each an optional dependency imported only
by its own module: `fusedloss.integrations.transformers` (Hugging Face transformers)."""
