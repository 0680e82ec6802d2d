"""MkDocs hooks of structkd's documentation site (``hooks:`` in ``mkdocs.yml``).

- The site's home page is the README itself: ``docs/index.md`` is replaced by ``README.md``,
  whose links into ``docs/`` (``docs/demo.md``, ``docs/detections.png``) are made relative to
  the site's root, so that the README is written once and its links work on GitHub and here.
- The docstrings' reStructuredText roles (``:func:`fit```) render as plain code in the API
  reference: the role's name is dropped, the code is kept.
"""

from __future__ import annotations

import re
from pathlib import Path

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):(?=<code)")


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != "index.md":
        return markdown
    readme = Path(config["config_file_path"]).parent / "README.md"
    return re.sub(r"\]\(docs/", "](", readme.read_text(encoding="utf-8"))


def on_page_content(html, page, config, files):
    return _ROLE.sub("", html)
