"""Text-to-image models (diffusers): pipelines, tracing, cross-attention maps, attacks."""
