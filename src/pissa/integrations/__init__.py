"""Other libraries around pissa models: transformers' Trainer and TRL (:mod:`.trainer`), and the experiment trackers
TensorBoard, MLflow and trackio (:mod:`.tracking`, ``--report-to``).
"""
