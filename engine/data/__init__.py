"""Pairwise preference data: readers, handlers, prompt-type templates, preprocessing to indexed shards."""
