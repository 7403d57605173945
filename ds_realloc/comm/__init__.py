"""Executing reallocation plans and moving batches between meshes with torch.distributed."""
