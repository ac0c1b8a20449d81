"""Tools: commands that use the stages without a worker (``tagstream tag``, ``extract``) or around one
(``tagstream demo``, which starts Redis when none is configured and runs a worker in-process).

In: local files and folders. Out: documents and feature stores on stdout and disk. :mod:`.local_redis`
runs a private ``redis-server`` for the demo and the tests. The top layer: nothing else imports it.
"""
