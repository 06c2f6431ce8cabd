"""Fine-tuning runs: the session, the loop, checkpoints, a run's metrics, pissa compare, evaluation and reports.
"""
