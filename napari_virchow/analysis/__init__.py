"""What the embeddings are used for: probe heads, clusters, similarity, the cohort index, rasters."""
