"""Files other tools read: QuPath GeoJSON, TRIDENT-style HDF5 features, heatmap TIFFs; atomic writes."""
