"""The errors the logic raises for the user: the message says what to do."""


class MAISSegmentError(RuntimeError):
    """A problem the user can fix (missing dependency, no model, wrong nodes); the message says how."""


class RewriteNeeded(MAISSegmentError):
    """The segment was made with other weights than the model in use: its points replayed with this model give
    another mask everywhere, so the next update would rewrite the whole segment. Nothing was changed; call
    :meth:`MAISSegmentLogic.allow_rewrite` once the user agrees, then update again."""
