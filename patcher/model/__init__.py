"""What a model is: architecture tables, the forward description, its numpy backend, streamed execution,
prompts, and the one opened Model every command uses."""
