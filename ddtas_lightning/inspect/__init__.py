"""Looking at a trained embedding: which queries fail (retrieval gallery), do the classes separate
(embedding map), and the embeddings themselves for search outside the framework (exports).

Pure numpy / torch / PIL / matplotlib code on already computed embeddings; ``evaluate.py`` calls it.
"""

from ddtas_lightning.inspect.embedding_map import embedding_map
from ddtas_lightning.inspect.exports import export_embeddings, load_exports
from ddtas_lightning.inspect.gallery import (
    gallery_rows,
    render_gallery_html,
    render_gallery_png,
    select_queries,
)

__all__ = [
    "embedding_map",
    "export_embeddings",
    "gallery_rows",
    "load_exports",
    "render_gallery_html",
    "render_gallery_png",
    "select_queries",
]
