"""patchflow: the application shell. The ``patchflow`` command (``patchflow.cli``), the demo
(``patchflow.demo``) and the environment it reads (``patchflow.settings``).

The only package that imports ``flows``; nothing in ``tasks``, ``flows`` or ``patcher`` imports it.
"""
