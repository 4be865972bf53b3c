"""The servers iomux is measured against, all started the same way.

Every peer takes ``--port P --ready-file PATH`` (plus ``--host``), writes the
same ready file as ``iomux serve --ready-file`` once it is listening, and exits
0 on SIGTERM, so the runner starts and stops each of them alike.
"""
