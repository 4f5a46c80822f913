"""rbee's border to what it does not own: the hub's vendors and the byte transfer, the
Hugging Face cache layout, the packaged model, and the vLLM engine. Ray stays out of it."""
