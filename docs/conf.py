"""Sphinx configuration of the celery_guard documentation (MyST Markdown)."""

project = "celery_guard"
author = "celery_guard developers"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
master_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
myst_heading_anchors = 3
