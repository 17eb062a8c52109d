"""What a model is: architecture tables, the forward description, its numpy backend, streamed execution, prompts."""
