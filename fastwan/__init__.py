"""fastwan: sparse distillation (DMD2 + Video Sparse Attention) for Wan video transformers."""

__version__ = "0.1.0"

# Where presets marked ``bundled`` (weights shipped inside fastwan: the toy world's teacher
# and student) live: "module:function(name) -> folder", imported only when such a preset is
# asked for (fastwan.models.loading.resolve_model_path), so no model code imports them.
BUNDLED_MODELS = ("fastwan.toy.assets:toy_model_path",)
