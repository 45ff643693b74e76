"""The web UI (``fastwan ui``): Gradio page over plain, testable handler functions."""

from fastwan.ui.app import (
    CompareResult,
    FastWanUI,
    LazyModel,
    SizeOptions,
    VideoResult,
    build_app,
    launch,
    size_options,
)

__all__ = [
    "CompareResult",
    "FastWanUI",
    "LazyModel",
    "SizeOptions",
    "VideoResult",
    "build_app",
    "launch",
    "size_options",
]
