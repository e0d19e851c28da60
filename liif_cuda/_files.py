"""File helpers shared by the writers of outputs and checkpoints."""

import os


def give_default_mode(path):
    """mkstemp makes files private (0600); a file written through a temporary one gets the mode any
    new file gets here (0666 less the umask), so that others read it as they would a file written
    in place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
