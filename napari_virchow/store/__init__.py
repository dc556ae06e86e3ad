"""The embedding cache: one zarr store per (slide, encoder, weights, µm/px, tile size), and the cache root."""
