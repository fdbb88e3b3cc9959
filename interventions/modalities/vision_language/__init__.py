"""Vision-language models (LLaVA): loading, images, image-token prompts."""
