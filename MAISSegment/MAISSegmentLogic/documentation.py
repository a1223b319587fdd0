"""The module's help: where its documentation is (a page that ships with the extension, so the link always works).

Slicer's default link (``getDefaultModuleDocumentationLink``) points to ``slicer.readthedocs.io/.../maissegment.html``,
a page that exists only for Slicer's own modules. MAISSegment's user guide is ``README.md`` beside ``MAISSegment.py``
(installed with the extension by ``MAISSegment/CMakeLists.txt``), linked as a local file. The project's home page
(``EXTENSION_HOMEPAGE`` in the top-level ``CMakeLists.txt``) is the public repository made by
``scripts/release_repository.sh``.
"""

import os
from pathlib import Path

from slicer.i18n import tr as _

from .constants import MODULE_DIR

USER_GUIDE = "README.md"  # beside MAISSegment.py, in a checkout and once installed


def user_guide_path() -> str:
    """The user guide shipped with the module (``<module folder>/README.md``)."""
    return os.path.join(MODULE_DIR, USER_GUIDE)


def help_link_html() -> str:
    """The paragraph appended to the module's help text: a link to the shipped user guide (empty if it is missing)."""
    path = user_guide_path()
    if not os.path.isfile(path):
        return ""
    url = Path(path).resolve().as_uri()
    return (
        "<p>"
        + _(
            "For more information, see the {link_start}MAISSegment user guide{link_end} (installed with the module)."
        ).format(link_start=f'<a href="{url}">', link_end="</a>")
        + "</p>"
    )
