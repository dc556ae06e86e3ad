"""Whole-slide images: the :class:`Slide` façade, its TIFF fast path, and the tile grid."""
