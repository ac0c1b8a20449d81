"""The error a command raises when what the user gave it cannot be used as given.

:class:`InputError` covers a data folder, checkpoint, output file or combination of options that is wrong
for the command (not a bug in Tagstream): the ``tagstream`` command reports it as one line with the usage
exit status 2. Its message says what is wrong and, where there is one, what to pass instead.
"""

from __future__ import annotations


class InputError(ValueError):
    """A command's input (folder, checkpoint, output, options) cannot be used as given."""
