"""Video Sparse Attention (VSA): coarse tile attention, top-k tile selection, fine block
attention, and a learned gate. One public function, several backends."""

from fastwan.attention.api import resolve_backend, video_sparse_attention
from fastwan.attention.reference import vsa_reference
from fastwan.attention.tiling import TilePlan, get_tile_plan, num_selected_tiles

__all__ = [
    "TilePlan",
    "get_tile_plan",
    "num_selected_tiles",
    "resolve_backend",
    "video_sparse_attention",
    "vsa_reference",
]
