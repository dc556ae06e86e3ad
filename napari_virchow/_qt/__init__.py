"""Everything that imports Qt or napari: the dock widget, viewport watching, layers, the demo."""
