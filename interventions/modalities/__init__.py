"""Modalities beyond text: vision-language (LLaVA) and text-to-image (diffusers)."""
