"""`patcher web`: a static chat site that runs an export in the visitor's browser (transformers.js)."""
