"""Inspecting what a Vision Transformer learned (paper Sec. 4.5, Fig. 6 and 7).

Pure array functions (arrays in, numpy arrays out, no plotting) for each analysis:

- :func:`patch_embedding_pca`: principal components of the patch-embedding filters;
- :func:`position_embedding_similarity`: cosine similarity grid of the position embeddings;
- :func:`mean_attention_distance`: attention-weighted distance per head, in pixels;
- :func:`attention_rollout` and :func:`class_attention`: attention maps over the patch grid.

:func:`analyze_model` runs them all on a model and images; :func:`analyze` (also ``vitkit analyze``)
loads a model and a data set and writes figures, numbers and an ``index.html`` report.
"""

from vitkit.analysis.attention import attention_rollout, class_attention, rollout_matrix
from vitkit.analysis.distance import grid_mean_distance, mean_attention_distance, patch_distances
from vitkit.analysis.filters import FilterPCA, patch_embedding_pca
from vitkit.analysis.pipeline import ModelAnalysis, analyze_model, patch_projection_weight
from vitkit.analysis.position import position_embedding_similarity, similarity_by_distance
from vitkit.analysis.report import analyze, write_report

__all__ = [
    "FilterPCA", "ModelAnalysis", "analyze", "analyze_model", "attention_rollout", "class_attention",
    "grid_mean_distance", "mean_attention_distance", "patch_distances", "patch_embedding_pca",
    "patch_projection_weight", "position_embedding_similarity", "rollout_matrix", "similarity_by_distance",
    "write_report",
]
