"""What only the notebooks use: the seed's claims and fixes checked, MLflow run history,
figures, classical baselines, the shared notebook set-up, and the main-job runner.

``python -m deblur_lib.notebook`` runs every notebook in ``notebooks/`` (``make demo``).
Needs the ``[notebooks]`` extra (papermill, pandas, jupyterlab) on top of ``[train]``.
"""
