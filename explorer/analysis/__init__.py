"""Pure analyses of an Explanation (numpy only): rollout, maps, distance, position embeddings."""
from .rollout import RolloutOptions, rollout_row, rollout_matrix, patch_map, mass_on, object_patches
from .maps import query_maps, inner_map, word_grid, token_norms, prefix_share
from .distance import mean_attention_distance, conv_receptive_field, conv_mean_distance
from .posembed import similarity_tiles, sincos_1d, sincos_2d, neighbour_structure

__all__ = ["RolloutOptions", "rollout_row", "rollout_matrix", "patch_map", "mass_on", "object_patches", "query_maps",
           "inner_map", "word_grid", "token_norms", "prefix_share", "mean_attention_distance",
           "conv_receptive_field", "conv_mean_distance", "similarity_tiles", "sincos_1d",
           "sincos_2d", "neighbour_structure"]
